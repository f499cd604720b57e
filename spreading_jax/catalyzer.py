"""The catalyzer: an MLP that maps input vectors onto the unit sphere (Sablayrolles et al. 2019)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

import flax.linen as nn
import jax
import jax.numpy as jnp


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """Rows of x scaled to unit L2 norm. f32[n, d] -> f32[n, d].

  A zero row stays zero (no NaN, finite gradient): the norm is floored at ``eps``.

  Args:
    x: [..., d] vectors: a jax or numpy array or a nested list (``jnp.asarray``); integer
      values are normalized as float32.
    eps: floor of the norm.

  Raises:
    ValueError: x is a scalar, or its dtype is bool, complex or not numeric.
  """
  if not isinstance(x, jax.Array):  # a jax array or tracer is used as it is
    try:
      x = jnp.asarray(x)
    except (TypeError, ValueError) as e:
      raise ValueError(f"l2_normalize needs an array of real vectors, got "
                       f"{type(x).__name__} ({e})") from None
  if x.ndim == 0:
    raise ValueError("l2_normalize needs vectors [..., d], got a scalar")
  if jnp.issubdtype(x.dtype, jnp.integer):
    x = x.astype(jnp.float32)
  elif not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"l2_normalize needs real vectors, got dtype {x.dtype}")
  sq = jnp.sum(x * x, axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def _torch_kernel_init():
  # PyTorch's nn.Linear default (kaiming_uniform with a=sqrt(5)): U(±1/sqrt(fan_in)),
  # i.e. a uniform variance scaling of 1/3 over fan_in.
  return nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_bias_init(fan_in: int):
  # PyTorch's nn.Linear default bias: U(±1/sqrt(fan_in)).
  bound = 1.0 / np.sqrt(max(fan_in, 1))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)
  return init


def _dense(features: int, fan_in: int, init: str) -> nn.Dense:
  if init == "torch":
    return nn.Dense(features, kernel_init=_torch_kernel_init(),
                    bias_init=_torch_bias_init(fan_in))
  if init == "flax":
    return nn.Dense(features)
  raise ValueError(f"init={init!r} must be 'torch' or 'flax'")


class Catalyzer(nn.Module):
  """MLP d_in -> hidden... -> d_out with BatchNorm + ReLU, L2-normalized output.

  The paper's network is ``Catalyzer(d_out=24, hidden=(1024, 1024))``. Use it with explicit
  ``batch_stats``::

    model = Catalyzer(d_out=24)
    variables = model.init(rng, x, train=False)
    y = model.apply(variables, x, train=False)                      # inference
    y, upd = model.apply(variables, x, train=True, mutable=["batch_stats"])  # training

  Attributes:
    d_out: output dimension (the dimension of the sphere the quantizer works on).
    hidden: widths of the hidden layers.
    bn_momentum: running-average momentum of BatchNorm (0.9 = PyTorch's 0.1).
    axis_name: mesh axis over which BatchNorm statistics are averaged under
      ``shard_map`` (the global batch), or None on one device.
    init_scheme: "torch" (the original code's initialisation: weights and biases uniform in
      ±1/sqrt(fan_in)) or "flax" (LeCun-normal weights, zero biases).
  """
  d_out: int
  hidden: Sequence[int] = (1024, 1024)
  bn_momentum: float = 0.9
  axis_name: str | None = None
  init_scheme: str = "torch"

  @classmethod
  def from_config(cls, config) -> "Catalyzer":
    """The network a ``TrainConfig`` describes (d_out, hidden, init): the one place a
    config becomes a module (training, a saved model's forward pass and loading)."""
    return cls(d_out=config.d_out, hidden=tuple(config.hidden), init_scheme=config.init)

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    """x: f32[n, d_in] -> f32[n, d_out] of unit norm."""
    x = x.astype(jnp.float32)
    for width in self.hidden:
      x = _dense(width, x.shape[-1], self.init_scheme)(x)
      x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5,
                       axis_name=self.axis_name if train else None)(x)
      x = nn.relu(x)
    x = _dense(self.d_out, x.shape[-1], self.init_scheme)(x)
    return l2_normalize(x)
