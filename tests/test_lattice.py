"""Zn sphere codec: faiss as the oracle, exhaustive and property-based round trips."""
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import PartitionSpec as P

from spreading_jax import search, sharding
from spreading_jax.lattice import ZnSphereCodec, num_points, zn_r2_for_bits

faiss = pytest.importorskip("faiss")


def faiss_nearest(d, r2, x):
  f = faiss.ZnSphereCodec(d, r2)
  c = np.empty_like(x)
  dp = np.empty(len(x), np.float32)
  f.search_multi(len(x), faiss.swig_ptr(x), faiss.swig_ptr(c), faiss.swig_ptr(dp))
  return f.nv, c


@pytest.mark.parametrize("d, r2", [(24, 79), (32, 36), (40, 24), (16, 200), (4, 5), (8, 3), (3, 9)])
def test_matches_faiss(d, r2):
  codec = ZnSphereCodec(d, r2)
  x = np.random.default_rng(d * 1000 + r2).standard_normal((500, d)).astype(np.float32)
  nv, ref = faiss_nearest(d, r2, x)
  assert codec.num_points == nv
  q = np.asarray(codec.quantize(x))
  same = np.all(q == ref, axis=1)
  # Where the points differ it must be an exact tie in cosine (same dot product).
  np.testing.assert_allclose((x * q).sum(1)[~same], (x * ref).sum(1)[~same], rtol=1e-6)
  assert same.mean() > 0.99
  np.testing.assert_array_equal((q ** 2).sum(1), r2)


def test_paper_radius_table():
  assert [zn_r2_for_bits(24, b) for b in (16, 32, 64)] == [3, 10, 79]
  assert [zn_r2_for_bits(32, b) for b in (16, 32, 64)] == [3, 8, 36]
  assert [zn_r2_for_bits(40, b) for b in (16, 32, 64)] == [2, 7, 24]
  assert ZnSphereCodec(24, 79).code_bits == 64


def all_points(d, r2):
  r = math.isqrt(r2)
  pts = [p for p in itertools.product(range(-r, r + 1), repeat=d) if sum(v * v for v in p) == r2]
  return np.array(pts, np.float32)


@pytest.mark.parametrize("d, r2", [(3, 9), (4, 6), (5, 4), (2, 25), (6, 3)])
def test_exhaustive_bijection(d, r2):
  codec = ZnSphereCodec(d, r2)
  pts = all_points(d, r2)
  assert len(pts) == codec.num_points
  codes = np.asarray(codec.encode(pts))
  assert codes.dtype == np.uint32 and codes.shape == (len(pts), codec.code_words)
  assert sorted(codes[:, 0].tolist()) == list(range(codec.num_points))  # exactly [0, N)
  np.testing.assert_array_equal(np.asarray(codec.decode_points(codes)), pts)
  np.testing.assert_allclose(np.asarray(codec.decode(codes)), pts / math.sqrt(r2), rtol=1e-6)


def random_lattice_points(rng, d, r2, n):
  """Random points of the sphere: quantize random directions (covers many atoms)."""
  return np.asarray(ZnSphereCodec(d, r2).quantize(
      rng.standard_normal((n, d)).astype(np.float32) * rng.exponential(1, (n, d))))


@pytest.mark.parametrize("d, r2", [(24, 79), (64, 120)])
@settings(max_examples=2, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_round_trip_large(d, r2, seed):
  codec = ZnSphereCodec(d, r2)
  if d == 64:
    assert codec.code_bits > 128  # past faiss' 64 bits and two 64-bit words
  pts = random_lattice_points(np.random.default_rng(seed), d, r2, 64)
  codes = codec.encode(pts)
  np.testing.assert_array_equal(np.asarray(codec.decode_points(codes)), pts)
  # Codes are integers below num_points, as big integers.
  for row in np.asarray(codes):
    value = sum(int(w) << (32 * i) for i, w in enumerate(row))
    assert value < codec.num_points


def test_quantize_ste_forward_and_gradient():
  codec = ZnSphereCodec(8, 6)
  y = jax.random.normal(jax.random.PRNGKey(0), (5, 8))
  out = codec.quantize_ste(y)
  np.testing.assert_allclose(out, np.asarray(codec.quantize(y)) / math.sqrt(6), rtol=1e-6)
  g = jax.grad(lambda y: jnp.sum(codec.quantize_ste(y) * jnp.arange(8.0)))(y)
  np.testing.assert_allclose(g, np.broadcast_to(np.arange(8.0), (5, 8)))


def test_jit_vmap_and_no_retracing():
  codec = ZnSphereCodec(24, 79)
  x = np.random.default_rng(0).standard_normal((16, 24)).astype(np.float32)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def roundtrip(x):
    return codec.decode_core(codec.encode_core(x))

  a = roundtrip(x)
  b = roundtrip(x + 1.0)
  assert a.shape == b.shape == (16, 24)
  v = jax.vmap(lambda x: codec.encode_core(x[None])[0])(x)
  np.testing.assert_array_equal(np.asarray(v), np.asarray(codec.encode(x)))


def test_sharded_encode_and_search_equal_single_device():
  if jax.device_count() < 4:
    pytest.skip("needs 4 forced host devices (make test sets XLA_FLAGS)")
  mesh = sharding.make_mesh(4)
  codec = ZnSphereCodec(24, 79)
  rng = np.random.default_rng(5)
  x = rng.standard_normal((1000, 24)).astype(np.float32)
  enc = jax.jit(jax.shard_map(codec.encode_core, mesh=mesh, in_specs=P("data"),
                              out_specs=P("data")))
  codes = np.asarray(codec.encode(x))
  np.testing.assert_array_equal(np.asarray(enc(x)), codes)
  xq = rng.standard_normal((30, 24)).astype(np.float32)
  s1, i1 = search.search_lattice(xq, codes, codec, 20)
  s4, i4 = search.search_lattice(xq, codes, codec, 20, mesh=mesh)
  np.testing.assert_array_equal(np.asarray(i1), np.asarray(i4))
  # Asymmetric search = exact inner-product search over the decoded points.
  _, ref = search.knn(xq, np.asarray(codec.decode(codes)), 20, metric="ip")
  np.testing.assert_array_equal(np.asarray(i1), np.asarray(ref))
  _, isym = search.search_lattice(xq, codes, codec, 20, symmetric=True)
  assert np.asarray(isym).shape == (30, 20)


def test_zero_vector_is_deterministic():
  codec = ZnSphereCodec(6, 3)
  q = np.asarray(codec.quantize(np.zeros((2, 6), np.float32)))
  np.testing.assert_array_equal(q, [[1, 1, 1, 0, 0, 0]] * 2)


def test_bad_input_raises():
  with pytest.raises(ValueError, match="no lattice point"):
    ZnSphereCodec(1, 2)
  with pytest.raises(ValueError, match="bits"):
    ZnSphereCodec(256, 400)
  with pytest.raises(ValueError, match="r2=0"):
    ZnSphereCodec(8, 0)
  codec = ZnSphereCodec(24, 79)
  with pytest.raises(ValueError, match="d=23"):
    codec.encode(np.zeros((2, 23), np.float32))
  with pytest.raises(ValueError, match="NaN"):
    codec.quantize(np.full((2, 24), np.nan, np.float32))
  with pytest.raises(ValueError, match="uint32"):
    codec.decode(np.zeros((2, 2), np.int64))
  with pytest.raises(ValueError, match="words"):
    codec.decode(np.zeros((2, 3), np.uint32))
  with pytest.raises(ValueError, match="num_points"):
    codec.decode(np.full((1, 2), 0xFFFFFFFF, np.uint32))
  with pytest.raises(ValueError, match="fits in 8 bits"):
    zn_r2_for_bits(200, 8)
  assert num_points(3, 7) == 0  # 7 is not a sum of 3 squares
