"""The spreading losses: rank-preserving triplet loss and the KoLeo entropy regularizer.

Pure functions of arrays that return one value per example and leave the reduction to the
caller (``loss = triplet.mean() + lam * koleo.mean()``); they are jit/vmap/grad safe and
can be imported into any training code.

References:
  Sablayrolles, Douze, Schmid, Jégou. Spreading vectors for similarity search. ICLR 2019.
  Kozachenko, Leonenko. Sample estimate of the entropy of a random vector. 1987.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp



def _check_pair(name_a, a, name_b, b):
  if a.ndim != 2 or a.shape != b.shape:
    raise ValueError(f"{name_a} has shape {a.shape} but {name_b} has shape {b.shape}; "
                     "expected equal 2-D shapes (n, d)")


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
  if y.ndim != 2:
    raise ValueError(f"y must be 2-D (n, d), got shape {y.shape}")
  n_local = y.shape[0]
  if axis_name is None:
    ref, offset = y, 0
  else:
    ref = jax.lax.all_gather(y, axis_name, tiled=True)
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
    lambda_koleo: weight λ of the KoLeo term.
    axis_name: mesh axis of a sharded batch (see ``koleo``); the means are then global.

  Returns:
    (loss f32[], parts) where parts = {"triplet", "koleo", "violations"} (global values).
  """
  t, violations = triplet_rank(anchor, positive, negative)
  k = koleo(anchor, axis_name=axis_name)
  t_mean, k_mean = jnp.mean(t), jnp.mean(k)
  if axis_name is not None:
    t_mean = jax.lax.pmean(t_mean, axis_name)
    k_mean = jax.lax.pmean(k_mean, axis_name)
    violations = jax.lax.psum(violations, axis_name)
  loss = t_mean + lambda_koleo * k_mean
  return loss, {"triplet": t_mean, "koleo": k_mean, "violations": violations}
