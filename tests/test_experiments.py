"""Smoke tests: every experiment script runs end to end on a tiny real subset."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.join(os.path.dirname(__file__), os.pardir, "experiments")
TINY = ["--dataset", "fashion-mnist-mini", "--epochs", "1", "--hidden", "32", "--nb", "1000",
        "--nq", "20", "--nt", "1000", "--val-queries", "50", "--bits", "16", "--d-out", "8"]
GRIDS = {"table1_lattice": [], "table2_binary": ["--grid", "16"],
         "crossval_lambda": ["--grid", "0,0.05"], "dout_sweep": ["--grid", "8"]}


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _main(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.main


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_experiment_script_writes_report(mini, tmp_path, name):
  if name == "table1_lattice":
    pytest.importorskip("faiss")
  report = _main(name)(TINY + GRIDS[name] + ["--out", str(tmp_path)])
  suffixes = [".json", ".md", ".png", "_nn_hist.png", "_training.png"]
  if name == "crossval_lambda":
    suffixes.append("_lambda.png")
  for suffix in suffixes:
    assert (tmp_path / f"{name}{suffix}").stat().st_size > 0
  saved = json.loads((tmp_path / f"{name}.json").read_text())
  assert saved["experiment"] == name and saved["rows"] == json.loads(json.dumps(report["rows"]))
  assert all(0 <= v <= 1 for r in saved["rows"] for v in r["recall"].values())
