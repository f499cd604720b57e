"""Vector files: .fvecs / .ivecs / .bvecs, .npy, ann-benchmarks HDF5, and gzipped IDX.

Readers return memory-mapped, read-only numpy views (no full copy) where the format
allows it and reject malformed files with a ``ValueError`` naming the file and the
problem. Writers go through ``_files.atomic_output``, so a crash never leaves a
half-written file.
"""
from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from spreading_jax._files import PathLike, atomic_output
from spreading_jax._validation import check_int

# Largest dimension a vector file may declare; anything bigger is a corrupt header.
_MAX_DIM = 1 << 20
# Files up to this size get every row's dimension header checked; bigger ones (the 1B-row
# bigann/deep1B files) get a sample, because a strided read of the headers touches every
# page of the file.
_FULL_HEADER_CHECK_BYTES = 4 << 30
_HEADER_SAMPLE_ROWS = 1 << 16
# Bytes of output rows assembled at a time by the writers.
_WRITE_CHUNK_BYTES = 1 << 26


# ---------------------------------------------------------------------------------------
# .fvecs / .ivecs / .bvecs: each row is a little-endian int32 dimension d, then d values.

def _read_vecs(path: PathLike, dtype, max_rows: int | None) -> np.ndarray:
  name = os.fspath(path)
  dtype = np.dtype(dtype).newbyteorder("<")
  if max_rows is not None:
    max_rows = check_int("max_rows", max_rows, minimum=1)
  if not os.path.exists(name):
    raise ValueError(f"{name}: no such file")
  if not os.path.isfile(name):
    raise ValueError(f"{name}: not a regular file")
  size = os.path.getsize(name)
  if size == 0:
    raise ValueError(f"{name}: empty file (0 bytes)")
  if size < 4:
    raise ValueError(f"{name}: truncated: {size} bytes, shorter than the 4-byte dimension "
                     "header")
  d = int(np.fromfile(name, dtype="<i4", count=1)[0])
  if not 0 < d <= _MAX_DIM:
    raise ValueError(f"{name}: invalid dimension header d={d} in row 0 (expected 1..{_MAX_DIM});"
                     " the file is corrupt or not in this format")
  row = 4 + d * dtype.itemsize
  if size < row:
    raise ValueError(f"{name}: truncated first row: the header says d={d} ({row}-byte rows) "
                     f"but the file has only {size} bytes")
  if size % row:
    raise ValueError(f"{name}: truncated last row: {size} bytes is not a multiple of the "
                     f"{row}-byte row (d={d})")
  n_file = size // row
  n = n_file if max_rows is None else min(n_file, max_rows)
  raw = np.memmap(name, dtype=np.uint8, mode="r", shape=(n_file, row))[:n]
  headers = raw[:, :4].view("<i4")[:, 0]  # strided view: no copy
  if n * row <= _FULL_HEADER_CHECK_BYTES:
    rows = None
    bad = np.flatnonzero(headers != d)
  else:
    m = _HEADER_SAMPLE_ROWS
    rows = np.unique(np.concatenate([np.arange(m), np.arange(n - m, n),
                                     np.linspace(0, n - 1, m).astype(np.int64)]))
    bad = rows[headers[rows] != d]
  if bad.size:
    checked = "all rows" if rows is None else f"{rows.size} sampled rows"
    raise ValueError(f"{name}: inconsistent dimension headers: row {bad[0]} declares "
                     f"d={headers[bad[0]]} but row 0 declares d={d} ({bad.size} of {checked} "
                     "differ); the file is corrupt or not in this format")
  return raw[:, 4:].view(dtype)


def read_fvecs(path: PathLike, max_rows: int | None = None) -> np.ndarray:
  """Reads a .fvecs file as a read-only memory-mapped view, no copy.

  Args:
    path: the file; each row is an int32 d followed by d float32 (little-endian).
    max_rows: keep only the first ``max_rows`` rows (e.g. the first 1M of a 1B file).

  Returns:
    f32[n, d] ``np.memmap`` view (strided: it skips the per-row headers). Copy it
    (``np.array(x)``) to modify it or to get a contiguous array.

  Raises:
    ValueError: missing or empty file, a truncated last row, an invalid dimension header,
      or rows whose header differs from row 0 (every row is checked for files up to
      4 GiB, a sample of 196k rows beyond that).

  Example:
    >>> import tempfile
    >>> f = Path(tempfile.mkdtemp()) / "x.fvecs"
    >>> write_fvecs(f, np.eye(2, 3))
    >>> read_fvecs(f).shape
    (2, 3)
  """
  return _read_vecs(path, np.float32, max_rows)


def read_ivecs(path: PathLike, max_rows: int | None = None) -> np.ndarray:
  """Reads a .ivecs file as a read-only memory-mapped i32[n, d] view (see ``read_fvecs``)."""
  return _read_vecs(path, np.int32, max_rows)


def read_bvecs(path: PathLike, max_rows: int | None = None) -> np.ndarray:
  """Reads a .bvecs file as a read-only memory-mapped u8[n, d] view (see ``read_fvecs``).

  Each row is an int32 d followed by d uint8 values. The view stays uint8: convert the
  rows you use (``np.asarray(x[i:j], np.float32)``); ``search.knn`` converts itself.
  """
  return _read_vecs(path, np.uint8, max_rows)


def is_real_dtype(dtype: np.dtype) -> bool:
  return dtype != np.bool_ and (np.issubdtype(dtype, np.floating)
                                or np.issubdtype(dtype, np.integer))


# The suffixes that name another format than the writer's: read_vectors would misread them.
_OTHER_FORMATS = (".fvecs", ".ivecs", ".bvecs", ".npy", ".hdf5", ".h5")


def _write_vecs(path: PathLike, x, dtype, fn: str) -> None:
  name = os.fspath(path)
  own = "." + fn.split("_")[-1]
  suffix = Path(name).suffix.lower()
  if suffix != own and suffix in _OTHER_FORMATS:
    raise ValueError(f"{fn}({name}): the name ends in {suffix} but {fn} writes the {own} "
                     f"format, which read_vectors would misread; name the file *{own}"
                     + (" or use numpy.save" if suffix == ".npy" else ""))
  dtype = np.dtype(dtype).newbyteorder("<")
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
    raise ValueError(f"{fn}({name}): x must be a 2-D array (n, d) with n >= 1 and d >= 1, "
                     f"got shape {x.shape}")
  if x.shape[1] > _MAX_DIM:
    raise ValueError(f"{fn}({name}): d={x.shape[1]} exceeds the supported {_MAX_DIM}")
  if dtype.kind == "f":
    if not is_real_dtype(x.dtype):
      raise ValueError(f"{fn}({name}): x must hold real numbers, got dtype {x.dtype}")
  else:
    if not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"{fn}({name}): x must be an integer array, got dtype {x.dtype}")
    info = np.iinfo(dtype)
    lo, hi = int(x.min()), int(x.max())
    if lo < info.min or hi > info.max:
      raise ValueError(f"{fn}({name}): values must lie in [{info.min}, {info.max}] to fit "
                       f"{dtype.name}, got range [{lo}, {hi}]")
  n, d = x.shape
  row = 4 + d * dtype.itemsize
  step = max(1, _WRITE_CHUNK_BYTES // row)
  header = np.frombuffer(np.array(d, "<i4").tobytes(), np.uint8)
  # Validate every chunk before the rename: a NaN in the last chunk must not leave a file.
  with atomic_output(name) as tmp, open(tmp, "wb") as f:
    for start in range(0, n, step):
      with np.errstate(over="ignore", invalid="ignore"):
        values = np.ascontiguousarray(x[start:start + step], dtype=dtype)
      if dtype.kind == "f" and not np.isfinite(values).all():
        r, c = np.argwhere(~np.isfinite(values))[0]
        raise ValueError(f"{fn}({name}): x contains NaN or Inf as float32 (first at row "
                         f"{start + r}, column {c}: {x[start + r, c]!r})")
      out = np.empty((values.shape[0], row), np.uint8)
      out[:, :4] = header
      out[:, 4:] = values.view(np.uint8).reshape(values.shape[0], -1)
      out.tofile(f)


def write_fvecs(path: PathLike, x) -> None:
  """Writes f32[n, d] (any real dtype, converted) to a .fvecs file atomically.

  Raises:
    ValueError: x is not 2-D real with n, d >= 1, or holds NaN/Inf (also after the cast
      to float32, so float64 overflow is caught); the path names another vector format
      (.npy, .bvecs, .ivecs, .hdf5, .h5): any other name is written as given.
  """
  _write_vecs(path, x, np.float32, "write_fvecs")


def write_ivecs(path: PathLike, x) -> None:
  """Writes i32[n, d] (any integer dtype whose values fit int32) to a .ivecs file atomically."""
  _write_vecs(path, x, np.int32, "write_ivecs")


def write_bvecs(path: PathLike, x) -> None:
  """Writes u8[n, d] (any integer dtype with values in [0, 255]) to a .bvecs file atomically."""
  _write_vecs(path, x, np.uint8, "write_bvecs")


# ---------------------------------------------------------------------------------------
# HDF5 (ann-benchmarks) and dispatch on the suffix.

_HDF5_KEYS = ("train", "test", "neighbors")


# deflate's largest expansion (about 1032:1): a compressed dataset may declare at most this
# many times the bytes it stores.
_MAX_EXPANSION = 1032


def _read_dataset(name: str, f, key: str) -> np.ndarray:
  """The HDF5 dataset ``f[key]`` read into memory, after its declared size is compared
  with the bytes it really stores (a small file must not make the reader allocate what
  its header declares)."""
  ds = f[key]
  declared = int(np.prod(ds.shape, dtype=np.float64) * ds.dtype.itemsize)
  stored = int(ds.id.get_storage_size())
  filtered = ds.compression is not None or bool(ds._filters)  # pylint: disable=protected-access
  allowed = stored * _MAX_EXPANSION if filtered else stored
  if declared > allowed and declared > 0:
    how = (f"at most {_MAX_EXPANSION}x that when compressed" if filtered
           else "uncompressed data must be stored in full")
    raise ValueError(f"{name}: dataset {key!r} declares shape {tuple(ds.shape)} {ds.dtype} "
                     f"({declared} bytes) but stores {stored} bytes ({how}); the file is "
                     "truncated, corrupt or hostile")
  return ds[()]


def _attr_str(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def read_hdf5(path: PathLike) -> dict:
  """Reads an ann-benchmarks HDF5 file into memory.

  The format: datasets ``train`` [nb, d] (the database), ``test`` [nq, d] (the queries),
  ``neighbors`` i32[nq, k] (exact ids into ``train``), optionally ``distances`` [nq, k],
  and a file attribute ``distance`` ("euclidean", "angular", ...). HDF5 datasets are
  often chunked or compressed, so they are read into memory (copies), not mapped.

  Returns:
    ``{"train", "test", "neighbors"[, "distances"]}`` as numpy arrays, plus
    ``"distance"``: the attribute as a str ("euclidean" when absent).

  Raises:
    ValueError: not an HDF5 file, a required dataset is missing (all missing names are
      listed), a dataset is not 2-D, or the shapes disagree.
  """
  import h5py
  name = os.fspath(path)
  if not os.path.isfile(name):
    raise ValueError(f"{name}: no such file")
  try:
    with h5py.File(name, "r") as f:
      missing = [k for k in _HDF5_KEYS if k not in f]
      if missing:
        raise ValueError(f"{name}: not in ann-benchmarks format: missing datasets {missing} "
                         f"(the file has {sorted(f.keys())})")
      out = {k: _read_dataset(name, f, k) for k in _HDF5_KEYS + ("distances",) if k in f}
      out["distance"] = _attr_str(f.attrs.get("distance", "euclidean"))
  except OSError as e:
    raise ValueError(f"{name}: not a readable HDF5 file ({e})") from e
  for k in _HDF5_KEYS:
    if out[k].ndim != 2:
      raise ValueError(f"{name}: dataset '{k}' must be 2-D, got shape {out[k].shape}")
  if out["train"].shape[1] != out["test"].shape[1]:
    raise ValueError(f"{name}: 'train' has d={out['train'].shape[1]} but 'test' has "
                     f"d={out['test'].shape[1]}")
  if out["neighbors"].shape[0] != out["test"].shape[0]:
    raise ValueError(f"{name}: 'neighbors' has {out['neighbors'].shape[0]} rows for "
                     f"{out['test'].shape[0]} test queries")
  _check_ids(name, "'neighbors'", out["neighbors"], out["train"].shape[0])
  return out


def _check_ids(name: str, what: str, ids: np.ndarray, n: int) -> None:
  """Neighbour ids must be integers in [0, n) (so int32 holds them without wrapping)."""
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{name}: {what} must hold integer ids, got {ids.dtype}")
  if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= n):
    raise ValueError(f"{name}: {what} holds ids in [{int(ids.min())}, {int(ids.max())}], "
                     f"outside [0, {n}) of the {n} database vectors")


def write_hdf5(path: PathLike, train, test, neighbors, distances=None,
               distance: str = "euclidean") -> None:
  """Writes an ann-benchmarks HDF5 file atomically (see ``read_hdf5`` for the layout).

  Args:
    path: the .hdf5 file.
    train: [nb, d] database vectors.
    test: [nq, d] queries.
    neighbors: integer [nq, k] ids into ``train`` (stored as int32).
    distances: optional [nq, k] distances.
    distance: the file's ``distance`` attribute.
  """
  import h5py
  name = os.fspath(path)
  train, test, neighbors = np.asarray(train), np.asarray(test), np.asarray(neighbors)
  for key, x in (("train", train), ("test", test), ("neighbors", neighbors)):
    if x.ndim != 2:
      raise ValueError(f"write_hdf5({name}): {key} must be 2-D, got shape {x.shape}")
  if train.shape[1] != test.shape[1] or neighbors.shape[0] != test.shape[0]:
    raise ValueError(f"write_hdf5({name}): shapes disagree: train {train.shape}, test "
                     f"{test.shape}, neighbors {neighbors.shape}")
  _check_ids(f"write_hdf5({name})", "neighbors", neighbors, train.shape[0])
  with atomic_output(name) as tmp:
    with h5py.File(tmp, "w") as f:
      f.attrs["distance"] = distance
      f["train"], f["test"] = train, test
      f["neighbors"] = neighbors.astype(np.int32)
      if distances is not None:
        f["distances"] = np.asarray(distances)


def _read_hdf5_key(name: str, key: str | None) -> np.ndarray:
  import h5py
  if not os.path.isfile(name):
    raise ValueError(f"{name}: no such file")
  try:
    with h5py.File(name, "r") as f:
      keys = sorted(k for k in f.keys() if isinstance(f[k], h5py.Dataset))
      if key is None:
        raise ValueError(f"{name}: an HDF5 file needs key=... naming the dataset to read "
                         f"(the file has {keys})")
      if key not in keys:
        raise ValueError(f"{name}: no dataset {key!r} (the file has {keys})")
      return _read_dataset(name, f, key)
  except OSError as e:
    raise ValueError(f"{name}: not a readable HDF5 file ({e})") from e


VECTOR_SUFFIXES = (".fvecs", ".bvecs", ".npy")  # plain vector files (HDF5 needs a key)


def read_vectors(path: PathLike, key: str | None = None) -> np.ndarray:
  """Reads a 2-D array of vectors, choosing the format from the file suffix.

  Args:
    path: a .fvecs, .ivecs, .bvecs or .npy file (memory-mapped, read-only), or a
      .hdf5/.h5 file (the dataset is read into memory).
    key: the HDF5 dataset to read (required for HDF5, e.g. ``key="train"``); must be
      None for the other formats.

  Returns:
    [n, d] numpy array.

  Raises:
    ValueError: unknown suffix, malformed file, an array that is not 2-D, or a missing
      or superfluous ``key``.
  """
  name = os.fspath(path)
  suffix = Path(name).suffix.lower()
  if suffix in (".hdf5", ".h5"):
    x = _read_hdf5_key(name, key)
  elif key is not None:
    raise ValueError(f"{name}: key={key!r} only applies to HDF5 files")
  elif suffix in _VECS_READERS:
    return _VECS_READERS[suffix](name)
  elif suffix == ".npy":
    if not os.path.isfile(name):
      raise ValueError(f"{name}: no such file")
    try:
      x = np.load(name, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
      raise ValueError(f"{name}: not a valid .npy file ({e})") from e
  else:
    raise ValueError(f"{name}: unknown vector file type {suffix!r} (expected .fvecs, .ivecs, "
                     ".bvecs, .npy, .hdf5 or .h5)")
  if x.ndim != 2:
    raise ValueError(f"{name}: expected a 2-D array (n, d), got shape {x.shape}")
  if not is_real_dtype(x.dtype):
    raise ValueError(f"{name}: expected real numbers, got dtype {x.dtype}")
  return x


_VECS_READERS: dict[str, Callable[[str], np.ndarray]] = {
    ".fvecs": read_fvecs, ".ivecs": read_ivecs, ".bvecs": read_bvecs}


def read_idx_gz(path: Path, magic: int) -> np.ndarray:
  """Reads a gzipped IDX (MNIST-format) file of uint8 values as u8[n, prod(dims[1:])].

  The header is a big-endian magic (0x0000 0x08=uint8 ndim) and ndim big-endian uint32
  dimensions; the payload must hold exactly prod(dims) bytes.
  """
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(f"{path}: corrupt or truncated gzip ({e})") from e
  if len(raw) < 4:
    raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes)")
  got = int.from_bytes(raw[:4], "big")
  if got != magic:
    raise ValueError(f"{path}: bad IDX magic {got:#010x}, expected {magic:#010x}")
  ndim = magic & 0xFF
  offset = 4 + 4 * ndim
  if len(raw) < offset:
    raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {offset} needed)")
  dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  expected = int(np.prod(dims, dtype=np.int64))
  if expected == 0:
    raise ValueError(f"{path}: IDX dims {dims} describe no data")
  if len(raw) - offset != expected:
    raise ValueError(f"{path}: IDX payload has {len(raw) - offset} bytes but dims {dims} need "
                     f"{expected}")
  return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims[0], -1)
