"""The streaming encoder (issue 28) and batch-invariant codes (issue 26, item 5).

Every vector is encoded in a fixed-shape block (``encode.block_rows()`` rows per device),
so its code is the same whatever the chunk size, the batch it is added in, the number of
devices or where a resume starts; reads and transfers overlap the compute, the NaN/Inf
check runs on the device, and uint8 inputs travel as uint8.

The data are rows on lattice decision boundaries (bisected between two vectors with
different codes until their codes differ by one float step), where any difference in the
float rounding of the catalyzer flips codes: on XLA:CPU a 20000-row program gave ~100 of
these 1958 rows another code than the 2048-row block program.
"""
import os
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spreading_jax import _signals, encode, sharding
from spreading_jax.catalyzer import Catalyzer
from spreading_jax.cli import main
from spreading_jax.config import TrainConfig
from spreading_jax.quantizers import make_codec
from spreading_jax.index import SpreadingIndex
from spreading_jax.model import TrainResult
from spreading_jax.vecs_io import write_bvecs, write_fvecs

D_IN = 96


@pytest.fixture(scope="module")
def model():
  """An untrained catalyzer 96 -> 64 -> 64 -> 8 (r2=10): real shapes, fixed weights."""
  module = Catalyzer(d_out=8, hidden=(64, 64))
  v = module.init(jax.random.PRNGKey(0), jnp.zeros((1, D_IN)), train=False)
  config = TrainConfig(d_out=8, r2=10, bits=32, hidden=[64, 64])
  return TrainResult(v["params"], v["batch_stats"], config, D_IN, 2.0)


def _block_codes(model, x):
  """The unpipelined reference: make_encoder on zero-padded blocks of block_rows() rows,
  one after the other."""
  enc, b = encode.make_encoder(model), encode.block_rows()
  parts = [np.asarray(enc(sharding.pad_rows(x[s:s + b], b)))[:len(x[s:s + b])]
           for s in range(0, len(x), b)]
  return np.concatenate(parts)


@pytest.fixture(scope="module")
def ties(model):
  """f32[~2000, 96] rows on both sides of lattice decision boundaries (see the module
  docstring)."""
  rng = np.random.default_rng(0)
  x0, x1 = (rng.standard_normal((1024, D_IN)).astype(np.float32) for _ in range(2))
  c0 = _block_codes(model, x0)
  keep = (c0 != _block_codes(model, x1)).any(1)
  x0, x1, c0 = x0[keep], x1[keep], c0[keep]
  lo, hi = np.zeros(len(x0)), np.ones(len(x0))
  for _ in range(40):
    mid = (lo + hi) / 2
    same = (_block_codes(model, (x0 + mid[:, None] * (x1 - x0)).astype(np.float32))
            == c0).all(1)
    lo, hi = np.where(same, mid, lo), np.where(same, hi, mid)
  return np.concatenate([(x0 + t[:, None] * (x1 - x0)).astype(np.float32) for t in (lo, hi)])


def test_codes_do_not_depend_on_chunk_devices_batches_or_resume(model, ties, tmp_path):
  """encode_file with chunks 1000/4096/20000 on 1 and 4 devices, an interrupted run
  resumed with another chunk on another device count, SpreadingIndex.add (whole and in
  uneven pieces), SpreadingIndex.encode and the CLI: all byte-identical to the block
  reference. Catches any path that compiles another row count than block_rows() per
  device (red with blocks sized by the chunk, the old encode_file, and with power-of-two
  padded batches, the old add)."""
  src = tmp_path / "ties.fvecs"
  write_fvecs(src, ties)
  ref = _block_codes(model, ties)
  mesh = sharding.make_mesh()
  runs = {}
  for chunk, m in ((1000, None), (4096, mesh), (20000, None), (1000, mesh)):
    out = tmp_path / f"c{chunk}_{'mesh' if m else 'one'}.npy"
    assert encode.encode_file(model, src, out, chunk=chunk, mesh=m)
    runs[out.name] = np.load(out)
  resumed = tmp_path / "resumed.npy"
  assert not encode.encode_file(model, src, resumed, chunk=1000, max_rows=333)
  assert encode.encode_file(model, src, resumed, chunk=20000, mesh=mesh)
  runs["resumed"] = np.load(resumed)
  index = SpreadingIndex(model, "zn")
  index.add(ties, chunk=700)
  runs["add"] = index.codes
  pieces = SpreadingIndex(model, "zn")
  for start in range(0, 777, 37):  # small batches (a power-of-two bucket would be 64 rows)
    pieces.add(ties[start:min(start + 37, 777)], chunk=20000)
  pieces.add(ties[777:], chunk=100, mesh=mesh)
  runs["add in pieces"] = pieces.codes
  runs["index.encode"] = index.encode(ties)
  model.save(tmp_path / "model")
  assert main(["encode", str(tmp_path / "model"), str(src), str(tmp_path / "cli.npy"),
               "--chunk", "3000"]) == 0
  runs["cli"] = np.load(tmp_path / "cli.npy")
  for name, codes in runs.items():
    assert codes.dtype == np.uint32 and codes.shape == ref.shape, name
    assert codes.tobytes() == ref.tobytes(), (name, int((codes != ref).any(1).sum()))


def test_rows_of_a_block_do_not_depend_on_position_or_neighbours(model, ties):
  """The rule batch invariance rests on: in the block program (block_rows() rows) a row's
  catalyzed floats are bitwise the same at any position and with any other rows. Red when
  a block of another row count is compared (XLA:CPU rounds other shapes differently)."""
  b = encode.block_rows()
  rng = np.random.default_rng(1)
  x = np.concatenate([ties, rng.standard_normal((b, D_IN)).astype(np.float32)])[:b]
  program = encode._block_program(model.module, None)
  scale = np.float32(model.input_scale)
  y = np.asarray(program(model.variables, x, scale)[0])
  for shift in (1, 7, 8, 513):
    rolled = np.asarray(program(model.variables, np.roll(x, shift, axis=0), scale)[0])
    assert np.array_equal(np.roll(y, shift, axis=0), rolled), shift
  other = x.copy()
  other[1::2] = rng.standard_normal((b // 2, D_IN))
  assert np.array_equal(np.asarray(program(model.variables, other, scale)[0])[0::2], y[0::2])


def test_uint8_inputs_travel_as_uint8(model, tmp_path, monkeypatch):
  """A bvecs file is sent to the device as its uint8 row bytes (1 byte per value, not 4;
  the 4-byte headers dropped on the device), a fvecs file as its row bytes too (no host
  copy), and both get the codes of the same values as float32 arrays. Red when rows are
  converted or copied on the host, or when the header offset is wrong."""
  x = np.random.default_rng(2).integers(0, 256, (3000, D_IN), dtype=np.uint8)
  write_bvecs(tmp_path / "x.bvecs", x)
  write_fvecs(tmp_path / "x.fvecs", x.astype(np.float32))
  sent = []
  put = jax.device_put
  monkeypatch.setattr(encode.jax, "device_put",
                      lambda v, *a, **k: (sent.append((v.dtype, v.shape)),
                                          put(v, *a, **k))[1])
  assert encode.encode_file(model, tmp_path / "x.bvecs", tmp_path / "b.npy", chunk=1000)
  assert sent == [(np.uint8, (2048, 4 + D_IN))] * 2, sent  # 2 blocks of file rows
  sent.clear()
  assert encode.encode_file(model, tmp_path / "x.fvecs", tmp_path / "f.npy", chunk=1000)
  assert sent == [(np.uint8, (2048, 4 + 4 * D_IN))] * 2, sent  # the bytes, headers too
  np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), np.load(tmp_path / "f.npy"))
  np.testing.assert_array_equal(np.load(tmp_path / "b.npy"), _block_codes(model, x))


def _readers() -> list:
  return [t for t in threading.enumerate() if t.name == "encode-reader"]


def test_bad_rows_are_found_on_the_device_and_nothing_is_added(model, tmp_path):
  """A NaN, an Inf or a float64 beyond float32 in a later chunk: ValueError naming the
  row and column, no codes appended, the reader thread gone. Red without the in-program
  check (the codes of a NaN row come back without an error)."""
  x = np.random.default_rng(3).standard_normal((5000, D_IN))
  for value, row, col in ((np.nan, 4321, 5), (np.inf, 2048, 0), (1e39, 4999, 95)):
    bad = x.copy()
    bad[row, col] = value
    index = SpreadingIndex(model, "zn")
    with pytest.raises(ValueError, match=rf"x row {row} contains NaN or Inf .*column {col}"):
      index.add(bad, chunk=1000)
    assert index.ntotal == 0
  assert not _readers()
  # encode_file: the job's partial and progress files are gone, no output.
  bad = x.astype(np.float32)
  bad[3000, 7] = np.nan
  np.save(tmp_path / "nan.npy", bad)
  with pytest.raises(ValueError, match="nan.npy row 3000 contains NaN.*nothing was written"):
    encode.encode_file(model, tmp_path / "nan.npy", tmp_path / "codes.npy", chunk=1000)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["nan.npy"]


class _LoggedRows:
  """An [n, d] array whose row reads are logged (a stand-in for a memory map)."""

  def __init__(self, x, log):
    self.x, self.log, self.shape, self.dtype = x, log, x.shape, x.dtype

  def __getitem__(self, rows):
    if isinstance(rows, slice):
      self.log.append(("read", rows.start))
    return self.x[rows]


def test_reads_run_ahead_of_the_compute_but_boundedly(model):
  """Chunk i+1 is read (and dispatched) before chunk i is handed back, and a slow
  consumer never has more than 4 chunks read ahead of it (one dispatched, _PREFETCH
  queued, one waiting to be queued). Red with an unbounded queue or without prefetch."""
  b = encode.block_rows()
  x = np.random.default_rng(4).standard_normal((12 * b, D_IN)).astype(np.float32)
  log = []
  with encode.EncodeStream(model, _LoggedRows(x, log), chunk=b) as stream:
    for lo, hi, y in stream:
      log.append(("yield", lo))
      time.sleep(0.05)
      assert y.shape == (hi - lo, 8)
  reads = [lo for kind, lo in log if kind == "read"]
  assert reads == list(range(0, 12 * b, b))
  for i, (kind, lo) in enumerate(log):
    if kind == "yield":
      read_before = sum(1 for k, _ in log[:i] if k == "read")
      assert min(lo // b + 2, 12) <= read_before <= lo // b + 1 + 1 + encode._PREFETCH + 1, log
  assert not _readers()


class _SlowRows(_LoggedRows):
  """Rows whose every chunk read takes `delay` seconds (a slow disk)."""

  def __init__(self, x, delay):
    super().__init__(x, [])
    self.delay = delay

  def __getitem__(self, rows):
    time.sleep(self.delay)
    return super().__getitem__(rows)


def test_a_signal_while_the_stream_stops_still_joins_the_reader(model):
  """Bug caught: `spreading-jax encode` killed by SIGTERM sometimes aborted ("terminate
  called ... FATAL: exception not rethrown", status -6) instead of exiting 143: a second
  signal, or the first one arriving while the stream stopped, interrupted the join, and
  the interpreter exited with the reader thread inside jax. Here Ctrl-C interrupts the
  consumer and a SIGTERM lands while the stream waits for the reader's slow read. Red
  without the deferral in EncodeStream.__exit__ (the reader is still alive)."""
  if threading.current_thread() is not threading.main_thread():
    pytest.skip("signals are delivered to the main thread only")
  b = encode.block_rows()
  x = _SlowRows(np.zeros((8 * b, D_IN), np.float32), delay=0.5)
  with pytest.raises(_signals.Interrupted) as raised, _signals.handling():
    with encode.EncodeStream(model, x, chunk=b) as stream:
      for _ in stream:
        # The reader is now inside a 0.5 s read; SIGTERM arrives 0.1 s into the stop.
        threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGTERM)).start()
        os.kill(os.getpid(), signal.SIGINT)
  assert raised.value.signum == signal.SIGTERM  # raised once the reader had ended
  assert not _readers()


def test_resume_is_keyed_to_the_encoder_configuration(model, tmp_path, monkeypatch):
  """An interrupted encode is not resumed by an encoder whose codes may round
  differently (another block size here; also platform, jax version, XLA flags), but is
  resumed with another chunk and device count. Red without "encoder" in the job key."""
  x = np.random.default_rng(5).standard_normal((3000, D_IN)).astype(np.float32)
  np.save(tmp_path / "x.npy", x)
  out = tmp_path / "codes.npy"
  assert not encode.encode_file(model, tmp_path / "x.npy", out, chunk=1000, max_rows=1000)
  rows = encode.block_rows()
  monkeypatch.setattr(encode, "block_rows", lambda: rows // 2)
  with pytest.raises(ValueError, match="another encoder configuration"):
    encode.encode_file(model, tmp_path / "x.npy", out, chunk=1000)
  monkeypatch.setattr(encode, "block_rows", lambda: rows)
  assert encode.encode_file(model, tmp_path / "x.npy", out, chunk=5000,
                            mesh=sharding.make_mesh())
  np.testing.assert_array_equal(np.load(out), _block_codes(model, x))
  fp = encode.encoder_fingerprint()
  assert fp["block_rows"] == rows and fp["platform"] == jax.devices()[0].platform
  assert encode.encoder_fingerprint(sharding.make_mesh()) == fp  # device count: no part
  codec = make_codec(model.config)
  assert np.load(out).shape == (3000, codec.code_words)


def test_encoders_refuse_a_quantizer_they_cannot_run(model, tmp_path):
  """make_encoder and encode_file refuse, with one message each, a quantizer on another
  dimension than the model's d_out and one that encodes outside JAX (a faiss index), before
  writing anything. Red with make_encoder's former wording ("codec has d=16 but d_out=8")."""
  from spreading_jax import quantizers
  d_out = model.config.d_out
  np.save(tmp_path / "x.npy", np.zeros((10, D_IN), np.float32))
  other_d = quantizers.make_quantizer("sign", d_out + 8, bits=d_out + 8)
  outside = quantizers.make_quantizer("PQ2", d_out, bits=16)
  for q, message in ((other_d, f"works on d={d_out + 8} but the model's d_out={d_out}"),
                     (outside, "encodes outside JAX")):
    with pytest.raises(ValueError, match=message):
      encode.make_encoder(model.params, model.batch_stats, q, model.input_scale,
                          model.config.hidden, d_out)
    with pytest.raises(ValueError, match=message):
      encode.encode_file(model, tmp_path / "x.npy", tmp_path / "codes.npy", quantizer=q)
  assert sorted(os.listdir(tmp_path)) == ["x.npy"]


# float64 1e39 becomes inf when jax casts the input to float32 (numpy warns; the test wants it).
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
def test_make_encoder_checks_its_input(model):
  """make_encoder's encoder refuses, with a ValueError naming the problem and before any
  compute, what used to fail deep inside flax/jax or pass silently: another dimension, a
  1-D row, a bool matrix, a list; a NaN/Inf row raises NonFiniteRowError naming its row
  and column (numpy and jax inputs, checked inside the program), unless check_finite=False
  is asked for; 0 rows give 0 codes. Valid codes are those of the program."""
  enc = encode.make_encoder(model)
  x = np.random.default_rng(5).standard_normal((6, D_IN)).astype(np.float32)
  codes = np.asarray(enc(x))
  assert codes.shape == (6, make_codec(model.config).code_words) and codes.dtype == np.uint32
  for bad, message in ((x[:, :10], f"x has d_in=10 but {D_IN} was expected"),
                       (x[0], r"x must be 2-D \(n, d\), got shape \(96,\)"),
                       (x > 0, "x has dtype bool"),
                       (x.tolist(), "x must be an array, got list")):
    with pytest.raises(ValueError, match=message):
      enc(bad)
  for value in (np.nan, -np.inf):
    bad = x.copy()
    bad[4, 3] = value
    for arg in (bad, jnp.asarray(bad)):
      with pytest.raises(encode.NonFiniteRowError,
                         match=r"x row 4 contains NaN or Inf .*first at column 3") as info:
        enc(arg)
      assert info.value.row == 4
  bad = x.astype(np.float64)
  bad[2, 7] = 1e39  # beyond float32
  with pytest.raises(ValueError, match="x row 2 .*column 7"):
    enc(bad)
  # The opt-out keeps calls asynchronous: a bad row then gets some code, no error.
  assert encode.make_encoder(model, check_finite=False)(bad).shape == codes.shape
  empty = enc(x[:0])
  assert empty.shape == (0, codes.shape[1]) and empty.dtype == codes.dtype
  np.testing.assert_array_equal(np.asarray(enc(x)), codes)
  with pytest.raises(ValueError, match="not a Catalyzer's parameters"):
    encode.make_encoder({"w": np.zeros(3)}, model.batch_stats, make_codec(model.config),
                        hidden=model.config.hidden, d_out=model.config.d_out)


def _stream_rows(model, x, **kwargs):
  out = []
  with encode.EncodeStream(model, x, then=make_codec(model.config).encode_core,
                           **kwargs) as stream:
    for lo, hi, codes in stream:
      out.append((lo, hi, codes))
  return out


def test_encode_stream_checks_its_input_and_row_range(model):
  """EncodeStream, documented as usable directly, refuses when constructed (before any
  thread or compute) rows outside its input (stop=500 of 200 rows used to yield 500 rows
  of codes, start=-10 210 rows, start > stop nothing), non-integer bounds, another
  dimension, a 1-D row and a list; a valid sub-range yields exactly its rows."""
  x = np.random.default_rng(6).standard_normal((200, D_IN)).astype(np.float32)
  for start, stop in ((0, 500), (-10, None), (50, 10), (201, None)):
    shown = 200 if stop is None else stop
    with pytest.raises(ValueError, match=rf"rows \[start, stop\) = \[{start}, {shown}\) are "
                                         r"not a range of the 200 rows of x"):
      _stream_rows(model, x, start=start, stop=stop)
  with pytest.raises(ValueError, match="start must be an integer, got 1.5"):
    _stream_rows(model, x, start=1.5)
  for bad, message in ((x[:, :10], f"vecs has d_in=10 but {D_IN} was expected"),
                       (x[0], r"vecs must be 2-D \(n, d\), got shape \(96,\)"),
                       (x > 0, "vecs has dtype bool"),
                       (x.tolist(), "vecs must be an array, got list")):
    with pytest.raises(ValueError, match=message):
      _stream_rows(model, bad, name="vecs")
  assert not _readers()
  whole = np.concatenate([c for _, _, c in _stream_rows(model, x)])
  part = _stream_rows(model, x, start=3, stop=7)
  assert [(lo, hi) for lo, hi, _ in part] == [(3, 7)]
  np.testing.assert_array_equal(part[0][2], whole[3:7])
  assert _stream_rows(model, x, start=200) == []


def test_l2_normalize_takes_array_likes_and_refuses_the_rest():
  """l2_normalize (exported) takes nested lists and integer arrays (it raised "can't
  multiply sequence" on a list) and refuses a scalar, bool, complex and non-numeric input
  with a ValueError naming the problem."""
  from spreading_jax import l2_normalize
  np.testing.assert_allclose(l2_normalize([[3.0, 4.0]]), [[0.6, 0.8]], rtol=1e-6)
  np.testing.assert_allclose(l2_normalize(np.array([[3, 4]])), [[0.6, 0.8]], rtol=1e-6)
  for bad, message in ((2.0, "got a scalar"), ([[True, False]], "dtype bool"),
                       (np.ones((1, 2), np.complex64), "dtype complex64"),
                       (np.array([["a"]]), "needs an array of real vectors, got ndarray")):
    with pytest.raises(ValueError, match=message):
      l2_normalize(bad)
