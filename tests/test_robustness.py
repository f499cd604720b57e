"""Issue 26 (reliability, second round): consistent loads under concurrent saves, outputs
that are only regular files, bounded allocation on hostile files, interrupts and a full
disk, and extreme values. Every test names the bug it catches; each was seen red with the
behaviour broken on purpose.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
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
import os, sys, time
from spreading_jax.index import SpreadingIndex
a, b = SpreadingIndex.load(sys.argv[1]), SpreadingIndex.load(sys.argv[2])
target, stop, count = sys.argv[3], sys.argv[4], sys.argv[5]
a.save(target)
print("ready", flush=True)
i = 0
while not os.path.exists(stop):
  (b if i % 2 else a).save(target)
  i += 1
  with open(count + ".tmp", "w") as f:
    f.write(str(i))
  os.replace(count + ".tmp", count)
  time.sleep(0.005)
print(i, flush=True)
"""


def _saves_so_far(count: Path) -> int:
  """How many saves the writer reported (it replaces the file atomically after each)."""
  try:
    return int(count.read_text())
  except (FileNotFoundError, ValueError):
    return 0


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
  target, stop, count = tmp_path / "idx", tmp_path / "stop", tmp_path / "count"
  writer = subprocess.Popen(
      [sys.executable, "-c", _WRITER, str(two_indexes / "i1"), str(two_indexes / "i2"),
       str(target), str(stop), str(count)], env=_env(), cwd=tmp_path, stdout=subprocess.PIPE,
      text=True)
  try:
    assert writer.stdout.readline().strip() == "ready"
    loads, changed, seen = 0, 0, set()
    # Until 30 loads returned an index, both indexes were seen and the writer finished 10
    # saves meanwhile (a few seconds; on a loaded CI machine the writer can be slower than
    # the loads, so its count is read, not assumed). The bound only stops a hung run.
    end = time.monotonic() + 120
    while ((loads < 30 or seen != {0, 1} or _saves_so_far(count) < 10)
           and time.monotonic() < end):
      try:
        index = SpreadingIndex.load(target)
      except _files.ChangedWhileReading as e:
        assert "\n" not in str(e)
        changed += 1
        continue
      model, codes = _which(index, refs)
      assert model is not None and model == codes, "a load mixed two saves"
      seen.add(model)
      loads += 1
  finally:
    stop.touch()
    saves = int(writer.communicate(timeout=60)[0].strip() or 0)
  assert writer.returncode == 0
  print(f"loads={loads} changed={changed} saves={saves}")
  assert loads >= 30 and seen == {0, 1} and saves >= 10, (loads, changed, seen, saves)


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
  x.mkdir()  # existing and empty: the same message (it read "output x is the input x")
  _refused(["train", saved["xb"], "--epochs", "1", "--checkpoint-dir", x, "--out", x], capsys,
           "one lies inside the other")
  x.rmdir()
  np.save(tmp_path / "gt_bad.npy", np.zeros((4, 3), np.int32))  # 4 rows for 5 queries
  for gt, match in ((tmp_path / "missing.ivecs", "missing.ivecs"),
                    (tmp_path / "gt_bad.npy", "one row per query")):
    _refused(["search", saved["index"], saved["xq"], "--out", tmp_path / "r", "--groundtruth",
              gt], capsys, match)
  assert sorted(os.listdir(tmp_path)) == ["gt_bad.npy"]


# ---------------------------------------------------------------------------------------
# 3. Bounded allocation: small hostile files that declare huge sizes.

_UNDER_CAP = """
import json, resource, sys
resource.setrlimit(resource.RLIMIT_DATA, (int(sys.argv[1]), int(sys.argv[1])))
from spreading_jax import encode, vecs_io
from spreading_jax.index import SpreadingIndex
from spreading_jax.model import TrainResult
out = {}
for case, path in json.loads(sys.argv[2]).items():
  try:
    if case.startswith("model"):
      TrainResult.load(path)
    elif case.startswith("index"):
      SpreadingIndex.load(path)
    elif case.startswith("hdf5"):
      vecs_io.read_vectors(path, key="train")
    elif case == "chunk":
      model, xb, target = path
      encode.encode_file(TrainResult.load(model), xb, target, chunk=2_000_000_000)
    out[case] = "loaded"
  except ValueError as e:
    out[case] = "ValueError: " + str(e)
  except BaseException as e:
    out[case] = type(e).__name__ + ": " + str(e)
print(json.dumps(out))
"""


def _copy(src: Path, dst: Path) -> Path:
  import shutil
  shutil.copytree(src, dst)
  return dst


def _edit(path: Path, **changes) -> None:
  meta = json.loads(path.read_text())
  for key, value in changes.items():
    target = meta
    *parents, last = key.split(".")
    for p in parents:
      target = target[p]
    target[last] = value
  path.write_text(json.dumps(meta))


def _rehash(index: Path) -> None:
  """Recomputes index.json's checksums (a hostile file that passes them)."""
  meta = json.loads((index / "index.json").read_text())
  meta["sha256"] = {rel: _files.sha256_file(index / rel) for rel in meta["sha256"]}
  (index / "index.json").write_text(json.dumps(meta))


def test_hostile_sizes_are_refused_before_allocating(saved, tmp_path):
  """Bugs caught: loaders allocated what a small file declared before checking it (a
  sparse 30 GiB variables.msgpack read whole; a codes.npy header declaring (10^12, 2)
  with recomputed checksums; quantizer "IVF100000000,PQ8"; an HDF5 dataset declaring
  (10^10, 32) in a few KB; model.json hidden=[10^9]; encode --chunk 2000000000), and
  model.json values contradicting the weights crashed deep in flax. Run in a subprocess
  limited to 2 GiB of data: red (MemoryError, or a crash) without each size check."""
  import h5py
  cases = {}
  m = _copy(saved["model"], tmp_path / "m_sparse")
  meta = json.loads((m / "model.json").read_text())
  os.truncate(m / "variables.msgpack", 30 << 30)  # sparse: no disk used
  cases["model_sparse_30GiB"] = (m, "it has 32212254720 bytes but")
  m = _copy(saved["model"], tmp_path / "m_hidden")
  _edit(m / "model.json", **{"config.hidden": [10 ** 9], "variables_bytes": 30 << 30})
  cases["model_hidden_1e9"] = (m, "does not fit the architecture")
  m = _copy(saved["model"], tmp_path / "m_width")  # wider: the sizes disagree
  _edit(m / "model.json", **{"config.hidden": [64]})
  cases["model_hidden_edited"] = (m, "does not fit the architecture")
  for key, value in (("d_in", D_IN + 1), ("config.d_out", 9)):  # within the size slack
    m = _copy(saved["model"], tmp_path / f"m_{key}")
    _edit(m / "model.json", **{key: value})
    cases[f"model_{key}_edited"] = (m, "does not match the architecture")
  m = _copy(saved["model"], tmp_path / "m_scale")
  _edit(m / "model.json", input_scale=1e-300)
  cases["model_scale_1e-300"] = (m, "input_scale=1e-300 is 0 in float32")
  m = _copy(saved["model"], tmp_path / "m_nested")
  (m / "model.json").write_text("[" * 100_000 + "]" * 100_000)
  cases["model_nested_json"] = (m, "nested too deeply")
  i = _copy(saved["index"], tmp_path / "i_header")
  codes = np.load(i / "codes.npy")
  with open(i / "codes.npy", "wb") as f:
    np.lib.format.write_array_header_1_0(
        f, {"descr": codes.dtype.str, "fortran_order": False, "shape": (10 ** 12, 2)})
    f.write(codes.tobytes())
  _rehash(i)
  cases["index_npy_header_1e12"] = (i, "declares shape (1000000000000, 2)")
  i = _copy(i, tmp_path / "i_ntotal")
  _edit(i / "index.json", ntotal=10 ** 12)
  cases["index_ntotal_1e12"] = (i, "declares shape (1000000000000, 2)")
  i = _copy(saved["index"], tmp_path / "i_ivf")
  _edit(i / "index.json", **{"quantizer.name": "IVF100000000,PQ8"})
  cases["index_ivf_1e8"] = (i, "100000000 is larger than this library builds")
  with h5py.File(tmp_path / "big.hdf5", "w") as f:
    f.create_dataset("train", shape=(10 ** 10, 32), dtype="f4")
  cases["hdf5_1e10_rows"] = (tmp_path / "big.hdf5", "declares shape (10000000000, 32)")
  cases["chunk"] = ([saved["model"], saved["xb"], tmp_path / "codes.npy"], "loaded")
  paths = json.dumps({k: [str(p) for p in v[0]] if isinstance(v[0], list) else str(v[0])
                      for k, v in cases.items()})
  proc = subprocess.run([sys.executable, "-c", _UNDER_CAP, str(2 << 30), paths], env=_env(),
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  for case, (_, match) in cases.items():
    assert match in got[case] and "\n" not in got[case], (case, got[case])
    assert got[case] == "loaded" or got[case].startswith("ValueError: "), (case, got[case])
  assert meta["variables_bytes"] < 4096  # the sparse file really declared more than it holds
  assert np.load(tmp_path / "codes.npy").shape == (200, 1)


def test_info_on_edited_model_metadata_is_one_line(saved, tmp_path, capsys):
  """Bugs caught: `info` crashed (TypeError, RecursionError tracebacks) on an edited
  `selection` field and on deeply nested JSON. Red without the try around ``Selection``
  or without the RecursionError case of ``_parse_json``."""
  m = _copy(saved["model"], tmp_path / "sel")
  _edit(m / "model.json", selection={"d_out": 8, "nonsense": 1})
  _refused(["info", m], capsys, "selection record is malformed")
  m = _copy(saved["model"], tmp_path / "nested")
  (m / "model.json").write_text('{"kind": ' + "[" * 100_000 + "]" * 100_000 + "}")
  _refused(["info", m], capsys, "nested too deeply")


# ---------------------------------------------------------------------------------------
# 4. Interrupts and a full disk.

def _train_files(d: Path) -> list:
  rng = np.random.default_rng(2)
  np.save(d / "xt.npy", rng.standard_normal((960, D_IN)).astype(np.float32))
  (d / "cfg.json").write_text(json.dumps(
      {"d_out": 8, "r2": 10, "bits": 32, "hidden": [16, 16], "epochs": 12, "val_every": 0,
       "lambda_koleo": 0.05, "verbose": False, "batch_size": 64}))
  return ["train", str(d / "xt.npy"), "--config", str(d / "cfg.json"),
          "--checkpoint-dir", str(d / "ck"), "--out", str(d / "m")]


def _signal_when(proc, ready, signum: int, delay: float, timeout: float = 180) -> bool:
  """Sends signum `delay` s after ready() holds; False when proc finished first."""
  t0 = time.monotonic()
  while not ready():
    if proc.poll() is not None:
      return False
    assert time.monotonic() - t0 < timeout, "signal point never reached"
    time.sleep(0.001)
  time.sleep(delay)
  if proc.poll() is not None:
    return False
  proc.send_signal(signum)
  return True


def _writing_checkpoint(ck: Path) -> bool:
  """True while orbax writes a checkpoint (its temporary directory exists)."""
  try:
    return any("tmp" in p for p in os.listdir(ck / "checkpoints"))
  except OSError:
    return False


def test_sigint_and_sigterm_end_train_and_encode_with_one_line(saved, tmp_path):
  """Bugs caught: Ctrl-C while `train` wrote an orbax checkpoint gave dozens of
  tracebacks (and once a segmentation fault after "interrupted"); SIGTERM killed every
  command without a word and without closing the checkpoint manager. Seeded points:
  while orbax writes a checkpoint, and at a random delay after an epoch. Red without
  ``_signals.handling`` in cli.main (SIGTERM: no line, status -15) or without the deferral
  around the orbax save (tracebacks on stderr)."""
  rng = np.random.default_rng(26)
  argv = _train_files(tmp_path)
  ck, history = tmp_path / "ck", tmp_path / "ck" / "history.jsonl"
  lines = lambda: history.read_text().count("\n") if history.exists() else 0
  # (signal, ready(lines before the run)): each point lies in the run that is signalled.
  points = [(2, lambda before: _writing_checkpoint(ck)),
            (15, lambda before: lines() > before)]
  signalled = 0
  for signum, point in points:
    ready = lambda point=point, before=lines(): point(before)
    proc = subprocess.Popen([sys.executable, "-m", "spreading_jax", *argv], cwd=tmp_path,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    sent = _signal_when(proc, ready, signum, delay=float(rng.uniform(0, 0.2)))
    err = proc.communicate(timeout=180)[1]
    if not sent or proc.returncode == 0 or (tmp_path / "m").exists():
      continue  # finished first (a signal while the process exits is the default one)
    signalled += 1
    word = "interrupted" if signum == 2 else "terminated (SIGTERM)"
    assert proc.returncode == 128 + signum, (proc.returncode, err[-2000:])
    assert err.strip().splitlines() == [f"spreading-jax train: {word}"], err[-3000:]
    assert not (tmp_path / "m").exists()
  assert signalled == 2
  proc = subprocess.run([sys.executable, "-m", "spreading_jax", *argv], cwd=tmp_path,
                        env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]  # resumes from the last checkpoint
  assert len(TrainResult.load(tmp_path / "m").history) == 12
  # encode: SIGTERM at a seeded point, one line, then the resume completes.
  xb = tmp_path / "xb.npy"
  np.save(xb, np.random.default_rng(3).standard_normal((20000, D_IN)).astype(np.float32))
  out, progress = tmp_path / "codes.npy", tmp_path / "codes.npy.progress.json"
  enc = ["encode", str(saved["model"]), str(xb), str(out), "--chunk", "64"]
  proc = subprocess.Popen([sys.executable, "-m", "spreading_jax", *enc], cwd=tmp_path,
                          env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True)
  sent = _signal_when(proc, progress.exists, 15, delay=float(rng.uniform(0, 0.1)))
  err = proc.communicate(timeout=180)[1]
  if sent and proc.returncode != 0:
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines() == ["spreading-jax encode: terminated (SIGTERM)"], err
  from spreading_jax.cli import main
  assert main(enc) == 0 and np.load(out).shape == (20000, 1)


def test_full_disk_is_enospc_naming_the_file(saved, tmp_path, capsys, monkeypatch):
  """Bugs caught: `encode` onto a full disk died of SIGBUS (exit 135, no message): its
  memory-mapped output was a sparse file; and a short write said "40000 requested and
  13280 written" with no file name. The full disk is simulated (posix_fallocate, os.write
  and the free space report ENOSPC). Red without ``preallocate`` in encode (exit 0, and
  the partial file is sparse) or without ``_named_oserror`` in atomic_output."""
  import errno
  import shutil
  from spreading_jax.encode import encode_file
  # A partial output's blocks are reserved when it is made: no sparse memory map.
  out, big = tmp_path / "codes.npy", tmp_path.parent / "big_xb.npy"
  np.save(big, np.zeros((100_000, D_IN), np.float32))
  assert encode_file(TrainResult.load(saved["model"]), big, out, chunk=64,
                     max_rows=64) is False
  (partial,) = [p for p in tmp_path.iterdir() if p.name.endswith(".partial")]
  assert partial.stat().st_blocks * 512 >= partial.stat().st_size > 0
  for p in tmp_path.iterdir():
    p.unlink()

  def full(*args):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  def unsupported(*args):
    raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))

  for fallocate, write in ((full, os.write), (unsupported, full)):
    with monkeypatch.context() as m:
      m.setattr(os, "posix_fallocate", fallocate)
      m.setattr(os, "write", write)
      _refused(["encode", saved["model"], saved["xb"], out], capsys,
               f"{out}: No space left on device")
    assert os.listdir(tmp_path) == []
  usage = shutil.disk_usage(tmp_path)
  monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=0))
  with pytest.raises(OSError) as e:
    with _files.atomic_output(tmp_path / "x.npy"):
      raise OSError("40000 requested and 13280 written")
  assert (e.value.errno, e.value.filename) == (errno.ENOSPC, str(tmp_path / "x.npy"))
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------
# 6. Extreme values, and the cosmetic messages of the issue.

def _brute_l2(xq, xb):
  d = ((xq.astype(np.float64)[:, None, :] - xb.astype(np.float64)[None]) ** 2).sum(-1)
  return d.min(1), d.argmin(1)


def test_knn_l2_is_exact_or_refuses_at_extreme_scales():
  """Bug caught: knn(metric="l2") on data scaled by 5e17 returned a farther neighbour for
  39 of 40 queries (squares overflowed inside the search although the distances fit
  float32), and at 1e20 `inf` distances and wrong ids without an error. Red with the
  power-of-two rescaling off (``_L2_RANGE`` unbounded)."""
  from spreading_jax import search
  rng = np.random.default_rng(6)
  xb, xq = rng.standard_normal((2000, 32)), rng.standard_normal((40, 32))
  for scale in (5e17, 1e15, 1e-15, 1e-25):
    b, q = (xb * scale).astype(np.float32), (xq * scale).astype(np.float32)
    want_d, want_i = _brute_l2(q, b)
    D, I = search.knn(q, b, 1)
    np.testing.assert_array_equal(np.asarray(I)[:, 0], want_i, err_msg=str(scale))
    if scale > 1e-20:  # squared distances of 1e-50 are below float32's range
      np.testing.assert_allclose(np.asarray(D)[:, 0], want_d, rtol=1e-5, err_msg=str(scale))
  with pytest.raises(ValueError, match="exceed float32's range"):
    search.knn((xq * 1e20).astype(np.float32), (xb * 1e20).astype(np.float32), 1)
  # A row the centre's sample does not read (every 2nd row of 140k) and far larger.
  b = rng.standard_normal((140_000, 4)).astype(np.float32)
  b[1] = 1e25
  q = np.concatenate([b[1:2], rng.standard_normal((3, 4))]).astype(np.float32)
  want_d, want_i = _brute_l2(q, b)
  D, I = search.knn(q, b, 1)
  np.testing.assert_array_equal(np.asarray(I)[:, 0], want_i)
  np.testing.assert_allclose(np.asarray(D)[:, 0], want_d, rtol=1e-5)


def test_messages_of_extreme_inputs(tmp_path):
  """Bugs caught: a bfloat16 query array was "not a real float dtype"; a finite query of
  3e38 gave zero rows out of the catalyzer and searched silently (or was reported as NaN
  or Inf); "has index format version '2', this library reads version 2". Red with numpy's
  issubdtype (no bfloat16), without the unit-row flag of the forward pass, or with the
  old version message."""
  from spreading_jax._validation import check_vectors
  check_vectors("xq", np.ones((2, 3), jnp.bfloat16))
  with pytest.raises(ValueError, match="NaN or Inf"):
    check_vectors("xq", np.array([[1, np.nan]], jnp.bfloat16))
  index = SpreadingIndex(_random_model(1), "zn")
  index.add(np.random.default_rng(0).standard_normal((50, D_IN)).astype(np.float32))
  index.search(np.ones((2, D_IN), jnp.bfloat16), 3)
  with pytest.raises(ValueError, match=r"row 1 \(values up to 3e\+38\) overflows"):
    index.search(np.stack([np.ones(D_IN), np.full(D_IN, 3e38)]).astype(np.float32), 3)
  index.save(tmp_path / "i")
  _edit(tmp_path / "i" / "index.json", format_version="2")
  with pytest.raises(ValueError, match=r"version '2' \(a str, not an integer\)"):
    SpreadingIndex.load(tmp_path / "i")
