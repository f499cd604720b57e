"""Device meshes and the padding helpers that let kernels shard a database over them.

A mesh is built once at the edge of a program (``make_mesh``) and passed to kernels as
``mesh=``; every kernel works the same with ``mesh=None``.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spreading_jax._validation import check_int, check_mesh

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None, axis_name: str = DATA_AXIS) -> Mesh:
  """A 1-D mesh over the first ``num_devices`` devices (default: all of them).

  On a multi-host job (after ``jax.distributed.initialize()``) the default spans every
  process's devices.

  Example:
    >>> mesh = make_mesh()
    >>> mesh.axis_names
    ('data',)
  """
  devices = jax.devices()
  if num_devices is None:
    num_devices = len(devices)
  num_devices = check_int("num_devices", num_devices, minimum=1)
  if num_devices > len(devices):
    raise ValueError(f"num_devices={num_devices} but only {len(devices)} devices are available")
  return Mesh(np.asarray(devices[:num_devices]), (axis_name,))


def local_mesh(axis_name: str = DATA_AXIS) -> Mesh | None:
  """A 1-D mesh over this process's devices (``jax.local_devices()``), or None when it has
  one device: the mesh for work that each process does on its own (searching an index,
  encoding its slice of a file).

  ``jax.devices()[:jax.local_device_count()]`` is not this: on a multi-process job it
  names process 0's devices on every process.

  Example:
    >>> mesh = local_mesh()
    >>> mesh is None or mesh.devices.size == jax.local_device_count()
    True
  """
  devices = jax.local_devices()
  if len(devices) < 2:
    return None
  return Mesh(np.asarray(devices), (axis_name,))


def mesh_size(mesh: Mesh | None) -> int:
  """Number of devices along the data axis (1 without a mesh). TypeError when ``mesh`` is
  not a ``jax.sharding.Mesh`` or None (``_validation.check_mesh``)."""
  if mesh is None:
    return 1
  return int(check_mesh(mesh).devices.size)  # check_mesh: a 1-D Mesh


def axis_name(mesh: Mesh) -> str:
  """The name of the (single) data axis of ``mesh``."""
  return check_mesh(mesh).axis_names[0]  # check_mesh: a 1-D Mesh


def round_up(n: int, multiple: int) -> int:
  """Smallest multiple of ``multiple`` that is >= n."""
  return -(-n // multiple) * multiple


def round_up_pow2(n: int, minimum: int = 1) -> int:
  """Smallest power of two that is >= n and >= ``minimum``: a size bucket, so that varying
  row counts share a few compiled shapes."""
  return max(minimum, 1 << (max(n, 1) - 1).bit_length())


def pad_rows(x, n: int, value=0):
  """Pads the leading axis of ``x`` (numpy or jax) to length ``n`` with ``value``."""
  extra = n - x.shape[0]
  if extra < 0:
    raise ValueError(f"cannot pad {x.shape[0]} rows down to {n}")
  if extra == 0:
    return x
  widths = [(0, extra)] + [(0, 0)] * (x.ndim - 1)
  if isinstance(x, np.ndarray):
    return np.pad(x, widths, constant_values=value)
  return jax.numpy.pad(x, widths, constant_values=value)


def shard_rows(x, mesh: Mesh):
  """Places ``x`` on ``mesh`` split along its leading axis (rows must divide evenly)."""
  n = mesh_size(mesh)
  if x.shape[0] % n:
    raise ValueError(f"{x.shape[0]} rows do not split over {n} devices; pad first")
  return jax.device_put(x, NamedSharding(mesh, P(axis_name(mesh))))


def replicate(x, mesh: Mesh):
  """Places ``x`` on every device of ``mesh``."""
  return jax.device_put(x, NamedSharding(mesh, P()))


# ---------------------------------------------------------------------------------------
# Multi-process (multi-host) helpers: meaningful after ``jax.distributed.initialize()``;
# with one process they reduce to plain slicing.

def process_rows(n: int, index: int | None = None, count: int | None = None) -> tuple[int, int]:
  """Rows [lo, hi) of an n-row input that process ``index`` of ``count`` owns (contiguous,
  sizes differ by at most one). Defaults: this process of ``jax.process_count()``."""
  index = jax.process_index() if index is None else int(index)
  count = jax.process_count() if count is None else int(count)
  if not 0 <= index < count:
    raise ValueError(f"process index {index} is outside [0, {count})")
  return index * n // count, (index + 1) * n // count


def gather_process_slices(x, rows: np.ndarray | None = None) -> np.ndarray:
  """Every process reads only its own ``process_rows`` slice of ``x`` (a memory map or any
  array-like with row indexing), or of ``x[rows]`` when ``rows`` is given, and receives
  the full array, assembled with one all-gather. With one process nothing is copied when
  ``rows`` is None (``x`` is returned as it is).

  Used where each process needs all rows (training: exact kNN positives and negative mining
  span the whole training set) but the input should be read once across the job.
  """
  if jax.process_count() == 1:
    return x if rows is None else np.asarray(x[np.asarray(rows)])  # no copy of a whole input
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  n = int(x.shape[0] if rows is None else len(rows))
  count = jax.process_count()
  spans = [process_rows(n, i, count) for i in range(count)]
  lo, hi = spans[jax.process_index()]
  local = x[lo:hi] if rows is None else x[np.asarray(rows[lo:hi])]
  width = -(-n // count)  # all_gather needs equal shapes: pad every slice to ceil(n / P)
  local = pad_rows(np.ascontiguousarray(local), width)
  gathered = np.asarray(multihost_utils.process_allgather(local, tiled=False))
  return np.concatenate([gathered[i, :b - a] for i, (a, b) in enumerate(spans)])
