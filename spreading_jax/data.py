"""Vector files (fvecs/ivecs/bvecs/npy/HDF5), atomic writes, and the named datasets.

Readers return memory-mapped, read-only numpy views (no full copy) and reject malformed
files with a ``ValueError`` naming the file and the problem. Writers go through a
temporary file that is renamed into place (``atomic_output``), so a crash never leaves a
half-written file. ``load_dataset`` turns a dataset name into a ``Dataset`` of
train / base / query / groundtruth arrays (faiss vocabulary: xt, xb, xq, gt).
"""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import os
import secrets
import shutil
import stat
import zlib
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from spreading_jax import _outputs
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
# Rows of the paper's 1M-vector databases (deep1m, bigann1m).
_ONE_MILLION = 1_000_000
# k of every groundtruth this module computes.
_GT_K = 100

PathLike = str | os.PathLike


# ---------------------------------------------------------------------------------------
# Atomic writes.

def _temp_name(parent: Path, name: str, suffix: str) -> Path:
  # A hidden, recognisable name in the target's directory (same filesystem, so the final
  # rename is atomic); the random part avoids collisions between concurrent writers.
  return parent / f".{name}.{secrets.token_hex(4)}{suffix}"


def _fsync_path(path: PathLike) -> None:
  """Flushes a file or directory to disk (best effort where the OS refuses directories)."""
  try:
    fd = os.open(path, os.O_RDONLY)
  except OSError:
    return  # e.g. directories on Windows
  try:
    os.fsync(fd)
  except OSError:
    pass  # some filesystems do not support fsync on directories
  finally:
    os.close(fd)


def _fsync_tree(root: PathLike) -> None:
  for dirpath, _, filenames in os.walk(root):
    for filename in filenames:
      full = os.path.join(dirpath, filename)
      if os.path.isfile(full) and not os.path.islink(full):
        _fsync_path(full)
    _fsync_path(dirpath)


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[str]:
  """Writes a file atomically: yields a temporary path that replaces ``path`` on success.

  The temporary file is created (empty) in the same directory as ``path`` and keeps its
  suffix (so ``np.save``/``np.savez`` do not append another one). When the block exits
  normally the file is fsync'ed and ``os.replace``d onto ``path``, so readers see either
  the old or the new complete file, never a partial one. When the block raises, the
  temporary file is removed and ``path`` is untouched. The new file gets the permissions
  of the file it replaces, else the usual ones (0o666 minus the umask). Missing parent
  directories are created. For a directory use ``atomic_output_dir``.

  Args:
    path: the file to (re)write.

  Yields:
    The temporary file path (a ``str``) to write to; the block may also replace it
    (e.g. ``h5py.File(tmp, "w")``).

  Raises:
    ValueError: ``path`` is an existing directory, or the block deleted the temporary file.

  Example:
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "hello.txt"
    >>> with atomic_output(target) as tmp:
    ...   _ = Path(tmp).write_text("hello")
    >>> target.read_text()
    'hello'
  """
  path = Path(path)
  if path.is_dir():
    raise ValueError(f"{path}: is a directory; use atomic_output_dir to replace a directory")
  path.parent.mkdir(parents=True, exist_ok=True)
  while True:
    tmp = _temp_name(path.parent, path.name, ".tmp" + path.suffix)
    try:
      # O_EXCL: never clobber another writer's file; mode 0o666 lets the umask apply.
      os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
      break
    except FileExistsError:
      continue
  try:
    yield str(tmp)
    if not tmp.is_file():
      raise ValueError(f"{path}: the temporary file {tmp} was removed inside the "
                       "atomic_output block; nothing was written")
    with contextlib.suppress(FileNotFoundError):
      os.chmod(tmp, stat.S_IMODE(path.stat().st_mode))
    _fsync_path(tmp)
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.unlink(tmp)
    raise
  _fsync_path(path.parent)


@contextlib.contextmanager
def atomic_output_dir(path: PathLike) -> Iterator[str]:
  """Writes a directory atomically: yields a temporary directory that becomes ``path``.

  The temporary directory is created next to ``path``. When the block exits normally its
  whole tree is fsync'ed; then an existing ``path`` is renamed aside, the new directory
  is renamed into place and only then is the old one deleted. If the second rename fails
  the old directory is put back. A crash between the two renames (a window of two
  ``rename`` calls) leaves the complete old copy as ``.{name}.<random>.old`` beside
  ``path``. When the block raises, the temporary directory is deleted and ``path`` is
  untouched.

  Only what this library wrote is ever replaced (``_outputs.check_output_dir``): ``path``
  must be absent, empty, or a saved model or index directory, and a saved directory is
  replaced only by one of the same kind; anything else raises before the block runs.

  Args:
    path: the directory to (re)write.

  Yields:
    The temporary directory path (a ``str``), initially empty.

  Raises:
    ValueError: ``path`` exists and is not a directory, is a non-empty directory this
      library did not write, the current directory, or a saved directory of another kind
      than the one written.

  Example:
    >>> import tempfile
    >>> target = Path(tempfile.mkdtemp()) / "ckpt"
    >>> with atomic_output_dir(target) as tmp:
    ...   _ = (Path(tmp) / "params.npy").write_bytes(b"...")
    >>> sorted(p.name for p in target.iterdir())
    ['params.npy']
  """
  path = Path(path)
  if path.exists() and not path.is_dir():
    raise ValueError(f"{path}: exists and is not a directory; atomic_output_dir replaces "
                     "directories only")
  _outputs.check_output_dir(path)  # only an absent/empty dir or a saved model/index
  path.parent.mkdir(parents=True, exist_ok=True)
  while True:
    tmp = _temp_name(path.parent, path.name, ".tmp")
    try:
      os.mkdir(tmp, 0o777)  # the umask applies, unlike tempfile.mkdtemp's 0o700
      break
    except FileExistsError:
      continue
  try:
    yield str(tmp)
    _fsync_tree(tmp)
    _outputs.check_replace(path, tmp)  # a model is replaced by a model, an index by an index
    if path.exists():
      old = _temp_name(path.parent, path.name, ".old")
      os.rename(path, old)
      try:
        os.rename(tmp, path)
      except BaseException:
        os.rename(old, path)
        raise
      _fsync_path(path.parent)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  _fsync_path(path.parent)


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


def _is_real(dtype: np.dtype) -> bool:
  return dtype != np.bool_ and (np.issubdtype(dtype, np.floating)
                                or np.issubdtype(dtype, np.integer))


def _write_vecs(path: PathLike, x, dtype, fn: str) -> None:
  name = os.fspath(path)
  dtype = np.dtype(dtype).newbyteorder("<")
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
    raise ValueError(f"{fn}({name}): x must be a 2-D array (n, d) with n >= 1 and d >= 1, "
                     f"got shape {x.shape}")
  if x.shape[1] > _MAX_DIM:
    raise ValueError(f"{fn}({name}): d={x.shape[1]} exceeds the supported {_MAX_DIM}")
  if dtype.kind == "f":
    if not _is_real(x.dtype):
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
      to float32, so float64 overflow is caught).
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
      out = {k: f[k][()] for k in _HDF5_KEYS + ("distances",) if k in f}
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
  return out


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
  if not np.issubdtype(neighbors.dtype, np.integer):
    raise ValueError(f"write_hdf5({name}): neighbors must be integer ids, got {neighbors.dtype}")
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
      return f[key][()]
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
  if not _is_real(x.dtype):
    raise ValueError(f"{name}: expected real numbers, got dtype {x.dtype}")
  return x


_VECS_READERS: dict[str, Callable[[str], np.ndarray]] = {
    ".fvecs": read_fvecs, ".ivecs": read_ivecs, ".bvecs": read_bvecs}


# ---------------------------------------------------------------------------------------
# Locations.

def sample_indices(total: int, n: int, seed: int) -> np.ndarray:
  """``n`` distinct row indices of ``range(total)`` drawn with ``seed``, sorted (so that a
  memory map is read front to back). Requires n <= total."""
  return np.sort(np.random.default_rng(seed).choice(total, n, replace=False))


def sample_rows(x, n: int, seed: int):
  """At most ``n`` rows of ``x`` drawn with ``seed`` (``x`` itself when it has no more)."""
  if x.shape[0] <= n:
    return x
  return x[sample_indices(x.shape[0], n, seed)]


def data_root(root: PathLike | None = None) -> Path:
  """The directory holding the datasets.

  Args:
    root: used when given; otherwise $SPREADING_DATA; otherwise ``shared/data`` next to
      the repository checkout (``<repo>/../shared/data``).

  Raises:
    ValueError: the chosen directory does not exist (the message says how to set it).
  """
  if root is not None:
    source = "the root argument"
  elif os.environ.get("SPREADING_DATA"):
    root, source = os.environ["SPREADING_DATA"], "$SPREADING_DATA"
  else:
    root, source = Path(__file__).resolve().parents[2] / "shared" / "data", "the default"
  root = Path(root).expanduser()
  if not root.is_dir():
    raise ValueError(f"data root {root} (from {source}) is not a directory; pass root=... or "
                     "set SPREADING_DATA=/path/to/data, the directory holding siftsmall/, "
                     "wordllama-wamerican/, fashion-mnist/, ...")
  return root


def cache_dir() -> Path:
  """Where derived data (computed groundtruth) is cached, created on demand.

  $SPREADING_CACHE if set, else ``~/.cache/spreading_jax``. Deleting it is always safe.
  """
  path = Path(os.environ.get("SPREADING_CACHE") or Path.home() / ".cache" / "spreading_jax")
  path = path.expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"cache directory {path} cannot be created ({e}); set SPREADING_CACHE "
                     "to a writable directory") from e
  return path


# ---------------------------------------------------------------------------------------
# Exact groundtruth.

def _exact_rerank(query, base, cand: np.ndarray, k: int, metric: str) -> np.ndarray:
  """Re-scores candidate ids in float64 and keeps the k best, ties to the lower id.

  ``search.knn`` ranks in float32, so near-ties (closer than float32 rounding) may come
  out in either order; re-ranking a slightly larger candidate list in float64 makes the
  groundtruth exact and deterministic.
  """
  nq, kc = cand.shape
  d = base.shape[1]
  out = np.empty((nq, k), np.int32)
  # Small blocks (a few MiB of float64 candidates) stay in cache: several times faster.
  step = max(1, (1 << 19) // (kc * d))
  for s in range(0, nq, step):
    c = cand[s:s + step]
    x = np.asarray(base[c], np.float64)  # [b, kc, d]
    q = np.asarray(query[s:s + step], np.float64)
    ip = np.matmul(x, q[:, :, None])[..., 0]
    # ||x - q||^2 without the query's own norm, which does not change the order.
    score = np.einsum("bkd,bkd->bk", x, x) - 2 * ip if metric == "l2" else -ip
    order = np.lexsort((c, score), axis=-1)[:, :k]
    out[s:s + step] = np.take_along_axis(c, order, axis=-1)
  return out


def exact_groundtruth(query, base, k: int = _GT_K, metric: str = "l2") -> np.ndarray:
  """Exact k nearest neighbours of each query in ``base``, ties broken by the lower id.

  Candidates come from ``search.knn`` (float32, blocked, jit-compiled), padded by a margin
  and re-ranked in float64, so the result does not depend on float32 rounding.

  Args:
    query: [nq, d] real vectors.
    base: [nb, d] real vectors (uint8 memmaps are fine).
    k: neighbours per query, 1 <= k <= nb.
    metric: "l2" (ascending squared distance) or "ip" (descending inner product).

  Returns:
    i32[nq, k] ids into ``base``.
  """
  from spreading_jax import search
  if metric not in ("l2", "ip"):
    raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
  k = check_int("k", k, minimum=1, maximum=base.shape[0])
  kc = min(base.shape[0], k + max(16, k // 4))
  _, cand = search.knn(query, base, kc, metric=metric)
  return _exact_rerank(query, base, np.asarray(cand), k, metric)


def _groundtruth_is_valid(gt, query, base, k: int, metric: str) -> bool:
  """Shape, range and a spot check of two queries against brute force in float64."""
  if gt.shape != (query.shape[0], k) or gt.dtype != np.int32:
    return False
  if gt.min() < 0 or gt.max() >= base.shape[0]:
    return False
  rows = np.unique([0, query.shape[0] - 1])
  q = np.asarray(query[rows], np.float64)
  scores = []
  for s in range(0, base.shape[0], 8192):
    x = np.asarray(base[s:s + 8192], np.float64)
    ip = x @ q.T
    scores.append((x * x).sum(1)[:, None] - 2 * ip if metric == "l2" else -ip)
  scores = np.concatenate(scores).T  # [len(rows), nb]; the query norm is a constant shift
  if metric == "l2":
    scores = scores + (q * q).sum(1)[:, None]
  best = np.sort(scores, axis=1)[:, :k]
  got = np.take_along_axis(scores, np.asarray(gt[rows], np.int64), axis=1)
  scale = np.abs(best).max() + 1e-30
  return bool(np.allclose(got, best, rtol=0, atol=1e-9 * scale))


def _file_digest(paths: list[Path]) -> str:
  h = hashlib.sha256()
  for p in paths:
    h.update(p.name.encode() + b"\0")
    with open(p, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
  return h.hexdigest()[:16]


def _cached_groundtruth(name: str, sources: list[Path], query, base, k: int = _GT_K,
                        metric: str = "l2") -> np.ndarray:
  """Exact groundtruth, computed once and cached under ``cache_dir()``.

  The cache key hashes the content of the source files (so a moved or copied dataset
  reuses it and a changed one does not); a cached file that fails validation (shape,
  range, brute-force spot check) is recomputed.
  """
  path = cache_dir() / f"{name}-gt{k}-{metric}-{_file_digest(sources)}.ivecs"
  if path.is_file():
    try:
      gt = np.asarray(read_ivecs(path))
      if _groundtruth_is_valid(gt, query, base, k, metric):
        return gt
    except ValueError:
      pass  # corrupt cache file: recompute below
  gt = exact_groundtruth(query, base, k, metric)
  write_ivecs(path, gt)
  return gt


# ---------------------------------------------------------------------------------------
# Datasets.

@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class Dataset:
  """The vectors of one benchmark (faiss vocabulary: xt = train, xb = base, xq = query).

  Arrays may be numpy memmaps (read-only, possibly uint8 for bigann): convert the rows you
  use, or call ``as_float32()``.

  Attributes:
    name: dataset name.
    train: [nt, d] float32 or uint8 vectors the models are trained on; never the queries
      (for datasets without a learn set it is the base).
    base: [nb, d] the database that is searched.
    query: [nq, d] the queries.
    groundtruth: integer [nq, k >= 1] ids into ``base`` of each query's exact nearest
      neighbours, nearest first.
    metric: "l2" (squared Euclidean, every built-in dataset) or "ip" (inner product).
  """
  name: str
  train: np.ndarray
  base: np.ndarray
  query: np.ndarray
  groundtruth: np.ndarray
  metric: str = "l2"

  def __post_init__(self):
    where = f"dataset {self.name!r}"
    for field in ("train", "base", "query", "groundtruth"):
      x = getattr(self, field)
      shape, dtype = getattr(x, "shape", None), getattr(x, "dtype", None)
      if shape is None or len(shape) != 2:
        raise ValueError(f"{where}: {field} must be a 2-D array, got shape {shape}")
      if field != "groundtruth" and not _is_real(np.dtype(dtype)):
        raise ValueError(f"{where}: {field} must hold real numbers, got dtype {dtype}")
    d = self.base.shape[1]
    for field in ("train", "query"):
      if getattr(self, field).shape[1] != d:
        raise ValueError(f"{where}: {field} has d={getattr(self, field).shape[1]} but base "
                         f"has d={d}")
    if self.base.shape[0] < 1:
      raise ValueError(f"{where}: base is empty")
    gt = self.groundtruth
    if not np.issubdtype(np.dtype(gt.dtype), np.integer):
      raise ValueError(f"{where}: groundtruth must hold integer ids, got dtype {gt.dtype}")
    if gt.shape[0] != self.query.shape[0] or gt.shape[1] < 1:
      raise ValueError(f"{where}: groundtruth has shape {gt.shape} for {self.query.shape[0]} "
                       "queries; expected (nq, k >= 1)")
    if gt.size:
      lo, hi = int(np.min(gt)), int(np.max(gt))
      if lo < 0 or hi >= self.base.shape[0]:
        raise ValueError(f"{where}: groundtruth ids span [{lo}, {hi}] but must lie in "
                         f"[0, {self.base.shape[0]}) (nb={self.base.shape[0]})")
    if self.metric not in ("l2", "ip"):
      raise ValueError(f"{where}: metric must be 'l2' or 'ip', got {self.metric!r}")

  @property
  def d(self) -> int:
    """Vector dimension."""
    return int(self.base.shape[1])

  @property
  def nb(self) -> int:
    """Number of database vectors."""
    return int(self.base.shape[0])

  @property
  def nq(self) -> int:
    """Number of queries."""
    return int(self.query.shape[0])

  @property
  def nt(self) -> int:
    """Number of training vectors."""
    return int(self.train.shape[0])

  def __repr__(self) -> str:
    return (f"Dataset({self.name!r}, d={self.d}, nt={self.nt}, nb={self.nb}, nq={self.nq}, "
            f"gt_k={self.groundtruth.shape[1]}, dtype={self.base.dtype}, "
            f"metric={self.metric!r})")

  def subset(self, nb: int | None = None, nq: int | None = None,
             nt: int | None = None) -> Dataset:
    """A smaller dataset made of the first rows, for smoke tests.

    Truncating the base recomputes the groundtruth exactly (``exact_groundtruth`` with
    k = min(100, nb)), since the old neighbours may fall outside the new base.

    Args:
      nb: database rows to keep (None: all).
      nq: queries to keep (None: all).
      nt: training rows to keep (None: all).

    Raises:
      ValueError: a size is not an integer in [1, current size].

    Example:
      >>> small = load_dataset("siftsmall").subset(nb=1000, nq=10)  # doctest: +SKIP
    """
    nb = self.nb if nb is None else check_int("nb", nb, minimum=1, maximum=self.nb)
    nq = self.nq if nq is None else check_int("nq", nq, minimum=1, maximum=self.nq)
    nt = self.nt if nt is None else check_int("nt", nt, minimum=1, maximum=self.nt)
    base, query, train = self.base[:nb], self.query[:nq], self.train[:nt]
    gt = self.groundtruth[:nq]
    if nb < self.nb:
      gt = exact_groundtruth(query, base, min(_GT_K, nb), self.metric)
    return Dataset(f"{self.name}[nb={nb},nq={nq},nt={nt}]", train, base, query, gt,
                   self.metric)

  def as_float32(self) -> Dataset:
    """The same dataset with float32 vectors and int32 groundtruth.

    Arrays of another dtype (bigann's uint8) are converted into memory; arrays that
    already have the right dtype are kept as they are (memmaps included, no copy); a
    shared train/base array stays shared.
    """
    base = np.asarray(self.base, np.float32)
    train = base if self.train is self.base else np.asarray(self.train, np.float32)
    return Dataset(self.name, train, base, np.asarray(self.query, np.float32),
                   np.asarray(self.groundtruth, np.int32), self.metric)


def _require(root: Path, name: str, files: list[str]) -> list[Path]:
  """The paths of a dataset's files; lists every expected file when one is missing."""
  paths = [root / f for f in files]
  missing = [f for f, p in zip(files, paths) if not p.is_file()]
  if missing:
    raise ValueError(f"dataset {name!r}: missing {', '.join(missing)} under {root}; it "
                     f"expects the files {', '.join(files)} there")
  return paths


def _read_idx_gz(path: Path, magic: int) -> np.ndarray:
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


def _load_siftsmall(root: Path) -> Dataset:
  b, q, g = _require(root / "siftsmall", "siftsmall", [
      "siftsmall_base.fvecs", "siftsmall_query.fvecs", "siftsmall_groundtruth.ivecs"])
  base = read_fvecs(b)
  return Dataset("siftsmall", base, base, read_fvecs(q), read_ivecs(g))


def _load_wordllama(root: Path) -> Dataset:
  t, b, q, g = _require(root / "wordllama-wamerican", "wordllama-256", [
      "wl256_learn.fvecs", "wl256_base.fvecs", "wl256_query.fvecs", "wl256_groundtruth.ivecs"])
  return Dataset("wordllama-256", read_fvecs(t), read_fvecs(b), read_fvecs(q), read_ivecs(g))


def _load_fashion_mnist(root: Path) -> Dataset:
  tr, te = _require(root / "fashion-mnist", "fashion-mnist", [
      "train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"])
  base = _read_idx_gz(tr, 0x00000803).astype(np.float32)
  query = _read_idx_gz(te, 0x00000803).astype(np.float32)
  if base.shape[1] != query.shape[1]:
    raise ValueError(f"dataset 'fashion-mnist': {tr.name} has {base.shape[1]} pixels per image "
                     f"but {te.name} has {query.shape[1]}")
  gt = _cached_groundtruth("fashion-mnist", [tr, te], query, base)
  return Dataset("fashion-mnist", base, base, query, gt)


def _load_deep1m(root: Path) -> Dataset:
  b, t, q, g = _require(root, "deep1m", [
      "base.fvecs", "learn.fvecs", "deep1B_queries.fvecs", "deep1M_groundtruth.ivecs"])
  return Dataset("deep1m", read_fvecs(t), read_fvecs(b, max_rows=_ONE_MILLION),
                 read_fvecs(q), read_ivecs(g))


def _load_bigann1m(root: Path) -> Dataset:
  b, t, q, g = _require(root, "bigann1m", [
      "bigann_base.bvecs", "bigann_learn.bvecs", "bigann_query.bvecs", "gnd/idx_1M.ivecs"])
  return Dataset("bigann1m", read_bvecs(t), read_bvecs(b, max_rows=_ONE_MILLION),
                 read_bvecs(q), read_ivecs(g))


_LOADERS: dict[str, Callable[[Path], Dataset]] = {
    "siftsmall": _load_siftsmall,
    "wordllama-256": _load_wordllama,
    "fashion-mnist": _load_fashion_mnist,
    "deep1m": _load_deep1m,
    "bigann1m": _load_bigann1m,
}
DATASETS: tuple[str, ...] = tuple(_LOADERS)

# ann-benchmarks distance attribute -> (metric, L2-normalise the vectors first).
_HDF5_METRICS = {"euclidean": ("l2", False), "l2": ("l2", False),
                 "angular": ("l2", True), "cosine": ("l2", True),
                 "dot": ("ip", False), "ip": ("ip", False)}


def _normalize(x: np.ndarray) -> np.ndarray:
  norms = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.where(norms > 0, norms, 1)  # zero vectors stay zero


def _load_hdf5_dataset(path: Path) -> Dataset:
  f = read_hdf5(path)
  distance = f["distance"].lower()
  if distance not in _HDF5_METRICS:
    raise ValueError(f"{path}: distance {f['distance']!r} is not supported (supported: "
                     f"{', '.join(_HDF5_METRICS)})")
  metric, normalize = _HDF5_METRICS[distance]
  base = np.asarray(f["train"], np.float32)
  query = np.asarray(f["test"], np.float32)
  if normalize:
    base, query = _normalize(base), _normalize(query)
  return Dataset(path.stem, base, base, query, np.asarray(f["neighbors"], np.int32), metric)


def load_dataset(name: str | os.PathLike, root: PathLike | None = None) -> Dataset:
  """Loads a named dataset, or an ann-benchmarks HDF5 file.

  Names (files under ``data_root(root)``; arrays are read-only memmaps unless noted):
    "siftsmall": siftsmall/siftsmall_{base,query}.fvecs + siftsmall_groundtruth.ivecs
      (10k x 128, 100 queries). No learn set is shipped, so ``train`` is the base; the
      queries never train.
    "wordllama-256": wordllama-wamerican/wl256_{learn,base,query}.fvecs +
      wl256_groundtruth.ivecs (unit-norm 256-d word embeddings; 20k learn, 53,743 base,
      1k queries, all disjoint). The demo's default.
    "fashion-mnist": fashion-mnist/{train,t10k}-images-idx3-ubyte.gz; base = the 60k
      training images, queries = the 10k test images, float32 in memory; ``train`` is the
      base. The exact 100-NN groundtruth is computed once (~10-20 s on a CPU) and cached
      in ``cache_dir()``.
    "deep1m": user files base.fvecs (its first 1M rows are the database), learn.fvecs
      (the whole file trains; ``TrainConfig.num_train`` caps it), deep1B_queries.fvecs,
      deep1M_groundtruth.ivecs, all directly under the root.
    "bigann1m": bigann_base.bvecs (first 1M rows), bigann_learn.bvecs,
      bigann_query.bvecs, gnd/idx_1M.ivecs. The vectors stay uint8 memmaps (no copy of
      the 1B-row files); ``search.knn`` and the trainer convert the rows they use to
      float32, and ``Dataset.as_float32()`` converts everything.
  A path ending in .hdf5/.h5 (ann-benchmarks format; absolute, relative to the working
  directory, or relative to the data root): base = "train", query = "test",
  groundtruth = "neighbors", ``train`` is the base (the file has no separate learn set).
  The ``distance`` attribute picks the metric: "euclidean" -> "l2"; "angular" (cosine)
  -> the vectors are L2-normalised and the metric is "l2", which ranks exactly like
  cosine similarity; "dot" -> "ip". Others (hamming, jaccard) are rejected.

  Args:
    name: one of ``DATASETS``, or a path to an ann-benchmarks HDF5 file.
    root: the data directory (default: see ``data_root``).

  Raises:
    ValueError: unknown name (the known ones are listed), missing files (every expected
      file and the directory searched are listed), or malformed files.

  Example:
    >>> ds = load_dataset("siftsmall")  # doctest: +SKIP
    >>> ds  # doctest: +SKIP
    Dataset('siftsmall', d=128, nt=10000, nb=10000, nq=100, gt_k=100, dtype=float32, metric='l2')
  """
  if os.fspath(name).lower().endswith((".hdf5", ".h5")):
    path = Path(name).expanduser()
    if not path.is_file() and not path.is_absolute():
      with contextlib.suppress(ValueError):
        if (data_root(root) / path).is_file():
          path = data_root(root) / path
    if not path.is_file():
      raise ValueError(f"{name}: no such HDF5 file (looked in the working directory and the "
                       "data root)")
    return _load_hdf5_dataset(path)
  if name not in _LOADERS:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}, or a path to "
                     "an ann-benchmarks .hdf5 file")
  return _LOADERS[name](data_root(root))
