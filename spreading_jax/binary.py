"""Binary codes: one sign bit per catalyzed dimension, packed 8 to a byte.

Bit ``j`` of a vector is stored in byte ``j // 8`` at bit position ``j % 8`` (little-endian
bit order). A coordinate >= 0 gives bit 1 (so an exact zero maps to +1, deterministically).
Codes are compared with ``hamming.hamming_knn``.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from spreading_jax._validation import check_int, check_vectors

_BIT_WEIGHTS = 1 << np.arange(8, dtype=np.uint32)


def num_bytes(d: int) -> int:
  """Bytes per code for ``d`` sign bits."""
  return -(-d // 8)


def sign_codes_core(y) -> jax.Array:
  """Traceable ``sign_codes`` (no input checks): f32[n, d] -> u8[n, ceil(d/8)]."""
  n, d = y.shape
  nbytes = num_bytes(d)
  bits = jnp.pad((y >= 0).astype(jnp.uint32), ((0, 0), (0, nbytes * 8 - d)))
  packed = jnp.sum(bits.reshape(n, nbytes, 8) * jnp.asarray(_BIT_WEIGHTS), axis=2)
  return packed.astype(jnp.uint8)


_sign_codes = jax.jit(sign_codes_core)


def sign_codes(y) -> jax.Array:
  """Packed sign bits. y: f32[n, d] -> u8[n, ceil(d/8)].

  Example:
    >>> np.asarray(sign_codes(np.array([[1., -1., 0.5]]))).tolist()
    [[5]]
  """
  check_vectors("y", y)
  return _sign_codes(jnp.asarray(y, jnp.float32))


def check_codes(name: str, codes, nbytes: int | None = None) -> None:
  """Raises ValueError unless ``codes`` is a 2-D uint8 array of packed bits (with ``nbytes``
  bytes per code when given)."""
  shape = getattr(codes, "shape", None)
  if shape is None:
    raise ValueError(f"{name} must be a 2-D uint8 array of packed bits (numpy or jax), got "
                     f"{type(codes).__name__}")
  if len(shape) != 2:
    raise ValueError(f"{name} must be a 2-D uint8 array of packed bits, got shape {shape}")
  if np.dtype(codes.dtype) != np.uint8:
    raise ValueError(f"{name} must have dtype uint8 (packed bits), got {codes.dtype}")
  if nbytes is not None and shape[1] != nbytes:
    raise ValueError(f"{name} has {shape[1]} bytes per code but {nbytes} were expected")


@functools.partial(jax.jit, static_argnames=("d",))
def _unpack(codes, d):
  bits = (codes[:, :, None].astype(jnp.uint32) >> jnp.arange(8, dtype=jnp.uint32)) & 1
  bits = bits.reshape(codes.shape[0], 8 * codes.shape[1])[:, :d]  # no -1: n may be 0
  return jnp.where(bits == 1, 1.0, -1.0).astype(jnp.float32)


@jax.jit
def unpack_all(codes) -> jax.Array:
  """All 8 * nbytes bits of u8[n, nbytes] codes as f32 +1/-1 (no validation; jittable)."""
  return _unpack(codes, 8 * codes.shape[1])


def unpack(codes, d: int) -> jax.Array:
  """Inverse of ``sign_codes``. codes: u8[n, ceil(d/8)] -> f32[n, d] of +1/-1."""
  d = check_int("d", d, minimum=1)
  check_codes("codes", codes, num_bytes(d))
  return _unpack(jnp.asarray(codes), d)
