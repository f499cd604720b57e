"""Training dynamics against the original PyTorch code, recorded in tests/fixtures/fidelity.json.

The fixture holds the per-epoch KoLeo, triplet loss, violating-triplet count and validation
recall of the original's ``triplet_optimize`` and of ours, three seeds each, on a fixed
split of the shipped dataset, and tolerances derived from their seed spread (the command
that made it is in the fixture: ``experiments/fidelity.py``). Here ours is trained again
and its trajectory must stay within those tolerances of the original's seed mean.
"""
import json
from pathlib import Path

import numpy as np
import pytest

from spreading_jax import datasets
from spreading_jax import train as T
from spreading_jax.checkpoint import fingerprint

FIXTURE = Path(__file__).parent / "fixtures" / "fidelity.json"


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


def _trajectory(runs, metric):
  return np.array([[r[metric] for r in run] for run in runs], np.float64)


def test_fixture_sides_agree_with_each_other(record):
  # The record itself: our recipe's seed-mean trajectory lies within the tolerance of the
  # original's (this is what the recipe issue measured; a re-recorded fixture must keep it).
  for metric, tol in record["tolerance"]["per_epoch"].items():
    orig = _trajectory(record["runs"]["original"], metric).mean(0)
    ours = _trajectory(record["runs"]["ours"], metric).mean(0)
    assert np.all(np.abs(ours - orig) <= np.asarray(tol)), (metric, ours, orig, tol)
    assert abs(ours.mean() - orig.mean()) <= record["tolerance"]["epoch_mean"][metric], metric


@pytest.mark.slow
def test_training_follows_the_original(record, split):
  config = T.TrainConfig.from_dict(dict(record["config"], seed=record["seeds"][0],
                                        verbose=False))
  result = T.train(config, split["train"], validation=(split["val_query"], split["val_base"]))
  assert len(result.history) == config.epochs
  for metric, tol in record["tolerance"]["per_epoch"].items():
    ours = np.array([h[metric] for h in result.history], np.float64)
    orig = _trajectory(record["runs"]["original"], metric).mean(0)
    bad = np.flatnonzero(np.abs(ours - orig) > np.asarray(tol))
    assert bad.size == 0, (f"{metric} leaves the original's band at epochs {(bad + 1).tolist()}: "
                           f"ours {ours[bad]}, original {orig[bad]}, tolerance "
                           f"{np.asarray(tol)[bad]}")
    gap = abs(ours.mean() - orig.mean())
    assert gap <= record["tolerance"]["epoch_mean"][metric], (
        f"{metric} averaged over epochs: ours {ours.mean():.4f}, original {orig.mean():.4f}")
