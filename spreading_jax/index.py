"""SpreadingIndex: a trained catalyzer plus a quantizer (Zn lattice or sign bits) over a
database of codes, with streaming add, exact search over codes, and checksummed save/load.
"""
from __future__ import annotations

import hashlib
import json
import os

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from spreading_jax import binary, lattice, search, sharding
from spreading_jax._validation import check_int, check_vectors
from spreading_jax.train import TrainResult

FORMAT_VERSION = 1
_KIND = "spreading_jax.index"
_QUANTIZERS = ("zn", "sign")


def _file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


class SpreadingIndex:
  """Catalyzer + quantizer index.

  Args:
    model: a trained ``TrainResult``.
    quantizer: "zn" (Zn sphere lattice codes, asymmetric search) or "sign" (d_out sign
      bits, Hamming search).
    bits: code size for "zn"; the model's own lattice radius is used when it fits.

  Example::

    index = SpreadingIndex(model, "zn", bits=64)
    index.add(xb)
    D, I = index.search(xq, 10)
  """

  def __init__(self, model: TrainResult, quantizer: str = "zn", bits: int = 64):
    if quantizer not in _QUANTIZERS:
      raise ValueError(f"quantizer={quantizer!r} must be one of {_QUANTIZERS}")
    self.model = model
    self.quantizer = quantizer
    self.bits = check_int("bits", bits, minimum=1)
    d_out = model.config.d_out
    if quantizer == "zn":
      r2 = model.config.r2
      if r2 is None or lattice.ZnSphereCodec(d_out, r2).code_bits > self.bits:
        try:
          r2 = lattice.zn_r2_for_bits(d_out, self.bits)
        except ValueError as e:
          raise ValueError(f"d_out={d_out} does not fit a {self.bits}-bit lattice code: {e}") from e
      self.codec = lattice.ZnSphereCodec(d_out, r2)
      self._width = self.codec.code_words
      self._dtype = np.uint32
    else:
      self.codec = None
      self._width = binary.num_bytes(d_out)
      self._dtype = np.uint8
    self._chunks: list[np.ndarray] = []
    self._codes_cache: np.ndarray | None = None

  # -------------------------------------------------------------------------------------
  @property
  def d(self) -> int:
    return self.model.d_in

  @property
  def ntotal(self) -> int:
    return sum(c.shape[0] for c in self._chunks)

  @property
  def code_bits(self) -> int:
    return self.codec.code_bits if self.quantizer == "zn" else self.model.config.d_out

  @property
  def bytes_per_vector(self) -> int:
    """Size of one code in bytes: ceil(code_bits / 8) (8 for a 64-bit code)."""
    return (self.code_bits + 7) // 8

  @property
  def codes(self) -> np.ndarray:
    """All codes: u32[ntotal, code_words] ("zn") or u8[ntotal, bytes] ("sign")."""
    if self._codes_cache is None:
      self._codes_cache = (np.concatenate(self._chunks) if self._chunks
                           else np.zeros((0, self._width), self._dtype))
      self._chunks = [self._codes_cache] if self._chunks else []
    return self._codes_cache

  def info(self) -> str:
    return (f"SpreadingIndex quantizer={self.quantizer} d_in={self.d} "
            f"d_out={self.model.config.d_out} code_bits={self.code_bits} "
            f"bytes_per_vector={self.bytes_per_vector} ntotal={self.ntotal}"
            + (f" r2={self.codec.r2}" if self.codec is not None else ""))

  def __repr__(self):
    return self.info()

  # -------------------------------------------------------------------------------------
  def encode(self, x) -> np.ndarray:
    """Raw vectors f32[n, d_in] -> codes (see ``codes``)."""
    y = self.model.apply(x)
    if self.quantizer == "zn":
      return np.asarray(self.codec.encode(y), np.uint32)
    return np.asarray(binary.sign_codes(y), np.uint8)

  def add(self, x, chunk: int = 65536) -> None:
    """Encodes and appends x: [n, d_in] (numpy or memory map), ``chunk`` rows at a time."""
    check_vectors("x", x, d=self.d, d_name="d_in")
    chunk = check_int("chunk", chunk, minimum=1)
    n = x.shape[0]
    for start in tqdm(range(0, n, chunk), desc="add", unit="chunk", disable=n <= chunk):
      self._chunks.append(self.encode(np.asarray(x[start:start + chunk], np.float32)))
      self._codes_cache = None

  def reconstruct(self, ids) -> np.ndarray:
    """Decoded unit vectors in catalyzer space: i[m] -> f32[m, d_out]."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= self.ntotal):
      raise ValueError(f"ids must lie in [0, {self.ntotal})")
    codes = self.codes[ids]
    if self.quantizer == "zn":
      return np.asarray(self.codec.decode(codes), np.float32)
    signs = np.asarray(binary.unpack(codes, self.model.config.d_out), np.float32)
    return signs / np.sqrt(self.model.config.d_out)

  def search(self, xq, k: int, mesh: Mesh | None = None):
    """k nearest database vectors of raw queries xq: [nq, d_in].

    Returns (D, I): "zn": D f32[nq, k] inner products (descending), "sign": D i32[nq, k]
    Hamming distances (ascending); I i32[nq, k]. Sharded over ``mesh``, or over all local
    devices when there are several.
    """
    if self.ntotal == 0:
      raise ValueError("the index is empty: add vectors before searching")
    check_vectors("xq", xq, d=self.d, d_name="d_in")
    k = check_int("k", k, minimum=1)
    if k > self.ntotal:
      raise ValueError(f"k={k} is larger than ntotal={self.ntotal}")
    if mesh is None and jax.local_device_count() > 1:
      mesh = sharding.make_mesh(jax.local_device_count())
    yq = self.model.apply(xq)
    if self.quantizer == "zn":
      D, I = search.search_lattice(yq, self.codes, self.codec, k, mesh=mesh)
    else:
      D, I = search.hamming_knn(binary.sign_codes(yq), self.codes, k, mesh=mesh)
    return np.asarray(D), np.asarray(I)

  # -------------------------------------------------------------------------------------
  def save(self, path) -> None:
    """Writes the index atomically to directory ``path``: model/, codes.npy, index.json."""
    from spreading_jax.data import atomic_output_dir
    with atomic_output_dir(path) as tmp:
      self.model.save(os.path.join(tmp, "model"))
      np.save(os.path.join(tmp, "codes.npy"), self.codes)
      files = {}
      for root, _, names in os.walk(tmp):
        for name in names:
          full = os.path.join(root, name)
          files[os.path.relpath(full, tmp)] = _file_sha256(full)
      meta = {"format_version": FORMAT_VERSION, "kind": _KIND, "quantizer": self.quantizer,
              "bits": self.bits, "d_in": self.d, "d_out": self.model.config.d_out,
              "r2": self.codec.r2 if self.codec is not None else None,
              "ntotal": self.ntotal, "sha256": files}
      with open(os.path.join(tmp, "index.json"), "w") as f:
        json.dump(meta, f, indent=2)

  @classmethod
  def load(cls, path) -> "SpreadingIndex":
    """Reads an index written by ``save``; ValueError names what is missing or corrupt."""
    path = os.fspath(path)
    meta_path = os.path.join(path, "index.json")
    if not os.path.isfile(meta_path):
      raise ValueError(f"{path} is not a saved index (index.json missing)")
    try:
      with open(meta_path) as f:
        meta = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{meta_path} is corrupt: {e}") from e
    if not isinstance(meta, dict) or meta.get("kind") != _KIND:
      raise ValueError(f"{meta_path} does not describe a spreading_jax index")
    if meta.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{path} has index format version {meta.get('format_version')}, "
                       f"this library reads version {FORMAT_VERSION}")
    for rel, digest in meta.get("sha256", {}).items():
      full = os.path.join(path, rel)
      if not os.path.isfile(full):
        raise ValueError(f"{full} is missing from the index")
      if _file_sha256(full) != digest:
        raise ValueError(f"{full} is truncated or corrupt (checksum mismatch)")
    if "codes.npy" not in meta.get("sha256", {}):
      raise ValueError(f"{meta_path} lists no codes.npy checksum")
    model = TrainResult.load(os.path.join(path, "model"))
    index = cls(model, meta["quantizer"], meta["bits"])
    if index.codec is not None and index.codec.r2 != meta["r2"]:
      raise ValueError(f"{meta_path} says r2={meta['r2']} but the model gives r2={index.codec.r2}")
    codes = np.load(os.path.join(path, "codes.npy"))
    if codes.shape != (meta["ntotal"], index._width) or codes.dtype != index._dtype:
      raise ValueError(f"codes.npy has shape {codes.shape} dtype {codes.dtype}, expected "
                       f"({meta['ntotal']}, {index._width}) {np.dtype(index._dtype)}")
    index._chunks = [codes] if len(codes) else []
    return index
