"""Datasets: the ``Dataset`` container and the named benchmarks behind ``load_dataset``.

``load_dataset`` turns a dataset name into a ``Dataset`` of train / base / query /
groundtruth arrays (faiss vocabulary: xt, xb, xq, gt). "fashion-mnist-mini" ships inside
the package; the other named datasets are files looked up under the data roots
(``data_roots``: ``root=``, then $SPREADING_DATA, then the user cache), and those with a
canonical public URL are downloaded into the cache when missing (``download``: progress
bar, sha256 check, resume, atomic rename).
"""
from __future__ import annotations

import dataclasses
import functools
import http.client
import io
import lzma
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import numpy as np
from tqdm.auto import tqdm

from spreading_jax._files import PathLike, fsync_path, sha256_bytes, sha256_file, sha256_files
from spreading_jax._validation import check_int
from spreading_jax.groundtruth import exact_groundtruth
from spreading_jax.vecs_io import (is_real_dtype, read_bvecs, read_fvecs, read_hdf5,
                                   read_idx_gz, read_ivecs, write_ivecs)

# Rows of the paper's 1M-vector databases (deep1m, bigann1m).
_ONE_MILLION = 1_000_000
# k of every groundtruth this module computes.
_GT_K = 100


# ---------------------------------------------------------------------------------------
# Locations.

def cache_dir() -> Path:
  """Where derived data (computed groundtruth) and downloads are cached, created on demand.

  $SPREADING_CACHE if set, else ``~/.cache/spreading_jax``. Downloads go to its ``data/``
  subdirectory, which is the last data root searched (``data_roots``). Deleting the
  cache is always safe: what is needed again is recomputed or downloaded again.
  """
  path = Path(os.environ.get("SPREADING_CACHE") or Path.home() / ".cache" / "spreading_jax")
  path = path.expanduser()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"cache directory {path} cannot be created ({e}); set SPREADING_CACHE "
                     "to a writable directory") from e
  return path


def data_roots(root: PathLike | None = None) -> list[Path]:
  """The directories searched for dataset files, in order.

  Args:
    root: searched first when given.

  Returns:
    ``[root, $SPREADING_DATA, cache_dir() / "data"]`` without the ones not given; a dataset
    is loaded from the first directory that holds all its files.

  Raises:
    ValueError: ``root`` or $SPREADING_DATA is given but is not a directory (a typo
      should not silently fall through to the cache).
  """
  roots = []
  for value, source in ((root, "the root argument"),
                        (os.environ.get("SPREADING_DATA") or None, "$SPREADING_DATA")):
    if value is None:
      continue
    path = Path(value).expanduser()
    if not path.is_dir():
      raise ValueError(f"data root {path} (from {source}) is not a directory; pass root=... or "
                       "set SPREADING_DATA=/path/to/data, the directory holding siftsmall/, "
                       "wordllama-wamerican/, fashion-mnist/, ...")
    roots.append(path)
  return roots + [cache_dir() / "data"]


# ---------------------------------------------------------------------------------------
# Downloads.

_DOWNLOAD_BLOCK = 1 << 16
_DOWNLOAD_ATTEMPTS = 3


class _Interrupted(Exception):
  """The connection ended before the announced length (the partial file is kept)."""


def _fetch(url: str, part: Path, timeout: float, desc: str) -> None:
  """Appends the rest of ``url`` to ``part`` (HTTP Range from its current size)."""
  have = part.stat().st_size if part.is_file() else 0
  headers = {"User-Agent": "spreading-jax"}
  if have:
    headers["Range"] = f"bytes={have}-"
  try:
    response = urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                      timeout=timeout)
  except urllib.error.HTTPError as e:
    if e.code == 416 and have:
      return  # nothing left to fetch: the part is complete (the checksum decides)
    raise
  with response:
    start = 0
    if have and response.status == 206:
      # "Content-Range: bytes START-END/TOTAL": append only if it starts where we stopped.
      m = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
      start = int(m.group(1)) if m else -1
      if start != have:
        raise _Interrupted(f"the server resumed at byte {start}, not {have}")
    length = response.headers.get("Content-Length")
    total = start + int(length) if length is not None else None
    with open(part, "ab" if start else "wb") as f, \
         tqdm(total=total, initial=start, unit="B", unit_scale=True, unit_divisor=1024,
              desc=desc, leave=False) as bar:
      got = start
      try:
        while block := response.read(_DOWNLOAD_BLOCK):
          f.write(block)
          got += len(block)
          bar.update(len(block))
      except (http.client.IncompleteRead, OSError) as e:
        raise _Interrupted(f"connection lost after {got} bytes ({e})") from e
      finally:
        f.flush()
        os.fsync(f.fileno())
    if total is not None and got < total:
      raise _Interrupted(f"connection closed after {got} of {total} bytes")


def download(url: str, path: PathLike, sha256: str | None = None, *, timeout: float = 60,
             check: Callable[[Path], None] | None = None) -> Path:
  """Downloads ``url`` to ``path``: progress bar, resume, sha256 check, atomic rename.

  Bytes go to ``.{name}.part`` beside ``path``. An interrupted transfer keeps the part
  and resumes with an HTTP Range request (up to 3 attempts in this call; a later call
  resumes too); a server that ignores Range restarts from zero. Only a complete file
  whose sha256 matches (and that ``check`` accepts) is renamed to ``path``.

  Args:
    url: http(s) URL.
    path: where the file ends up.
    sha256: expected hex digest of the whole file; None where no checksum is published
      (then only ``check`` and the loader's format checks guard the content).
    timeout: seconds without data before a connection attempt fails.
    check: optional function that raises ``ValueError`` for a bad file (called on the
      complete part before the rename).

  Returns:
    ``path``.

  Raises:
    ValueError: the URL cannot be reached (offline, HTTP error; the message names the
      URL and where to put the file by hand), or the checksum differs (the part is
      deleted so that the next call starts over).
  """
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  part = path.with_name(f".{path.name}.part")
  by_hand = f"download it by hand and put it at {path}"
  for attempt in range(_DOWNLOAD_ATTEMPTS):
    try:
      _fetch(url, part, timeout, path.name)
      break
    except _Interrupted as e:
      if attempt == _DOWNLOAD_ATTEMPTS - 1:
        raise ValueError(f"download of {url} interrupted: {e}; run again to resume from "
                         f"{part}, or {by_hand}") from None
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
      reason = getattr(e, "reason", None) or e
      raise ValueError(f"cannot download {url} ({reason}); {by_hand}") from None
  got = sha256_file(part)
  if sha256 is not None and got != sha256.lower():
    part.unlink()
    raise ValueError(f"download of {url} is corrupt: sha256 {got}, expected {sha256}; the "
                     f"partial file was deleted, run again to retry or {by_hand}")
  if check is not None:
    try:
      check(part)
    except ValueError as e:
      part.unlink()
      raise ValueError(f"download of {url} is not a valid file ({e}); {by_hand}") from None
  os.replace(part, path)
  fsync_path(path.parent)
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

    Truncating the base recomputes the groundtruth exactly (``groundtruth.exact_groundtruth`` with
    k = min(100, nb)), since the old neighbours may fall outside the new base.

    Args:
      nb: database rows to keep (None: all).
      nq: queries to keep (None: all).
      nt: training rows to keep (None: all).

    Raises:
      ValueError: a size is not an integer in [1, current size].

    Example:
      >>> small = load_dataset("fashion-mnist-mini").subset(nb=1000, nq=10)
      >>> small.nb, small.nq, small.groundtruth.shape
      (1000, 10, (10, 100))
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


# ---------------------------------------------------------------------------------------
# The shipped dataset.

_SHIPPED = Path(__file__).resolve().parent / "_shipped"
_MINI_FILE = "fashion-mnist-mini.npz.xz"
# The shipped file never changes (experiments/make_fashion_mnist_mini.py made it once).
_MINI_SHA256 = "d756b2741d11b3ca4f945e168ac42e09beaea2198ddb4cfbfdacf49e78743064"


@functools.lru_cache(maxsize=1)
def _read_shipped(path: Path = _SHIPPED / _MINI_FILE) -> dict[str, np.ndarray]:
  """The shipped arrays (uint8 pixels), read and checked once per process, read-only."""
  try:
    blob = path.read_bytes()
  except OSError as e:
    raise ValueError(f"{path}: the dataset shipped with spreading-jax cannot be read ({e}); "
                     "reinstall the package") from e
  if sha256_bytes(blob) != _MINI_SHA256:
    raise ValueError(f"{path}: sha256 {sha256_bytes(blob)} differs from the pinned "
                     f"{_MINI_SHA256}; the installed copy is corrupt, reinstall the package")
  with np.load(io.BytesIO(lzma.decompress(blob)), allow_pickle=False) as z:
    arrays = {k: z[k] for k in z.files}
  for x in arrays.values():
    x.setflags(write=False)
  return arrays


def _load_fashion_mnist_mini(_: list[Path]) -> Dataset:
  a = _read_shipped()
  return Dataset("fashion-mnist-mini", a["train"].astype(np.float32),
                 a["base"].astype(np.float32), a["query"].astype(np.float32),
                 a["groundtruth"])


# ---------------------------------------------------------------------------------------
# Datasets on disk.

def _load_siftsmall(paths: list[Path]) -> Dataset:
  b, q, g = paths
  base = read_fvecs(b)
  return Dataset("siftsmall", base, base, read_fvecs(q), read_ivecs(g))


def _load_wordllama(paths: list[Path]) -> Dataset:
  t, b, q, g = paths
  return Dataset("wordllama-256", read_fvecs(t), read_fvecs(b), read_fvecs(q), read_ivecs(g))


def _load_fashion_mnist(paths: list[Path]) -> Dataset:
  tr, te = paths
  base = read_idx_gz(tr, 0x00000803).astype(np.float32)
  query = read_idx_gz(te, 0x00000803).astype(np.float32)
  if base.shape[1] != query.shape[1]:
    raise ValueError(f"dataset 'fashion-mnist': {tr.name} has {base.shape[1]} pixels per image "
                     f"but {te.name} has {query.shape[1]}")
  gt = _cached_groundtruth("fashion-mnist", [tr, te], query, base)
  return Dataset("fashion-mnist", base, base, query, gt)


def _load_deep1m(paths: list[Path]) -> Dataset:
  b, t, q, g = paths
  return Dataset("deep1m", read_fvecs(t), read_fvecs(b, max_rows=_ONE_MILLION),
                 read_fvecs(q), read_ivecs(g))


def _load_bigann1m(paths: list[Path]) -> Dataset:
  b, t, q, g = paths
  return Dataset("bigann1m", read_bvecs(t), read_bvecs(b, max_rows=_ONE_MILLION),
                 read_bvecs(q), read_ivecs(g))


@dataclasses.dataclass(frozen=True)
class _Source:
  """Where a named dataset's files live and how to get them.

  files: paths relative to a data root. urls: file -> (URL, sha256 or None) for the
  files that can be downloaded. by_hand: how to get the files where no URL is known.
  """
  load: Callable[[list[Path]], Dataset]
  files: tuple[str, ...] = ()
  urls: dict[str, tuple[str, str | None]] = dataclasses.field(default_factory=dict)
  by_hand: str = ""


# Upstream Fashion-MNIST at a fixed commit. The sha256 are those of the upstream .gz files
# as pinned by TensorFlow Datasets and Keras; the label files' pins were checked here
# against the upstream git blobs (the image blobs were not available to check). A
# re-compressed copy (e.g. Debian's) has other .gz bytes: put such a copy in a data root,
# where files are used as they are.
_FASHION_MNIST_URL = ("https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/"
                      "b2617bb6d3ffa2e429640350f613e3291e10b141/data/fashion/")
_SOURCES: dict[str, _Source] = {
    "fashion-mnist-mini": _Source(_load_fashion_mnist_mini),
    "siftsmall": _Source(
        _load_siftsmall,
        ("siftsmall/siftsmall_base.fvecs", "siftsmall/siftsmall_query.fvecs",
         "siftsmall/siftsmall_groundtruth.ivecs"),
        by_hand="get ftp://ftp.irisa.fr/local/texmex/corpus/siftsmall.tar.gz (FTP only, so "
        "not downloaded automatically) and unpack it in a data root"),
    "wordllama-256": _Source(
        _load_wordllama,
        tuple(f"wordllama-wamerican/wl256_{f}" for f in (
            "learn.fvecs", "base.fvecs", "query.fvecs", "groundtruth.ivecs")),
        by_hand="it has no public download (WordLlama embeddings of a word list, built "
        "offline); put the files in a data root"),
    "fashion-mnist": _Source(
        _load_fashion_mnist,
        ("fashion-mnist/train-images-idx3-ubyte.gz", "fashion-mnist/t10k-images-idx3-ubyte.gz"),
        urls={"fashion-mnist/train-images-idx3-ubyte.gz": (
                  _FASHION_MNIST_URL + "train-images-idx3-ubyte.gz",
                  "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
              "fashion-mnist/t10k-images-idx3-ubyte.gz": (
                  _FASHION_MNIST_URL + "t10k-images-idx3-ubyte.gz",
                  "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073")}),
    "deep1m": _Source(
        _load_deep1m,
        ("base.fvecs", "learn.fvecs", "deep1B_queries.fvecs", "deep1M_groundtruth.ivecs"),
        by_hand="the Deep1B files are tens of GB: see docs/paper_protocol.md for where to "
        "get them"),
    "bigann1m": _Source(
        _load_bigann1m,
        ("bigann_base.bvecs", "bigann_learn.bvecs", "bigann_query.bvecs", "gnd/idx_1M.ivecs"),
        by_hand="the BigANN (SIFT1B) files are tens of GB, FTP only: see "
        "docs/paper_protocol.md for where to get them"),
}
DATASETS: tuple[str, ...] = tuple(_SOURCES)

# ann-benchmarks serves its HDF5 files here; it publishes no checksums, so a download is
# only checked by reading it as an ann-benchmarks file.
_ANN_BENCHMARKS_URL = "http://ann-benchmarks.com/"

# ann-benchmarks distance attribute -> (metric, L2-normalise the vectors first).
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


def _resolve(name: str, source: _Source, roots: list[Path]) -> list[Path]:
  """The files of a named dataset: from the first root holding them all, else downloaded
  into the cache (when every missing file has a URL)."""
  for root in roots:
    paths = [root / f for f in source.files]
    if all(p.is_file() for p in paths):
      return paths
  first = roots[0]
  missing = [f for f in source.files if not (first / f).is_file()]
  looked = ", ".join(str(r) for r in roots)
  if not source.urls:
    raise ValueError(f"dataset {name!r}: missing {', '.join(missing)} under {first} (looked "
                     f"in {looked}); it expects the files {', '.join(source.files)} in one "
                     f"of them; {source.by_hand}")
  cache = roots[-1]
  paths = []
  for f in source.files:
    path = next((r / f for r in roots if (r / f).is_file()), None)
    if path is None:
      url, sha256 = source.urls[f]
      try:
        path = download(url, cache / f, sha256)
      except ValueError as e:
        raise ValueError(f"dataset {name!r}: {e} (or under any data root as {f}: root=..., "
                         "$SPREADING_DATA)") from None
    paths.append(path)
  return paths


def _find_hdf5(name: PathLike, roots: list[Path]) -> Path:
  path = Path(name).expanduser()
  if path.is_file():
    return path
  if not path.is_absolute():
    for root in roots:
      if (root / path).is_file():
        return root / path
  if path.name != os.fspath(name):  # a path, not a bare ann-benchmarks name
    raise ValueError(f"{name}: no such HDF5 file (looked in the working directory and under "
                     f"{', '.join(str(r) for r in roots)})")
  url = _ANN_BENCHMARKS_URL + path.name
  return download(url, roots[-1] / path.name, None, check=read_hdf5)


def load_dataset(name: str | os.PathLike, root: PathLike | None = None) -> Dataset:
  """Loads a named dataset, or an ann-benchmarks HDF5 file.

  Named datasets other than the shipped one are files under a data root: the first of
  ``data_roots(root)`` (``root``, $SPREADING_DATA, ``cache_dir()/data``) that holds all of
  them. A missing dataset with a public URL is downloaded into ``cache_dir()/data``
  (``download``: progress bar, sha256 where one is published, resume, atomic rename);
  offline, or for datasets without a URL, the error says where to put the files by hand.

  Names (arrays are read-only memmaps unless noted):
    "fashion-mnist-mini": shipped inside the package, no file needed (the demo's
      default): 20k training, 10k base and 1k query Fashion-MNIST images (queries from
      the test set, all disjoint), float32 pixels 0..255 in memory, exact L2 100-NN
      groundtruth. See ``spreading_jax/_shipped/SOURCE.md``.
    "siftsmall": siftsmall/siftsmall_{base,query}.fvecs + siftsmall_groundtruth.ivecs
      (10k x 128, 100 queries). No learn set is shipped, so ``train`` is the base; the
      queries never train. Not downloaded (the texmex corpus is FTP only).
    "wordllama-256": wordllama-wamerican/wl256_{learn,base,query}.fvecs +
      wl256_groundtruth.ivecs (unit-norm 256-d word embeddings; 20k learn, 53,743 base,
      1k queries, all disjoint). No public download.
    "fashion-mnist": fashion-mnist/{train,t10k}-images-idx3-ubyte.gz; base = the 60k
      training images, queries = the 10k test images, float32 in memory; ``train`` is the
      base. Downloaded from the upstream repository when missing (sha256-checked, 30 MB).
      The exact 100-NN groundtruth is computed once (~10-20 s on a CPU) and cached in
      ``cache_dir()``.
    "deep1m": user files base.fvecs (its first 1M rows are the database), learn.fvecs
      (the whole file trains; ``TrainConfig.num_train`` caps it), deep1B_queries.fvecs,
      deep1M_groundtruth.ivecs, all directly under the root.
    "bigann1m": bigann_base.bvecs (first 1M rows), bigann_learn.bvecs,
      bigann_query.bvecs, gnd/idx_1M.ivecs. The vectors stay uint8 memmaps (no copy of
      the 1B-row files); ``search.knn`` and the trainer convert the rows they use to
      float32, and ``Dataset.as_float32()`` converts everything.
  A path ending in .hdf5/.h5 (ann-benchmarks format; absolute, relative to the working
  directory, or relative to a data root); a bare ann-benchmarks name such as
  "fashion-mnist-784-euclidean.hdf5" that is found nowhere is downloaded from
  ann-benchmarks.com into the cache (no checksum is published; the file is checked by
  reading it). base = "train", query = "test", groundtruth = "neighbors", ``train`` is
  the base (the file has no separate learn set). The ``distance`` attribute picks the
  metric: "euclidean" -> "l2"; "angular" (cosine) -> the vectors are L2-normalised and
  the metric is "l2", which ranks exactly like cosine similarity; "dot" -> "ip". Others
  (hamming, jaccard) are rejected.

  Args:
    name: one of ``DATASETS``, or a path to an ann-benchmarks HDF5 file.
    root: a data directory searched first (see ``data_roots``).

  Raises:
    ValueError: unknown name (the known ones are listed), missing files that cannot be
      downloaded (every expected file and the directories searched are listed), a failed
      download (the URL and where to put the file by hand), or malformed files.

  Example:
    >>> ds = load_dataset("fashion-mnist-mini")
    >>> ds.nt, ds.nb, ds.nq, ds.d, ds.groundtruth.shape
    (20000, 10000, 1000, 784, (1000, 100))
  """
  if os.fspath(name).lower().endswith((".hdf5", ".h5")):
    return _load_hdf5_dataset(_find_hdf5(name, data_roots(root)))
  if name not in _SOURCES:
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}, or a path to "
                     "an ann-benchmarks .hdf5 file")
  source = _SOURCES[name]
  if not source.files:
    return source.load([])
  return source.load(_resolve(name, source, data_roots(root)))
