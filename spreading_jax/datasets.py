"""Datasets: the ``Dataset`` container and the named benchmarks behind ``load_dataset``.

``load_dataset`` turns a dataset name into a ``Dataset`` of train / base / query /
groundtruth arrays (faiss vocabulary: xt, xb, xq, gt). Files are looked up under a data
root (``data_root``); derived data such as computed groundtruth is cached in
``cache_dir()``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path
from typing import Callable

import numpy as np

from spreading_jax import search
from spreading_jax._files import PathLike, sha256_files
from spreading_jax._validation import check_int
from spreading_jax.vecs_io import (is_real_dtype, read_bvecs, read_fvecs, read_hdf5,
                                   read_idx_gz, read_ivecs, write_ivecs)

# Rows of the paper's 1M-vector databases (deep1m, bigann1m).
_ONE_MILLION = 1_000_000
# k of every groundtruth this module computes.
_GT_K = 100


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


def _cached_groundtruth(name: str, sources: list[Path], query, base, k: int = _GT_K,
                        metric: str = "l2") -> np.ndarray:
  """Exact groundtruth, computed once and cached under ``cache_dir()``.

  The cache key hashes the content of the source files (so a moved or copied dataset
  reuses it and a changed one does not); a cached file that fails validation (shape,
  range, brute-force spot check) is recomputed.
  """
  path = cache_dir() / f"{name}-gt{k}-{metric}-{sha256_files(sources)[:16]}.ivecs"
  if path.is_file():
    try:
      gt = np.asarray(read_ivecs(path))
      if _groundtruth_is_valid(gt, query, base, k, metric):
        return gt
    except ValueError:
      pass  # corrupt cache file: recompute below
  gt = search.exact_groundtruth(query, base, k, metric)
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
      if field != "groundtruth" and not is_real_dtype(np.dtype(dtype)):
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

    Truncating the base recomputes the groundtruth exactly (``search.exact_groundtruth`` with
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
      gt = search.exact_groundtruth(query, base, min(_GT_K, nb), self.metric)
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
  base = read_idx_gz(tr, 0x00000803).astype(np.float32)
  query = read_idx_gz(te, 0x00000803).astype(np.float32)
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
