"""Issue 26 (reliability, second round): consistent loads under concurrent saves, outputs
that are only regular files, bounded allocation on hostile files, interrupts and a full
disk, and extreme values. Every test names the bug it catches; each was seen red with the
behaviour broken on purpose.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from spreading_jax import _files
from spreading_jax.catalyzer import Catalyzer
from spreading_jax.config import TrainConfig
from spreading_jax.index import SpreadingIndex
from spreading_jax.model import TrainResult

REPO = Path(__file__).resolve().parent.parent
D_IN = 16


def _env() -> dict:
  return dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1", JAX_PLATFORMS="cpu")


def _random_model(seed: int, hidden=(8,), d_out: int = 8) -> TrainResult:
  """An untrained catalyzer with seeded weights (what it computes does not matter here)."""
  config = TrainConfig(d_out=d_out, r2=10, bits=32, hidden=hidden, lambda_koleo=0.05,
                       verbose=False)
  variables = Catalyzer(d_out=d_out, hidden=hidden).init(
      jax.random.PRNGKey(seed), np.zeros((1, D_IN), np.float32), train=False)
  return TrainResult(variables["params"], variables["batch_stats"], config, D_IN, 1.0 + seed)


@pytest.fixture(scope="module")
def two_indexes(tmp_path_factory):
  """Two saved "sign" indexes of the same shape: different models, different codes."""
  d = tmp_path_factory.mktemp("two")
  rng = np.random.default_rng(0)
  for i, n in ((1, 300), (2, 301)):
    index = SpreadingIndex(_random_model(i), "sign")
    index.add(rng.standard_normal((n, D_IN)).astype(np.float32))
    index.save(d / f"i{i}")
  return d


# ---------------------------------------------------------------------------------------
# 1. Consistent loads while another process saves to the same path.

_WRITER = """
import sys, time
from spreading_jax.index import SpreadingIndex
a, b = SpreadingIndex.load(sys.argv[1]), SpreadingIndex.load(sys.argv[2])
target, seconds = sys.argv[3], float(sys.argv[4])
a.save(target)
print("ready", flush=True)
end, i = time.monotonic() + seconds, 0
while time.monotonic() < end:
  (b if i % 2 else a).save(target)
  i += 1
print(i, flush=True)
"""


def _which(index: SpreadingIndex, refs) -> tuple:
  """(the reference whose model this is, the one whose codes these are)."""
  model = [np.array_equal(index.model.params["Dense_0"]["kernel"],
                          r.model.params["Dense_0"]["kernel"]) for r in refs]
  codes = [index.codes.shape == r.codes.shape and np.array_equal(index.codes, r.codes)
           for r in refs]
  return (model.index(True) if any(model) else None, codes.index(True) if any(codes) else None)


def test_loads_during_concurrent_saves_are_never_mixed(two_indexes, tmp_path):
  """Bug caught: ``load`` verified the checksums, then read the files again by path, so a
  save renamed in meanwhile gave one index's model with the other's codes (1184 of 4371
  loads in the issue's probe), or a misleading "checksum mismatch". Red with the files
  read by path (``_files._DIR_FD = False``): "checksum mismatch" errors."""
  refs = [SpreadingIndex.load(two_indexes / "i1"), SpreadingIndex.load(two_indexes / "i2")]
  target = tmp_path / "idx"
  writer = subprocess.Popen(
      [sys.executable, "-c", _WRITER, str(two_indexes / "i1"), str(two_indexes / "i2"),
       str(target), "6"], env=_env(), cwd=tmp_path, stdout=subprocess.PIPE, text=True)
  try:
    assert writer.stdout.readline().strip() == "ready"
    loads, changed, seen = 0, 0, set()
    end = time.monotonic() + 4
    while time.monotonic() < end:
      try:
        index = SpreadingIndex.load(target)
      except _files.ChangedWhileReading as e:
        assert "changed while it was being read" in str(e) and "\n" not in str(e)
        changed += 1
        continue
      model, codes = _which(index, refs)
      assert model is not None and model == codes, "a load mixed two saves"
      seen.add(model)
      loads += 1
  finally:
    saves = int(writer.communicate(timeout=60)[0].strip() or 0)
  assert writer.returncode == 0
  print(f"loads={loads} changed={changed} saves={saves}")
  # Both saves were seen and the writer kept saving while the reader read.
  assert loads >= 20 and seen == {0, 1} and saves >= 20, (loads, changed, seen, saves)


# ---------------------------------------------------------------------------------------
# 2. Outputs: only regular files or new paths; never inside a saved model or index;
# every input checked before anything is written.

@pytest.fixture(scope="module")
def saved(two_indexes, tmp_path_factory):
  """A model, an index and vectors files on disk."""
  d = tmp_path_factory.mktemp("saved")
  _random_model(1).save(d / "model")
  rng = np.random.default_rng(1)
  np.save(d / "xb.npy", rng.standard_normal((200, D_IN)).astype(np.float32))
  np.save(d / "xq.npy", rng.standard_normal((5, D_IN)).astype(np.float32))
  return {"model": d / "model", "index": two_indexes / "i1", "xb": d / "xb.npy",
          "xq": d / "xq.npy"}


def _refused(argv, capsys, match: str) -> None:
  from spreading_jax.cli import main
  capsys.readouterr()
  assert main([str(a) for a in argv]) == 2, argv
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and match in err[0], err


def _snapshot(root) -> dict:
  return {str(p.relative_to(root)): (p.is_symlink(), p.lstat().st_mode, p.lstat().st_size,
                                     p.lstat().st_mtime_ns)
          for p in sorted(Path(root).rglob("*"))}


def test_outputs_are_regular_files_outside_saved_directories(saved, tmp_path, capsys):
  """Bugs caught: `encode` onto a FIFO (or through a link to /dev/null) exited 0 and
  replaced it with a regular file; `encode ... INDEX/codes.npy` and `search --out
  INDEX/model/res` wrote inside a saved index, which then no longer loaded. Red without
  ``check_regular_or_absent`` / ``_check_not_inside_saved`` in ``check_output_file``."""
  fifo, null = tmp_path / "fifo.npy", tmp_path / "null.npy"
  os.mkfifo(fifo)
  null.symlink_to(os.devnull)  # the check refuses it; nothing would ever open the device
  os.mkfifo(tmp_path / "res_I.npy")
  index = tmp_path / "index"
  SpreadingIndex.load(saved["index"]).save(index)
  before = _snapshot(tmp_path)
  for out, match in ((fifo, "is a FIFO"), (null, "is a character device"),
                     (index / "codes.npy", "lies inside the saved index"),
                     (index / "model" / "c.npy", "lies inside the saved model")):
    _refused(["encode", saved["model"], saved["xb"], out], capsys, match)
  for prefix, match in ((tmp_path / "res", "is a FIFO"),
                        (index / "model" / "res", "lies inside the saved model")):
    _refused(["search", saved["index"], saved["xq"], "--out", prefix], capsys, match)
  assert _snapshot(tmp_path) == before
  SpreadingIndex.load(index)
  with pytest.raises(ValueError, match="is a FIFO"):  # the library's atomic writer too
    with _files.atomic_output(fifo) as tmp:
      Path(tmp).write_bytes(b"x")
  assert _snapshot(tmp_path) == before


def test_inputs_and_paired_outputs_are_checked_before_writing(saved, tmp_path, capsys):
  """Bugs caught: `train --checkpoint-dir X --out X` (X new) trained to the end, then
  failed and left checkpoints in X; `search --groundtruth missing.ivecs` (or one of the
  wrong shape) wrote its result files, then failed. Red without ``check_apart`` in train
  or with the ground truth read after the results are written."""
  x = tmp_path / "x"
  for ck, out in ((x, x), (x, x / "m"), (x / "ck", x)):
    _refused(["train", saved["xb"], "--epochs", "1", "--checkpoint-dir", ck, "--out", out],
             capsys, "one lies inside the other")
  assert not x.exists()
  np.save(tmp_path / "gt_bad.npy", np.zeros((4, 3), np.int32))  # 4 rows for 5 queries
  for gt, match in ((tmp_path / "missing.ivecs", "missing.ivecs"),
                    (tmp_path / "gt_bad.npy", "one row per query")):
    _refused(["search", saved["index"], saved["xq"], "--out", tmp_path / "r", "--groundtruth",
              gt], capsys, match)
  assert sorted(os.listdir(tmp_path)) == ["gt_bad.npy"]
