"""Losses and the catalyzer module against hand-written numpy references."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from spreading_jax import sharding
from spreading_jax.catalyzer import Catalyzer, l2_normalize
from spreading_jax.losses import koleo, spreading_loss, triplet_rank


def unit_rows(rng, n, d):
  x = rng.standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_koleo(y):
  y = np.asarray(y, np.float64)
  d = np.sqrt(((y[:, None] - y[None]) ** 2).sum(-1))
  np.fill_diagonal(d, np.inf)
  return -np.log(len(y) * d.min(1))


def test_triplet_matches_numpy_and_optax():
  rng = np.random.default_rng(0)
  a, p, n = (unit_rows(rng, 50, 8) for _ in range(3))
  loss, violations = jax.jit(triplet_rank)(a, p, n)
  dp, dn = np.linalg.norm(a - p, axis=1), np.linalg.norm(a - n, axis=1)
  np.testing.assert_allclose(loss, np.maximum(dp - dn, 0), rtol=1e-5, atol=1e-6)
  assert int(violations) == int((dp > dn).sum())
  ref = optax.losses.triplet_margin_loss(a, p, n, margin=0.0, eps=0.0)
  np.testing.assert_allclose(loss, ref, rtol=1e-5, atol=1e-6)


def test_koleo_matches_numpy():
  rng = np.random.default_rng(1)
  y = unit_rows(rng, 64, 12)
  np.testing.assert_allclose(jax.jit(koleo)(y), np_koleo(y), rtol=1e-5, atol=1e-5)


def test_degenerate_batches_have_finite_values_and_gradients():
  y = np.zeros((8, 4), np.float32)
  y[:4, 0] = 1.0  # four identical rows
  y[4:, 1] = 1.0
  g = jax.grad(lambda y: koleo(y).mean())(y)
  assert np.all(np.isfinite(koleo(y))) and np.all(np.isfinite(g))
  a = jnp.asarray(y)
  g = jax.grad(lambda a: triplet_rank(a, a, a)[0].sum())(a)  # zero distances everywhere
  assert np.all(np.isfinite(g))
  g = jax.grad(lambda x: l2_normalize(x).sum())(jnp.zeros((2, 3)))
  assert np.all(np.isfinite(g))
  assert np.all(l2_normalize(jnp.zeros((2, 3))) == 0)


def test_spreading_loss_is_triplet_plus_lambda_koleo_and_grad_safe():
  rng = np.random.default_rng(2)
  a, p, n = (unit_rows(rng, 32, 6) for _ in range(3))
  loss, parts = spreading_loss(a, p, n, 0.05)
  t, _ = triplet_rank(a, p, n)
  np.testing.assert_allclose(loss, t.mean() + 0.05 * np_koleo(a).mean(), rtol=1e-5)
  assert set(parts) == {"triplet", "koleo", "violations"}
  grads = jax.jit(jax.grad(lambda a: spreading_loss(a, p, n, 0.05)[0]))(a)
  assert grads.shape == a.shape and np.all(np.isfinite(grads))
  # vmap over independent batches equals a loop.
  stacked = jax.vmap(lambda a, p, n: spreading_loss(a, p, n, 0.05)[0])(
      jnp.stack([a, p]), jnp.stack([p, n]), jnp.stack([n, a]))
  np.testing.assert_allclose(stacked[1], spreading_loss(p, n, a, 0.05)[0], rtol=1e-6)


def test_koleo_over_sharded_batch_equals_global():
  if jax.device_count() < 4:
    pytest.skip("needs 4 forced host devices (make test sets XLA_FLAGS)")
  mesh = sharding.make_mesh(4)
  rng = np.random.default_rng(3)
  y = unit_rows(rng, 32, 5)
  fn = jax.shard_map(lambda y: koleo(y, axis_name="data"), mesh=mesh, in_specs=P("data"),
                     out_specs=P("data"))
  np.testing.assert_allclose(fn(y), koleo(y), rtol=1e-6, atol=1e-6)
  loss_fn = jax.shard_map(lambda a, p, n: spreading_loss(a, p, n, 0.1, axis_name="data")[0],
                          mesh=mesh, in_specs=(P("data"),) * 3, out_specs=P())
  a, p, n = y, unit_rows(rng, 32, 5), unit_rows(rng, 32, 5)
  np.testing.assert_allclose(loss_fn(a, p, n), spreading_loss(a, p, n, 0.1)[0], rtol=1e-6)


def test_bad_shapes_raise():
  with pytest.raises(ValueError, match="anchor has shape"):
    triplet_rank(jnp.zeros((3, 2)), jnp.zeros((3, 3)), jnp.zeros((3, 2)))
  with pytest.raises(ValueError, match="2-D"):
    koleo(jnp.zeros(5))
  with pytest.raises(ValueError, match="at least 2"):
    koleo(jnp.zeros((1, 3)))


def test_catalyzer_outputs_unit_vectors_and_tracks_batch_stats():
  model = Catalyzer(d_out=8, hidden=(32, 16))
  x = np.random.default_rng(4).standard_normal((20, 13)).astype(np.float32)
  variables = model.init(jax.random.PRNGKey(0), x, train=False)
  y = model.apply(variables, x, train=False)
  assert y.shape == (20, 8)
  np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-5)
  y_train, updates = model.apply(variables, x, train=True, mutable=["batch_stats"])
  assert not np.allclose(y_train, y)  # batch statistics differ from the initial running ones
  before = jax.tree_util.tree_leaves(variables["batch_stats"])
  after = jax.tree_util.tree_leaves(updates["batch_stats"])
  assert any(not np.allclose(b, a) for b, a in zip(before, after))
  shapes = jax.tree_util.tree_map(lambda v: v.shape, variables["params"])
  assert shapes["Dense_0"]["kernel"] == (13, 32) and shapes["Dense_2"]["kernel"] == (16, 8)


@pytest.mark.parametrize("call, error, match", [
    (lambda a: spreading_loss(a, a, a, "0.1"), TypeError, "lambda_koleo must be a number"),
    (lambda a: spreading_loss(a, a, a, float("nan")), ValueError, "lambda_koleo=nan"),
    (lambda a: spreading_loss(a, a, a, -1.0), ValueError, "lambda_koleo=-1.0"),
    (lambda a: spreading_loss(a, a, a, jnp.ones(2)), TypeError, "scalar"),
    (lambda a: koleo(a[:, :0]), ValueError, r"y must be 2-D \(n, d\) with d >= 1"),
    (lambda a: koleo(a[0]), ValueError, "y must be 2-D"),
    (lambda a: koleo(a.astype(jnp.int32)), TypeError, "y must be a floating-point array"),
    (lambda a: koleo(a, axis_name="data"), ValueError, "axis_name='data' is not an axis"),
    (lambda a: triplet_rank(a, a[:, :3], a), ValueError, "positive has shape"),
    (lambda a: triplet_rank(a, a, a[:5]), ValueError, "negative has shape"),
])
def test_losses_name_bad_input(call, error, match):
  a = jnp.asarray(unit_rows(np.random.default_rng(4), 8, 4))
  with pytest.raises(error, match=match):
    call(a)


def test_losses_take_array_likes_and_a_traced_lambda():
  rows = [[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]
  np.testing.assert_allclose(koleo(rows), koleo(jnp.asarray(rows)))
  a, p, n = (unit_rows(np.random.default_rng(5), 16, 4) for _ in range(3))
  grid = jax.vmap(lambda lam: spreading_loss(a, p, n, lam)[0])(jnp.array([0.0, 0.05]))
  np.testing.assert_allclose(grid[1], spreading_loss(a, p, n, 0.05)[0], rtol=1e-6)
