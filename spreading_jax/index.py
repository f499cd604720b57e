"""SpreadingIndex: a trained catalyzer + a quantizer + the database's codes, with streaming
add, search over the codes, and checksummed save/load.

Everything specific to a kind of quantizer (Zn lattice, sign bits, faiss) lives in
``quantizers``; the index only catalyzes, stores codes and persists them.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import time

import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from spreading_jax import _outputs, quantizers, sharding
from spreading_jax._files import (ChangedWhileReading, SavedDir, atomic_output_dir,
                                  check_format_version, check_saved_dir, sha256_file)
from spreading_jax._validation import check_int, check_mesh, check_vectors
from spreading_jax.encode import EncodeStream
from spreading_jax.model import _MAX_JSON_BYTES, TrainResult, _parse_json
from spreading_jax.sampling import sample_rows

FORMAT_VERSION = 2
_META, _KIND = _outputs.KINDS["index"]  # the metadata file and its kind tag
_CODES = "codes.npy"
_MODEL = "model"
_WRITER = ".writer.json"  # inside a save's temporary directory while it is being written


class SpreadingIndex:
  """Catalyzer + quantizer + codes.

  Args:
    model: a trained ``TrainResult``.
    quantizer: a ``quantizers.Quantizer`` on the model's d_out, or a name for
      ``quantizers.for_model``: "lattice" (alias "zn": Zn sphere lattice codes, asymmetric
      search on every local device), "sign" (d_out sign bits, Hamming search on every local
      device), or a
      faiss index-factory string such as "OPQ8_32,PQ8" or "PQ8" applied to the catalyzed
      vectors (needs ``train`` before ``add``; searched by faiss on the CPU).
    bits: code size when ``quantizer`` is a name. "lattice": a budget: the model's own
      lattice when its codes fit (always when None), else the largest sphere that fits. "sign":
      must be d_out when given. faiss: must equal the factory's code size when given.

  Example::

    index = SpreadingIndex(model, "lattice", bits=64)
    index.add(xb)
    D, I = index.search(xq, 10)

    opq = SpreadingIndex(model, "OPQ8_32,PQ8")
    opq.train(xt)  # faiss quantizers learn from (catalyzed) training vectors
    opq.add(xb)
  """

  def __init__(self, model: TrainResult, quantizer: str | quantizers.Quantizer = "lattice",
               bits: int | None = None):
    if not isinstance(model, TrainResult):
      raise ValueError(f"model must be a TrainResult, got {type(model).__name__}")
    d_out = model.config.d_out
    if isinstance(quantizer, quantizers.Quantizer):
      if bits is not None:
        raise ValueError("bits is chosen by the quantizer object; pass bits=None")
      if quantizer.d != d_out:
        raise ValueError(f"the quantizer works on d={quantizer.d} but the model's "
                         f"d_out={d_out}")
    else:
      quantizer = quantizers.for_model(quantizer, model.config, bits)
    self.model, self.quantizer = model, quantizer
    self._chunks: list[np.ndarray] = []
    self._codes: np.ndarray | None = quantizer.empty_codes()

  # -------------------------------------------------------------------------------------
  @property
  def d(self) -> int:
    """Input dimension (the model's d_in)."""
    return self.model.d_in

  @property
  def is_trained(self) -> bool:
    """False only while the quantizer still needs ``train`` (faiss quantizers)."""
    return not self.quantizer.needs_training

  @property
  def ntotal(self) -> int:
    return sum(c.shape[0] for c in self._chunks) + (
        0 if self._codes is None else self._codes.shape[0])

  @property
  def code_bits(self) -> int:
    return self.quantizer.code_bits

  @property
  def bytes_per_vector(self) -> int:
    """Size of one code in bytes (8 for a 64-bit code)."""
    return self.quantizer.bytes_per_vector

  @property
  def codes(self) -> np.ndarray:
    """All codes, [ntotal, code_width]: u32 words (Zn) or u8 bytes (sign, faiss)."""
    if self._chunks:
      self._codes = np.concatenate([self._codes, *self._chunks])
      self._chunks = []
    return self._codes

  def info(self) -> str:
    extra = "".join(f" {k}={v}" for k, v in self.quantizer.meta().items()
                    if k not in ("name", "d", "code_bits"))
    return (f"SpreadingIndex quantizer={self.quantizer.name} d_in={self.d} "
            f"d_out={self.model.config.d_out} code_bits={self.code_bits} "
            f"bytes_per_vector={self.bytes_per_vector} ntotal={self.ntotal}{extra}")

  def __repr__(self) -> str:
    return self.info()

  def train(self, x, max_train: int = 100_000, seed: int = 0) -> None:
    """Trains the quantizer on catalyzed training vectors x: [n, d_in] (at most
    ``max_train`` rows, drawn with ``seed``). A no-op for parameter-free quantizers ("lattice",
    "sign"). Never pass the queries here."""
    check_vectors("x", x, d=self.d, d_name="d_in")
    if not self.quantizer.needs_training:
      return
    xt = np.asarray(sample_rows(x, check_int("max_train", max_train, minimum=1), seed),
                    np.float32)
    self.quantizer.train(self.model.apply(xt))

  # -------------------------------------------------------------------------------------
  def encode(self, x, chunk: int = 65536, mesh: Mesh | None = None) -> np.ndarray:
    """Raw vectors [n, d_in] (numpy or memory map, any real dtype) -> codes
    [n, code_width] (see ``codes``).

    Rows stream through ``encode.EncodeStream`` (the pipeline of ``encode_file`` and the
    CLI): read and transferred ``chunk`` rows at a time while the previous chunk computes,
    checked for NaN/Inf on the device, 8/16-bit integer inputs sent as they are. For "lattice"
    and "sign" the catalyzer and the encoder are one compiled program (only codes come
    back); faiss quantizers encode the catalyzed chunks on the host. Every row goes
    through the catalyzer in a block of ``encode.block_rows()`` rows per device, so a
    vector's "lattice"/"sign" code does not depend on ``chunk``, ``mesh`` or the batch it is
    added in, and equals ``encode_file``'s byte for byte (faiss quantizers get the same
    catalyzed floats). Raises ValueError naming the first row with NaN/Inf, TypeError when
    ``mesh`` is not a ``jax.sharding.Mesh`` or None.
    """
    return self._encode(x, chunk, mesh, None)

  def _encode(self, x, chunk: int, mesh: Mesh | None, bar) -> np.ndarray:
    check_vectors("x", x, d=self.d, d_name="d_in", finite=False)  # finite: on the device
    chunk = check_int("chunk", chunk, minimum=1)
    mesh = check_mesh(mesh)
    core = self.quantizer.encode_core
    out = self.quantizer.empty_codes()
    with EncodeStream(self.model, x, then=core, chunk=chunk, mesh=mesh) as stream:
      for lo, hi, y in stream:
        codes = y if core is not None else self.quantizer.encode(y)
        if lo == 0:
          out = np.empty((x.shape[0],) + codes.shape[1:], codes.dtype)
        out[lo:hi] = codes
        if bar is not None:
          bar.update(hi - lo)
    return out

  def add(self, x, chunk: int = 65536, mesh: Mesh | None = None) -> None:
    """Encodes and appends x: [n, d_in] (numpy or memory map), ``chunk`` rows at a time
    (see ``encode``: the codes do not depend on ``chunk`` or on how x is split over calls).
    A row with NaN/Inf raises ValueError naming it, and nothing is appended; a ``mesh``
    that is not a ``jax.sharding.Mesh`` or None raises TypeError."""
    check_vectors("x", x, d=self.d, d_name="d_in", finite=False)
    mesh = check_mesh(mesh)
    if not self.is_trained:
      raise ValueError(f"quantizer {self.quantizer.name!r} is not trained: call "
                       "index.train(training_vectors) before add")
    n = x.shape[0]
    bar = tqdm(total=n, desc="add", unit="vec", disable=n <= chunk)
    try:
      codes = self._encode(x, chunk, mesh, bar)
    finally:
      bar.close()
    self._chunks.append(codes)

  def reconstruct(self, ids) -> np.ndarray:
    """Decoded vectors in catalyzer space: i[m] -> f32[m, d_out]."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= self.ntotal):
      raise ValueError(f"ids must lie in [0, {self.ntotal})")
    return self.quantizer.decode(self.codes[ids])

  def search(self, xq, k: int, mesh: Mesh | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k nearest database vectors of raw queries xq: [nq, d_in] (nq = 0 gives empty results).

    Returns (D, I): "lattice": D f32[nq, k] inner products (descending), "sign": D i32[nq, k]
    Hamming distances (ascending), faiss: D f32[nq, k] faiss' distances (squared L2 for
    PQ/OPQ, ascending); I i32[nq, k]. "lattice" and "sign" are sharded over ``mesh``, or over
    all of this process's devices (``sharding.local_mesh``) when it has several; faiss
    searches on the CPU.

    Raises:
      ValueError: the index is empty, xq is not [nq, d_in] finite real vectors, k is not
        an int in [1, ntotal].
      TypeError: ``mesh`` is not a ``jax.sharding.Mesh`` or None.
    """
    mesh = check_mesh(mesh)
    if self.ntotal == 0:
      raise ValueError("the index is empty: add vectors before searching")
    check_vectors("xq", xq, d=self.d, d_name="d_in")
    k = check_int("k", k, minimum=1)
    if k > self.ntotal:
      raise ValueError(f"k={k} is larger than ntotal={self.ntotal}")
    if mesh is None:
      mesh = sharding.local_mesh()
    return self.quantizer.search(self.model.apply(xq), self.codes, k, mesh=mesh)

  # -------------------------------------------------------------------------------------
  def save(self, path: str | os.PathLike) -> None:
    """Writes the index atomically to directory ``path``: model/, codes.npy, the
    quantizer's files and index.json (with a sha256 of every other file).

    Temporary or old copies that an interrupted save of this index left beside ``path``
    are removed once the new copy is in place.
    """
    codes = self.codes
    with atomic_output_dir(path) as tmp:
      writer = os.path.join(tmp, _WRITER)
      with open(writer, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
      self.model.save(os.path.join(tmp, _MODEL))
      np.save(os.path.join(tmp, _CODES), codes)
      self.quantizer.save(tmp)
      files = {}
      for root, _, names in os.walk(tmp):
        for name in names:
          full = os.path.join(root, name)
          if full != writer:
            files[os.path.relpath(full, tmp).replace(os.sep, "/")] = sha256_file(full)
      meta = {"format_version": FORMAT_VERSION, "kind": _KIND,
              "quantizer": self.quantizer.meta(), "d_in": self.d,
              "d_out": self.model.config.d_out, "ntotal": int(codes.shape[0]),
              "sha256": dict(sorted(files.items()))}
      with open(os.path.join(tmp, _META), "w") as f:
        json.dump(meta, f, indent=2)
      os.remove(writer)  # after index.json: a directory has one or the other (see below)
    _remove_stale_copies(os.fspath(path))

  @classmethod
  def load(cls, path: str | os.PathLike) -> "SpreadingIndex":
    """Reads an index written by ``save``; ValueError names what is missing or corrupt.

    Every file is read once, checksummed on the bytes that are deserialized, and all come
    from the same save (``_files.SavedDir``): while another process saves over ``path``
    the load returns the old or the new index, never a mixture, or raises
    ``_files.ChangedWhileReading`` (a ValueError) after ``_LOAD_TRIES`` attempts.
    """
    path = os.fspath(path)
    for attempt in range(_LOAD_TRIES):
      try:
        check_saved_dir(path, _META, f"{path} is not a saved index ({_META} missing)")
        with SavedDir(path, "index") as saved:
          return cls._from_saved(saved)
      except ChangedWhileReading:
        if attempt + 1 == _LOAD_TRIES:
          raise
        time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")

  @classmethod
  def _from_saved(cls, saved: SavedDir) -> "SpreadingIndex":
    path = saved.path
    meta = _read_meta(saved)
    sums = meta["sha256"]
    q = quantizers.from_meta(meta["quantizer"],
                             lambda rel: saved.read(rel, sha256=sums[rel]), path)
    model = TrainResult._from_saved(saved, _MODEL + "/", sums)  # pylint: disable=protected-access
    if (model.d_in, model.config.d_out, q.d) != (meta["d_in"], meta["d_out"], meta["d_out"]):
      raise ValueError(f"{path}/{_META} says d_in={meta['d_in']} d_out={meta['d_out']} but "
                       f"the model has d_in={model.d_in} d_out={model.config.d_out} and "
                       f"the quantizer d={q.d}")
    codes = _read_codes(saved, q, meta["ntotal"], sums[_CODES])
    index = cls(model, q)
    index._codes = codes
    return index


# Loads retried when a concurrent save replaced the index while it was being read.
_LOAD_TRIES = 5


def _read_codes(saved: SavedDir, q: quantizers.Quantizer, ntotal: int, digest: str
                ) -> np.ndarray:
  """codes.npy of ``saved``: read once, checksummed, parsed from the same bytes. The
  header's shape is compared with index.json and the file's real size before the array
  is made (a small file declaring (10^12, 2) allocates nothing)."""
  codes_path = saved.full(_CODES)
  width, dtype = q.code_width, np.dtype(q.code_dtype)
  data = ntotal * width * dtype.itemsize
  blob = saved.read(_CODES, max_size=data + _NPY_MAX_HEADER,
                    why=f" for ntotal={ntotal} codes of {width} x {dtype}", sha256=digest)
  f = io.BytesIO(blob)
  try:
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(f)]
    shape, fortran, stored = read_header(f, max_header_size=_NPY_MAX_HEADER)
  except (ValueError, OSError, EOFError, SyntaxError, KeyError) as e:
    raise ValueError(f"{codes_path} is not a readable .npy file: {e}") from e
  if tuple(shape) != (ntotal, width) or np.dtype(stored) != dtype or fortran \
      or len(blob) - f.tell() != data:
    raise ValueError(f"{codes_path} declares shape {tuple(shape)} {np.dtype(stored)} in "
                     f"{len(blob)} bytes; index.json says ntotal={ntotal} codes of "
                     f"{width} x {dtype} ({q.name})")
  return np.frombuffer(blob, dtype, count=ntotal * width, offset=f.tell()).reshape(
      ntotal, width)


# The largest .npy header read (numpy's own default limit is 10000 bytes).
_NPY_MAX_HEADER = 1 << 16


def _safe_relative(rel: str) -> bool:
  """True for a relative path of plain names joined by "/" (nothing that leaves the
  directory: no "..", no absolute path, no backslash or drive)."""
  if not isinstance(rel, str) or not rel or "\\" in rel or "\0" in rel or ":" in rel:
    return False
  parts = rel.split("/")
  return not rel.startswith("/") and all(p not in ("", ".", "..") for p in parts)


def _read_meta(saved: SavedDir) -> dict:
  """index.json of ``saved``, validated; every file the loader reads must be listed with
  a sha256 (each file is checked when it is read)."""
  path = saved.path
  meta_path = saved.full(_META)
  meta = _parse_json(meta_path, saved.read(_META, max_size=_MAX_JSON_BYTES))
  if not isinstance(meta, dict) or meta.get("kind") != _KIND:
    raise ValueError(f"{meta_path} does not describe a spreading_jax index")
  check_format_version(path, "index", meta.get("format_version"), FORMAT_VERSION)
  for key in ("d_in", "d_out", "ntotal"):
    value = meta.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
      raise ValueError(f"{meta_path}: {key}={value!r} must be a non-negative integer")
  sums = meta.get("sha256")
  if not isinstance(sums, dict) or not all(
      isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) for v in sums.values()):
    raise ValueError(f"{meta_path}: sha256 must map file names to hex sha256 digests")
  if not isinstance(meta.get("quantizer"), dict):
    raise ValueError(f"{meta_path}: quantizer must be a JSON object")
  root = os.path.realpath(path)
  for rel in sums:
    full = os.path.realpath(os.path.join(root, rel))
    if not _safe_relative(rel) or os.path.commonpath([root, full]) != root:
      raise ValueError(f"{meta_path} lists {rel!r}, which is not a file inside the index")
  # Every file the loader reads: the codes, the quantizer's files, all of model/.
  required = {_CODES, *quantizers.from_meta(meta["quantizer"]).state_files,
              *saved.files_under(_MODEL)}
  missing = sorted(required - set(sums))
  if missing:
    raise ValueError(f"{meta_path} lists no checksum for {', '.join(missing)}: the index "
                     "is incomplete or was edited")
  for rel in sums:
    if not saved.is_file(rel):
      if saved.replaced():
        raise saved.changed()
      raise ValueError(f"{saved.full(rel)} is missing from the index (or is not a regular "
                       "file)")
  return meta


def _writer_is_gone(tmp: str) -> bool:
  """True when the temporary directory ``tmp`` belongs to a save of this host whose
  process no longer runs, or to a save that finished writing (index.json present)."""
  try:
    with open(os.path.join(tmp, _WRITER)) as f:
      writer = json.load(f)
  except (OSError, ValueError):
    return _is_our_index(tmp)
  if not isinstance(writer, dict) or writer.get("host") != socket.gethostname():
    return False
  pid = writer.get("pid")
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except OSError:
    return False
  return False


def _is_our_index(directory: str) -> bool:
  try:
    with open(os.path.join(directory, _META)) as f:
      return json.load(f).get("kind") == _KIND
  except (OSError, ValueError, AttributeError, RecursionError):
    return False


def _remove_stale_copies(path: str) -> None:
  """Deletes ``.{name}.<random>.tmp`` and ``.old`` directories beside ``path`` that an
  interrupted save of an index left (never another program's or a running save's)."""
  parent, name = os.path.split(os.path.abspath(path))
  pattern = re.compile(r"\." + re.escape(name) + r"\.[0-9a-f]+\.(tmp|old)")
  try:
    entries = os.listdir(parent)
  except OSError:
    return
  for entry in entries:
    m = pattern.fullmatch(entry)
    full = os.path.join(parent, entry)
    if not m or os.path.islink(full) or not os.path.isdir(full):
      continue
    stale = _writer_is_gone(full) if m.group(1) == "tmp" else _is_our_index(full)
    if stale:
      shutil.rmtree(full, ignore_errors=True)
