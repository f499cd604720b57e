"""One dependency list: requirements*.txt mirror pyproject.toml; the accelerator extras pass
through to jax's; the shipped data is package data; the package imports no third-party
module that is not a dependency."""
from __future__ import annotations

import ast
import pathlib
import re
import sys

if sys.version_info >= (3, 11):
  import tomllib
else:  # pragma: no cover
  import tomli as tomllib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(path: pathlib.Path) -> list[str]:
  lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
  return [line for line in lines if line]


def _norm(req: str) -> str:
  return re.sub(r"\s+", "", req).lower()


# The accelerator extras: each is jax's extra of the same name.
ACCELERATOR_EXTRAS = ("cuda12", "tpu")


def test_requirements_files_mirror_pyproject():
  project = PYPROJECT["project"]
  assert (sorted(map(_norm, _requirements(ROOT / "requirements.txt")))
          == sorted(map(_norm, project["dependencies"])))
  extras = project["optional-dependencies"]
  assert set(extras) == {"test", *ACCELERATOR_EXTRAS}
  for extra, requirements in extras.items():
    path = ROOT / ("requirements-dev.txt" if extra == "test" else f"requirements-{extra}.txt")
    assert sorted(map(_norm, _requirements(path))) == sorted(map(_norm, requirements)), path


def test_accelerator_extras_pass_through_to_jax():
  """Catches an extra that asks jax for an extra jax does not have (pip only warns and
  installs the CPU build) or for another jax version than the package needs."""
  import importlib.metadata
  project = PYPROJECT["project"]
  (jax_req,) = [r for r in project["dependencies"] if _name(r) == "jax"]
  provided = importlib.metadata.metadata("jax").get_all("Provides-Extra")
  for extra in ACCELERATOR_EXTRAS:
    assert project["optional-dependencies"][extra] == [jax_req.replace("jax", f"jax[{extra}]")]
    assert extra in provided, f"the installed jax has no [{extra}] extra"


def _name(req: str) -> str:
  return re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0].lower().replace("_", "-")


# Distribution name -> the module it installs, where they differ.
_MODULE = {"orbax-checkpoint": "orbax", "faiss-cpu": "faiss", "tomli": "tomli",
           "tensorboardx": "tensorboardX"}


def _imports(paths) -> set[str]:
  found = set()
  for path in paths:
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        found.update(a.name.split(".")[0] for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        found.add(node.module.split(".")[0])
  return found


def test_every_dependency_is_imported_and_every_import_is_a_dependency():
  runtime = {_MODULE.get(_name(r), _name(r)) for r in PYPROJECT["project"]["dependencies"]}
  test = {_MODULE.get(_name(r), _name(r))
          for r in PYPROJECT["project"]["optional-dependencies"]["test"]}
  library = _imports((ROOT / "spreading_jax").glob("*.py"))
  tests = _imports((ROOT / "tests").glob("*.py"))
  local = {p.stem for p in (ROOT / "tests").glob("*.py")}  # the tests' own helpers
  third_party = lambda names: {n for n in names  # noqa: E731
                               if n not in sys.stdlib_module_names and n not in (
                                   "spreading_jax", *local)}
  # faiss is optional at run time (baselines import it lazily) and comes with the extra.
  assert third_party(library) - runtime <= {"faiss"}
  assert third_party(tests) - runtime - test == set()
  unused = runtime - third_party(library) - third_party(tests)
  assert not unused, f"listed but imported nowhere: {sorted(unused)}"


def test_shipped_data_is_package_data():
  patterns = PYPROJECT["tool"]["setuptools"]["package-data"]["spreading_jax"]
  shipped = sorted(p.relative_to(ROOT / "spreading_jax").as_posix()
                   for p in (ROOT / "spreading_jax" / "_shipped").iterdir())
  assert shipped == ["_shipped/LICENSE-fashion-mnist", "_shipped/SOURCE.md",
                     "_shipped/fashion-mnist-mini.npz.xz"]
  assert all(any(pathlib.PurePath(f).match(p) for p in patterns) for f in shipped)
  assert PYPROJECT["project"]["license"] == "MIT"
  size = (ROOT / "spreading_jax" / "_shipped" / "fashion-mnist-mini.npz.xz").stat().st_size
  assert size <= 15 * 2**20
