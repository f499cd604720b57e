"""SpreadingIndex: a trained catalyzer plus a quantizer (Zn lattice or sign bits) over a
database of codes, with streaming add, exact search over codes, and checksummed save/load.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from spreading_jax import binary, lattice, search, sharding
from spreading_jax._files import atomic_output_dir, sha256_file
from spreading_jax._validation import check_int, check_vectors
from spreading_jax.model import TrainResult

FORMAT_VERSION = 1
_KIND = "spreading_jax.index"
_QUANTIZERS = ("zn", "sign")
_FAISS_FILE = "faiss.index"


class SpreadingIndex:
  """Catalyzer + quantizer index.

  Args:
    model: a trained ``TrainResult``.
    quantizer: "zn" (Zn sphere lattice codes, asymmetric search on every local device),
      "sign" (d_out sign bits, Hamming search on every local device), or a faiss
      index-factory string such as "OPQ8_32,PQ8" or "PQ8" applied to the catalyzed vectors
      (the catalyzer as preprocessing for any faiss quantizer; needs ``train`` before
      ``add``, searched by faiss on the CPU).
    bits: code size. "zn": default 64, the model's own lattice radius is used when it
      fits, else the largest radius that does. "sign": must be d_out when given. faiss:
      must equal the factory's code size when given.

  Example::

    index = SpreadingIndex(model, "zn", bits=64)
    index.add(xb)
    D, I = index.search(xq, 10)

    opq = SpreadingIndex(model, "OPQ8_32,PQ8")
    opq.train(xt)  # faiss quantizers learn from (catalyzed) training vectors
    opq.add(xb)
  """

  def __init__(self, model: TrainResult, quantizer: str = "zn", bits: int | None = None):
    if not isinstance(quantizer, str) or not quantizer:
      raise ValueError(f"quantizer={quantizer!r} must be 'zn', 'sign' or a faiss factory string")
    self.model = model
    self.quantizer = quantizer
    self.faiss_index = None
    d_out = model.config.d_out
    if bits is not None:
      bits = check_int("bits", bits, minimum=1)
    if quantizer == "zn":
      self.bits = 64 if bits is None else bits
      r2 = model.config.r2
      if r2 is None or lattice.ZnSphereCodec(d_out, r2).code_bits > self.bits:
        try:
          r2 = lattice.zn_r2_for_bits(d_out, self.bits)
        except ValueError as e:
          raise ValueError(f"d_out={d_out} does not fit a {self.bits}-bit lattice code: {e}") from e
      self.codec = lattice.ZnSphereCodec(d_out, r2)
      self._width = self.codec.code_words
      self._dtype = np.uint32
    elif quantizer == "sign":
      if bits is not None and bits != d_out:
        raise ValueError(f"the sign quantizer has one bit per output dimension: bits={bits} "
                         f"but the model's d_out={d_out}")
      self.bits = d_out
      self.codec = None
      self._width = binary.num_bytes(d_out)
      self._dtype = np.uint8
    else:
      from spreading_jax import baselines  # pylint: disable=import-outside-toplevel
      try:
        self.faiss_index = baselines.build_index(quantizer, d_out)
      except ValueError as e:
        raise ValueError(f"quantizer={quantizer!r} is neither 'zn', 'sign' nor a faiss "
                         f"index-factory string that builds on d_out={d_out}: {e}") from e
      self.bits = baselines.index_code_bits(self.faiss_index)
      if bits is not None and bits != self.bits:
        raise ValueError(f"faiss quantizer {quantizer!r} on d_out={d_out} makes "
                         f"{self.bits}-bit codes, not bits={bits}")
      self.codec = None
    self._chunks: list[np.ndarray] = []
    self._codes_cache: np.ndarray | None = None

  # -------------------------------------------------------------------------------------
  @property
  def d(self) -> int:
    return self.model.d_in

  @property
  def is_faiss(self) -> bool:
    """True when the quantizer is a faiss index on the catalyzed vectors."""
    return self.faiss_index is not None

  @property
  def is_trained(self) -> bool:
    """False only for a faiss quantizer that still needs ``train``."""
    return not self.is_faiss or bool(self.faiss_index.is_trained)

  @property
  def ntotal(self) -> int:
    if self.is_faiss:
      return int(self.faiss_index.ntotal)
    return sum(c.shape[0] for c in self._chunks)

  @property
  def code_bits(self) -> int:
    if self.quantizer == "zn":
      return self.codec.code_bits
    return self.bits

  @property
  def bytes_per_vector(self) -> int:
    """Size of one code in bytes: ceil(code_bits / 8) (8 for a 64-bit code)."""
    return (self.code_bits + 7) // 8

  @property
  def codes(self) -> np.ndarray:
    """All codes: u32[ntotal, code_words] ("zn"), u8[ntotal, bytes] ("sign", and faiss
    quantizers that store flat codes such as PQ/OPQ/SQ)."""
    if self.is_faiss:
      return self._faiss_codes()
    if self._codes_cache is None:
      self._codes_cache = (np.concatenate(self._chunks) if self._chunks
                           else np.zeros((0, self._width), self._dtype))
      self._chunks = [self._codes_cache] if self._chunks else []
    return self._codes_cache

  def _faiss_codes(self) -> np.ndarray:
    import faiss  # pylint: disable=import-outside-toplevel
    inner = faiss.downcast_index(self.faiss_index)
    if isinstance(inner, faiss.IndexPreTransform):
      inner = faiss.downcast_index(inner.index)
    if not isinstance(inner, faiss.IndexFlatCodes):
      raise ValueError(f"faiss quantizer {self.quantizer!r} does not store flat codes "
                       f"({type(inner).__name__}); use faiss_index directly")
    return faiss.vector_to_array(inner.codes).reshape(self.ntotal, inner.code_size)

  def info(self) -> str:
    return (f"SpreadingIndex quantizer={self.quantizer} d_in={self.d} "
            f"d_out={self.model.config.d_out} code_bits={self.code_bits} "
            f"bytes_per_vector={self.bytes_per_vector} ntotal={self.ntotal}"
            + (f" r2={self.codec.r2}" if self.codec is not None else ""))

  def __repr__(self):
    return self.info()

  def train(self, x, max_train: int = 100_000, seed: int = 0) -> None:
    """Trains a faiss quantizer on catalyzed training vectors x: [n, d_in] (at most
    ``max_train`` rows, drawn with ``seed``). A no-op for "zn" and "sign", which have no
    parameters. Never pass the queries here."""
    check_vectors("x", x, d=self.d, d_name="d_in")
    if not self.is_faiss:
      return
    from spreading_jax.datasets import sample_rows  # pylint: disable=import-outside-toplevel
    xt = np.asarray(sample_rows(x, max_train, seed), np.float32)
    y = np.ascontiguousarray(self.model.apply(xt), np.float32)
    self.faiss_index.train(y)

  # -------------------------------------------------------------------------------------
  def encode(self, x) -> np.ndarray:
    """Raw vectors f32[n, d_in] -> codes (see ``codes``)."""
    y = self.model.apply(x)
    if self.is_faiss:
      self._require_trained()
      return self.faiss_index.sa_encode(np.ascontiguousarray(y, np.float32))
    if self.quantizer == "zn":
      return np.asarray(self.codec.encode(y), np.uint32)
    return np.asarray(binary.sign_codes(y), np.uint8)

  def add(self, x, chunk: int = 65536) -> None:
    """Encodes and appends x: [n, d_in] (numpy or memory map), ``chunk`` rows at a time."""
    check_vectors("x", x, d=self.d, d_name="d_in")
    chunk = check_int("chunk", chunk, minimum=1)
    self._require_trained()
    n = x.shape[0]
    for start in tqdm(range(0, n, chunk), desc="add", unit="chunk", disable=n <= chunk):
      xb = np.asarray(x[start:start + chunk], np.float32)
      if self.is_faiss:
        self.faiss_index.add(np.ascontiguousarray(self.model.apply(xb), np.float32))
      else:
        self._chunks.append(self.encode(xb))
        self._codes_cache = None

  def _require_trained(self) -> None:
    if not self.is_trained:
      raise ValueError(f"faiss quantizer {self.quantizer!r} is not trained: call "
                       "index.train(training_vectors) before add/encode")

  def reconstruct(self, ids) -> np.ndarray:
    """Decoded unit vectors in catalyzer space: i[m] -> f32[m, d_out]."""
    ids = np.asarray(ids)
    if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"ids must be a 1-D integer array, got shape {ids.shape} dtype {ids.dtype}")
    if ids.size and (ids.min() < 0 or ids.max() >= self.ntotal):
      raise ValueError(f"ids must lie in [0, {self.ntotal})")
    if self.is_faiss:
      return self.faiss_index.reconstruct_batch(ids.astype(np.int64))
    codes = self.codes[ids]
    if self.quantizer == "zn":
      return np.asarray(self.codec.decode(codes), np.float32)
    signs = np.asarray(binary.unpack(codes, self.model.config.d_out), np.float32)
    return signs / np.sqrt(self.model.config.d_out)

  def search(self, xq, k: int, mesh: Mesh | None = None):
    """k nearest database vectors of raw queries xq: [nq, d_in].

    Returns (D, I): "zn": D f32[nq, k] inner products (descending), "sign": D i32[nq, k]
    Hamming distances (ascending), faiss: D f32[nq, k] faiss' distances (squared L2 for
    PQ/OPQ, ascending); I i32[nq, k]. "zn" and "sign" are sharded over ``mesh``, or over
    all local devices when there are several; faiss searches on the CPU.
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
    if self.is_faiss:
      D, I = self.faiss_index.search(np.ascontiguousarray(yq, np.float32), k)
      return D, I.astype(np.int32)
    if self.quantizer == "zn":
      D, I = search.search_lattice(yq, self.codes, self.codec, k, mesh=mesh)
    else:
      D, I = search.hamming_knn(binary.sign_codes(yq), self.codes, k, mesh=mesh)
    return np.asarray(D), np.asarray(I)

  # -------------------------------------------------------------------------------------
  def save(self, path) -> None:
    """Writes the index atomically to directory ``path``: model/, codes.npy, index.json."""
    with atomic_output_dir(path) as tmp:
      self.model.save(os.path.join(tmp, "model"))
      if self.is_faiss:
        import faiss  # pylint: disable=import-outside-toplevel
        faiss.write_index(self.faiss_index, os.path.join(tmp, _FAISS_FILE))
      else:
        np.save(os.path.join(tmp, "codes.npy"), self.codes)
      files = {}
      for root, _, names in os.walk(tmp):
        for name in names:
          full = os.path.join(root, name)
          files[os.path.relpath(full, tmp)] = sha256_file(full)
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
      if sha256_file(full) != digest:
        raise ValueError(f"{full} is truncated or corrupt (checksum mismatch)")
    data_file = "codes.npy" if meta.get("quantizer") in _QUANTIZERS else _FAISS_FILE
    if data_file not in meta.get("sha256", {}):
      raise ValueError(f"{meta_path} lists no {data_file} checksum")
    model = TrainResult.load(os.path.join(path, "model"))
    index = cls(model, meta["quantizer"], None if meta["quantizer"] == "sign" else meta["bits"])
    if index.is_faiss:
      import faiss  # pylint: disable=import-outside-toplevel
      stored = faiss.read_index(os.path.join(path, _FAISS_FILE))
      if stored.d != model.config.d_out or stored.ntotal != meta["ntotal"]:
        raise ValueError(f"{path}/{_FAISS_FILE} has d={stored.d} ntotal={stored.ntotal}, "
                         f"expected d={model.config.d_out} ntotal={meta['ntotal']}")
      index.faiss_index = stored
      return index
    if index.codec is not None and index.codec.r2 != meta["r2"]:
      raise ValueError(f"{meta_path} says r2={meta['r2']} but the model gives r2={index.codec.r2}")
    codes = np.load(os.path.join(path, "codes.npy"))
    if codes.shape != (meta["ntotal"], index._width) or codes.dtype != index._dtype:
      raise ValueError(f"codes.npy has shape {codes.shape} dtype {codes.dtype}, expected "
                       f"({meta['ntotal']}, {index._width}) {np.dtype(index._dtype)}")
    index._chunks = [codes] if len(codes) else []
    return index
