"""Zn sphere codec: faiss as the oracle, exhaustive bijections, property-based round trips."""
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import PartitionSpec as P

from spreading_jax import sharding
from spreading_jax.lattice import (ZnSphereCodec, num_points, quantize_ste, zn_codec,
                                   zn_r2_for_bits)

faiss = pytest.importorskip("faiss")


def sphere_points(d, r2):
  """Every point of Z^d with squared norm r2 (recursive enumeration), f32[N, d]."""
  out = []

  def rec(prefix, left):
    if len(prefix) == d:
      if left == 0:
        out.append(prefix)
      return
    r = math.isqrt(left)
    for v in range(-r, r + 1):
      rec(prefix + [v], left - v * v)

  rec([], r2)
  return np.array(out, np.float32).reshape(-1, d)


def as_ints(codes):
  """u32[n, w] little-endian words -> list of Python ints."""
  return [sum(int(w) << (32 * i) for i, w in enumerate(row)) for row in np.asarray(codes)]


def as_words(values, words):
  return np.array([[(v >> (32 * i)) & 0xFFFFFFFF for i in range(words)] for v in values],
                  np.uint32).reshape(len(values), words)


# ---------------------------------------------------------------------------------------
# faiss as the oracle.

@pytest.mark.parametrize("d, r2", [(24, 79), (32, 36), (40, 24), (16, 200), (4, 5), (8, 3),
                                   (3, 9), (2, 25), (1, 4)])
def test_num_points_and_nearest_point_match_faiss(d, r2):
  codec = ZnSphereCodec(d, r2)
  ref = faiss.ZnSphereCodec(d, r2)
  assert codec.num_points == ref.nv == num_points(d, r2)
  assert codec.code_bits == max(1, (ref.nv - 1).bit_length())
  x = np.random.default_rng(d * 1000 + r2).standard_normal((300, d)).astype(np.float32)
  nearest = np.empty_like(x)
  dots = np.empty(len(x), np.float32)
  ref.search_multi(len(x), faiss.swig_ptr(x), faiss.swig_ptr(nearest), faiss.swig_ptr(dots))
  q = np.asarray(codec.quantize(x))
  np.testing.assert_array_equal(np.sum(q * q, axis=1), r2)
  same = np.all(q == nearest, axis=1)
  # Where the points differ it can only be a tie in cosine.
  np.testing.assert_allclose(np.sum(x * q, 1)[~same], np.sum(x * nearest, 1)[~same], rtol=1e-5)
  assert same.mean() > 0.98
  # decode(encode(x)) is the same point, normalized.
  y = np.asarray(codec.decode(codec.encode(x)))
  np.testing.assert_allclose(y, q / math.sqrt(r2), rtol=1e-6, atol=1e-7)


def test_paper_radius_table():
  assert [zn_r2_for_bits(24, b) for b in (16, 32, 64)] == [3, 10, 79]
  assert [zn_r2_for_bits(32, b) for b in (16, 32, 64)] == [3, 8, 36]
  assert [zn_r2_for_bits(40, b) for b in (16, 32, 64)] == [2, 7, 24]
  for d, bits in [(24, 64), (32, 64), (40, 32), (64, 100)]:
    r2 = zn_r2_for_bits(d, bits)
    assert num_points(d, r2) <= 2**bits < num_points(d, r2 + 1)
  assert ZnSphereCodec(24, 79).code_bits == 64


# ---------------------------------------------------------------------------------------
# Exact bijection onto [0, N).

# tail: None = the default lookup table, 0 = every coordinate walked, else that many.
@pytest.mark.parametrize("d, r2, tail", [(1, 4, None), (2, 25, None), (3, 9, 0), (4, 6, 2),
                                         (5, 10, None), (5, 10, 0), (6, 3, 3), (8, 4, 0),
                                         (10, 3, None), (10, 3, 4)])
def test_exhaustive_bijection(d, r2, tail):
  codec = ZnSphereCodec(d, r2, tail=tail)
  pts = sphere_points(d, r2)
  assert len(pts) == codec.num_points
  codes = np.asarray(codec.encode(pts))
  assert codes.dtype == np.uint32 and codes.shape == (len(pts), codec.code_words)
  assert sorted(as_ints(codes)) == list(range(codec.num_points))  # exactly [0, N)
  np.testing.assert_array_equal(np.asarray(codec.decode_points(codes)), pts)


def test_code_order_is_magnitudes_then_signs():
  # Within a magnitude pattern the codes are consecutive, ordered by the signs as bits.
  codec = ZnSphereCodec(3, 2)
  pts = np.array([[1, 1, 0], [-1, 1, 0], [1, -1, 0], [-1, -1, 0]], np.float32)
  values = as_ints(codec.encode(pts))
  assert values == list(range(values[0], values[0] + 4))
  assert as_ints(codec.encode(np.array([[0, 1, 1]], np.float32))) == [0]


# Large configurations: 64 bits (the paper), > 64 bits and > 128 bits (looped walks).
LARGE = [(24, 79), (64, 20), (96, 40)]


@pytest.mark.parametrize("d, r2", LARGE)
@settings(max_examples=4, deadline=None)
@given(data=st.data())
def test_round_trip_random_codes(d, r2, data):
  codec = zn_codec(d, r2=r2)
  values = data.draw(st.lists(st.integers(0, codec.num_points - 1), min_size=64, max_size=64))
  values[:2] = [0, codec.num_points - 1]
  codes = as_words(values, codec.code_words)
  pts = np.asarray(codec.decode_points(codes))
  np.testing.assert_array_equal(pts, np.round(pts))
  np.testing.assert_array_equal(np.sum(pts * pts, axis=1), r2)
  assert as_ints(codec.encode(pts)) == values


@pytest.mark.parametrize("d, r2", LARGE)
@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_round_trip_random_vectors(d, r2, seed):
  codec = zn_codec(d, r2=r2)
  rng = np.random.default_rng(seed)
  # Heavy-tailed directions reach many atoms, not only the common ones.
  x = (rng.standard_normal((64, d)) * rng.exponential(1.0, (64, d)) ** 2).astype(np.float32)
  codes = codec.encode(x)
  assert all(v < codec.num_points for v in as_ints(codes))
  np.testing.assert_array_equal(np.asarray(codec.decode_points(codes)),
                                np.asarray(codec.quantize(x)))


def test_zn_codec_picks_or_checks_the_radius():
  assert zn_codec(24, 64).r2 == 79 and zn_codec(24, 64) is zn_codec(24, 64)  # shared tables
  assert zn_codec(8, 64, r2=10).r2 == 10 and zn_codec(24, r2=79).code_bits == 64
  with pytest.raises(ValueError, match="needs 64-bit codes, more than bits=32"):
    zn_codec(24, 32, r2=79)
  with pytest.raises(ValueError, match="bits or r2"):
    zn_codec(24)
  with pytest.raises(ValueError, match="does not fit a 8-bit"):
    zn_codec(200, 8)


def test_code_sizes():
  assert (ZnSphereCodec(64, 20).code_bits, ZnSphereCodec(64, 20).code_words) == (75, 3)
  assert (ZnSphereCodec(96, 40).code_bits, ZnSphereCodec(96, 40).code_words) == (133, 5)
  assert ZnSphereCodec(1, 1).code_words == 1  # N = 2: one bit


# ---------------------------------------------------------------------------------------
# Quantization details.

def test_ties_and_zero_rows_are_deterministic():
  codec = ZnSphereCodec(6, 3)
  np.testing.assert_array_equal(np.asarray(codec.quantize(np.zeros((2, 6), np.float32))),
                                [[1, 1, 1, 0, 0, 0]] * 2)
  # Equal |x_i|: the lower index gets the larger value; signs follow x.
  x = np.array([[0.5, -0.5, 0.5, -0.5, 0.5, 0.1]], np.float32)
  np.testing.assert_array_equal(np.asarray(codec.quantize(x)), [[1, -1, 1, 0, 0, 0]])
  big = ZnSphereCodec(24, 79)
  zero = np.asarray(big.quantize(np.zeros((1, 24), np.float32)))[0]
  np.testing.assert_array_equal(zero, big._atoms[0])  # the first atom, (8, 3, 2, 1, 1, 0...)


def test_quantize_is_scale_invariant_and_accepts_other_dtypes():
  codec = ZnSphereCodec(8, 6)
  x = np.random.default_rng(1).standard_normal((50, 8))
  q = np.asarray(codec.quantize(x.astype(np.float32)))
  np.testing.assert_array_equal(np.asarray(codec.quantize(x)), q)                   # float64
  np.testing.assert_array_equal(np.asarray(codec.quantize(3.0 * x.astype(np.float32))), q)
  np.testing.assert_array_equal(np.asarray(codec.quantize(q.astype(np.int32))), q)  # fixed points
  assert codec.encode(np.zeros((0, 8), np.float32)).shape == (0, codec.code_words)


def test_quantize_ste_forward_and_gradient():
  codec = ZnSphereCodec(8, 6)
  y = jax.random.normal(jax.random.PRNGKey(0), (5, 8))
  out = jax.jit(codec.quantize_ste)(y)
  np.testing.assert_allclose(out, np.asarray(codec.quantize(y)) / math.sqrt(6), rtol=1e-6)
  np.testing.assert_allclose(quantize_ste(y, 6), out, rtol=1e-6)
  w = jnp.arange(40.0).reshape(5, 8)
  g = jax.jit(jax.grad(lambda y: jnp.sum(codec.quantize_ste(y) * w)))(y)
  np.testing.assert_allclose(g, w)                  # straight through: identity
  g2 = jax.grad(lambda y: jnp.sum(quantize_ste(y, 6) ** 2))(y)
  np.testing.assert_allclose(g2, 2 * out, rtol=1e-6)


# ---------------------------------------------------------------------------------------
# Transformations: jit, vmap, static arguments, no retracing, sharding.

def test_jit_vmap_compose_without_retracing():
  codec = ZnSphereCodec(12, 30)
  x = np.random.default_rng(0).standard_normal((16, 12)).astype(np.float32)
  codes = np.asarray(codec.encode(x))

  @jax.jit
  @chex.assert_max_traces(n=1)
  def round_trip(x):
    return codec.decode(codec.encode(x))        # tracers: runs the cores, checks shapes

  a = round_trip(x)
  b = round_trip(x + 1.0)
  np.testing.assert_allclose(a, codec.decode(codes), rtol=1e-6)
  assert b.shape == (16, 12)
  np.testing.assert_array_equal(jax.jit(codec.encode)(x), codes)
  per_row = jax.vmap(lambda row: codec.encode_core(row[None])[0])
  np.testing.assert_array_equal(per_row(x), codes)
  # A codec is a static argument; an equal codec reuses the compiled function.
  f = jax.jit(chex.assert_max_traces(n=1)(lambda c, x: c.quantize_core(x)), static_argnums=0)
  np.testing.assert_array_equal(f(codec, x), f(ZnSphereCodec(12, 30), x))
  np.testing.assert_array_equal(codec.jitted("decode_points")(codes), codec.decode_points(codes))
  with pytest.raises(ValueError, match="name='search'"):
    codec.jitted("search")
  # The eager API compiles once per padded size.
  traces = codec.encode(x[:5]), codec.encode(x[:7])
  np.testing.assert_array_equal(traces[1][:5], traces[0])


def test_sharded_equals_single_device():
  if jax.device_count() < 4:
    pytest.skip("needs 4 forced host devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
  mesh = sharding.make_mesh(4)
  codec = ZnSphereCodec(24, 79)
  x = np.random.default_rng(5).standard_normal((1000, 24)).astype(np.float32)
  x = sharding.pad_rows(x, sharding.round_up(len(x), 4))
  codes = np.asarray(codec.encode(x))

  def sharded(fn):
    return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("data"), out_specs=P("data")))

  xs = sharding.shard_rows(x, mesh)
  np.testing.assert_array_equal(sharded(codec.encode_core)(xs), codes)
  np.testing.assert_array_equal(sharded(codec.quantize_core)(xs), codec.quantize(x))
  cs = sharding.shard_rows(codes, mesh)
  np.testing.assert_array_equal(sharded(codec.decode_core)(cs), codec.decode(codes))


# ---------------------------------------------------------------------------------------
# Errors.

def test_bad_codec_arguments_raise():
  with pytest.raises(ValueError, match="no lattice point"):
    ZnSphereCodec(1, 2)
  with pytest.raises(ValueError, match="no lattice point"):
    ZnSphereCodec(3, 7)
  with pytest.raises(ValueError, match="r2=0"):
    ZnSphereCodec(8, 0)
  with pytest.raises(ValueError, match="d=0"):
    ZnSphereCodec(0, 4)
  with pytest.raises(ValueError, match="2\\^256"):
    ZnSphereCodec(300, 60)
  with pytest.raises(ValueError, match="r2"):
    ZnSphereCodec(24, 2.5)
  with pytest.raises(ValueError, match="tail"):
    ZnSphereCodec(4, 4, tail=5)
  with pytest.raises(ValueError, match="d >= 5"):
    zn_r2_for_bits(4, 16)
  with pytest.raises(ValueError, match="bits"):
    zn_r2_for_bits(24, 0)
  with pytest.raises(ValueError, match="bits"):
    zn_r2_for_bits(24, 300)
  with pytest.raises(ValueError, match="fits in 8 bits"):
    zn_r2_for_bits(200, 8)


def test_bad_vectors_raise():
  codec = ZnSphereCodec(24, 79)
  with pytest.raises(ValueError, match="d=23 but the codec has d=24"):
    codec.encode(np.zeros((2, 23), np.float32))
  with pytest.raises(ValueError, match="2-D"):
    codec.quantize(np.zeros(24, np.float32))
  with pytest.raises(ValueError, match="NaN or Inf"):
    codec.quantize(np.full((2, 24), np.nan, np.float32))
  with pytest.raises(ValueError, match="NaN or Inf"):
    codec.encode(jnp.asarray(np.full((2, 24), np.inf, np.float32)))
  with pytest.raises(ValueError, match="d=23"):
    jax.jit(codec.encode)(jnp.zeros((2, 23)))     # shapes are checked under jit too
  with pytest.raises(ValueError, match="2-D"):
    codec.quantize_ste(jnp.zeros(24))
  with pytest.raises(ValueError, match="2-D"):
    quantize_ste(jnp.zeros(24), 79)


def test_bad_codes_raise():
  codec = ZnSphereCodec(24, 79)
  with pytest.raises(ValueError, match="uint32"):
    codec.decode(np.zeros((2, 2), np.int64))
  with pytest.raises(ValueError, match="uint32"):
    codec.decode([[0, 0]])
  with pytest.raises(ValueError, match="2-D"):
    codec.decode(np.zeros(2, np.uint32))
  with pytest.raises(ValueError, match="3 words but this codec \\(64 bits\\) uses 2"):
    codec.decode_points(np.zeros((2, 3), np.uint32))
  with pytest.raises(ValueError, match="row 1 is >= num_points"):
    codec.decode(as_words([5, codec.num_points], 2))
  with pytest.raises(ValueError, match="num_points"):
    codec.decode(np.full((1, 2), 0xFFFFFFFF, np.uint32))
  with pytest.raises(ValueError, match="uint32"):
    jax.jit(codec.decode)(jnp.zeros((2, 2), jnp.int32))
  codec.decode(as_words([codec.num_points - 1], 2))  # the largest code is fine


def test_encode_ignores_the_scale_of_a_row():
  # Finite rows of extreme magnitude used to get other codes (products flushed to zero or
  # overflowing): at 1e-38 most rows, at 1e-39 (subnormal) all rows got one code.
  c = zn_codec(8, bits=16)
  x = np.random.default_rng(0).standard_normal((20, 8)).astype(np.float32)
  ref = np.asarray(c.encode(x))
  unit = x / np.abs(x).max(axis=1, keepdims=True)
  for scaled in (x * np.float32(1e-38), x * np.float32(1e-39), x * np.float32(2.0 ** -100),
                 unit * np.float32(1e38), unit * np.float32(3.4e38), x * np.float32(2.0 ** 90)):
    assert np.isfinite(scaled).all()
    np.testing.assert_array_equal(np.asarray(c.encode(scaled)), ref)
    np.testing.assert_array_equal(np.asarray(c.quantize(scaled)), np.asarray(c.quantize(x)))
  # Subnormal rows of few significant bits: the code of the same values scaled up exactly.
  tiny = x * np.float32(1e-44)
  exact = (tiny.astype(np.float64) * 2.0 ** 149).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(c.encode(tiny)), np.asarray(c.encode(exact)))
  # A zero row keeps its documented point: the first atom on the leading coordinates.
  zero = np.zeros((1, 8), np.float32)
  np.testing.assert_array_equal(np.asarray(c.quantize(zero))[0], [3, 2, 1, 1, 0, 0, 0, 0])


@pytest.mark.parametrize("args, match", [
    (([8],), "d must be an integer, got \\[8\\]"),
    ((8, [16]), "bits must be an integer"),
])
def test_zn_codec_checks_argument_types(args, match):
  with pytest.raises(ValueError, match=match):
    zn_codec(*args)
