"""Vector file I/O and datasets: round trips, malformed files, real data shapes."""
import gzip
import os

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from spreading_jax import data


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 30), d=st.integers(1, 40), seed=st.integers(0, 9))
def test_vecs_round_trip(tmp_path_factory, n, d, seed):
  tmp = tmp_path_factory.mktemp("vecs")
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d)).astype(np.float32)
  i = rng.integers(-2**31, 2**31 - 1, (n, d), dtype=np.int64).astype(np.int32)
  b = rng.integers(0, 256, (n, d)).astype(np.uint8)
  data.write_fvecs(tmp / "x.fvecs", x)
  data.write_ivecs(tmp / "x.ivecs", i)
  data.write_bvecs(tmp / "x.bvecs", b)
  np.testing.assert_array_equal(data.read_fvecs(tmp / "x.fvecs"), x)
  np.testing.assert_array_equal(data.read_ivecs(tmp / "x.ivecs"), i)
  np.testing.assert_array_equal(data.read_vectors(tmp / "x.bvecs"), b)


def test_reads_are_memory_mapped(siftsmall):
  assert isinstance(siftsmall.base.base, np.memmap) or isinstance(siftsmall.base, np.memmap)
  assert not siftsmall.base.flags.owndata


def test_npy_and_hdf5_round_trip(tmp_path):
  x = np.arange(12, dtype=np.float32).reshape(4, 3)
  np.save(tmp_path / "x.npy", x)
  assert isinstance(data.read_vectors(tmp_path / "x.npy"), np.memmap)
  gt = np.array([[0], [1]], np.int32)
  data.write_hdf5(tmp_path / "a.hdf5", x, x[:2], gt)
  f = data.read_hdf5(tmp_path / "a.hdf5")
  np.testing.assert_array_equal(f["test"], x[:2])
  ds = data.load_dataset(str(tmp_path / "a.hdf5"))
  assert (ds.nb, ds.nq, ds.metric) == (4, 2, "l2")
  np.testing.assert_array_equal(data.read_vectors(tmp_path / "a.hdf5", key="neighbors"), gt)


def _write_raw(path, *chunks):
  with open(path, "wb") as f:
    for c in chunks:
      f.write(c)


@pytest.mark.parametrize("case, match", [
    ("empty", "empty file"),
    ("truncated", "truncated last row"),
    ("inconsistent", "inconsistent dimension"),
    ("bad_header", "invalid dimension"),
])
def test_malformed_vecs_are_rejected(tmp_path, case, match):
  path = tmp_path / "bad.fvecs"
  row = np.int32(3).tobytes() + np.ones(3, np.float32).tobytes()
  if case == "empty":
    _write_raw(path)
  elif case == "truncated":
    _write_raw(path, row, row[:-2])
  elif case == "inconsistent":
    _write_raw(path, row, np.int32(2).tobytes() + np.ones(3, np.float32).tobytes())
  else:
    _write_raw(path, np.int32(-5).tobytes() + b"\0" * 12)
  with pytest.raises(ValueError, match=match) as e:
    data.read_fvecs(path)
  assert "bad.fvecs" in str(e.value)


def test_bad_writes_and_files_are_rejected(tmp_path):
  with pytest.raises(ValueError, match="NaN"):
    data.write_fvecs(tmp_path / "x.fvecs", np.array([[np.nan]], np.float32))
  with pytest.raises(ValueError, match=r"\[0, 255\]"):
    data.write_bvecs(tmp_path / "x.bvecs", np.array([[300]]))
  with pytest.raises(ValueError, match="integer"):
    data.write_ivecs(tmp_path / "x.ivecs", np.array([[1.5]]))
  with pytest.raises(ValueError, match="2-D"):
    data.write_fvecs(tmp_path / "x.fvecs", np.ones(3))
  import h5py
  with h5py.File(tmp_path / "bad.hdf5", "w") as f:
    f["train"] = np.ones((3, 2))
  with pytest.raises(ValueError, match="missing datasets"):
    data.read_hdf5(tmp_path / "bad.hdf5")
  with pytest.raises(ValueError, match="unknown vector file type"):
    data.read_vectors(tmp_path / "x.txt")
  (tmp_path / "x.npy").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="not a valid .npy"):
    data.read_vectors(tmp_path / "x.npy")


def test_idx_reader_rejects_bad_magic_and_truncation(tmp_path):
  good = (0x803).to_bytes(4, "big") + (2).to_bytes(4, "big") + (2).to_bytes(4, "big") * 2
  gz = tmp_path / "img.gz"
  gz.write_bytes(gzip.compress(good + bytes(8)))
  assert data._read_idx_gz(gz, 0x803).shape == (2, 4)
  gz.write_bytes(gzip.compress((0x801).to_bytes(4, "big") + good[4:] + bytes(8)))
  with pytest.raises(ValueError, match="bad IDX magic"):
    data._read_idx_gz(gz, 0x803)
  gz.write_bytes(gzip.compress(good + bytes(8))[:-6])
  with pytest.raises(ValueError, match="corrupt or truncated gzip"):
    data._read_idx_gz(gz, 0x803)
  gz.write_bytes(gzip.compress(good + bytes(5)))
  with pytest.raises(ValueError, match="payload"):
    data._read_idx_gz(gz, 0x803)


def test_atomic_output_keeps_old_file_on_error(tmp_path):
  target = tmp_path / "keep.txt"
  target.write_text("old")
  with pytest.raises(RuntimeError):
    with data.atomic_output(target) as tmp:
      open(tmp, "w").write("half")
      raise RuntimeError("crash")
  assert target.read_text() == "old"
  assert os.listdir(tmp_path) == ["keep.txt"]
  with data.atomic_output_dir(tmp_path / "d") as tmp:
    open(os.path.join(tmp, "a"), "w").write("1")
  with pytest.raises(RuntimeError):
    with data.atomic_output_dir(tmp_path / "d") as tmp:
      raise RuntimeError("crash")
  assert (tmp_path / "d" / "a").read_text() == "1"
  assert sorted(os.listdir(tmp_path)) == ["d", "keep.txt"]


def test_real_datasets_have_documented_shapes(siftsmall, wordllama):
  assert (siftsmall.nt, siftsmall.nb, siftsmall.nq, siftsmall.d) == (10000, 10000, 100, 128)
  assert siftsmall.groundtruth.shape == (100, 100)
  w = wordllama
  assert (w.nt, w.nb, w.nq, w.d) == (20000, 53743, 1000, 256)
  # The learn set is disjoint from the queries: no query vector appears in train.
  assert not np.isin(w.query[:50, 0], w.train[:, 0]).all()


def test_fashion_mnist_groundtruth_is_cached():
  try:
    root = data.data_root()
  except ValueError as e:
    pytest.skip(str(e))
  ds = data.load_dataset("fashion-mnist", root)
  assert (ds.nb, ds.nq, ds.d) == (60000, 10000, 784)
  assert ds.groundtruth.shape == (10000, 100)
  cached = list(data.cache_dir().glob("fashion-mnist-gt100-*.ivecs"))
  assert cached, "groundtruth was not cached"
  # Spot-check the cached groundtruth against brute force.
  q = ds.query[:5].astype(np.float64)
  d = ((q[:, None, :] - ds.base[None].astype(np.float64)) ** 2).sum(-1)
  np.testing.assert_array_equal(np.argmin(d, axis=1), ds.groundtruth[:5, 0])


def test_paper_datasets_need_user_files(tmp_path):
  with pytest.raises(ValueError, match="deep1B_queries.fvecs"):
    data.load_dataset("deep1m", tmp_path)
  rng = np.random.default_rng(0)
  (tmp_path / "gnd").mkdir()
  data.write_bvecs(tmp_path / "bigann_base.bvecs", rng.integers(0, 255, (50, 8)))
  data.write_bvecs(tmp_path / "bigann_learn.bvecs", rng.integers(0, 255, (30, 8)))
  data.write_bvecs(tmp_path / "bigann_query.bvecs", rng.integers(0, 255, (4, 8)))
  data.write_ivecs(tmp_path / "gnd" / "idx_1M.ivecs", rng.integers(0, 50, (4, 10)))
  ds = data.load_dataset("bigann1m", tmp_path)
  assert (ds.nt, ds.nb, ds.nq, ds.base.dtype) == (30, 50, 4, np.uint8)
  with pytest.raises(ValueError, match="unknown dataset"):
    data.load_dataset("nope")
  sub = ds.subset(nb=20, nq=2)
  assert sub.groundtruth.max() < 20 and sub.nq == 2
