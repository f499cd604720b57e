"""Reliability (issue 13): no command destroys, mixes or hangs; every user mistake is one
line on stderr with exit status 2 and nothing written.

One test per class of failure: outputs that are not ours or are inputs (data loss),
resumed encodes of another model/input, corrupt progress, concurrent runs (silent wrong
results), input validation, the CLI's error path (explicit cases and a hypothesis
property), ``--distributed`` with absent peers, and kill -9 at seeded random points of
``train``, ``build`` and ``encode`` followed by a byte-identical resume/re-run.
"""
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from spreading_jax import _outputs
from spreading_jax._validation import check_vectors
from spreading_jax.cli import main
from spreading_jax.encode import encode_file
from spreading_jax.index import SpreadingIndex
from spreading_jax.model import TrainResult

REPO = Path(__file__).resolve().parent.parent
CONFIG = {"d_out": 8, "r2": 10, "bits": 32, "hidden": [16, 16], "epochs": 2, "val_every": 0,
          "lambda_koleo": 0.05, "verbose": False, "batch_size": 64}


@pytest.fixture(scope="module")
def work(mini, tmp_path_factory):
  """A directory with vectors files, a config and a model trained through the CLI (with
  a checkpoint directory: it is also the uninterrupted reference of the kill -9 test)."""
  w = tmp_path_factory.mktemp("rel")
  # 960 = 15 batches of 64: no partial-batch step to compile (test_train and
  # test_distributed cover that one on a mesh).
  np.save(w / "xt.npy", np.asarray(mini.train[:960], np.float32))
  np.save(w / "xb.npy", np.asarray(mini.base[:4000], np.float32))
  np.save(w / "xq.npy", np.asarray(mini.query[:20], np.float32))
  (w / "cfg.json").write_text(json.dumps(CONFIG))
  with _compilation_cache(w):
    assert main(_train_argv(w, w / "model", w / "ck_ref")) == 0
  return w


@contextlib.contextmanager
def _compilation_cache(w):
  """jax's persistent compilation cache in w/jax_cache while the block runs (and for the
  subprocesses, see _env): the kill -9 runs reuse the fixture's compiled programs."""
  names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs")
  old = [getattr(jax.config, n) for n in names]
  jax.config.update(names[0], str(w / "jax_cache"))
  jax.config.update(names[1], 0.5)
  try:
    yield
  finally:
    for n, v in zip(names, old):
      jax.config.update(n, v)


def _train_argv(w, out, checkpoint_dir):
  return ["train", str(w / "xt.npy"), "--config", str(w / "cfg.json"),
          "--checkpoint-dir", str(checkpoint_dir), "--out", str(out)]


def _tree(root) -> dict:
  """Every file (-> size, mtime) and directory (-> "dir") under root, hidden ones too.
  (A directory's own mtime moves when a check probes it for writability.)"""
  out = {}
  for dirpath, dirnames, filenames in os.walk(root):
    for name in dirnames:
      out[os.path.relpath(os.path.join(dirpath, name), root)] = "dir"
    for name in filenames:
      st_ = os.lstat(os.path.join(dirpath, name))
      out[os.path.relpath(os.path.join(dirpath, name), root)] = (st_.st_size, st_.st_mtime_ns)
  return out


def _fails_cleanly(argv, capsys, root, match=None) -> str:
  """Runs the CLI in-process: exit status 2, one stderr line, nothing under root changed."""
  capsys.readouterr()
  before = _tree(root)
  assert main(argv) == 2, argv
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and ": error: " in err[0], (argv, err)
  assert _tree(root) == before, argv
  if match is not None:
    assert match in err[0], err[0]
  return err[0]


def _env(w=None) -> dict:
  env = dict(os.environ, PYTHONPATH=str(REPO), TQDM_DISABLE="1", JAX_PLATFORMS="cpu")
  if w is not None:
    env.update(JAX_COMPILATION_CACHE_DIR=str(w / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
  return env


# ---------------------------------------------------------------------------------------
# Data loss: outputs that are not ours, or are inputs, are refused before any work.

def test_outputs_that_are_not_ours_or_are_inputs_are_refused(work, tmp_path, capsys,
                                                             monkeypatch):
  model, xb, xt = str(work / "model"), str(work / "xb.npy"), str(work / "xt.npy")
  proj = tmp_path / "project"
  proj.mkdir()
  (proj / "notes.txt").write_text("precious")
  (tmp_path / "afile").write_text("x")
  # A foreign non-empty directory, for both directory writers; for train the output is
  # checked before the (missing) dataset is even looked up.
  _fails_cleanly(["train", "no_such_dataset", "--out", str(proj)], capsys, tmp_path,
                 "not a saved spreading_jax model")
  _fails_cleanly(["build", model, xb, "--out", str(proj)], capsys, tmp_path,
                 "not a saved spreading_jax model")
  # A model is never turned into an index, and an input is never an output.
  before = _tree(work / "model")
  _fails_cleanly(["build", model, xb, "--out", model], capsys, tmp_path, "is the input")
  link = tmp_path / "model_link"
  link.symlink_to(work / "model")
  _fails_cleanly(["build", model, xb, "--out", str(link)], capsys, tmp_path, "is the input")
  for out in (xb, str(Path(os.path.relpath(xb)))):
    _fails_cleanly(["encode", model, xb, out], capsys, tmp_path, "is the input")
  (tmp_path / "xb_link.npy").symlink_to(xb)
  _fails_cleanly(["encode", model, xb, str(tmp_path / "xb_link.npy")], capsys, tmp_path,
                 "is the input")
  os.link(xt, tmp_path / "xt_hard.npy")
  _fails_cleanly(["encode", model, str(tmp_path / "xt_hard.npy"), xt], capsys, tmp_path,
                 "is the input")
  assert _tree(work / "model") == before
  # The current directory, a file's "subdirectory", a directory where a file goes.
  monkeypatch.chdir(proj)
  _fails_cleanly(["build", model, xb, "--out", "."], capsys, tmp_path, "current directory")
  monkeypatch.chdir(tmp_path)
  _fails_cleanly(["train", xt, "--out", "afile/m"], capsys, tmp_path, "is a file")
  _fails_cleanly(["build", model, xb, "--out", "afile"], capsys, tmp_path, "not a directory")
  _fails_cleanly(["encode", model, xb, "project"], capsys, tmp_path, "is a directory")
  _fails_cleanly(["search", model, xb, "--out", "afile/r"], capsys, tmp_path, "is a file")
  assert (proj / "notes.txt").read_text() == "precious"
  # The library API goes through the same check (atomic_output_dir): a saved model is
  # replaced by a model, never by an index, and a foreign directory never.
  m = TrainResult.load(model)
  index = SpreadingIndex(m, "sign")
  index.add(np.asarray(np.load(xb)[:100]))
  with pytest.raises(ValueError, match="saved model"):
    index.save(model)
  with pytest.raises(ValueError, match="not a saved spreading_jax"):
    m.save(proj)
  index.save(tmp_path / "idx")
  index.save(tmp_path / "idx")  # our own kind: replaced
  with pytest.raises(ValueError, match="saved index"):
    m.save(tmp_path / "idx")
  m.save(tmp_path / "m2")
  m.save(tmp_path / "m2")
  assert TrainResult.load(tmp_path / "m2").d_in == 784
  assert _tree(work / "model") == before and (proj / "notes.txt").read_text() == "precious"


def test_output_check_probes_real_writability(tmp_path):
  # /proc refuses new files even to root, where os.access would say yes.
  with pytest.raises(ValueError, match="cannot write"):
    _outputs.check_output_file("/proc/spreading_jax_probe.npy")
  with pytest.raises(ValueError, match="cannot write"):
    _outputs.check_output_dir("/proc/spreading_jax_probe/deeper", "model")
  _outputs.check_output_dir(tmp_path / "new" / "deeper", "model")
  assert sorted(os.listdir(tmp_path)) == []  # the probe leaves nothing


# ---------------------------------------------------------------------------------------
# Silent wrong results: resumed encodes, locks, corrupt progress, NaN rows.

def _other_model(model: TrainResult) -> TrainResult:
  return dataclasses.replace(model, params=jax.tree_util.tree_map(lambda a: a * 1.01,
                                                                   model.params))


def test_encode_resume_is_keyed_to_model_and_input(work, tmp_path):
  model = TrainResult.load(work / "model")
  x = np.load(work / "xb.npy")[:1500]
  src = tmp_path / "x.npy"
  np.save(src, x)
  assert encode_file(model, src, tmp_path / "ref.npy", chunk=256)
  out = tmp_path / "codes.npy"
  assert not encode_file(model, src, out, chunk=256, max_rows=600)
  progress = Path(str(out) + ".progress.json")
  with pytest.raises(ValueError, match="another model"):
    encode_file(_other_model(model), src, out, chunk=256)
  edited = x.copy()
  edited[700, 3] += 1.0  # same size and shape, another content
  np.save(src, edited)
  with pytest.raises(ValueError, match="another input"):
    encode_file(model, src, out, chunk=256)
  np.save(src, x)
  assert encode_file(model, src, out, chunk=256)
  assert (tmp_path / "ref.npy").read_bytes() == out.read_bytes()
  assert not progress.exists()
  assert sorted(os.listdir(tmp_path)) == ["codes.npy", "ref.npy", "x.npy"]


def test_encode_lock_and_corrupt_progress(work, tmp_path):
  model = TrainResult.load(work / "model")
  src = tmp_path / "x.npy"
  np.save(src, np.load(work / "xb.npy")[:600])
  out = tmp_path / "codes.npy"
  lock = Path(str(out) + ".lock")
  # A live process holds the lock: refused. A dead one's lock is stale: taken over.
  sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
  try:
    import socket
    lock.write_text(f"{sleeper.pid} {socket.gethostname()} x\n")
    with pytest.raises(ValueError, match=f"pid {sleeper.pid}"):
      encode_file(model, src, out, chunk=256)
  finally:
    sleeper.kill()
    sleeper.wait()
  assert not out.exists() and lock.exists()
  assert encode_file(model, src, out, chunk=256)
  assert not lock.exists()
  reference = out.read_bytes()
  out.unlink()
  # Corrupt progress records: every one is refused at once (no endless loop, no
  # "success" over rows never encoded).
  progress = Path(str(out) + ".progress.json")
  assert not encode_file(model, src, out, chunk=256, max_rows=256)
  good = json.loads(progress.read_text())
  partial = tmp_path / good["partial"]
  corrupt = [b"{not json", b"[]", json.dumps(dict(good, rows_done=-5)).encode(),
             json.dumps(dict(good, rows_done="x")).encode(),
             json.dumps(dict(good, rows_done=600)).encode(),  # claims rows never written
             json.dumps(dict(good, partial="../../etc/passwd")).encode(),
             json.dumps(dict(good, version=1)).encode()]
  for blob in corrupt:
    progress.write_bytes(blob)
    with pytest.raises(ValueError, match="corrupt|does not hold"):
      encode_file(model, src, out, chunk=256)
    assert not out.exists()
  progress.write_text(json.dumps(good))
  # A partial file swapped for zeros is caught by the checksum of the last rows written.
  saved = partial.read_bytes()
  codes = np.load(partial, mmap_mode="r+")
  codes[:] = 0
  codes.flush()
  del codes
  with pytest.raises(ValueError, match="does not hold"):
    encode_file(model, src, out, chunk=256)
  partial.write_bytes(saved)
  assert encode_file(model, src, out, chunk=256)
  assert out.read_bytes() == reference


def test_encode_rejects_nan_rows_and_leaves_nothing(work, tmp_path, capsys):
  x = np.load(work / "xb.npy")[:700].copy()
  x[650, 5] = np.nan
  np.save(tmp_path / "nan.npy", x)
  err = _fails_cleanly(["encode", str(work / "model"), str(tmp_path / "nan.npy"),
                        str(tmp_path / "codes.npy"), "--chunk", "128"], capsys, tmp_path)
  assert "row 650" in err and "NaN" in err


def test_validation_of_batch_size_overflow_and_zero_width(work):
  model = TrainResult.load(work / "model")
  x = np.load(work / "xq.npy")
  for bad in (-3, 0, 2.5, True):
    with pytest.raises(ValueError, match="batch_size"):
      model.apply(x, batch_size=bad)
  big = x.astype(np.float64)
  big[3, 7] = 1e39  # finite in float64, inf in float32
  with pytest.raises(ValueError, match="overflow float32"):
    check_vectors("x", big)
  with pytest.raises(ValueError, match="overflow float32"):
    model.apply(big)
  check_vectors("x", x.astype(np.float64))  # in range: fine
  with pytest.raises(ValueError, match="dimension 0"):
    check_vectors("x", np.zeros((4, 0), np.float32))


def test_finiteness_by_sum_with_exact_fallback():
  # NaN/Inf are found by one float sum (numpy on the host, a compiled sum on the device)
  # with an exact fallback: a sum that overflows is not a NaN, and each bad value is found
  # wherever it is.
  for wrap in (np.asarray, jax.numpy.asarray):
    huge = wrap(np.full((64, 8), 3e38, np.float32))
    assert check_vectors("x", huge) is huge
    for value in (np.nan, np.inf, -np.inf):
      x = np.full((64, 8), 3e38, np.float32)
      x[37, 5] = value
      with pytest.raises(ValueError, match=r"x contains NaN or Inf \(first at row 37, column 5"):
        check_vectors("x", wrap(x))
    x = np.ones((64, 8), np.float32)
    x[[3, 9], 2] = (np.inf, -np.inf)  # the sum alone is NaN
    with pytest.raises(ValueError, match="row 3, column 2"):
      check_vectors("x", wrap(x))
  check_vectors("x", np.full((64, 8), 6e4, np.float16))  # its float32 sum is finite
  with pytest.raises(ValueError, match="row 0, column 1"):
    check_vectors("x", np.array([[1, np.inf]], np.float16))


# ---------------------------------------------------------------------------------------
# The CLI's error path: one line, exit status 2, nothing written.

def _corrupt_faiss_index(work, tmp_path) -> Path:
  import hashlib
  idx = tmp_path / "pq"
  assert main(["build", str(work / "model"), str(work / "xq.npy"), "--out", str(idx),
               "--quantizer", "PQ1x2", "--train", str(work / "xt.npy")]) == 0
  (idx / "quantizer.faiss").write_bytes(b"garbage!")
  meta = json.loads((idx / "index.json").read_text())
  meta["sha256"]["quantizer.faiss"] = hashlib.sha256(b"garbage!").hexdigest()
  (idx / "index.json").write_text(json.dumps(meta))
  return idx


def test_cli_user_mistakes_are_one_line(work, tmp_path, capsys, one_faiss_thread):
  model, xb, xq = str(work / "model"), str(work / "xb.npy"), str(work / "xq.npy")
  t = tmp_path
  (t / "cfgdir").mkdir()
  (t / "types.json").write_text(json.dumps({"momentum": "fast"}))
  (t / "hidden.json").write_text(json.dumps({"hidden": 5}))
  (t / "afile").write_text("x")
  np.save(t / "zero_width.npy", np.zeros((5, 0), np.float32))
  np.save(t / "no_rows.npy", np.zeros((0, 784), np.float32))
  edited = t / "edited_model"
  shutil.copytree(work / "model", edited)
  meta = json.loads((edited / "model.json").read_text())
  del meta["variables_bytes"]
  (edited / "model.json").write_text(json.dumps(meta))
  faiss_idx = _corrupt_faiss_index(work, t)
  sign_idx = t / "sign"
  assert main(["build", model, xb, "--out", str(sign_idx), "--quantizer", "sign"]) == 0
  cases = [
      (["train", xq, "--config", str(t / "cfgdir"), "--out", str(t / "m")], "directory"),
      (["train", xq, "--config", str(t / "types.json"), "--out", str(t / "m")], "momentum"),
      (["train", xq, "--config", str(t / "hidden.json"), "--out", str(t / "m")], "hidden"),
      (["train", xq, "--checkpoint-dir", str(t / "afile"), "--out", str(t / "m")],
       "not a directory"),
      (["train", str(t / "zero_width.npy"), "--out", str(t / "m")], "dimension 0"),
      (["train", xq, "--epochs", "many", "--out", str(t / "m")], "invalid int"),
      (["info", str(edited)], "malformed model metadata"),
      (["encode", str(edited), xq, str(t / "c.npy")], "malformed model metadata"),
      (["search", str(faiss_idx), xq, "--out", str(t / "r")], "faiss index"),
      (["build", model, xb, "--out", str(t / "pq8"), "--quantizer", "PQ1",
        "--train", xq], "Number of training points"),
      (["encode", model, str(t / "zero_width.npy"), str(t / "c.npy")], "d=0"),
      (["build", model, str(t / "zero_width.npy"), "--out", str(t / "i2")], "d_in=0"),
      (["search", str(sign_idx), xq, "--out", str(t / "afile")  + "/r"], "is a file"),
      (["train", xq, "--distributed-timeout", "5", "--out", str(t / "m")],
       "needs --distributed"),
  ]
  for argv, match in cases:
    _fails_cleanly(argv, capsys, t, match)
  # Zero queries: the CLI says so in one line; the library answers with an empty result
  # (the Hamming kernel used to crash reshaping zero rows).
  _fails_cleanly(["search", str(sign_idx), str(t / "no_rows.npy"), "--out", str(t / "s")],
                 capsys, t, "no rows")
  from spreading_jax import search
  D, I = search.hamming_knn(np.zeros((0, 1), np.uint8), np.zeros((5, 1), np.uint8), 3)
  assert D.shape == I.shape == (0, 3)
  for metric in ("l2", "ip"):
    D, I = search.knn(np.zeros((0, 4), np.float32), np.ones((5, 4), np.float32), 3,
                      metric=metric)
    assert D.shape == I.shape == (0, 3)


# Outputs each command must refuse: inputs (also spelled relatively or through a symlink),
# directories where a file goes and files where a directory goes, paths under a file, a
# foreign project directory, a saved model that is an input, the current directory.
_BAD_OUTPUTS = {
    "encode": ["{xb}", "./{rel_xb}", "{link_xb}", "{proj}", "{afile}/sub", "{model}", "."],
    "build": ["{xb}", "./{rel_xb}", "{link_xb}", "{proj}", "{afile}/sub", "{afile}",
              "{model}", "{proj}/notes.txt", "."],
    "train": ["{xb}", "{link_xb}", "{proj}", "{afile}/sub", "{afile}", "{proj}/notes.txt",
              "."],
    "search": ["{afile}/sub", "{proj}/notes.txt/r"],
}


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), command=st.sampled_from(sorted(_BAD_OUTPUTS)),
       bad_input=st.sampled_from([None, None, "garbage", ".nan", ".zero_width", ".missing"]))
def test_cli_error_path_property(work, capsys, monkeypatch, data, command, bad_input):
  """A bad output and/or a bad input: one line on stderr, exit 2, nothing written."""
  root = work / "prop"
  if not root.exists():
    root.mkdir()
    (root / "project").mkdir()
    (root / "project" / "notes.txt").write_text("precious")
    (root / "afile").write_text("x")
    (root / "link_xb.npy").symlink_to(work / "xb.npy")
    x = np.load(work / "xq.npy").copy()
    x[3, 3] = np.inf
    np.save(root / ".nan.npy", x)
    np.save(root / ".zero_width.npy", np.zeros((3, 0), np.float32))
    assert main(["build", str(work / "model"), str(work / "xq.npy"), "--out",
                 str(root / "idx")]) == 0
  monkeypatch.chdir(root / "project")
  names = {"xb": str(work / "xb.npy"), "rel_xb": os.path.relpath(work / "xb.npy"),
           "link_xb": str(root / "link_xb.npy"), "proj": str(root / "project"),
           "afile": str(root / "afile"), "model": str(work / "model")}
  out = data.draw(st.sampled_from(_BAD_OUTPUTS[command])).format(**names)
  if bad_input is None:
    src = names["xb"]
  elif bad_input == "garbage":
    src = str(root / "garbage.fvecs")
    Path(src).write_bytes(data.draw(st.binary(max_size=48)))
  else:
    src = str(root / f"{bad_input}.npy")
  argv = {"encode": ["encode", names["model"], src, out],
          "build": ["build", names["model"], src, "--out", out],
          "train": ["train", src, "--out", out, "--epochs", "1"],
          "search": ["search", str(root / "idx"), src, "--out", out]}[command]
  _fails_cleanly(argv, capsys, work)


# ---------------------------------------------------------------------------------------
# --distributed never waits silently forever.

def test_distributed_without_peers_times_out_in_one_line(work, tmp_path):
  import socket
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  proc = subprocess.run(
      [sys.executable, "-m", "spreading_jax", "train", str(work / "xq.npy"), "--out",
       str(tmp_path / "m"), "--distributed", "--coordinator", f"127.0.0.1:{port}",
       "--num-processes", "2", "--process-id", "1", "--distributed-timeout", "2"],
      env=_env(), capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  # Its own 2 s timeout ended it (the message says so); how long the whole run took depends
  # on the machine (starting Python and JAX), so only a hang is bounded, by timeout=120.
  assert len(lines) == 1 and "not all 2 processes joined within 2 s" in lines[0], lines
  assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------
# kill -9 at seeded random points, then a resume / re-run: byte-identical, nothing
# half-written visible.

def _spawn(argv, cwd, cache_of=None):
  return subprocess.Popen([sys.executable, "-m", "spreading_jax", *argv], cwd=cwd,
                          env=_env(cache_of),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill_when(proc, ready, delay: float, timeout: float = 180) -> bool:
  """SIGKILLs proc `delay` seconds after ready() holds; False if it finished first."""
  t0 = time.monotonic()
  while not ready():
    if proc.poll() is not None:
      return False
    assert time.monotonic() - t0 < timeout, "kill point never reached"
    time.sleep(0.002)
  time.sleep(delay)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  return proc.returncode == -signal.SIGKILL


def _kill_frozen_when(proc, ready, timeout: float = 180) -> bool:
  """SIGKILLs proc at the first state where ready() holds, observed with proc stopped
  (SIGSTOP), so the kill lands exactly there however fast the machine; the process runs
  in slices of about a millisecond between looks. False if it finished first."""
  t0 = time.monotonic()
  while proc.poll() is None:
    proc.send_signal(signal.SIGSTOP)
    if ready():
      proc.send_signal(signal.SIGKILL)
      proc.wait()
      return proc.returncode == -signal.SIGKILL
    proc.send_signal(signal.SIGCONT)
    assert time.monotonic() - t0 < timeout, "kill point never reached"
    time.sleep(0.001)
  return False


def _rows_done(progress: Path) -> int:
  try:
    return json.loads(progress.read_text())["rows_done"]
  except (OSError, ValueError, KeyError):
    return -1


def test_kill9_encode_resumes_byte_identical(work, tmp_path):
  """Catches an encode that a kill -9 leaves half-written, or whose resume differs from
  the uninterrupted codes. The input is 8 encode blocks (progress records every 2,048
  rows); each kill lands at a seeded progress point in the first six blocks, taken with
  the process stopped, so it is mid-run on a machine of any speed (with a random delay
  after the record, an idle machine finished the last blocks first)."""
  rng = np.random.default_rng(13)
  xb = tmp_path / "xb.npy"
  np.save(xb, np.tile(np.load(work / "xb.npy"), (4, 1))[:8 * 2048])
  argv = lambda out: ["encode", str(work / "model"), str(xb), str(out), "--chunk", "64"]
  with _compilation_cache(work):
    assert main(argv(tmp_path / "ref.npy")) == 0
  reference = (tmp_path / "ref.npy").read_bytes()
  out, progress = tmp_path / "codes.npy", tmp_path / "codes.npy.progress.json"
  killed = 0
  for target in sorted(rng.integers(0, 6 * 2048, size=3)):
    proc = _spawn(argv(out), tmp_path, cache_of=work)
    killed += _kill_frozen_when(proc, lambda: _rows_done(progress) >= target)
    assert not out.exists() or out.read_bytes() == reference  # never half-written
  assert killed >= 2
  assert main(argv(out)) == 0
  assert out.read_bytes() == reference
  assert sorted(os.listdir(tmp_path)) == ["codes.npy", "ref.npy", "xb.npy"]


def _index_bytes(path: Path) -> dict:
  return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
          if p.is_file()}


def test_kill9_build_never_half_written(work, tmp_path):
  rng = np.random.default_rng(14)
  model, xb = str(work / "model"), str(work / "xb.npy")
  with _compilation_cache(work):
    assert main(["build", model, xb, "--out", str(tmp_path / "ref")]) == 0
  reference = _index_bytes(tmp_path / "ref")
  idx = tmp_path / "idx"
  assert main(["build", model, str(work / "xq.npy"), "--out", str(idx), "--quantizer",
               "sign"]) == 0
  old = _index_bytes(idx)
  started = lambda: any(p.startswith(".idx.") for p in os.listdir(tmp_path))
  for delay in rng.uniform(0, 0.03, size=2):
    proc = _spawn(["build", model, xb, "--out", str(idx)], tmp_path, cache_of=work)
    _kill_when(proc, started, delay=float(delay))
    # The index is the old one or the new one, complete, never a mixture; a kill in the
    # two-rename window of atomic_output_dir leaves the old one complete beside it.
    if idx.exists():
      assert _index_bytes(idx) in (old, reference)
      SpreadingIndex.load(idx)
    else:
      aside = [p for p in tmp_path.iterdir() if p.name.startswith(".idx.") and
               p.name.endswith(".old")]
      assert [_index_bytes(p) for p in aside] == [old]
  assert main(["build", model, xb, "--out", str(idx)]) == 0
  assert _index_bytes(idx) == reference
  # What a kill leaves is hidden temporary copies only (removed by issue 15's cleanup).
  assert all(p in ("idx", "ref") or p.startswith(".idx.") for p in os.listdir(tmp_path))


def _model_bytes(path: Path) -> tuple:
  meta = json.loads((path / "model.json").read_text())
  meta["config"].pop("checkpoint_dir")
  return (path / "variables.msgpack").read_bytes(), meta


def test_train_on_a_finished_checkpoint_returns_the_trained_model(work, tmp_path):
  """Catches a run whose checkpoint already holds every epoch (killed after its last
  checkpoint committed but before the model was written, or simply run again) returning
  the untrained initial parameters: nothing is left to train, and the model must be the
  checkpoint's. (The results were built from the initial state before the restore.)"""
  shutil.copytree(work / "ck_ref", tmp_path / "ck")
  with _compilation_cache(work):
    assert main(_train_argv(work, tmp_path / "m", tmp_path / "ck")) == 0
  assert _model_bytes(tmp_path / "m") == _model_bytes(work / "model")


def test_kill9_train_resumes_byte_identical(work, tmp_path):
  """Catches a kill -9 that leaves a half-written model or a checkpoint that does not resume
  to the uninterrupted model (the fixture's, same config, its own checkpoint directory).

  Kill points: the moment the first epoch's history line appears, then a random point up to
  0.5 s after it (before, during or after a checkpoint commits, in the second epoch, or
  after the model is saved: a fast, idle machine finishes this 2-epoch run within that
  delay). Either outcome is checked: no model, and the resumed run writes the reference
  byte for byte; or the whole reference model. The first kill lands mid-run on any machine
  that needs more than the 2 ms poll interval for an epoch and two checkpoint commits."""
  rng = np.random.default_rng(15)
  reference = _model_bytes(work / "model")
  mid_run = 0
  for i, delay in enumerate([0.0, float(rng.uniform(0, 0.5))]):
    out, ck = tmp_path / f"m{i}", tmp_path / f"ck{i}"
    history = ck / "history.jsonl"
    proc = _spawn(_train_argv(work, out, ck), tmp_path, cache_of=work)
    assert _kill_when(proc, lambda: history.exists() and history.read_text().strip(),
                      delay=delay)
    if out.exists():  # killed after the model was saved: it is whole
      assert _model_bytes(out) == reference
      shutil.rmtree(out)
    else:
      mid_run += 1
    with _compilation_cache(work):
      assert main(_train_argv(work, out, ck)) == 0
    assert _model_bytes(out) == reference
  assert mid_run >= 1


def test_a_temporary_name_another_writer_holds_is_never_reused(tmp_path, monkeypatch):
  """atomic_output and atomic_output_dir draw a new temporary name when the drawn one
  exists (another writer's file or directory), and never write into it. Red when the
  exclusive create is dropped (the other writer's file is truncated or its directory
  reused)."""
  from spreading_jax import _files
  target = tmp_path / "out.npy"
  taken = [tmp_path / ".out.npy.taken.tmp.npy", tmp_path / ".d.taken.tmp"]
  taken[0].write_bytes(b"another writer")
  taken[1].mkdir()
  (taken[1] / "theirs").write_bytes(b"x")
  draws = iter([str(taken[0]), str(tmp_path / ".out.npy.fresh.tmp.npy"),
                str(taken[1]), str(tmp_path / ".d.fresh.tmp")])
  monkeypatch.setattr(_outputs, "temp_name", lambda path, suffix: next(draws))
  with _files.atomic_output(target) as tmp:
    assert Path(tmp).name == ".out.npy.fresh.tmp.npy"
    Path(tmp).write_bytes(b"ours")
  with _files.atomic_output_dir(tmp_path / "d") as tmp:
    assert Path(tmp).name == ".d.fresh.tmp"
    (Path(tmp) / "ours").write_bytes(b"y")
  assert target.read_bytes() == b"ours" and taken[0].read_bytes() == b"another writer"
  assert sorted(os.listdir(taken[1])) == ["theirs"]
  assert sorted(os.listdir(tmp_path / "d")) == ["ours"]
