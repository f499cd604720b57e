"""The experiment runner and its configs: every config runs end to end on a tiny real subset,
and every number a config's docstring quotes is in the results file it cites."""
import glob
import importlib.util
import json
import os
import re

import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "experiments")
REPO = os.path.dirname(EXPERIMENTS)
CONFIGS = sorted(glob.glob(os.path.join(EXPERIMENTS, "configs", "*.py")))
# nt=1010: 50 validation queries, 192 database, 768 training rows (12 full batches of 64).
TINY = ["dataset=fashion-mnist-mini", "epochs=1", "hidden=32", "nb=1000", "nq=20", "nt=1010",
        "val_queries=50", "bits=16", "d_out=8", "verbose=false"]
GRIDS = {"table1_lattice": None, "table2_binary": "16", "crossval_lambda": "0,0.05",
         "dout_sweep": "8", "lattice_ablation": "0.05", "validation_ranking": "8",
         "auto_shape": None}
QUOTE = re.compile(r"^  ([\w-]+): (.+?)(?: (\d+)b)? = "
                   r"([\d.]+)/([\d.]+)/([\d.]+)$", re.M)

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _runner():
  spec = importlib.util.spec_from_file_location("run", os.path.join(EXPERIMENTS, "run.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _docstring(path):
  spec = importlib.util.spec_from_file_location("config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.__doc__


def test_every_experiment_has_a_config():
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  assert names == set(_runner().EXPERIMENTS) == set(GRIDS)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_docstring_states_command_runtime_and_recorded_numbers(path):
  doc = _docstring(path)
  rel = os.path.relpath(path, REPO)
  assert f"python experiments/run.py {rel}:" in doc and "Expected runtime" in doc
  quotes = QUOTE.findall(doc)
  assert quotes, f"{rel} quotes no recorded number"
  for dataset, method, bits, *recalls in quotes:
    results = os.path.join("experiments", "results", dataset, os.path.basename(path)[:-3] + ".json")
    rows = json.loads(open(os.path.join(REPO, results)).read())["rows"]
    match = [r for r in rows if r["method"] == method and (not bits or r["bits"] == int(bits))]
    assert len(match) == 1, f"{rel}: {method!r} is not one row of {results}"
    got = [round(100 * match[0]["recall"][k], 1) for k in ("1", "10", "100")]
    assert got == [float(v) for v in recalls], f"{rel}: {method} {recalls}, {results}: {got}"


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_runner_smoke_run_writes_report(mini, tmp_path, path):
  name = os.path.basename(path)[:-3]
  if name == "table1_lattice":
    pytest.importorskip("faiss")
  grid = [] if GRIDS[name] is None else ["--set", f"grid={GRIDS[name]}"]
  args = [f"{path}:fashion-mnist-mini", "--out", str(tmp_path), *grid]
  for item in TINY:
    args += ["--set", item]
  payload = _runner().main(args)
  suffixes = [".json", ".md", ".png", "_nn_hist.png", "_training.png"]
  if name == "crossval_lambda":
    suffixes.append("_lambda.png")
  for suffix in suffixes:
    assert (tmp_path / f"{name}{suffix}").stat().st_size > 0
  saved = json.loads((tmp_path / f"{name}.json").read_text())
  assert saved["experiment"] == name and saved["rows"] == json.loads(json.dumps(payload["rows"]))
  assert saved["train_config"]["epochs"] == 1 and saved["sizes"]["nb"] == 1000
  assert saved["histories"] and all(len(h) == 1 for h in saved["histories"].values())
  assert all(0 <= v <= 1 for r in saved["rows"] for v in r["recall"].values())
  assert "| method | bits |" in (tmp_path / f"{name}.md").read_text()


def test_runner_rejects_unknown_keys_and_missing_files(tmp_path, capsys):
  run = _runner()
  with pytest.raises(SystemExit):
    run.main([CONFIGS[0], "--set", "epochz=1"])
  assert "epochz" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    run.main([str(tmp_path / "nope.py")])
  assert "does not exist" in capsys.readouterr().err
