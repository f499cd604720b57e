"""Exact search kernels against numpy references, on real and random data."""
import jax
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from spreading_jax import binary, search, sharding


def naive_knn(xq, xb, k, metric="l2"):
  xq, xb = np.asarray(xq, np.float64), np.asarray(xb, np.float64)
  if metric == "l2":
    d = ((xq[:, None, :] - xb[None, :, :]) ** 2).sum(-1)
  else:
    d = -(xq @ xb.T)
  i = np.argsort(d, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(d, i, axis=1), i


def four_device_mesh():
  if jax.device_count() < 4:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4 (make test sets it)")
  return sharding.make_mesh(4)


@settings(max_examples=12, deadline=None)
@given(nq=st.integers(1, 40), nb=st.integers(1, 700), d=st.integers(1, 20),
       k=st.integers(1, 50), metric=st.sampled_from(["l2", "ip"]), seed=st.integers(0, 99))
def test_blocked_equals_naive(nq, nb, d, k, metric, seed):
  k = min(k, nb)
  rng = np.random.default_rng(seed)
  # Small integers make exact ties common, which exercises the tie-breaking rule.
  xb = rng.integers(-3, 4, (nb, d)).astype(np.float32)
  xq = rng.integers(-3, 4, (nq, d)).astype(np.float32)
  D, I = search.knn(xq, xb, k, metric=metric, query_block=8, base_block=128)
  Dr, Ir = naive_knn(xq, xb, k, metric)
  np.testing.assert_array_equal(np.asarray(I), Ir)
  np.testing.assert_allclose(np.asarray(D), Dr if metric == "l2" else -Dr, atol=1e-4)


def test_two_stage_topk_matches_full_sort_with_ties():
  rng = np.random.default_rng(0)
  s = rng.integers(0, 40, (16, 8192)).astype(np.float32)  # many ties
  vals, cols = jax.jit(lambda s: search._block_topk(s, 100))(s)
  ref = np.argsort(-s, axis=1, kind="stable")[:, :100]
  np.testing.assert_array_equal(np.asarray(cols), ref)
  np.testing.assert_array_equal(np.asarray(vals), np.take_along_axis(s, ref, 1))


def test_default_blocks_wide_database():
  rng = np.random.default_rng(1)
  xb = rng.standard_normal((70_001, 8)).astype(np.float32)
  xq = rng.standard_normal((70, 8)).astype(np.float32)
  D, I = search.knn(xq, xb, 100)
  _, Ir = naive_knn(xq, xb, 100)
  assert (np.asarray(I) == Ir).mean() > 0.999  # float32 vs float64 rounding only


@pytest.mark.parametrize("nb", [997, 4096])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_sharded_equals_unsharded(nb, metric):
  mesh = four_device_mesh()
  rng = np.random.default_rng(nb)
  xb = rng.standard_normal((nb, 24)).astype(np.float32)
  xq = rng.standard_normal((33, 24)).astype(np.float32)
  D1, I1 = search.knn(xq, xb, 37, metric=metric, base_block=256)
  D4, I4 = search.knn(xq, xb, 37, metric=metric, mesh=mesh, base_block=256)
  np.testing.assert_array_equal(np.asarray(I1), np.asarray(I4))
  np.testing.assert_allclose(np.asarray(D1), np.asarray(D4), rtol=1e-6, atol=1e-6)


def test_knn_reproduces_the_shipped_groundtruth(mini):
  xq, gt = mini.query[:100], mini.groundtruth[:100]
  D, I = search.knn(xq, mini.base, 100)
  D, I = np.asarray(D), np.asarray(I)
  xb, q = np.asarray(mini.base, np.float64), np.asarray(xq, np.float64)
  exact = lambda ids: ((q[:, None, :] - xb[ids]) ** 2).sum(-1)  # noqa: E731
  d_gt = exact(gt)
  # 784 pixels up to 255: squared distances exceed float32's exact integers, so the
  # float32 ranking matches the exact one up to rounding (relative 1e-6), not bit for bit.
  np.testing.assert_allclose(D, d_gt, rtol=1e-5)
  np.testing.assert_allclose(exact(I), d_gt, rtol=1e-5)
  assert (I != gt).mean() < 0.01
  assert search.recall_at(I, gt)[1] >= 0.99


def test_hamming_knn_matches_naive_and_sharded():
  rng = np.random.default_rng(3)
  base = rng.integers(0, 256, (1501, 8), dtype=np.uint8)
  query = rng.integers(0, 256, (40, 8), dtype=np.uint8)
  D, I = search.hamming_knn(query, base, 25, base_block=256)
  ham = np.unpackbits(query[:, None, :] ^ base[None, :, :], axis=2).sum(2)
  ref = np.argsort(ham, axis=1, kind="stable")[:, :25]
  np.testing.assert_array_equal(np.asarray(I), ref)
  np.testing.assert_array_equal(np.asarray(D), np.take_along_axis(ham, ref, 1))
  if jax.device_count() >= 4:
    D4, I4 = search.hamming_knn(query, base, 25, base_block=256, mesh=sharding.make_mesh(4))
    np.testing.assert_array_equal(np.asarray(I4), ref)


def test_sign_codes_hamming_equals_sign_disagreements():
  rng = np.random.default_rng(4)
  y = rng.standard_normal((300, 19)).astype(np.float32)
  codes = binary.sign_codes(y)
  assert codes.shape == (300, 3) and codes.dtype == np.uint8
  np.testing.assert_array_equal(np.asarray(binary.unpack(codes, 19)), np.where(y >= 0, 1.0, -1.0))
  D, I = search.hamming_knn(codes[:5], codes, 3)
  s = np.sign(y + (y == 0))
  disagree = (s[:5, None, :] != s[None, :, :]).sum(-1)
  np.testing.assert_array_equal(np.asarray(D), np.sort(disagree, axis=1)[:, :3])


def test_recall_at():
  I = np.array([[3, 1, 2], [0, 2, 1], [7, 8, 9]])
  gt = np.array([[1, 0], [5, 0], [7, 1]])
  assert search.recall_at(I, gt, ks=(1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3}
  with pytest.raises(ValueError, match="recall@4"):
    search.recall_at(I, gt, ks=(4,))
  with pytest.raises(ValueError, match="queries"):
    search.recall_at(I[:2], gt)


@pytest.mark.parametrize("bad, match", [
    (dict(k=0), "k=0"),
    (dict(k=11), "larger than the database"),
    (dict(k=2.5), "integer"),
    (dict(xq=np.zeros((3, 5), np.float32)), "d=5"),
    (dict(xq=np.zeros(4, np.float32)), "2-D"),
    (dict(xq=np.full((2, 4), np.nan, np.float32)), "NaN"),
    (dict(xb=np.array([[np.inf] * 4] * 10, np.float32)), "NaN or Inf"),
    (dict(xq=np.zeros((2, 4), bool)), "dtype"),
    (dict(xq=np.zeros((2, 4), np.complex64)), "dtype"),
    (dict(metric="cosine"), "metric"),
])
def test_knn_rejects_bad_input(bad, match):
  args = dict(xq=np.zeros((2, 4), np.float32), xb=np.ones((10, 4), np.float32), k=3, metric="l2")
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    search.knn(args["xq"], args["xb"], args["k"], metric=args["metric"])


def test_hamming_rejects_bad_codes():
  base = np.zeros((10, 8), np.uint8)
  with pytest.raises(ValueError, match="uint8"):
    search.hamming_knn(np.zeros((2, 8), np.int32), base, 1)
  with pytest.raises(ValueError, match="bytes"):
    search.hamming_knn(np.zeros((2, 4), np.uint8), base, 1)
  with pytest.raises(ValueError, match="larger than"):
    search.hamming_knn(np.zeros((2, 8), np.uint8), base, 11)


def test_search_lattice_asymmetric_symmetric_and_sharded():
  from spreading_jax.lattice import ZnSphereCodec
  codec = ZnSphereCodec(24, 79)
  rng = np.random.default_rng(5)
  codes = np.asarray(codec.encode(rng.standard_normal((700, 24)).astype(np.float32)))
  xq = rng.standard_normal((30, 24)).astype(np.float32)
  s1, i1 = search.search_lattice(xq, codes, codec, 20, base_block=256)
  # Asymmetric search = exact inner-product search over the decoded unit points.
  _, ref = search.knn(xq, np.asarray(codec.decode(codes)), 20, metric="ip")
  np.testing.assert_array_equal(np.asarray(i1), np.asarray(ref))
  if jax.device_count() >= 4:
    _, i4 = search.search_lattice(xq, codes, codec, 20, base_block=256,
                                  mesh=sharding.make_mesh(4))
    np.testing.assert_array_equal(np.asarray(i4), np.asarray(i1))
  _, isym = search.search_lattice(xq, codes, codec, 20, symmetric=True, base_block=256)
  xq_q = np.asarray(codec.decode(codec.encode(xq)))
  _, ref_sym = search.knn(xq_q, np.asarray(codec.decode(codes)), 20, metric="ip")
  np.testing.assert_array_equal(np.asarray(isym), np.asarray(ref_sym))
  # Several decoded super-blocks and query blocks, single device and sharded, against a
  # numpy reference (stable sort: ties to the lower id).
  points = np.asarray(codec.decode(codes), np.float64)
  ref_ids = np.argsort(-(xq.astype(np.float64) @ points.T), axis=1, kind="stable")[:, :20]
  for mesh in [None] + ([sharding.make_mesh(4)] if jax.device_count() >= 4 else []):
    _, ib = search.search_lattice(xq, codes, codec, 20, query_block=8, base_block=128,
                                  super_block=256, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(ib), ref_ids)
  with pytest.raises(ValueError, match="words"):
    search.search_lattice(xq, codes[:, :1], codec, 5)
