"""Vector files (fvecs/ivecs/bvecs/npy/HDF5), atomic writes, and the named datasets.

Readers return memory-mapped numpy views (no full copy) and reject malformed files with a
``ValueError`` naming the file and the problem. Writers go through a temporary file that
is renamed into place, so a crash never leaves a half-written file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import os
import shutil
import tempfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

DATASETS = ("siftsmall", "wordllama-256", "fashion-mnist", "deep1m", "bigann1m")

# Largest dimension a vector file may declare; anything bigger is a corrupt header.
_MAX_DIM = 1 << 20


# ---------------------------------------------------------------------------------------
# Atomic writes.

@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary file path next to ``path``; on success it replaces ``path``.

  On an exception the temporary file is removed and ``path`` is left as it was.

  Example:
    >>> with atomic_output("/tmp/x.txt") as tmp:
    ...   _ = open(tmp, "w").write("hello")
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  os.close(fd)
  try:
    yield tmp
    with open(tmp, "rb+") as f:
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)
    raise


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike) -> Iterator[str]:
  """Yields a temporary directory next to ``path``; on success it becomes ``path``.

  An existing ``path`` is moved aside first and deleted only after the new directory is
  in place, so at every moment either the old or the new complete directory exists.
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  try:
    yield tmp
    for name in os.listdir(tmp):
      with open(os.path.join(tmp, name), "rb") as f:
        os.fsync(f.fileno())
    old = None
    if path.exists():
      old = tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent)
      os.rmdir(old)
      os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
      shutil.rmtree(old, ignore_errors=True)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


# ---------------------------------------------------------------------------------------
# .fvecs / .ivecs / .bvecs: each row is an int32 dimension d followed by d values.

def _read_vecs(path, dtype) -> np.ndarray:
  path = os.fspath(path)
  dtype = np.dtype(dtype)
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file")
  size = os.path.getsize(path)
  if size == 0:
    raise ValueError(f"{path}: empty file")
  if size < 4:
    raise ValueError(f"{path}: truncated ({size} bytes, shorter than one dimension header)")
  d = int(np.fromfile(path, dtype="<i4", count=1)[0])
  if not 0 < d <= _MAX_DIM:
    raise ValueError(f"{path}: invalid dimension header {d} in the first row")
  row = 4 + d * dtype.itemsize
  if size % row:
    raise ValueError(f"{path}: truncated last row: {size} bytes is not a multiple of the "
                     f"{row}-byte row (d={d})")
  n = size // row
  raw = np.memmap(path, dtype=np.uint8, mode="r", shape=(n, row))
  headers = raw[:, :4].view("<i4")[:, 0]
  bad = np.flatnonzero(headers != d)
  if bad.size:
    raise ValueError(f"{path}: inconsistent dimension: row {bad[0]} declares "
                     f"d={headers[bad[0]]} but row 0 declares d={d}")
  return raw[:, 4:].view(dtype.newbyteorder("<"))


def read_fvecs(path) -> np.ndarray:
  """Reads a .fvecs file as a memory-mapped f32[n, d] view."""
  return _read_vecs(path, np.float32)


def read_ivecs(path) -> np.ndarray:
  """Reads a .ivecs file as a memory-mapped i32[n, d] view."""
  return _read_vecs(path, np.int32)


def read_bvecs(path) -> np.ndarray:
  """Reads a .bvecs file as a memory-mapped u8[n, d] view."""
  return _read_vecs(path, np.uint8)


def _write_vecs(path, x, dtype, name: str) -> None:
  x = np.asarray(x)
  if x.ndim != 2 or x.shape[1] < 1:
    raise ValueError(f"{name} needs a 2-D array (n, d) with d >= 1, got shape {x.shape}")
  if dtype == np.float32:
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
      raise ValueError(f"{name} needs real values, got dtype {x.dtype}")
    if not np.all(np.isfinite(x)):
      raise ValueError(f"{name}: the array contains NaN or Inf")
  elif dtype == np.int32:
    if not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"{name} needs an integer array, got dtype {x.dtype}")
    if x.size and (x.min() < -2**31 or x.max() >= 2**31):
      raise ValueError(f"{name}: values do not fit in int32")
  else:
    if not np.issubdtype(x.dtype, np.integer):
      raise ValueError(f"{name} needs an integer array, got dtype {x.dtype}")
    if x.size and (x.min() < 0 or x.max() > 255):
      raise ValueError(f"{name}: values must lie in [0, 255]")
  n, d = x.shape
  out = np.empty((n, 4 + d * np.dtype(dtype).itemsize), np.uint8)
  out[:, :4] = np.frombuffer(np.int32(d).astype("<i4").tobytes(), np.uint8)
  out[:, 4:] = np.ascontiguousarray(x, dtype=np.dtype(dtype).newbyteorder("<")).view(np.uint8)
  with atomic_output(path) as tmp:
    out.tofile(tmp)


def write_fvecs(path, x) -> None:
  """Writes f32[n, d] to a .fvecs file atomically."""
  _write_vecs(path, x, np.float32, "write_fvecs")


def write_ivecs(path, x) -> None:
  """Writes i32[n, d] to a .ivecs file atomically."""
  _write_vecs(path, x, np.int32, "write_ivecs")


def write_bvecs(path, x) -> None:
  """Writes u8[n, d] to a .bvecs file atomically."""
  _write_vecs(path, x, np.uint8, "write_bvecs")


# ---------------------------------------------------------------------------------------
# HDF5 (ann-benchmarks) and dispatch.

_HDF5_KEYS = ("train", "test", "neighbors")


def read_hdf5(path) -> dict:
  """Reads an ann-benchmarks HDF5 file: {"train", "test", "neighbors", ["distances"],
  "distance"} as numpy arrays (the file is small enough to load; datasets are copied)."""
  import h5py
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ValueError(f"{path}: no such file")
  try:
    with h5py.File(path, "r") as f:
      missing = [k for k in _HDF5_KEYS if k not in f]
      if missing:
        raise ValueError(f"{path}: not in ann-benchmarks format, missing datasets {missing} "
                         f"(has {sorted(f.keys())})")
      out = {k: f[k][()] for k in f.keys() if k in _HDF5_KEYS + ("distances",)}
      out["distance"] = str(f.attrs.get("distance", "euclidean"))
  except OSError as e:
    raise ValueError(f"{path}: not a readable HDF5 file ({e})") from e
  for k in _HDF5_KEYS:
    if out[k].ndim != 2:
      raise ValueError(f"{path}: dataset '{k}' must be 2-D, got shape {out[k].shape}")
  return out


def write_hdf5(path, train, test, neighbors, distances=None, distance="euclidean") -> None:
  """Writes an ann-benchmarks HDF5 file atomically."""
  import h5py
  with atomic_output(path) as tmp:
    with h5py.File(tmp, "w") as f:
      f.attrs["distance"] = distance
      f["train"], f["test"], f["neighbors"] = train, test, np.asarray(neighbors, np.int32)
      if distances is not None:
        f["distances"] = distances


def read_vectors(path, key: str | None = None) -> np.ndarray:
  """Reads vectors by file suffix: .fvecs .ivecs .bvecs .npy (memory-mapped) or .hdf5/.h5
  (``key`` names the dataset, default "train")."""
  path = os.fspath(path)
  suffix = Path(path).suffix.lower()
  if suffix == ".fvecs":
    return read_fvecs(path)
  if suffix == ".ivecs":
    return read_ivecs(path)
  if suffix == ".bvecs":
    return read_bvecs(path)
  if suffix == ".npy":
    if not os.path.isfile(path):
      raise ValueError(f"{path}: no such file")
    try:
      x = np.load(path, mmap_mode="r")
    except (ValueError, OSError, EOFError) as e:
      raise ValueError(f"{path}: not a valid .npy file ({e})") from e
    if x.ndim != 2:
      raise ValueError(f"{path}: expected a 2-D array, got shape {x.shape}")
    return x
  if suffix in (".hdf5", ".h5"):
    return read_hdf5(path)[key or "train"]
  raise ValueError(f"{path}: unknown vector file type {suffix!r} "
                   "(expected .fvecs, .ivecs, .bvecs, .npy, .hdf5 or .h5)")


# ---------------------------------------------------------------------------------------
# Locations.

def data_root(root: str | os.PathLike | None = None) -> Path:
  """The data directory: ``root``, else $SPREADING_DATA, else ../shared/data next to the repo."""
  if root is None:
    root = os.environ.get("SPREADING_DATA")
  if root is None:
    root = Path(__file__).resolve().parents[2] / "shared" / "data"
  root = Path(root)
  if not root.is_dir():
    raise ValueError(f"data root {root} does not exist; pass root=... or set SPREADING_DATA "
                     "to the directory holding the datasets")
  return root


def cache_dir() -> Path:
  """Where derived data (e.g. computed groundtruth) is cached: $SPREADING_CACHE or
  ~/.cache/spreading_jax."""
  path = Path(os.environ.get("SPREADING_CACHE", Path.home() / ".cache" / "spreading_jax"))
  path.mkdir(parents=True, exist_ok=True)
  return path


# ---------------------------------------------------------------------------------------
# Datasets.

@dataclasses.dataclass(frozen=True, repr=False)
class Dataset:
  """Vectors of one benchmark (faiss vocabulary: xt = train, xb = base, xq = query, gt).

  Attributes:
    name: dataset name.
    train: [nt, d] vectors the models are trained on (never the queries).
    base: [nb, d] database.
    query: [nq, d] queries.
    groundtruth: i32[nq, >=1] exact nearest neighbours of each query in ``base``.
    metric: "l2" (all built-in datasets).
  """
  name: str
  train: np.ndarray
  base: np.ndarray
  query: np.ndarray
  groundtruth: np.ndarray
  metric: str = "l2"

  def __post_init__(self):
    for field in ("train", "base", "query", "groundtruth"):
      if getattr(self, field).ndim != 2:
        raise ValueError(f"dataset {self.name}: {field} must be 2-D, got shape "
                         f"{getattr(self, field).shape}")
    d = self.base.shape[1]
    for field in ("train", "query"):
      if getattr(self, field).shape[1] != d:
        raise ValueError(f"dataset {self.name}: {field} has d={getattr(self, field).shape[1]} "
                         f"but base has d={d}")
    if self.groundtruth.shape[0] != self.query.shape[0]:
      raise ValueError(f"dataset {self.name}: groundtruth has {self.groundtruth.shape[0]} rows "
                       f"for {self.query.shape[0]} queries")
    gt = np.asarray(self.groundtruth)
    if gt.size and (gt.min() < 0 or gt.max() >= self.base.shape[0]):
      raise ValueError(f"dataset {self.name}: groundtruth ids must lie in [0, "
                       f"{self.base.shape[0]})")
    if self.metric not in ("l2", "ip"):
      raise ValueError(f"dataset {self.name}: metric must be 'l2' or 'ip', got {self.metric!r}")

  d = property(lambda self: int(self.base.shape[1]))
  nb = property(lambda self: int(self.base.shape[0]))
  nq = property(lambda self: int(self.query.shape[0]))
  nt = property(lambda self: int(self.train.shape[0]))

  def __repr__(self):
    return (f"Dataset({self.name!r}, d={self.d}, nt={self.nt}, nb={self.nb}, nq={self.nq}, "
            f"gt_k={self.groundtruth.shape[1]}, metric={self.metric!r})")

  def subset(self, nb: int | None = None, nq: int | None = None,
             nt: int | None = None) -> "Dataset":
    """A smaller dataset (first rows); truncating the base recomputes the groundtruth
    exactly."""
    base, query, train, gt = self.base, self.query, self.train, self.groundtruth
    if nq is not None:
      query, gt = query[:nq], gt[:nq]
    if nt is not None:
      train = train[:nt]
    if nb is not None and nb < self.nb:
      from spreading_jax import search
      base = base[:nb]
      _, gt = search.knn(np.asarray(query, np.float32), np.asarray(base, np.float32),
                         min(100, nb), metric=self.metric)
      gt = np.asarray(gt)
    return Dataset(f"{self.name}[sub]", train, base, query, gt, self.metric)


def _require(root: Path, name: str, files: list[str]) -> list[Path]:
  paths = [root / f for f in files]
  missing = [f for f, p in zip(files, paths) if not p.is_file()]
  if missing:
    raise ValueError(f"dataset {name}: missing {missing} under {root}; expected files: "
                     f"{files}")
  return paths


def _read_idx_gz(path: Path, magic: int) -> np.ndarray:
  """Reads a gzipped IDX (MNIST-format) file of uint8 values."""
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(f"{path}: corrupt or truncated gzip ({e})") from e
  if len(raw) < 8:
    raise ValueError(f"{path}: truncated IDX header")
  got = int.from_bytes(raw[:4], "big")
  if got != magic:
    raise ValueError(f"{path}: bad IDX magic {got:#010x}, expected {magic:#010x}")
  ndim = magic & 0xFF
  dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  offset = 4 + 4 * ndim
  expected = int(np.prod(dims))
  if len(raw) - offset != expected:
    raise ValueError(f"{path}: IDX payload has {len(raw) - offset} bytes, dims {dims} need "
                     f"{expected}")
  return np.frombuffer(raw, np.uint8, offset=offset).reshape(dims[0], -1)


def _cached_groundtruth(name: str, sources: list[Path], query, base, k: int = 100):
  """Exact groundtruth, computed once and cached (keyed by the source files' identity)."""
  h = hashlib.sha256()
  for p in sources:
    st = p.stat()
    h.update(f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
  path = cache_dir() / f"{name}-gt{k}-{h.hexdigest()[:16]}.ivecs"
  if path.is_file():
    try:
      gt = read_ivecs(path)
      if gt.shape == (query.shape[0], k) and gt.min() >= 0 and gt.max() < base.shape[0]:
        return np.asarray(gt)
    except ValueError:
      pass  # corrupt cache: recompute below
  from spreading_jax import search
  _, gt = search.knn(query, base, k)
  gt = np.asarray(gt)
  write_ivecs(path, gt)
  return gt


def load_dataset(name: str, root: str | os.PathLike | None = None) -> Dataset:
  """Loads a named dataset or an ann-benchmarks HDF5 file.

  Names (files under the data root, see ``data_root``):
    "siftsmall": siftsmall/siftsmall_{base,query}.fvecs + siftsmall_groundtruth.ivecs.
      No learn set is shipped, so ``train`` is the base (the queries never train).
    "wordllama-256": wordllama-wamerican/wl256_{learn,base,query}.fvecs +
      wl256_groundtruth.ivecs; a disjoint 20k learn set trains (the demo's default).
    "fashion-mnist": fashion-mnist/*-idx3-ubyte.gz; base = the 60k training images,
      queries = the 10k test images, train = base; groundtruth computed once and cached.
    "deep1m": user files base.fvecs (first 1M rows), learn.fvecs, deep1B_queries.fvecs,
      deep1M_groundtruth.ivecs.
    "bigann1m": bigann_base.bvecs (first 1M rows), bigann_learn.bvecs, bigann_query.bvecs,
      gnd/idx_1M.ivecs (uint8 memmaps; converted to float where used).
    a path ending in .hdf5/.h5 (ann-benchmarks): base = "train", query = "test",
      groundtruth = "neighbors", train = base.
  """
  if str(name).lower().endswith((".hdf5", ".h5")):
    f = read_hdf5(name)
    metric = {"euclidean": "l2", "l2": "l2", "dot": "ip", "ip": "ip"}.get(f["distance"])
    if metric is None:
      raise ValueError(f"{name}: distance {f['distance']!r} is not supported (euclidean, dot)")
    base = np.asarray(f["train"], np.float32)
    return Dataset(Path(name).stem, base, base, np.asarray(f["test"], np.float32),
                   np.asarray(f["neighbors"], np.int32), metric)
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} or a path to an "
                     "ann-benchmarks .hdf5 file")
  root = data_root(root)
  if name == "siftsmall":
    b, q, g = _require(root / "siftsmall", name, ["siftsmall_base.fvecs",
                                                  "siftsmall_query.fvecs",
                                                  "siftsmall_groundtruth.ivecs"])
    base = read_fvecs(b)
    return Dataset(name, base, base, read_fvecs(q), read_ivecs(g))
  if name == "wordllama-256":
    t, b, q, g = _require(root / "wordllama-wamerican", name, [
        "wl256_learn.fvecs", "wl256_base.fvecs", "wl256_query.fvecs", "wl256_groundtruth.ivecs"])
    return Dataset(name, read_fvecs(t), read_fvecs(b), read_fvecs(q), read_ivecs(g))
  if name == "fashion-mnist":
    files = ["train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz"]
    tr, te = _require(root / "fashion-mnist", name, files)
    base = _read_idx_gz(tr, 0x00000803).astype(np.float32)
    query = _read_idx_gz(te, 0x00000803).astype(np.float32)
    gt = _cached_groundtruth(name, [tr, te], query, base)
    return Dataset(name, base, base, query, gt)
  if name == "deep1m":
    b, t, q, g = _require(root, name, ["base.fvecs", "learn.fvecs", "deep1B_queries.fvecs",
                                       "deep1M_groundtruth.ivecs"])
    return Dataset(name, read_fvecs(t), read_fvecs(b)[:1_000_000], read_fvecs(q),
                   read_ivecs(g))
  b, t, q, g = _require(root, name, ["bigann_base.bvecs", "bigann_learn.bvecs",
                                     "bigann_query.bvecs", "gnd/idx_1M.ivecs"])
  return Dataset(name, read_bvecs(t), read_bvecs(b)[:1_000_000], read_bvecs(q), read_ivecs(g))
