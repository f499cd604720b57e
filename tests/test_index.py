"""SpreadingIndex: add/search/save/load round trip and load-time corruption checks."""
import json
import os

import numpy as np
import pytest

from spreading_jax import search
from spreading_jax.index import SpreadingIndex
from spreading_jax.train import TrainConfig, train


@pytest.fixture(scope="module")
def model(mini):
  config = TrainConfig(d_out=8, r2=10, bits=32, hidden=(32, 32), epochs=1, val_every=0,
                       lambda_koleo=0.05, verbose=False)
  return train(config, np.asarray(mini.train[:3000], np.float32))


@pytest.fixture(scope="module")
def zn_index(model, mini):
  index = SpreadingIndex(model, "zn", bits=32)
  index.add(np.asarray(mini.base, np.float32), chunk=4000)
  return index


def test_add_search_matches_codec(zn_index, model, mini):
  xb, xq = np.asarray(mini.base, np.float32), np.asarray(mini.query[:20], np.float32)
  assert zn_index.ntotal == xb.shape[0]
  np.testing.assert_array_equal(zn_index.codes, np.asarray(zn_index.codec.encode(model.apply(xb))))
  D, I = zn_index.search(xq, 10)
  assert D.shape == I.shape == (20, 10)
  _, ref = search.search_lattice(model.apply(xq), zn_index.codes, zn_index.codec, 10)
  np.testing.assert_array_equal(I, np.asarray(ref))
  assert np.all(np.diff(D, axis=1) <= 1e-6)


def test_bytes_per_vector_and_reconstruct(model, zn_index):
  assert zn_index.bytes_per_vector == (zn_index.codec.code_bits + 7) // 8
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


def test_bad_quantizer(model):
  with pytest.raises(ValueError, match="quantizer"):
    SpreadingIndex(model, "pq")
  with pytest.raises(ValueError, match="one bit per output dimension"):
    SpreadingIndex(model, "sign", bits=64)


def test_faiss_quantizer(model, mini, tmp_path, one_faiss_thread):
  faiss = pytest.importorskip("faiss")
  xt = np.asarray(mini.train[:3000], np.float32)
  xb, xq = np.asarray(mini.base, np.float32), np.asarray(mini.query[:20], np.float32)
  index = SpreadingIndex(model, "OPQ4,PQ4")
  assert index.code_bits == 32 and index.bytes_per_vector == 4 and not index.is_trained
  with pytest.raises(ValueError, match="not trained"):
    index.add(xb)
  with pytest.raises(ValueError, match="32-bit codes, not bits=64"):
    SpreadingIndex(model, "OPQ4,PQ4", bits=64)
  with pytest.raises(ValueError, match="faiss"):
    SpreadingIndex(model, "NotAFactory12")
  index.train(xt)
  index.add(xb, chunk=3000)
  assert index.ntotal == len(xb) and index.codes.shape == (len(xb), 4)
  # The same faiss index built by hand on the catalyzed vectors gives the same answers.
  ref = faiss.index_factory(model.config.d_out, "OPQ4,PQ4")
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
  assert loaded.quantizer == "OPQ4,PQ4" and loaded.ntotal == len(xb)
  np.testing.assert_array_equal(loaded.search(xq, 10)[1], I)
  blob = (tmp_path / "opq" / "faiss.index").read_bytes()
  (tmp_path / "opq" / "faiss.index").write_bytes(blob[:-100])
  with pytest.raises(ValueError, match="faiss.index is truncated or corrupt"):
    SpreadingIndex.load(tmp_path / "opq")


def test_encoder_matches_codec(model, mini):
  from spreading_jax.encode import make_encoder
  from spreading_jax.train import make_codec
  x = np.asarray(mini.base[:256], np.float32)
  codec = make_codec(model.config)
  np.testing.assert_array_equal(np.asarray(make_encoder(model)(x)),
                                np.asarray(codec.encode(model.apply(x))))


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
  np.testing.assert_array_equal(np.load(resumed), np.load(full))
  assert not os.path.exists(str(resumed) + ".progress.json")


def test_encode_file_row_ranges(model, mini, tmp_path):
  from spreading_jax.encode import encode_file
  src = tmp_path / "x.npy"
  np.save(src, np.asarray(mini.base[:600], np.float32))
  encode_file(model, src, tmp_path / "full.npy", chunk=256)
  encode_file(model, src, tmp_path / "a.npy", chunk=256, row_range=(0, 250))
  encode_file(model, src, tmp_path / "b.npy", chunk=256, row_range=(250, 600))
  parts = np.concatenate([np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy")])
  np.testing.assert_array_equal(parts, np.load(tmp_path / "full.npy"))
  with pytest.raises(ValueError, match="row_range"):
    encode_file(model, src, tmp_path / "c.npy", row_range=(0, 601))
