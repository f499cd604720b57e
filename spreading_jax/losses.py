"""The spreading losses: rank-preserving triplet loss and the KoLeo entropy regularizer.

Pure functions of arrays that return one value per example and leave the reduction to the
caller (``loss = triplet.mean() + lam * koleo.mean()``); they are jit/vmap/grad safe and
can be imported into any training code.

References:
  Sablayrolles, Douze, Schmid, Jégou. Spreading vectors for similarity search. ICLR 2019.
  Kozachenko, Leonenko. Sample estimate of the entropy of a random vector. 1987.
"""
from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp

from spreading_jax._validation import is_concrete

# Shapes, dtypes and a concrete λ are checked when the function is traced (free under jit);
# values inside arrays are not: a NaN row gives NaN values, as in any jax loss.


def _batch(name: str, x) -> jax.Array:
  """``x`` as a float array of shape (n, d) with d >= 1, or a ValueError/TypeError naming it."""
  x = jnp.asarray(x)
  if x.ndim != 2 or x.shape[1] < 1:
    raise ValueError(f"{name} must be 2-D (n, d) with d >= 1, got shape {x.shape}")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(f"{name} must be a floating-point array, got dtype {x.dtype}")
  return x


def _check_pair(name_a, a, name_b, b):
  if a.shape != b.shape:
    raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}; "
                     "expected equal 2-D shapes (n, d)")


def _check_lambda(lam):
  """A concrete λ must be a finite number >= 0; a traced one (a λ grid under vmap) a scalar."""
  if isinstance(lam, (bool, str, bytes)) or not (
      isinstance(lam, numbers.Real) or hasattr(lam, "dtype")):
    raise TypeError(f"lambda_koleo must be a number, got {lam!r}")
  if hasattr(lam, "dtype"):
    if jnp.ndim(lam) != 0 or not jnp.issubdtype(lam.dtype, jnp.number):
      raise TypeError(f"lambda_koleo must be a scalar number, got {jnp.dtype(lam.dtype)} "
                      f"of shape {jnp.shape(lam)}")
    if not is_concrete(lam):
      return
  value = float(lam)
  if not math.isfinite(value) or value < 0:
    raise ValueError(f"lambda_koleo={value} must be a finite number >= 0")


def _safe_norm(x: jax.Array, eps: float) -> jax.Array:
  # sqrt has an infinite derivative at 0; flooring the squared norm keeps gradients finite.
  return jnp.sqrt(jnp.maximum(jnp.sum(x * x, axis=-1), eps * eps))


def triplet_rank(anchor: jax.Array, positive: jax.Array, negative: jax.Array,
                 eps: float = 1e-8) -> tuple[jax.Array, jax.Array]:
  """Rank-preserving triplet loss with no margin, per example.

  loss_i = relu(‖a_i − p_i‖ − ‖a_i − n_i‖): zero once the positive is closer to the anchor
  than the negative.

  Args:
    anchor, positive, negative: f32[n, d].
    eps: floor of the distances (keeps gradients finite when two points coincide).

  Returns:
    (loss f32[n], violations i32[]): the per-example losses and how many triplets are
    ranked the wrong way (positive strictly farther than negative).

  Examples:
    >>> a = jnp.array([[1., 0.]]); p = jnp.array([[0., 1.]]); n = jnp.array([[1., 0.]])
    >>> loss, bad = triplet_rank(a, p, n)
    >>> round(float(loss[0]), 4), int(bad)
    (1.4142, 1)

  References:
    Sablayrolles et al., ICLR 2019, eq. (6).
  """
  anchor, positive, negative = (_batch(name, v) for name, v in (
      ("anchor", anchor), ("positive", positive), ("negative", negative)))
  _check_pair("anchor", anchor, "positive", positive)
  _check_pair("anchor", anchor, "negative", negative)
  d_pos = _safe_norm(anchor - positive, eps)
  d_neg = _safe_norm(anchor - negative, eps)
  return jax.nn.relu(d_pos - d_neg), jnp.sum(d_pos > d_neg).astype(jnp.int32)


def koleo(y: jax.Array, eps: float = 1e-8, *, axis_name: str | None = None) -> jax.Array:
  """Kozachenko–Leonenko differential-entropy regularizer, per example.

  koleo_i = −log(n · ρ_i), ρ_i = distance from y_i to its nearest *other* row of the batch.
  Its mean is the paper's L_KoLeo; minimizing it spreads the rows uniformly over the sphere.

  Args:
    y: f32[n, d] (catalyzed vectors; typically unit norm).
    eps: floor of ρ, so coincident rows give a finite value and gradient.
    axis_name: under ``shard_map``, the mesh axis holding the rest of the global batch:
      nearest neighbours are searched over the whole (all-gathered) batch and n is the
      global batch size, so the values do not depend on how the batch is split.

  Returns:
    f32[n] (the local rows' values).

  Examples:
    >>> y = jnp.array([[1., 0.], [0., 1.], [-1., 0.]])
    >>> [round(float(v), 4) for v in koleo(y)]
    [-1.4452, -1.4452, -1.4452]

  References:
    Sablayrolles et al., ICLR 2019, eq. (3)-(4); Kozachenko & Leonenko, 1987.
  """
  y = _batch("y", y)
  n_local = y.shape[0]
  if axis_name is None:
    ref, offset = y, 0
  else:
    try:
      ref = jax.lax.all_gather(y, axis_name, tiled=True)
    except NameError:  # jax's "unbound axis name": not inside shard_map over that axis
      raise ValueError(f"axis_name={axis_name!r} is not an axis of the surrounding shard_map "
                       "(call koleo inside jax.shard_map over a mesh with that axis, or "
                       "leave axis_name=None for an unsharded batch)") from None
    offset = jax.lax.axis_index(axis_name) * n_local
  n = ref.shape[0]
  if n < 2:
    raise ValueError(f"koleo needs a batch of at least 2 rows, got {n}")
  # Squared distances by explicit differences: exact zeros for coincident rows (no
  # cancellation), and a zero gradient there instead of NaN.
  diff = y[:, None, :] - ref[None, :, :]
  d2 = jnp.sum(diff * diff, axis=-1)
  self_mask = jnp.arange(n)[None, :] == (offset + jnp.arange(n_local))[:, None]
  d2 = jnp.where(self_mask, jnp.inf, d2)
  rho = jnp.sqrt(jnp.maximum(jnp.min(d2, axis=1), eps * eps))
  return -jnp.log(n * rho)


def spreading_loss(anchor: jax.Array, positive: jax.Array, negative: jax.Array,
                   lambda_koleo: float, *, axis_name: str | None = None):
  """The paper's objective: mean triplet loss + λ · mean KoLeo (KoLeo on the anchors).

  Args:
    anchor, positive, negative: f32[n, d] catalyzed vectors (in end-to-end training the
      positives and negatives are already quantized with a straight-through estimator).
    lambda_koleo: weight λ of the KoLeo term: a finite number >= 0, or a traced scalar
      (e.g. a λ grid under ``jax.vmap``).
    axis_name: mesh axis of a sharded batch (see ``koleo``); the means are then global.

  Raises:
    ValueError/TypeError, when traced: shapes that differ or are not (n, d), integer
    arrays, a λ that is not a number or is negative or not finite. Values inside the
    arrays are not checked (a NaN row gives a NaN loss).

  Returns:
    (loss f32[], parts) where parts = {"triplet", "koleo", "violations"} (global values).
  """
  _check_lambda(lambda_koleo)
  t, violations = triplet_rank(anchor, positive, negative)
  k = koleo(anchor, axis_name=axis_name)
  t_mean, k_mean = jnp.mean(t), jnp.mean(k)
  if axis_name is not None:
    t_mean = jax.lax.pmean(t_mean, axis_name)
    k_mean = jax.lax.pmean(k_mean, axis_name)
    violations = jax.lax.psum(violations, axis_name)
  loss = t_mean + lambda_koleo * k_mean
  return loss, {"triplet": t_mean, "koleo": k_mean, "violations": violations}
