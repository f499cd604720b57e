"""Input checks shared by the public entry points: clear ValueErrors before any compute."""
from __future__ import annotations

import numbers

import jax
import numpy as np


def is_concrete(x) -> bool:
  """True when ``x`` holds values (numpy or a committed jax array), not a tracer."""
  return not isinstance(x, jax.core.Tracer)


def check_int(name: str, value, *, minimum: int | None = None, maximum: int | None = None) -> int:
  """Returns ``value`` as an int, raising ValueError if it is not an integer in range."""
  if isinstance(value, bool) or not isinstance(value, numbers.Integral):
    raise ValueError(f"{name} must be an integer, got {value!r}")
  value = int(value)
  if minimum is not None and value < minimum:
    raise ValueError(f"{name}={value} must be >= {minimum}")
  if maximum is not None and value > maximum:
    raise ValueError(f"{name}={value} must be <= {maximum}")
  return value


def check_vectors(name: str, x, *, d: int | None = None, d_name: str = "d",
                  finite: bool = True, min_rows: int = 0):
  """Validates a 2-D matrix of real vectors and returns it unchanged.

  Accepts numpy or jax arrays of any real (float or integer) dtype. Raises ValueError
  naming ``name`` when the rank, the dimension (also 0), the dtype or the values are wrong
  (NaN, Inf, or float64 values beyond the float32 range that all computation uses). The
  value scans run only on concrete arrays (inside ``jit`` they cannot be checked).
  """
  shape = getattr(x, "shape", None)
  dtype = getattr(x, "dtype", None)
  if shape is None or dtype is None:
    raise ValueError(f"{name} must be an array, got {type(x).__name__}")
  if len(shape) != 2:
    raise ValueError(f"{name} must be 2-D (n, d), got shape {tuple(shape)}")
  dtype = np.dtype(dtype)
  # jax's issubdtype also knows bfloat16 and the other ml_dtypes floats.
  floating = jax.numpy.issubdtype(dtype, jax.numpy.floating)
  numeric = floating or np.issubdtype(dtype, np.integer)
  if dtype == np.bool_ or not numeric:
    raise ValueError(f"{name} has dtype {dtype}; expected a real float or integer dtype")
  if d is not None and shape[1] != d:
    raise ValueError(f"{name} has {d_name}={shape[1]} but {d} was expected")
  if shape[1] == 0:
    raise ValueError(f"{name} has shape {tuple(shape)}: vectors of dimension 0")
  if shape[0] < min_rows:
    raise ValueError(f"{name} has {shape[0]} rows; at least {min_rows} are needed")
  if finite and floating and is_concrete(x):
    if not _all_finite(x):
      bad = np.argwhere(~np.isfinite(np.asarray(x)))[0]
      raise ValueError(f"{name} contains NaN or Inf (first at row {bad[0]}, column {bad[1]})")
    if dtype.itemsize > 4 and shape[0] and isinstance(x, np.ndarray):
      # Everything is computed in float32: wider floats must fit its range.
      top = max(abs(float(np.min(x))), abs(float(np.max(x))))
      if top > _F32_MAX:
        raise ValueError(f"{name} ({dtype}) has values up to {top:.3g} in magnitude, which "
                         f"overflow float32 (max {_F32_MAX:.3g})")
  return x


_F32_MAX = float(np.finfo(np.float32).max)


def _all_finite(x) -> bool:
  if isinstance(x, np.ndarray):
    # A sum is finite iff no entry is NaN/Inf (barring overflow, which falls back to the
    # exact per-entry test); it avoids a full boolean temporary. Summed in the array's own
    # float width (at least 32 bits): a float64 sum of float32 data ran several times slower.
    with np.errstate(over="ignore", invalid="ignore"):
      if np.isfinite(np.sum(x, dtype=np.promote_types(x.dtype, np.float32))):
        return True
    return bool(np.all(np.isfinite(x)))
  # The same test on the device, compiled: one fused, multi-threaded reduction (several
  # times faster than an elementwise isfinite + all on a 2-core CPU).
  if bool(_finite_sum(x)):
    return True
  return bool(_all_finite_entries(x))


@jax.jit
def _finite_sum(x):
  return jax.numpy.isfinite(jax.numpy.sum(x, dtype=jax.numpy.float32))


@jax.jit
def _all_finite_entries(x):
  return jax.numpy.all(jax.numpy.isfinite(x))


def check_mesh(mesh, name: str = "mesh"):
  """Returns ``mesh`` (None or a 1-D ``jax.sharding.Mesh``) unchanged.

  Raises TypeError naming ``name`` when it is something else (e.g. a device name such as
  "cpu"), ValueError when the mesh has more than one axis. A static check: no device work.
  """
  if mesh is None:
    return None
  if not isinstance(mesh, jax.sharding.Mesh):
    raise TypeError(f"{name} must be a jax.sharding.Mesh (see sharding.make_mesh) or None, "
                    f"got {type(mesh).__name__} {mesh!r:.60}")
  if len(mesh.axis_names) != 1:
    raise ValueError(f"{name} must be a 1-D mesh, got axes {tuple(mesh.axis_names)}")
  return mesh
