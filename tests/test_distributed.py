"""A real two-process job on localhost (CPU, gloo collectives): `train --distributed` and
`encode --distributed` through the CLI, compared with the same work in one process."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from spreading_jax import sharding
from spreading_jax.index import SpreadingIndex
from spreading_jax.train import TrainConfig, TrainResult, train


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CONFIG = {"d_out": 8, "r2": 10, "bits": 32, "hidden": [32, 32], "epochs": 2, "batch_size": 32,
          "lambda_koleo": 0.05,
          "val_queries": 50, "val_every": 1, "verbose": False, "seed": 3}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start_two_processes(args, tmp_path, name):
  """Starts ``spreading_jax ARGS --distributed`` as processes 0 and 1 of one job (2 CPU
  devices each, so the global mesh has 4 devices); their output goes to files (never a
  pipe that fills while this process works)."""
  port = _free_port()
  flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env = dict(os.environ, XLA_FLAGS=" ".join(["--xla_force_host_platform_device_count=2", *flags]),
             JAX_PLATFORMS="cpu", TQDM_DISABLE="1", PYTHONPATH=REPO)
  procs = []
  for i in range(2):
    with open(tmp_path / f"{name}{i}.log", "w") as log:
      procs.append(subprocess.Popen(
          [sys.executable, "-m", "spreading_jax", *args, "--distributed", "--coordinator",
           f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)],
          env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, text=True))
  return procs


def _wait(procs, tmp_path, name):
  """Waits for a job from _start_two_processes; returns the outputs of processes 0 and 1."""
  try:
    for p in procs:
      p.wait(timeout=240)
  except subprocess.TimeoutExpired:
    for q in procs:
      q.kill()
    pytest.fail("a process of the distributed job hung")
  outs = [(tmp_path / f"{name}{i}.log").read_text() for i in range(2)]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]
  return outs


def test_process_rows_partition():
  for n in (0, 1, 7, 100):
    for count in (1, 2, 3, 8):
      parts = [sharding.process_rows(n, i, count) for i in range(count)]
      assert parts[0][0] == 0 and parts[-1][1] == n
      assert all(a[1] == b[0] for a, b in zip(parts, parts[1:]))
      assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1
  with pytest.raises(ValueError, match="process index"):
    sharding.process_rows(10, 2, 2)


@pytest.mark.skipif(jax.device_count() < 4, reason="needs 4 forced host devices")
def test_two_process_train_and_encode(tmp_path):
  rng = np.random.default_rng(0)
  centers = rng.standard_normal((20, 16)).astype(np.float32)
  x = (centers[rng.integers(0, 20, 1001)] + 0.3 * rng.standard_normal((1001, 16))).astype(
      np.float32)  # 1001 rows: the two processes read slices of 500 and 501 rows
  np.save(tmp_path / "xt.npy", x)
  (tmp_path / "config.json").write_text(json.dumps(CONFIG))
  job = _start_two_processes(["train", "xt.npy", "--config", "config.json", "--out", "model",
                              "--log-dir", "tb"], tmp_path, "train")
  try:
    # Meanwhile, the same training in this process on a 4-device mesh: same global
    # batches, same math (run while the job runs: its processes often wait on each other).
    local = train(TrainConfig.from_dict(CONFIG), x, mesh=sharding.make_mesh(4))
  except BaseException:
    for p in job:
      p.kill()
    raise
  outs = _wait(job, tmp_path, "train")
  assert "wrote model" in outs[0] and "wrote model" not in outs[1]  # process 0 writes
  remote = TrainResult.load(tmp_path / "model")
  assert len(local.history) == len(remote.history) == CONFIG["epochs"]
  # Epoch 1 mines its negatives from the same initial outputs, so it is the same math up to
  # the rounding of gloo's reductions against one process's: a per-device instead of global
  # BatchNorm or KoLeo would move its loss by ~10%.
  first = (local.history[0], remote.history[0])
  np.testing.assert_allclose(first[0]["loss"], first[1]["loss"], rtol=1e-4)
  np.testing.assert_allclose(first[0]["koleo"], first[1]["koleo"], rtol=1e-4)
  # Later epochs mine from outputs that differ by that rounding: a negative whose
  # 50th-neighbour distance ties within it is mined differently, and SGD amplifies the
  # difference (seen on 951 rows: epoch 2 loss -0.1319 vs -0.1314, outputs up to 0.49
  # apart, validation R@10 0.42 vs 0.48 on 50 queries). They stay statistically alike.
  for a, b in zip(local.history[1:], remote.history[1:]):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-2)
    np.testing.assert_allclose(a["koleo"], b["koleo"], rtol=2e-2)
  for a, b in zip(local.history, remote.history):
    # Binomial noise of a recall over 50 queries near 0.5: sd 0.07; 3 sd.
    assert abs(a["lattice_R@10"] - b["lattice_R@10"]) <= 0.21

  # Distributed encoding: each process writes the codes of its own slice.
  _wait(_start_two_processes(["encode", "model", "xt.npy", "codes.npy"], tmp_path, "encode"),
        tmp_path, "encode")
  parts = [np.load(tmp_path / f"codes.part{i:05d}-of-00002.npy") for i in range(2)]
  assert [len(p) for p in parts] == [500, 501]
  # The single-process pipeline: same fixed-shape blocks, so the same bytes (a jitted
  # encoder on all 1001 rows at once may round near-tie rows differently).
  np.testing.assert_array_equal(np.concatenate(parts), SpreadingIndex(remote, "zn").encode(x))


def test_rows_to_read_samples_only_what_training_uses():
  cfg = TrainConfig(num_train=1000, val_queries=100, val_base=400)
  from spreading_jax.train import rows_to_read, split_train_validation
  assert rows_to_read(10_000, TrainConfig()) is None       # no cap: every row may train
  assert rows_to_read(2200, cfg) is None                     # the cap needs all rows anyway
  rows = rows_to_read(1_000_000, cfg)
  # Training rows and queries, doubled: the validation database is every row but the
  # queries (val_base samples it), so it grows with what is read.
  assert len(rows) == 2 * (1000 + 100) and np.all(np.diff(rows) > 0)
  np.testing.assert_array_equal(rows, rows_to_read(1_000_000, cfg))  # seeded
  x = np.arange(40, dtype=np.float32).reshape(20, 2)
  picked = np.array([1, 4, 5, 19])
  np.testing.assert_array_equal(sharding.gather_process_slices(x, picked), x[picked])
  np.testing.assert_array_equal(sharding.gather_process_slices(x), x)
  # The sample trains like any array: the split keeps validation disjoint from training.
  xt, val = split_train_validation(
      np.random.default_rng(0).standard_normal((len(rows), 4)).astype(np.float32), cfg)
  assert len(xt) == 1000 and val.query.shape[0] == 100 and val.base.shape[0] == 400
