"""SpreadingIndex: add/search/save/load round trip, load-time corruption checks, and the
quantizer interface behind it."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from spreading_jax import lattice, quantizers, search
from spreading_jax import model as model_module
from spreading_jax.index import SpreadingIndex
from spreading_jax.model import TrainResult

from _rounding import assert_codes_equal_up_to_ties


@pytest.fixture(scope="module")
def model(tiny_model_dir):
  # d_out=8, r2=10, bits=32, 1 epoch (conftest.py; shared with test_cli and test_evaluate).
  return TrainResult.load(tiny_model_dir)


@pytest.fixture(scope="module")
def zn_index(model, mini):
  index = SpreadingIndex(model, "zn", bits=32)
  index.add(np.asarray(mini.base, np.float32), chunk=4000)
  return index


def test_add_search_matches_codec(zn_index, model, mini):
  xb, xq = np.asarray(mini.base, np.float32), np.asarray(mini.query[:20], np.float32)
  assert zn_index.ntotal == xb.shape[0]
  codec = zn_index.quantizer.codec
  yb = model.apply(xb)  # another batch shape than add's chunks: equal up to rounding ties
  assert_codes_equal_up_to_ties(zn_index.codes, codec.encode(yb), yb, zn_index.quantizer)
  D, I = zn_index.search(xq, 10)
  assert D.shape == I.shape == (20, 10)
  _, ref = search.search_lattice(model.apply(xq), zn_index.codes, codec, 10)
  np.testing.assert_array_equal(I, np.asarray(ref))
  assert np.all(np.diff(D, axis=1) <= 1e-6)


def test_bytes_per_vector_and_reconstruct(model, zn_index):
  assert zn_index.bytes_per_vector == (zn_index.code_bits + 7) // 8
  # The own sphere (r2=10, 14 bits) fits 32 bits; a 12-bit budget takes the largest that fits.
  assert zn_index.quantizer.codec == lattice.zn_codec(8, r2=10)
  assert SpreadingIndex(model).quantizer.codec.r2 == 10
  assert SpreadingIndex(model, "zn", bits=12).quantizer.codec == lattice.zn_codec(8, 12)
  assert SpreadingIndex(model, "sign").bytes_per_vector == 1
  r = zn_index.reconstruct(np.array([0, 5]))
  np.testing.assert_allclose(np.linalg.norm(r, axis=1), 1.0, rtol=1e-5)
  with pytest.raises(ValueError, match="ids"):
    zn_index.reconstruct(np.array([zn_index.ntotal]))


def test_sign_quantizer(model, mini):
  index = SpreadingIndex(model, "sign")
  index.add(np.asarray(mini.base[:500], np.float32))
  D, I = index.search(np.asarray(mini.base[:5], np.float32), 3)
  assert np.all(D[:, 0] == 0)
  D, I = index.search(np.zeros((0, index.d), np.float32), 3)  # zero queries: empty results
  assert D.shape == I.shape == (0, 3)


def test_save_load_round_trip(zn_index, mini, tmp_path):
  path = tmp_path / "idx"
  zn_index.save(path)
  loaded = SpreadingIndex.load(path)
  np.testing.assert_array_equal(loaded.codes, zn_index.codes)
  xq = np.asarray(mini.query[:5], np.float32)
  np.testing.assert_array_equal(loaded.search(xq, 5)[1], zn_index.search(xq, 5)[1])
  assert "ntotal=10000" in loaded.info()


def test_load_errors(zn_index, tmp_path):
  path = tmp_path / "idx"
  zn_index.save(path)
  codes = path / "codes.npy"
  blob = codes.read_bytes()
  codes.write_bytes(blob[:len(blob) // 2])
  with pytest.raises(ValueError, match="codes.npy is truncated or corrupt"):
    SpreadingIndex.load(path)
  codes.write_bytes(blob)
  meta = json.loads((path / "index.json").read_text())
  (path / "index.json").write_text(json.dumps(dict(meta, format_version=99)))
  with pytest.raises(ValueError, match="format version 99"):
    SpreadingIndex.load(path)
  (path / "index.json").write_text("{not json")
  with pytest.raises(ValueError, match="corrupt"):
    SpreadingIndex.load(path)
  os.remove(path / "index.json")
  with pytest.raises(ValueError, match="not a saved index"):
    SpreadingIndex.load(path)


def _edit_meta(path, **changes):
  meta = json.loads((path / "index.json").read_text())
  meta.update(changes)
  (path / "index.json").write_text(json.dumps(meta))
  return meta


def test_checksum_list_is_confined_and_complete(zn_index, tmp_path):
  path = tmp_path / "idx"
  zn_index.save(path)
  meta = json.loads((path / "index.json").read_text())
  sums = meta["sha256"]
  assert {"codes.npy", "model/model.json", "model/variables.msgpack"} <= set(sums)
  outside = tmp_path / "outside.bin"
  outside.write_bytes(b"x")
  digest = sums["codes.npy"]
  for key in ("../outside.bin", str(outside), "model/../../outside.bin", "model\\x", "./codes.npy"):
    _edit_meta(path, sha256=dict(sums, **{key: digest}))
    with pytest.raises(ValueError, match="not a file inside the index"):
      SpreadingIndex.load(path)
  for omitted in ("codes.npy", "model/variables.msgpack", "model/model.json"):
    _edit_meta(path, sha256={k: v for k, v in sums.items() if k != omitted})
    with pytest.raises(ValueError, match=f"lists no checksum for {omitted}"):
      SpreadingIndex.load(path)
  # A symbolic link inside the index that points out of it is refused too.
  os.replace(path / "codes.npy", tmp_path / "codes.npy")
  os.symlink(tmp_path / "codes.npy", path / "codes.npy")
  _edit_meta(path, sha256=sums)
  with pytest.raises(ValueError, match="not a file inside the index"):
    SpreadingIndex.load(path)


@pytest.mark.parametrize("changes, match", [
    (dict(ntotal="10000"), "ntotal"), (dict(d_in=-1), "d_in"), (dict(sha256=[]), "sha256"),
    (dict(sha256={"codes.npy": "zz"}), "sha256"), (dict(quantizer="zn"), "quantizer"),
    (dict(quantizer={"name": "zn", "d": 8}), "code_bits"),
    (dict(quantizer={"name": "zn", "d": 8, "code_bits": 32, "r2": 11}), "32-bit codes but"),
    (dict(quantizer={"name": "sign", "d": 8, "code_bits": 8}), "codes"),
    (dict(ntotal=5), "ntotal=5"), (dict(d_out=9), "d_out=9"), (dict(kind="other"), "describe"),
])
def test_edited_metadata_is_a_clear_error(zn_index, tmp_path, changes, match):
  path = tmp_path / "idx"
  zn_index.save(path)
  _edit_meta(path, **changes)
  with pytest.raises(ValueError, match=match):
    SpreadingIndex.load(path)


def test_interrupted_save_leaves_nothing_behind(zn_index, tmp_path):
  path = tmp_path / "idx"
  zn_index.save(path)
  # A save killed while writing the codes (os._exit: no cleanup runs) leaves its temporary
  # directory; the next save removes it, and only copies a dead save of an index left.
  script = ("import os, sys, numpy as np\n"
            "from spreading_jax.index import SpreadingIndex\n"
            "index = SpreadingIndex.load(sys.argv[1])\n"
            "np.save = lambda *a, **k: os._exit(9)\n"
            "index.save(sys.argv[1])\n")
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-c", script, str(path)], env=env, timeout=300,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 9
  left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".idx.")]
  assert len(left) == 1 and left[0].endswith(".tmp")
  old = tmp_path / ".idx.0badc0de.old"   # a complete old copy (crash between two renames)
  zn_index.save(old)
  os.rename(old / "index.json", tmp_path / "keep.json")
  foreign = tmp_path / ".idx.12345678.old"  # not an index: someone else's
  os.rename(old, foreign)
  zn_index.save(old)
  running = tmp_path / ".idx.0000beef.tmp"  # a save still running (this process)
  running.mkdir()
  (running / ".writer.json").write_text(json.dumps({"pid": os.getpid(),
                                                    "host": __import__("socket").gethostname()}))
  zn_index.save(path)
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".idx.")) == sorted([
      foreign.name, running.name])
  assert SpreadingIndex.load(path).ntotal == zn_index.ntotal


def test_quantizer_interface(model, mini):
  y = model.apply(np.asarray(mini.base[:300], np.float32))
  for name in ("zn", "sign"):
    q = quantizers.for_model(name, model.config)
    codes = q.encode(y)
    q.check_codes("codes", codes)
    assert codes.shape == (300, q.code_width) and codes.dtype == q.code_dtype
    assert quantizers.from_meta(json.loads(json.dumps(q.meta()))).meta() == q.meta()
    np.testing.assert_allclose(np.linalg.norm(q.decode(codes), axis=1), 1.0, rtol=1e-5)
    _, ids = q.search(y[:5], codes, 1)
    assert ids.shape == (5, 1)
    with pytest.raises(ValueError, match="codes"):
      q.check_codes("codes", codes[:, :1].astype(np.float32))
  with pytest.raises(ValueError, match="r2=10 is a parameter of the 'lattice' quantizer"):
    quantizers.make_quantizer("sign", 8, r2=10)
  chunks = quantizers.encode_in_chunks(quantizers.SignQuantizer(8).encode, y, chunk=7)
  np.testing.assert_array_equal(chunks, quantizers.SignQuantizer(8).encode(y))


# "np": no polysemous training (faiss' default for 8-bit PQ, seconds per sub-quantizer and
# irrelevant to codes and distances); the library takes any factory string as given.
@pytest.mark.parametrize("factory", ["ITQ8", "LSH8", "IVF16,PQ2np", "SQ8"])
def test_faiss_quantizer_searches_codes_like_faiss(model, mini, factory, one_faiss_thread):
  from spreading_jax import baselines
  y = model.apply(np.asarray(mini.base[:3000], np.float32))
  q = quantizers.make_quantizer(factory, 8)
  q.train(y)
  codes = q.encode(y)
  assert codes.shape == (3000, q.code_width) and q.code_bits == 8 * q.code_width
  ref = baselines.build_index(factory, 8)
  ref.train(y)
  ref.add(y)
  D, I = q.search(y[:30], codes, 5)
  D_ref, I_ref = ref.search(y[:30], 5)
  np.testing.assert_array_equal(I, I_ref)
  np.testing.assert_allclose(D, D_ref, rtol=1e-5)


def test_bad_quantizer(model):
  with pytest.raises(ValueError, match="quantizer"):
    SpreadingIndex(model, "pq")
  with pytest.raises(ValueError, match="one bit per output dimension"):
    SpreadingIndex(model, "sign", bits=64)


def test_faiss_quantizer(model, mini, tmp_path, one_faiss_thread):
  faiss = pytest.importorskip("faiss")
  xt = np.asarray(mini.train[:3000], np.float32)
  xb, xq = np.asarray(mini.base, np.float32), np.asarray(mini.query[:20], np.float32)
  index = SpreadingIndex(model, "OPQ4,PQ4np")  # "np": no polysemous training (see above)
  assert index.code_bits == 32 and index.bytes_per_vector == 4 and not index.is_trained
  with pytest.raises(ValueError, match="standalone codec"):
    SpreadingIndex(model, "HNSW8")
  with pytest.raises(ValueError, match="not trained"):
    index.add(xb)
  with pytest.raises(ValueError, match="32-bit codes, not bits=64"):
    SpreadingIndex(model, "OPQ4,PQ4np", bits=64)
  with pytest.raises(ValueError, match="faiss"):
    SpreadingIndex(model, "NotAFactory12")
  index.train(xt)
  index.add(xb, chunk=3000)
  assert index.ntotal == len(xb) and index.codes.shape == (len(xb), 4)
  # The same faiss index built by hand on the catalyzed vectors gives the same answers.
  ref = faiss.index_factory(model.config.d_out, "OPQ4,PQ4np")
  ref.train(np.asarray(model.apply(xt), np.float32))
  ref.add(np.asarray(model.apply(xb), np.float32))
  D_ref, I_ref = ref.search(np.asarray(model.apply(xq), np.float32), 10)
  D, I = index.search(xq, 10)
  np.testing.assert_array_equal(I, I_ref)
  np.testing.assert_allclose(D, D_ref, rtol=1e-5)
  np.testing.assert_array_equal(index.encode(xb[:50]), index.codes[:50])
  assert index.reconstruct(np.array([0, 1])).shape == (2, model.config.d_out)
  index.save(tmp_path / "opq")
  loaded = SpreadingIndex.load(tmp_path / "opq")
  assert loaded.quantizer.name == "OPQ4,PQ4np" and loaded.ntotal == len(xb)
  np.testing.assert_array_equal(loaded.search(xq, 10)[1], I)
  np.testing.assert_array_equal(loaded.codes, index.codes)
  blob = (tmp_path / "opq" / "quantizer.faiss").read_bytes()
  (tmp_path / "opq" / "quantizer.faiss").write_bytes(blob[:-100])
  with pytest.raises(ValueError, match="quantizer.faiss is truncated or corrupt"):
    SpreadingIndex.load(tmp_path / "opq")


def test_encoder_matches_codec(model, mini):
  from spreading_jax.encode import make_encoder
  from spreading_jax.train import make_codec
  x = np.asarray(mini.base[:256], np.float32)
  codec = make_codec(model.config)
  y = model.apply(x)  # the fused program rounds its own way: equal up to rounding ties
  assert_codes_equal_up_to_ties(make_encoder(model)(x), codec.encode(y), y,
                                quantizers.ZnQuantizer(codec))


def test_encode_file_resume(model, mini, tmp_path):
  from spreading_jax import sharding
  from spreading_jax.encode import encode_file
  src = tmp_path / "x.npy"
  np.save(src, np.asarray(mini.base[:1000], np.float32))
  full, resumed = tmp_path / "full.npy", tmp_path / "resumed.npy"
  assert encode_file(model, src, full, chunk=256)
  # Interrupted after 300 rows (two chunks written), then resumed on a 4-device mesh.
  assert not encode_file(model, src, resumed, chunk=256, max_rows=300)
  assert os.path.exists(str(resumed) + ".progress.json") and not resumed.exists()
  assert encode_file(model, src, resumed, chunk=256, mesh=sharding.make_mesh())
  y = model.apply(np.load(src))  # one device and a mesh: equal up to rounding ties
  assert_codes_equal_up_to_ties(np.load(resumed), np.load(full), y,
                                quantizers.ZnQuantizer(model.codec()))
  assert not os.path.exists(str(resumed) + ".progress.json")


def test_encode_file_row_ranges(model, mini, tmp_path):
  from spreading_jax.encode import encode_file
  src = tmp_path / "x.npy"
  np.save(src, np.asarray(mini.base[:600], np.float32))
  encode_file(model, src, tmp_path / "full.npy", chunk=256)
  encode_file(model, src, tmp_path / "a.npy", chunk=256, row_range=(0, 250))
  encode_file(model, src, tmp_path / "b.npy", chunk=256, row_range=(250, 600))
  parts = np.concatenate([np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")])
  y = model.apply(np.load(src))  # other chunk shapes: equal up to rounding ties
  assert_codes_equal_up_to_ties(parts, np.load(tmp_path / "full.npy"), y,
                                quantizers.ZnQuantizer(model.codec()))
  for bad in ((0, 601), (250, 100)):  # beyond the rows, reversed
    with pytest.raises(ValueError, match=rf"row_range={re.escape(str(bad))} is not a range "
                       r"\[lo, hi\) of the 600 rows"):
      encode_file(model, src, tmp_path / "c.npy", row_range=bad)


def test_fused_encode_matches_the_two_step_path(model, mini):
  # index.encode and make_encoder compile the catalyzer and the encoder into one program
  # (the block program of EncodeStream): same codes as catalyzing, then encoding.
  from spreading_jax.encode import make_encoder
  x = np.asarray(mini.base[:203], np.float32)
  for kind in ("lattice", "sign"):
    index = SpreadingIndex(model, kind)
    q = index.quantizer
    y = model.apply(x)
    ref = q.encode(y)
    # One fused program per chunk against two steps: equal up to rounding ties.
    assert_codes_equal_up_to_ties(index.encode(x), ref, y, q)
    fused = np.asarray(make_encoder(model, codec=q)(x))
    assert fused.dtype == q.code_dtype
    assert_codes_equal_up_to_ties(fused, ref, y, q)
    empty = index.encode(x[:0])
    assert empty.shape == (0, q.code_width) and empty.dtype == q.code_dtype
  # 203 rows in chunks of 16: 13 chunks, more than are kept in flight; rows in order.
  np.testing.assert_allclose(model.apply(x, batch_size=16), model.apply(x), atol=1e-5)
  assert model.apply(x[:0]).shape == (0, model.config.d_out)


def test_forward_compiles_once_per_size_bucket(model, mini):
  # Query batches of varying size share the program of their power-of-two bucket: one
  # compiled shape for 65..128 rows.
  x = np.asarray(mini.base[:128], np.float32)
  fwd = model_module._forward_fn(model.module, check=True)
  model.apply(x[:100])
  before = fwd._cache_size()
  for n in (100, 65, 128, 121):
    assert model.apply(x[:n]).shape[0] == n
  assert fwd._cache_size() == before


def test_forward_batch_by_backend(monkeypatch):
  assert model_module.default_batch_size() == 16384
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert model_module.default_batch_size() == 65536


def test_default_search_mesh_is_this_process_devices(zn_index, mini, monkeypatch):
  """``SpreadingIndex.search`` without a mesh shards over ``jax.local_devices()``. Simulates
  process 1 of a 2-process job with 2 devices each (the 4 forced host devices split in
  two): the mesh must name devices 2 and 3, and the results must equal an unsharded
  search. Red with the old default ``jax.devices()[:jax.local_device_count()]``, which
  names process 0's devices 0 and 1 on every process."""
  from spreading_jax import sharding
  devices = jax.devices()
  if len(devices) < 4:
    pytest.skip("needs 4 devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
  ours = devices[2:4]
  monkeypatch.setattr(jax, "local_devices", lambda *a, **k: list(ours))
  monkeypatch.setattr(jax, "local_device_count", lambda *a, **k: len(ours))
  monkeypatch.setattr(jax, "process_index", lambda *a, **k: 1)
  monkeypatch.setattr(jax, "process_count", lambda *a, **k: 2)
  assert list(sharding.local_mesh().devices.flat) == ours
  seen = []
  search_fn = zn_index.quantizer.search

  def spy(yq, codes, k, mesh=None):
    seen.append(mesh)
    return search_fn(yq, codes, k, mesh=mesh)

  monkeypatch.setattr(zn_index.quantizer, "search", spy)
  xq = np.asarray(mini.query[:16], np.float32)
  D, I = zn_index.search(xq, 10)
  assert list(seen[0].devices.flat) == ours
  D1, I1 = zn_index.search(xq, 10, mesh=sharding.make_mesh(1))
  np.testing.assert_array_equal(I, I1)
  np.testing.assert_array_equal(D, D1)
  monkeypatch.setattr(jax, "local_devices", lambda *a, **k: devices[:1])
  assert sharding.local_mesh() is None  # one local device: no mesh


class _HalfSign(quantizers.SignQuantizer):
  """A quantizer defined outside quantizers.py: the sign bits of the first half of the
  dimensions (what a new quantizer's own module would hold)."""

  def __init__(self, d: int):
    super().__init__(d)
    self.name = "half_sign"

  def encode(self, y) -> np.ndarray:
    half = np.asarray(y, np.float32).copy()
    half[:, self.d // 2:] = 1.0
    return super().encode(half)


def test_a_registered_quantizer_is_known_everywhere(model, mini, tmp_path, monkeypatch):
  """One class plus ``register_quantizer`` is all a new quantizer needs: the index builds,
  saves and reloads it by name, TrainConfig accepts the name, training validates it under
  ``half_sign_R@k`` and keeps its per-query hits for selection, selection screens its
  shapes. Red when any of these dispatches on a hard-coded name list again (seen red with
  TrainConfig's old ("lattice", "sign") check)."""
  from spreading_jax import selection
  from spreading_jax import train as T
  monkeypatch.setitem(quantizers._REGISTRY, "half_sign", _HalfSign)  # register_quantizer
  assert "half_sign" in quantizers.names()
  xb = np.asarray(mini.base[:500], np.float32)
  index = SpreadingIndex(model, "half_sign")
  index.add(xb)
  assert isinstance(index.quantizer, _HalfSign)
  index.save(tmp_path / "idx")
  loaded = SpreadingIndex.load(tmp_path / "idx")
  assert loaded.quantizer.name == "half_sign"
  np.testing.assert_array_equal(loaded.codes, index.codes)
  assert selection.candidate_shapes(16, "half_sign") == [(16, None)]

  config = T.TrainConfig(d_out=8, bits=16, hidden=(16,), lambda_koleo=0.05, epochs=2,
                         batch_size=32,
                         val_every=1, val_queries=50, quantizer="half_sign", verbose=False)
  assert [q.name for q in quantizers.validation_quantizers(config)] == [
      "lattice", "sign", "half_sign"]
  result = T.train(config, np.asarray(mini.train[:400], np.float32))
  assert {"lattice_R@10", "sign_R@10", "half_sign_R@10"} <= set(result.history[-1])
  assert set(result.validation_hits) >= {"half_sign_R@10"}

  with pytest.raises(ValueError, match="quantizer='nope' must be one of"):
    T.TrainConfig(quantizer="nope")
  with pytest.raises(ValueError, match="is taken"):
    quantizers.register_quantizer("sign", _HalfSign)
  with pytest.raises(ValueError, match="is taken"):
    quantizers.register_quantizer("zn", _HalfSign)


def test_old_name_zn_still_reads(zn_index, model, tmp_path):
  """"zn", the lattice quantizer's name before it was "lattice" everywhere, still works:
  a saved index whose index.json says "zn" loads (as "lattice", same codes), and the name
  is accepted by SpreadingIndex, make_quantizer and TrainConfig. Red when the alias is
  dropped from quantizers.ALIASES."""
  assert zn_index.quantizer.name == "lattice"
  zn_index.save(tmp_path / "idx")
  meta_path = tmp_path / "idx" / "index.json"
  meta = json.loads(meta_path.read_text())
  assert meta["quantizer"]["name"] == "lattice"
  meta["quantizer"]["name"] = "zn"  # what a save before the rename wrote
  meta_path.write_text(json.dumps(meta))
  old = SpreadingIndex.load(tmp_path / "idx")
  assert old.quantizer.name == "lattice" and old.quantizer.codec == zn_index.quantizer.codec
  np.testing.assert_array_equal(old.codes, zn_index.codes)
  assert SpreadingIndex(model, "zn").quantizer.meta() == SpreadingIndex(model).quantizer.meta()
  assert quantizers.make_quantizer("zn", 24).name == "lattice"
  assert model.config.replace(quantizer="zn").quantizer == "lattice"


def test_sign_search_names_the_database_codes():
  q = quantizers.make_quantizer("sign", d=8)
  y = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
  # The database codes are 3 bytes wide, the queries' 1: the error names the database's.
  with pytest.raises(ValueError, match=r"codes has shape \(5, 3\).*sign codes are \[n, 1\]"):
    q.search(y, np.zeros((5, 3), np.uint8), 2)
  with pytest.raises(ValueError, match=r"codes has shape \(5, 3\)"):
    q.search(y[:0], np.zeros((5, 3), np.uint8), 2)


def test_index_mesh_must_be_a_mesh(zn_index, mini):
  xq = np.asarray(mini.query[:2], np.float32)
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh.*got str"):
    zn_index.search(xq, 2, mesh="cpu")
  ntotal = zn_index.ntotal
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    zn_index.add(xq, mesh="cpu")
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    zn_index.encode(xq, mesh="cpu")
  assert zn_index.ntotal == ntotal  # nothing appended
