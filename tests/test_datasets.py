"""Vector file I/O, atomic writes and datasets: round trips, malformed files, real data."""
from __future__ import annotations

import gzip
import mmap
import os
import stat

import h5py
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from spreading_jax import _files, datasets, groundtruth, vecs_io


def _brute_force_ids(query, base, k, metric="l2"):
  """Reference k-NN in float64, ties to the lower id."""
  q, b = np.asarray(query, np.float64), np.asarray(base, np.float64)
  score = ((q[:, None, :] - b[None]) ** 2).sum(-1) if metric == "l2" else -(q @ b.T)
  ids = np.broadcast_to(np.arange(b.shape[0]), score.shape)
  return np.lexsort((ids, score), axis=-1)[:, :k]


def _maps_a_file(x) -> bool:
  while x is not None:
    if isinstance(x, mmap.mmap):
      return True
    x = getattr(x, "base", None)
  return False


# ---------------------------------------------------------------------------------------
# Round trips.

_finite_f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)


@settings(max_examples=25, deadline=None)
@given(x=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=2, min_side=1,
                                                  max_side=24), elements=_finite_f32),
       seed=st.integers(0, 2**16))
def test_vecs_round_trip(tmp_path_factory, x, seed):
  tmp = tmp_path_factory.mktemp("vecs")
  rng = np.random.default_rng(seed)
  i = rng.integers(-2**31, 2**31, x.shape, dtype=np.int64).astype(np.int32)
  i.flat[0] = np.iinfo(np.int32).min
  b = rng.integers(0, 256, x.shape).astype(np.uint8)
  vecs_io.write_fvecs(tmp / "x.fvecs", x)
  vecs_io.write_ivecs(tmp / "x.ivecs", i)
  vecs_io.write_bvecs(tmp / "x.bvecs", b.astype(np.int64))  # any integer dtype in range
  for name, want in (("x.fvecs", x), ("x.ivecs", i), ("x.bvecs", b)):
    got = vecs_io.read_vectors(tmp / name)
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
  assert os.path.getsize(tmp / "x.fvecs") == x.shape[0] * (4 + 4 * x.shape[1])


def test_reads_are_memory_mapped_views(tmp_path):
  x = np.arange(60, dtype=np.float32).reshape(5, 12)
  vecs_io.write_fvecs(tmp_path / "x.fvecs", x)
  got = vecs_io.read_fvecs(tmp_path / "x.fvecs")
  assert isinstance(got, np.memmap) and _maps_a_file(got)
  assert not got.flags.owndata and not got.flags.writeable
  assert got.strides == (4 + 4 * 12, 4)  # a strided view that skips each row's header
  head = vecs_io.read_fvecs(tmp_path / "x.fvecs", max_rows=2)
  np.testing.assert_array_equal(head, x[:2])
  assert vecs_io.read_fvecs(tmp_path / "x.fvecs", max_rows=100).shape == (5, 12)


def test_npy_and_hdf5_round_trip(tmp_path):
  x = np.arange(12, dtype=np.float32).reshape(4, 3)
  np.save(tmp_path / "x.npy", x)
  got = vecs_io.read_vectors(tmp_path / "x.npy")
  assert isinstance(got, np.memmap)
  np.testing.assert_array_equal(got, x)
  gt = np.array([[0, 1], [1, 0]], np.int32)
  vecs_io.write_hdf5(tmp_path / "a.hdf5", x, x[:2], gt, distances=np.zeros((2, 2)))
  f = vecs_io.read_hdf5(tmp_path / "a.hdf5")
  np.testing.assert_array_equal(f["test"], x[:2])
  assert f["distance"] == "euclidean" and f["distances"].shape == (2, 2)
  np.testing.assert_array_equal(vecs_io.read_vectors(tmp_path / "a.hdf5", key="neighbors"), gt)
  with pytest.raises(ValueError, match=r"needs key=.*'distances', 'neighbors', 'test'"):
    vecs_io.read_vectors(tmp_path / "a.hdf5")
  with pytest.raises(ValueError, match="no dataset 'learn'"):
    vecs_io.read_vectors(tmp_path / "a.hdf5", key="learn")
  with pytest.raises(ValueError, match="only applies to HDF5"):
    vecs_io.read_vectors(tmp_path / "x.npy", key="train")
  ds = datasets.load_dataset(tmp_path / "a.hdf5")
  assert (ds.name, ds.nt, ds.nb, ds.nq, ds.d, ds.metric) == ("a", 4, 4, 2, 3, "l2")
  assert ds.train is ds.base
  # A relative path is also looked up under the data root.
  assert datasets.load_dataset("a.hdf5", root=tmp_path).nb == 4


def test_hdf5_angular_is_normalised_and_unknown_distances_rejected(tmp_path):
  rng = np.random.default_rng(0)
  xb, xq = rng.standard_normal((20, 5)) * rng.uniform(0.1, 9, (20, 1)), rng.standard_normal((3, 5))
  cos = (xq @ xb.T) / np.linalg.norm(xq, axis=1)[:, None] / np.linalg.norm(xb, axis=1)
  gt = np.argsort(-cos, axis=1)[:, :5]
  vecs_io.write_hdf5(tmp_path / "c.hdf5", xb, xq, gt, distance="angular")
  ds = datasets.load_dataset(tmp_path / "c.hdf5")
  assert ds.metric == "l2"
  np.testing.assert_allclose(np.linalg.norm(ds.base, axis=1), 1, rtol=1e-6)
  # On the normalised vectors, L2 ranks exactly as the file's cosine groundtruth.
  np.testing.assert_array_equal(_brute_force_ids(ds.query, ds.base, 5), gt)
  xb[4] = 0  # a zero vector has no direction: it stays zero instead of becoming NaN
  vecs_io.write_hdf5(tmp_path / "z.hdf5", xb, xq, gt, distance="angular")
  np.testing.assert_array_equal(datasets.load_dataset(tmp_path / "z.hdf5").base[4], 0)
  vecs_io.write_hdf5(tmp_path / "h.hdf5", xb, xq, gt, distance="hamming")
  with pytest.raises(ValueError, match="'hamming' is not supported"):
    datasets.load_dataset(tmp_path / "h.hdf5")


# ---------------------------------------------------------------------------------------
# Malformed files and bad writes.

def _row(d, fill=1.0):
  return np.int32(d).tobytes() + np.full(d, fill, np.float32).tobytes()


@pytest.mark.parametrize("case, match", [
    ("empty", "empty file"),
    ("tiny", "shorter than the 4-byte dimension header"),
    ("truncated", r"truncated last row: 38 bytes is not a multiple of the 16-byte row \(d=3\)"),
    ("truncated_first", "truncated first row"),
    ("inconsistent", "inconsistent dimension headers: row 2 declares d=2"),
    ("negative_header", "invalid dimension header d=-5"),
    ("absurd_header", "invalid dimension header d=2000000000"),
])
def test_malformed_vecs_are_rejected(tmp_path, case, match):
  path = tmp_path / "bad.fvecs"
  raw = {
      "empty": b"",
      "tiny": b"\1\0",
      "truncated": _row(3) * 2 + _row(3)[:6],
      "truncated_first": np.int32(100).tobytes() + bytes(12),
      "inconsistent": _row(3) * 2 + np.int32(2).tobytes() + bytes(12),
      "negative_header": np.int32(-5).tobytes() + bytes(12),
      "absurd_header": np.int32(2_000_000_000).tobytes() + bytes(12),
  }[case]
  path.write_bytes(raw)
  with pytest.raises(ValueError, match=match) as e:
    vecs_io.read_fvecs(path)
  assert "bad.fvecs" in str(e.value)


def test_missing_file_and_sampled_header_check(tmp_path, monkeypatch):
  with pytest.raises(ValueError, match="nope.ivecs: no such file"):
    vecs_io.read_ivecs(tmp_path / "nope.ivecs")
  # Big files get a sample of headers (first, last and evenly spaced rows) checked.
  monkeypatch.setattr(vecs_io, "_FULL_HEADER_CHECK_BYTES", 0)
  monkeypatch.setattr(vecs_io, "_HEADER_SAMPLE_ROWS", 4)
  path = tmp_path / "big.fvecs"
  path.write_bytes(_row(3) * 99 + np.int32(7).tobytes() + bytes(12))
  with pytest.raises(ValueError, match="row 99 declares d=7.*sampled rows"):
    vecs_io.read_fvecs(path)
  assert vecs_io.read_fvecs(path, max_rows=99).shape == (99, 3)


def test_bad_writes_are_rejected_and_leave_no_file(tmp_path):
  target = tmp_path / "x.fvecs"
  vecs_io.write_fvecs(target, np.ones((2, 2)))
  before = target.read_bytes()
  nan_last = np.ones((5, 2), np.float32)
  nan_last[4, 1] = np.nan
  cases = [
      (vecs_io.write_fvecs, nan_last, r"x.fvecs\): x contains NaN or Inf.*row 4, column 1"),
      (vecs_io.write_fvecs, np.array([[1e39]]), "NaN or Inf as float32"),  # overflows float32
      (vecs_io.write_fvecs, np.ones(3), "2-D array"),
      (vecs_io.write_fvecs, np.ones((0, 3)), "n >= 1"),
      (vecs_io.write_fvecs, np.ones((2, 2), np.complex64), "real numbers"),
      (vecs_io.write_fvecs, np.ones((2, 2), bool), "real numbers"),
  ]
  for write, x, match in cases:
    with pytest.raises(ValueError, match=match):
      write(target, x)
    assert target.read_bytes() == before
  for write, x, match in [
      (vecs_io.write_bvecs, np.array([[300]]), r"\[0, 255\].*\[300, 300\]"),
      (vecs_io.write_bvecs, np.array([[-1]]), r"\[0, 255\]"),
      (vecs_io.write_ivecs, np.array([[1.5]]), "integer array"),
      (vecs_io.write_ivecs, np.array([[2**31]]), "fit int32"),
  ]:
    with pytest.raises(ValueError, match=match):
      write(tmp_path / "y.vecs", x)
  # A name of another format would be misread by read_vectors (fvecs bytes in a .npy file).
  for write, name in [(vecs_io.write_fvecs, "w.npy"), (vecs_io.write_ivecs, "g.fvecs"),
                      (vecs_io.write_bvecs, "b.H5")]:
    with pytest.raises(ValueError, match=rf"ends in \.{name.split('.')[1].lower()} but"):
      write(tmp_path / name, np.ones((2, 2), np.int32))
  assert sorted(os.listdir(tmp_path)) == ["x.fvecs"]


def test_bad_hdf5_and_npy_are_rejected(tmp_path):
  with h5py.File(tmp_path / "bad.hdf5", "w") as f:
    f["train"] = np.ones((3, 2))
  with pytest.raises(ValueError, match=r"missing datasets \['test', 'neighbors'\]"):
    vecs_io.read_hdf5(tmp_path / "bad.hdf5")
  (tmp_path / "junk.hdf5").write_bytes(b"not hdf5 at all")
  with pytest.raises(ValueError, match="junk.hdf5: not a readable HDF5"):
    vecs_io.read_hdf5(tmp_path / "junk.hdf5")
  with h5py.File(tmp_path / "rows.hdf5", "w") as f:
    f["train"], f["test"], f["neighbors"] = np.ones((3, 2)), np.ones((2, 2)), np.zeros((5, 1))
  with pytest.raises(ValueError, match="'neighbors' has 5 rows for 2 test queries"):
    vecs_io.read_hdf5(tmp_path / "rows.hdf5")
  with pytest.raises(ValueError, match="unknown vector file type '.txt'"):
    vecs_io.read_vectors(tmp_path / "x.txt")
  (tmp_path / "x.npy").write_bytes(b"garbage")
  with pytest.raises(ValueError, match="x.npy: not a valid .npy"):
    vecs_io.read_vectors(tmp_path / "x.npy")
  np.save(tmp_path / "v.npy", np.ones(3))
  with pytest.raises(ValueError, match="v.npy: expected a 2-D array"):
    vecs_io.read_vectors(tmp_path / "v.npy")


def _idx_gz(path, images: np.ndarray, magic=0x803, cut=0):
  header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in images.shape)
  blob = gzip.compress(header + images.astype(np.uint8).tobytes())
  path.write_bytes(blob[:len(blob) - cut])


def test_idx_reader_rejects_bad_magic_truncation_and_size(tmp_path):
  gz = tmp_path / "img.gz"
  images = np.arange(2 * 3 * 3).reshape(2, 3, 3)
  _idx_gz(gz, images)
  np.testing.assert_array_equal(vecs_io.read_idx_gz(gz, 0x803), images.reshape(2, 9))
  _idx_gz(gz, images, magic=0x801)
  with pytest.raises(ValueError, match="img.gz: bad IDX magic 0x00000801, expected 0x00000803"):
    vecs_io.read_idx_gz(gz, 0x803)
  _idx_gz(gz, images, cut=6)
  with pytest.raises(ValueError, match="img.gz: corrupt or truncated gzip"):
    vecs_io.read_idx_gz(gz, 0x803)
  gz.write_bytes(b"plain bytes, not gzip")
  with pytest.raises(ValueError, match="corrupt or truncated gzip"):
    vecs_io.read_idx_gz(gz, 0x803)
  gz.write_bytes(gzip.compress((0x803).to_bytes(4, "big") + (2).to_bytes(4, "big") * 3 + bytes(5)))
  with pytest.raises(ValueError, match="payload has 5 bytes but dims"):
    vecs_io.read_idx_gz(gz, 0x803)


# ---------------------------------------------------------------------------------------
# Atomic writes.

def test_atomic_output_replaces_on_success_only(tmp_path):
  target = tmp_path / "keep.txt"
  target.write_text("old")
  os.chmod(target, 0o640)
  with pytest.raises(RuntimeError):
    with _files.atomic_output(target) as tmp:
      assert os.path.dirname(tmp) == str(tmp_path)
      open(tmp, "w").write("half")
      raise RuntimeError("crash")
  assert target.read_text() == "old"
  assert os.listdir(tmp_path) == ["keep.txt"]
  with _files.atomic_output(target) as tmp:
    open(tmp, "w").write("new")
  assert target.read_text() == "new"
  assert stat.S_IMODE(target.stat().st_mode) == 0o640  # the replaced file's permissions
  # The temporary path keeps the suffix, so np.save writes exactly there.
  with _files.atomic_output(tmp_path / "sub" / "a.npy") as tmp:
    np.save(tmp, np.arange(3))
  np.testing.assert_array_equal(np.load(tmp_path / "sub" / "a.npy"), np.arange(3))
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE((tmp_path / "sub" / "a.npy").stat().st_mode) == 0o666 & ~umask
  assert sorted(os.listdir(tmp_path)) == ["keep.txt", "sub"]
  with pytest.raises(ValueError, match="is a directory"):
    with _files.atomic_output(tmp_path / "sub"):
      pass
  with pytest.raises(ValueError, match="was removed"):
    with _files.atomic_output(tmp_path / "gone.txt") as tmp:
      os.unlink(tmp)
  assert sorted(os.listdir(tmp_path)) == ["keep.txt", "sub"]


def test_atomic_output_dir_replaces_whole_directories(tmp_path):
  # Only a directory this library wrote is replaced: here a (fake) saved model.
  marker = '{"kind": "spreading_jax.catalyzer"}'
  target = tmp_path / "ckpt"
  with _files.atomic_output_dir(target) as tmp:
    os.makedirs(os.path.join(tmp, "nested"))
    open(os.path.join(tmp, "nested", "a"), "w").write("1")
    open(os.path.join(tmp, "model.json"), "w").write(marker)
  assert (target / "nested" / "a").read_text() == "1"
  with pytest.raises(RuntimeError):
    with _files.atomic_output_dir(target) as tmp:
      open(os.path.join(tmp, "b"), "w").write("2")
      raise RuntimeError("crash")
  assert sorted(p.name for p in target.iterdir()) == ["model.json", "nested"]
  with _files.atomic_output_dir(target) as tmp:
    open(os.path.join(tmp, "b"), "w").write("2")
    open(os.path.join(tmp, "model.json"), "w").write(marker)
  assert sorted(p.name for p in target.iterdir()) == ["b", "model.json"]  # fully replaced
  assert os.listdir(tmp_path) == ["ckpt"]
  (tmp_path / "file").write_text("x")
  with pytest.raises(ValueError, match="not a directory"):
    with _files.atomic_output_dir(tmp_path / "file"):
      pass


# ---------------------------------------------------------------------------------------
# Locations.

def test_data_roots_and_cache_dir(tmp_path, monkeypatch):
  monkeypatch.delenv("SPREADING_DATA", raising=False)
  monkeypatch.setenv("SPREADING_CACHE", str(tmp_path / "c" / "d"))
  assert datasets.cache_dir() == tmp_path / "c" / "d" and (tmp_path / "c" / "d").is_dir()
  cache = tmp_path / "c" / "d" / "data"
  assert datasets.data_roots() == [cache]
  (tmp_path / "r").mkdir()
  assert datasets.data_roots(tmp_path / "r") == [tmp_path / "r", cache]
  monkeypatch.setenv("SPREADING_DATA", str(tmp_path))
  assert datasets.data_roots(tmp_path / "r") == [tmp_path / "r", tmp_path, cache]
  monkeypatch.setenv("SPREADING_DATA", str(tmp_path / "missing"))
  with pytest.raises(ValueError, match=r"missing \(from \$SPREADING_DATA\).*set SPREADING_DATA"):
    datasets.data_roots()
  with pytest.raises(ValueError, match=r"typo \(from the root argument\)"):
    datasets.data_roots(tmp_path / "typo")


def test_first_root_holding_every_file_wins(mini, tmp_path, monkeypatch):
  """root=, then SPREADING_DATA, then the cache; a root with only some files is passed over."""
  monkeypatch.setenv("SPREADING_CACHE", str(tmp_path / "cache"))
  a, b = tmp_path / "a", tmp_path / "b"
  files = ["siftsmall_base.fvecs", "siftsmall_query.fvecs", "siftsmall_groundtruth.ivecs"]
  for root, nb in ((a, 300), (b, 200), (tmp_path / "cache" / "data", 100)):
    (root / "siftsmall").mkdir(parents=True)
    sub = mini.subset(nb=nb, nq=5)
    for f, x in zip(files, (sub.base, sub.query, sub.groundtruth)):
      write = vecs_io.write_ivecs if f.endswith("ivecs") else vecs_io.write_fvecs
      write(root / "siftsmall" / f, x)
  monkeypatch.setenv("SPREADING_DATA", str(b))
  assert datasets.load_dataset("siftsmall", a).nb == 300
  assert datasets.load_dataset("siftsmall").nb == 200
  os.unlink(b / "siftsmall" / files[1])
  assert datasets.load_dataset("siftsmall").nb == 100  # b is incomplete: the cache has it
  monkeypatch.delenv("SPREADING_DATA")
  assert datasets.load_dataset("siftsmall").nb == 100


# ---------------------------------------------------------------------------------------
# Dataset, exact groundtruth, subsets.

def _toy(rng, nt=30, nb=40, nq=6, d=4, k=5):
  xb = rng.integers(0, 4, (nb, d)).astype(np.float32)  # small integers: many exact ties
  xq = rng.integers(0, 4, (nq, d)).astype(np.float32)
  return datasets.Dataset("toy", rng.standard_normal((nt, d)).astype(np.float32), xb, xq,
                      _brute_force_ids(xq, xb, k).astype(np.int32))


def test_dataset_validation_and_repr():
  rng = np.random.default_rng(0)
  ds = _toy(rng)
  assert (ds.d, ds.nb, ds.nq, ds.nt) == (4, 40, 6, 30)
  assert repr(ds) == ("Dataset('toy', d=4, nt=30, nb=40, nq=6, gt_k=5, dtype=float32, "
                      "metric='l2')")
  xt, xb, xq, gt = ds.train, ds.base, ds.query, ds.groundtruth
  for args, match in [
      ((xt[:, :3], xb, xq, gt), "train has d=3 but base has d=4"),
      ((xt, xb, xq[:2], gt), r"groundtruth has shape \(6, 5\) for 2 queries"),
      ((xt, xb[:10], xq, gt), r"ids span \[.*\] but must lie in \[0, 10\)"),
      ((xt, xb, xq, gt.astype(np.float32)), "integer ids"),
      ((xt, xb[0], xq, gt), "base must be a 2-D array"),
  ]:
    with pytest.raises(ValueError, match=match):
      datasets.Dataset("bad", *args)
  with pytest.raises(ValueError, match="metric must be 'l2' or 'ip'"):
    datasets.Dataset("bad", xt, xb, xq, gt, metric="cosine")


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_exact_groundtruth_matches_brute_force_with_ties(metric):
  rng = np.random.default_rng(1)
  xb = rng.integers(0, 3, (300, 5)).astype(np.uint8)  # heavy ties, uint8 like bigann
  xq = rng.integers(0, 3, (7, 5)).astype(np.uint8)
  got = groundtruth.exact_groundtruth(xq, xb, 20, metric)
  assert got.dtype == np.int32
  np.testing.assert_array_equal(got, _brute_force_ids(xq, xb, 20, metric))


def test_subset_recomputes_groundtruth_exactly():
  ds = _toy(np.random.default_rng(2))
  sub = ds.subset(nb=25, nq=4, nt=10)
  assert (sub.nb, sub.nq, sub.nt) == (25, 4, 10)
  np.testing.assert_array_equal(sub.groundtruth, _brute_force_ids(ds.query[:4], ds.base[:25], 25))
  same_base = ds.subset(nq=3)
  np.testing.assert_array_equal(same_base.groundtruth, ds.groundtruth[:3])
  with pytest.raises(ValueError, match="nb=41 must be <= 40"):
    ds.subset(nb=41)
  f = datasets.Dataset("u8", ds.base.astype(np.uint8), ds.base.astype(np.uint8),
                   ds.query.astype(np.uint8), ds.groundtruth).as_float32()
  assert f.base.dtype == f.train.dtype == f.query.dtype == np.float32
  assert f.groundtruth.dtype == np.int32


# ---------------------------------------------------------------------------------------
# Named datasets.

def test_shipped_dataset_is_real_disjoint_and_exact(mini):
  assert (mini.nt, mini.nb, mini.nq, mini.d) == (20000, 10000, 1000, 784)
  assert mini.train.dtype == mini.base.dtype == mini.query.dtype == np.float32
  assert mini.groundtruth.shape == (1000, 100) and mini.groundtruth.dtype == np.int32
  assert mini.base.min() == 0 and mini.base.max() == 255  # pixel scale of "fashion-mnist"
  np.testing.assert_array_equal(mini.base, np.round(mini.base))
  # Source rows: train and base are distinct training images, queries are test images.
  a = datasets._read_shipped()
  assert len(np.intersect1d(a["train_ids"], a["base_ids"])) == 0
  assert len(np.unique(a["train_ids"])) == 20000 and len(np.unique(a["query_ids"])) == 1000
  # Mean pixel of Fashion-MNIST's training set is 72.94 (0.2860 on [0, 1]).
  assert abs(mini.train.mean() - 72.94) < 1.0
  # The shipped groundtruth is the exact 100-NN: recomputed here, tie rule included, for
  # every 4th query (the file is pinned by its checksum, so a wrong generation shows in any
  # sample; all 1,000 took 30 s of the suite's 2-core budget).
  some = np.arange(0, 1000, 4)
  np.testing.assert_array_equal(groundtruth.exact_groundtruth(mini.query[some], mini.base, 100),
                                mini.groundtruth[some])
  # Pixel differences square to exact integers; summing them in float64 is exact.
  for i in (0, 999):
    dist = np.square(mini.base - mini.query[i]).sum(1, dtype=np.float64)
    np.testing.assert_array_equal(dist[mini.groundtruth[i]], np.sort(dist)[:100])


def test_shipped_file_is_checked(tmp_path):
  bad = tmp_path / "fashion-mnist-mini.npz.xz"
  bad.write_bytes(b"not the shipped file")
  with pytest.raises(ValueError, match="differs from the pinned .*reinstall"):
    datasets._read_shipped.__wrapped__(bad)
  with pytest.raises(ValueError, match="cannot be read"):
    datasets._read_shipped.__wrapped__(tmp_path / "gone")


def test_siftsmall_and_wordllama_layouts(mini, tmp_path):
  """The loaders of the on-disk benchmarks, on files written from the shipped images."""
  sub = mini.subset(nb=500, nq=20)
  (tmp_path / "siftsmall").mkdir()
  vecs_io.write_fvecs(tmp_path / "siftsmall" / "siftsmall_base.fvecs", sub.base)
  vecs_io.write_fvecs(tmp_path / "siftsmall" / "siftsmall_query.fvecs", sub.query)
  vecs_io.write_ivecs(tmp_path / "siftsmall" / "siftsmall_groundtruth.ivecs", sub.groundtruth)
  s = datasets.load_dataset("siftsmall", tmp_path)
  assert (s.nt, s.nb, s.nq, s.d) == (500, 500, 20, 784) and s.train is s.base
  assert _maps_a_file(s.base)
  np.testing.assert_array_equal(s.groundtruth, sub.groundtruth)
  w_dir = tmp_path / "wordllama-wamerican"
  w_dir.mkdir()
  vecs_io.write_fvecs(w_dir / "wl256_learn.fvecs", mini.train[:300])
  vecs_io.write_fvecs(w_dir / "wl256_base.fvecs", sub.base)
  vecs_io.write_fvecs(w_dir / "wl256_query.fvecs", sub.query)
  with pytest.raises(ValueError, match=r"missing wordllama-wamerican/wl256_groundtruth.ivecs "
                                       r"under .*no public download"):
    datasets.load_dataset("wordllama-256", tmp_path)
  vecs_io.write_ivecs(w_dir / "wl256_groundtruth.ivecs", sub.groundtruth)
  w = datasets.load_dataset("wordllama-256", tmp_path)
  assert (w.nt, w.nb, w.nq) == (300, 500, 20) and w.train is not w.base


def test_unknown_dataset_lists_known_names():
  with pytest.raises(ValueError, match="unknown dataset 'nope'; known: fashion-mnist-mini, "
                                      "siftsmall, wordllama-256, fashion-mnist, deep1m, bigann1m"):
    datasets.load_dataset("nope")
  assert datasets.DATASETS == ("fashion-mnist-mini", "siftsmall", "wordllama-256",
                               "fashion-mnist", "deep1m", "bigann1m")


def test_fashion_mnist_layout_and_groundtruth_cache(mini, tmp_path, monkeypatch):
  """The fashion-mnist loader on IDX files of real images: groundtruth computed, cached,
  reused."""
  monkeypatch.setenv("SPREADING_CACHE", str(tmp_path / "cache"))
  (tmp_path / "fashion-mnist").mkdir()
  _idx_gz(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz",
          mini.base[:300].reshape(300, 28, 28))
  _idx_gz(tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte.gz",
          mini.query[:8].reshape(8, 28, 28))
  ds = datasets.load_dataset("fashion-mnist", tmp_path)
  assert (ds.nb, ds.nq, ds.d, ds.base.dtype) == (300, 8, 784, np.float32)
  np.testing.assert_array_equal(ds.base, mini.base[:300])
  assert ds.train is ds.base
  np.testing.assert_array_equal(ds.groundtruth, _brute_force_ids(ds.query, ds.base, 100))
  (cached,) = (tmp_path / "cache").glob("fashion-mnist-gt100-l2-*.ivecs")
  stamp = cached.stat().st_mtime_ns
  np.testing.assert_array_equal(datasets.load_dataset("fashion-mnist", tmp_path).groundtruth,
                                ds.groundtruth)
  assert cached.stat().st_mtime_ns == stamp  # reused, not rewritten
  # A wrong cache (valid file, wrong neighbours) fails the spot check and is recomputed.
  vecs_io.write_ivecs(cached, np.zeros((8, 100), np.int32))
  np.testing.assert_array_equal(datasets.load_dataset("fashion-mnist", tmp_path).groundtruth,
                                ds.groundtruth)
  cached.write_bytes(b"\0\0")  # corrupt file
  np.testing.assert_array_equal(datasets.load_dataset("fashion-mnist", tmp_path).groundtruth,
                                ds.groundtruth)
  assert len(list((tmp_path / "cache").iterdir())) == 1
  # Without a download URL, a missing file is named with the directories searched
  # (downloads are tested against a local server in test_download.py).
  monkeypatch.setitem(datasets._SOURCES, "fashion-mnist", datasets.dataclasses.replace(
      datasets._SOURCES["fashion-mnist"], urls={}))
  os.unlink(tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte.gz")
  with pytest.raises(ValueError, match="missing fashion-mnist/t10k-images-idx3-ubyte.gz under"):
    datasets.load_dataset("fashion-mnist", tmp_path)


def test_deep1m_layout_keeps_the_first_million(tmp_path):
  with pytest.raises(ValueError) as e:
    datasets.load_dataset("deep1m", tmp_path)
  for name in ("base.fvecs", "learn.fvecs", "deep1B_queries.fvecs", "deep1M_groundtruth.ivecs",
               str(tmp_path)):
    assert name in str(e.value)
  rng = np.random.default_rng(4)
  vecs_io.write_fvecs(tmp_path / "base.fvecs", np.zeros((1_000_003, 1), np.float32))
  vecs_io.write_fvecs(tmp_path / "learn.fvecs", rng.standard_normal((50, 1)))
  vecs_io.write_fvecs(tmp_path / "deep1B_queries.fvecs", rng.standard_normal((3, 1)))
  vecs_io.write_ivecs(tmp_path / "deep1M_groundtruth.ivecs", rng.integers(0, 10**6, (3, 100)))
  ds = datasets.load_dataset("deep1m", tmp_path)
  assert (ds.nt, ds.nb, ds.nq, ds.d) == (50, 1_000_000, 3, 1)
  assert _maps_a_file(ds.base) and _maps_a_file(ds.train)


def test_bigann1m_layout_stays_uint8(tmp_path):
  rng = np.random.default_rng(5)
  (tmp_path / "gnd").mkdir()
  vecs_io.write_bvecs(tmp_path / "bigann_base.bvecs", rng.integers(0, 256, (50, 8)))
  vecs_io.write_bvecs(tmp_path / "bigann_learn.bvecs", rng.integers(0, 256, (30, 8)))
  vecs_io.write_bvecs(tmp_path / "bigann_query.bvecs", rng.integers(0, 256, (4, 8)))
  with pytest.raises(ValueError, match=r"missing gnd/idx_1M.ivecs under .*expects the files "
                                       r"bigann_base.bvecs, bigann_learn.bvecs"):
    datasets.load_dataset("bigann1m", tmp_path)
  vecs_io.write_ivecs(tmp_path / "gnd" / "idx_1M.ivecs", rng.integers(0, 50, (4, 10)))
  ds = datasets.load_dataset("bigann1m", tmp_path)
  assert (ds.nt, ds.nb, ds.nq) == (30, 50, 4)
  assert ds.base.dtype == ds.train.dtype == ds.query.dtype == np.uint8
  assert _maps_a_file(ds.base)
  sub = ds.subset(nb=20, nq=2)
  np.testing.assert_array_equal(sub.groundtruth, _brute_force_ids(ds.query[:2], ds.base[:20], 20))


def test_missing_dataset_fails_under_ci_and_skips_locally(monkeypatch):
  from conftest import _load
  monkeypatch.setenv("CI", "true")
  with pytest.raises(pytest.fail.Exception, match="'nope' is missing under CI=true"):
    _load("nope")
  monkeypatch.setenv("CI", "")
  with pytest.raises(pytest.skip.Exception, match="'nope' not available"):
    _load("nope")
