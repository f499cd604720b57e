"""The package's own import graph: layers that only point down, and no cycles.

Every ``spreading_jax/*.py`` is parsed (nothing is imported) and every import of a
package module counts, at module level or inside a function: a function-level import
that dodges a cycle is still the cycle. A module may import its own layer or the layers
below it; a new module must be given a layer here.
"""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "spreading_jax"

# Lowest first. Within a layer imports are allowed in any direction that makes no cycle.
LAYERS = (
    # foundations: checks, signals, meshes, output rules, the network, the losses, faiss,
    # row sampling, recall@k
    ("_validation", "_signals", "sharding", "_outputs", "catalyzer", "losses",
     "faiss_factory", "sampling", "metrics"),
    # files and codes
    ("_files", "vecs_io", "binary", "lattice"),
    # the top-k engine, then the searches built on it, then exact groundtruth
    ("topk",),
    ("hamming", "lattice_search"),
    ("search",),
    ("groundtruth",),
    # datasets (their groundtruth), neighbour graphs, mining, quantizers
    ("datasets", "knn_graph", "mining", "quantizers"),
    # the recipe's description
    ("config",),
    # a trained model, its checkpoints and logs
    ("model", "checkpoint", "_tensorboard"),
    # inference and evaluation
    ("encode", "index", "evaluate", "baselines", "report"),
    # training, choosing a shape, then both
    ("train",),
    ("selection",),
    ("autoshape",),
    # entry points
    ("cli", "__main__", "__init__"),
)

# Upward edges tolerated for now, each with the reason and who removes it (none today).
ALLOWED_UPWARD: set = set()


def layer_of() -> dict[str, int]:
  return {name: i for i, layer in enumerate(LAYERS) for name in layer}


def package_modules() -> set[str]:
  return {p.stem for p in PACKAGE.glob("*.py")}


def imports_of(path: Path, modules: set[str]) -> set[str]:
  """Package modules that ``path`` imports anywhere in its body."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
    if isinstance(node, ast.Import):
      for alias in node.names:
        parts = alias.name.split(".")
        if parts[0] == "spreading_jax" and len(parts) > 1:
          out.add(parts[1])
    elif isinstance(node, ast.ImportFrom):
      if node.level:  # relative: from . import x / from .x import y
        base = node.module.split(".")[0] if node.module else None
        names = [base] if base else [a.name for a in node.names]
      elif node.module == "spreading_jax":
        names = [a.name for a in node.names]
      elif node.module and node.module.startswith("spreading_jax."):
        names = [node.module.split(".")[1]]
      else:
        continue
      # ``from spreading_jax import name`` of a non-module name reads __init__.
      out.update(n if n in modules else "__init__" for n in names)
  out.discard(path.stem)
  return out


def import_graph() -> dict[str, set[str]]:
  modules = package_modules()
  return {p.stem: imports_of(p, modules) for p in sorted(PACKAGE.glob("*.py"))}


def upward_edges(graph: dict[str, set[str]], layers: dict[str, int]) -> list[str]:
  return sorted(f"{a} (layer {layers[a]}) imports {b} (layer {layers[b]})"
                for a, targets in graph.items() for b in targets
                if layers[b] > layers[a] and (a, b) not in ALLOWED_UPWARD)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  stack: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    stack.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return stack[stack.index(nxt):] + [nxt]
      if nxt not in state:
        found = visit(nxt)
        if found:
          return found
    stack.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state:
      found = visit(node)
      if found:
        return found
  return None


def test_every_module_has_a_layer():
  """Catches a new module that nobody placed in a layer (its imports would go unchecked)."""
  layers = layer_of()
  assert sum(map(len, LAYERS)) == len(layers), "a module is listed in two layers"
  missing = sorted(package_modules() - set(layers))
  assert not missing, f"give these modules a layer in tests/test_imports.py: {missing}"
  stale = sorted(set(layers) - package_modules())
  assert not stale, f"LAYERS lists modules that no longer exist: {stale}"


def test_imports_point_down():
  """Catches an import of a higher layer (the edges issue 29 removed: quantizers ->
  baselines, config -> lattice, mining -> config): seen red by adding ``from spreading_jax
  import baselines`` inside a function of quantizers.py, and with the datasets -> search
  entry taken out of ALLOWED_UPWARD."""
  graph, layers = import_graph(), layer_of()
  assert not upward_edges(graph, layers)


def test_no_import_cycles():
  """Catches a cycle, also one closed by a function-level import: seen red by adding
  ``from spreading_jax import train`` inside a function of model.py (model -> train ->
  model)."""
  assert find_cycle(import_graph()) is None


def test_allowed_upward_edges_still_exist():
  """An allow-list entry whose edge is gone must be deleted (it would hide its return)."""
  graph = import_graph()
  gone = sorted(f"{a} -> {b}" for a, b in ALLOWED_UPWARD if b not in graph.get(a, ()))
  assert not gone, f"delete from ALLOWED_UPWARD: {gone}"


@pytest.mark.parametrize("source, want", [
    ("import spreading_jax.search\n", {"search"}),
    ("def f():\n  from spreading_jax import lattice, fit\n", {"lattice", "__init__"}),
    ("from spreading_jax.model import TrainResult\n", {"model"}),
    ("from .binary import sign_codes\n", {"binary"}),
    ("import numpy\nfrom jax import numpy\n", set()),
])
def test_the_parser_sees_every_import_form(tmp_path, source, want):
  """The graph is only as good as its parser: each import spelling is found (a parser
  that skipped function bodies would miss the second case)."""
  path = tmp_path / "probe.py"
  path.write_text(source)
  assert imports_of(path, {"search", "lattice", "model", "binary"}) == want
