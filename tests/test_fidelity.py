"""Training dynamics against the original PyTorch code, recorded in tests/fixtures/fidelity.json.

The fixture holds the per-epoch KoLeo, triplet loss, violating-triplet count and validation
lattice recall (1,000 queries, 5,000 database vectors) of the original's
``triplet_optimize`` and of ours, several seeds each, on a fixed split of the shipped
dataset, and the test derived from them (``experiments/fidelity.py``, whose command is in
the fixture). Here ours is trained once more, with a seed that was not recorded, and each
per-run summary (a metric's mean over the epochs, and over the last quarter of them) must lie
within the original's seed mean +- t x sigma x sqrt(1 + 1/n): sigma the seed spread pooled
over both implementations (floored for recalls at the binomial noise of the 1,000 queries),
t the Student quantile that fails a sound run on any machine with probability 1% over all
summaries together. Another CPU, XLA optimization level or thread count rounds differently and
so gives another trajectory, as another seed does: the seed spread is that noise.

Bugs checked (each made once in a copy of the tree, the largest deviation in bands): the
trajectory test is red for flax's initialisation as the default (KoLeo mean 1.45), self left
out of the neighbour lists by default (triplet mean 1.21), the epoch key not folded with the
epoch number (triplet mean 2.26), momentum ignored (violations mean 2.49) and λ applied twice
(KoLeo mean 2.40); test_fixture_records_one_recipe is red for any changed convention default
(bn_mode "joint", init "flax", neighbors_include_self False). Within noise (the trajectory
stays inside its bands) and pinned instead by tests/test_recipe.py and
tests/test_recipe_numpy.py: bn_mode "joint" (0.65), BatchNorm momentum 0.1 in flax terms
(0.73), BatchNorm epsilon 1e-3 (0.26), weight decay 1e-4 (0.40), the lr schedule shifted by an
epoch (0.32). The unmodified code stays within 0.33 (XLA -O0), 0.31 (-O1, the suite's
level), 0.39 (-O3); one core and single-threaded Eigen give bitwise the -O0 run.
"""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from spreading_jax import datasets
from spreading_jax import train as T
from spreading_jax.checkpoint import fingerprint

ROOT = Path(__file__).parent.parent
FIXTURE = Path(__file__).parent / "fixtures" / "fidelity.json"


@pytest.fixture(scope="module")
def fidelity():
  """experiments/fidelity.py, which defines the summaries and the test's tolerances."""
  spec = importlib.util.spec_from_file_location("fidelity", ROOT / "experiments" / "fidelity.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def record():
  return json.loads(FIXTURE.read_text())


@pytest.fixture(scope="module")
def split(record):
  ds = datasets.load_dataset(record["dataset"])
  out = {k: np.ascontiguousarray(ds.train[a:b], np.float32) for k, (a, b) in
         record["split"].items()}
  assert fingerprint(out["train"], out["val_query"], out["val_base"]) == record["split_sha256"], (
      "the shipped dataset no longer holds the split the fixture was recorded on")
  return out


def test_fixture_records_one_recipe(record, fidelity):
  """The record itself: its test is the one experiments/fidelity.py derives from its runs
  (no hand-edited tolerance), the two sides' seed means agree within it (what the recipe
  issue measured; a re-recorded fixture must keep it), and the recipe's conventions are
  still TrainConfig's defaults (a changed default is a changed recipe: re-record)."""
  derived = fidelity.tolerances(record["runs"], record["test"]["validation_queries"],
                                record["test"]["family_alpha"])
  assert derived["t"] == pytest.approx(record["test"]["t"])
  for name, t in record["test"]["summaries"].items():
    for field, value in t.items():
      want = derived["summaries"][name][field]
      assert want == value if value is None else want == pytest.approx(value), (name, field)
    assert abs(t["ours_mean"] - t["original_mean"]) <= t["seed_means"], (name, t)
  defaults = T.TrainConfig().to_dict()
  assert {k: defaults[k] for k in record["conventions"]} == record["conventions"]


@pytest.mark.slow
def test_training_follows_the_original(record, split, fidelity):
  """One fresh run of ours (a seed the fixture did not record) passes the recorded test."""
  config = T.TrainConfig.from_dict(dict(record["config"], seed=record["test_seed"],
                                        verbose=False))
  result = T.train(config, split["train"], validation=(split["val_query"], split["val_base"]))
  assert len(result.history) == config.epochs
  got = fidelity.summaries(result.history)
  table = {name: (got[name], t["original_mean"], t["single_run"])
           for name, t in record["test"]["summaries"].items()}
  for name, (x, mean, tol) in table.items():  # shown by pytest -s, or on a failure
    print(f"{name:18s} ours {x:9.4f}  original {mean:9.4f} +- {tol:.4f}  "
          f"({(x - mean) / tol:+.2f} of the band)")
  bad = [name for name, (x, mean, tol) in table.items() if abs(x - mean) > tol]
  assert not bad, f"training left the original's band in {bad}"
