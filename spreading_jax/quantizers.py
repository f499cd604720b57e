"""Quantizers: catalyzed vectors (unit rows f32[n, d]) -> compact codes, and search over codes.

One interface, ``Quantizer``, and a registry of named implementations:

- "lattice", ``ZnQuantizer``: the spherical Zn lattice (``lattice.ZnSphereCodec``), exact
  integer codes as u32 words, asymmetric search on every local device (the paper's main
  quantizer).
- "sign", ``SignQuantizer``: one sign bit per dimension packed into u8 bytes, Hamming search.
- any other name, ``FaissQuantizer``: a faiss standalone codec built from an index-factory
  string ("PQ8", "OPQ8_32,PQ8", "SQ8", "IVF256,PQ8", "LSH64", "ITQ64"): the catalyzer as
  preprocessing for a learned quantizer. It needs ``train`` and searches on the CPU.

A quantizer holds only its parameters; the codes live with the caller (``SpreadingIndex``,
the evaluation protocols), so every quantizer is used the same way::

  q = make_quantizer("lattice", d=24, bits=64)
  q.train(y_train)                        # a no-op unless q.needs_training
  codes = encode_in_chunks(q.encode, yb)  # u32[nb, 2]
  D, I = q.search(yq, codes, k=10)

Names: one per quantizer, the same everywhere (``TrainConfig.quantizer``, training's
validation metrics ``{name}_R@k``, ``SpreadingIndex``, the CLI, a saved index's
``index.json``). "zn", the lattice quantizer's name in the index, the CLI and saved indexes
before issue 29, is an alias (``ALIASES``): it is still accepted everywhere and saved
indexes that say "zn" load; what is written says "lattice".

A new quantizer is one ``Quantizer`` subclass in its own module, registered there with
``register_quantizer(name, cls)``, plus the import of that module in
``spreading_jax/__init__.py``: ``make_quantizer``, ``for_model`` and ``from_meta`` (the index,
the CLI, ``encode_file``), ``TrainConfig.quantizer`` and training's validation, the
screening of ``selection.py``, the logs, TensorBoard and the plots then know it by name.
"""
from __future__ import annotations

import abc
import os
from typing import Callable

import numpy as np
from jax.sharding import Mesh

from spreading_jax import binary, faiss_factory, lattice, search
from spreading_jax._validation import check_int, check_vectors
from spreading_jax.catalyzer import l2_normalize

LATTICE, SIGN = "lattice", "sign"
ZN = LATTICE  # the name before issue 29 (see ALIASES)
# Old spellings -> names. "zn": the lattice quantizer in SpreadingIndex, the CLI's
# --quantizer and index.json before issue 29.
ALIASES = {"zn": LATTICE}
# Quantizers that training validates besides its own (``TrainConfig.quantizer``), in the
# order of the history's keys.
VALIDATED = (LATTICE, SIGN)
_FAISS_FILE = "quantizer.faiss"


def encode_in_chunks(fn: Callable[[np.ndarray], np.ndarray], x, chunk: int = 65536
                     ) -> np.ndarray:
  """``fn`` over the rows of x, ``chunk`` rows at a time, results concatenated.

  Only one chunk of x is read at a time (x may be a memory map larger than RAM) and the
  intermediates of ``fn`` stay bounded by the chunk.

  Args:
    fn: rows [m, ...] -> array [m, ...] (an encoder, a catalyzer's apply, or both).
    x: [n, ...] array or memory map.
    chunk: rows per call.

  Returns:
    ``fn``'s outputs for all n rows, in order.

  Example:
    >>> encode_in_chunks(lambda r: r * 2, np.arange(5).reshape(5, 1), chunk=2).ravel()
    array([0, 2, 4, 6, 8])
  """
  chunk = check_int("chunk", chunk, minimum=1)
  n = x.shape[0]
  parts = [np.asarray(fn(np.asarray(x[s:s + chunk]))) for s in range(0, n, chunk)]
  if not parts:
    return np.asarray(fn(np.asarray(x[:0])))
  return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


class Quantizer(abc.ABC):
  """Maps catalyzed vectors f32[n, d] to codes [n, code_width] and searches over codes.

  Attributes:
    name: the name ``make_quantizer`` takes ("zn", "sign" or a faiss factory string).
    d: input dimension (the catalyzer's d_out).
  """

  name: str
  d: int
  state_files: tuple[str, ...] = ()  # what ``save`` writes into a directory

  # -- construction (what the registry calls) ----------------------------------------------
  @classmethod
  def make(cls, name: str, d: int, bits: int | None = None, **params) -> "Quantizer":
    """The quantizer called ``name`` on d dimensions with a ``bits`` code (None: its
    default); ``params`` are the extra fields of its ``meta()`` (e.g. "r2")."""
    raise NotImplementedError

  @classmethod
  def for_config(cls, name: str, config, bits: int | None = None) -> "Quantizer":
    """The quantizer a model trained with ``config`` (a ``TrainConfig``) uses on its d_out
    outputs, for a ``bits`` code (None: the quantizer's default on d_out)."""
    return cls.make(name, config.d_out, bits)

  @classmethod
  def shape_param(cls, d: int, bits: int) -> int | None:
    """The ``TrainConfig.r2`` that goes with output dimension d at a ``bits`` code (raises
    ValueError when there is none); None for quantizers without such a parameter."""
    del d, bits
    return None

  @classmethod
  def candidate_shapes(cls, bits: int, d_outs) -> list[tuple[int, int | None]]:
    """(d_out, r2) pairs that ``selection.py`` screens at a ``bits`` code: each of
    ``d_outs`` on which the quantizer makes ``bits``-bit codes, with its ``shape_param``."""
    out = []
    for d in d_outs:
      try:
        r2 = cls.shape_param(int(d), bits)
        cls.make("", int(d), bits, **({} if r2 is None else {"r2": r2}))
      except ValueError:
        continue  # d does not fit this budget
      out.append((int(d), r2))
    return out

  # -- sizes ------------------------------------------------------------------------------
  @property
  @abc.abstractmethod
  def code_bits(self) -> int:
    """Bits of information per code."""

  @property
  def bytes_per_vector(self) -> int:
    """Bytes one code takes on disk and in memory."""
    return self.code_width * np.dtype(self.code_dtype).itemsize

  @property
  @abc.abstractmethod
  def code_width(self) -> int:
    """Columns of a code array."""

  @property
  @abc.abstractmethod
  def code_dtype(self) -> type:
    """dtype of a code array (np.uint32 words or np.uint8 bytes)."""

  def empty_codes(self) -> np.ndarray:
    """A code array of zero rows: [0, code_width]."""
    return np.zeros((0, self.code_width), self.code_dtype)

  def check_codes(self, name: str, codes) -> None:
    """Raises ValueError unless ``codes`` is a [n, code_width] array of ``code_dtype``."""
    shape = getattr(codes, "shape", None)
    if (shape is None or len(shape) != 2 or shape[1] != self.code_width
        or np.dtype(codes.dtype) != np.dtype(self.code_dtype)):
      raise ValueError(f"{name} has shape {shape} dtype {getattr(codes, 'dtype', None)}; "
                       f"{self.name} codes are [n, {self.code_width}] "
                       f"{np.dtype(self.code_dtype)}")

  # -- training ---------------------------------------------------------------------------
  @property
  def needs_training(self) -> bool:
    """True while ``train`` must run before ``encode`` (faiss quantizers)."""
    return False

  def train(self, y) -> None:
    """Learns the quantizer's parameters from catalyzed training vectors f32[n, d] (never
    the queries). A no-op for parameter-free quantizers."""
    check_vectors("y", y, d=self.d)

  # -- codes ------------------------------------------------------------------------------
  @abc.abstractmethod
  def encode(self, y) -> np.ndarray:
    """Catalyzed vectors f32[n, d] -> codes [n, code_width] of ``code_dtype``."""

  @property
  def encode_core(self) -> Callable | None:
    """A traceable, hashable ``f32[n, d] -> codes`` that ``SpreadingIndex`` compiles into
    the catalyzer's forward program, so that codes come back from the device instead of
    floats; None where encoding runs outside JAX (faiss)."""
    return None

  @abc.abstractmethod
  def decode(self, codes) -> np.ndarray:
    """Codes [n, code_width] -> reconstructed vectors f32[n, d]."""

  @abc.abstractmethod
  def search(self, yq, codes, k: int, mesh: Mesh | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """k nearest codes of catalyzed queries yq: f32[nq, d].

    Returns:
      (D [nq, k], I i32[nq, k]); the order of D is the quantizer's (see each class).
    """

  def search_vectors(self, yq, yb, k: int, mesh: Mesh | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """k nearest of catalyzed queries yq among the quantized database vectors yb:
    f32[nb, d], whose codes are not kept (the evaluation protocols, training's
    validation). Default: ``search(yq, encode(yb))``."""
    return self.search(yq, encode_in_chunks(self.encode, yb), k, mesh=mesh)

  # -- persistence ------------------------------------------------------------------------
  def meta(self) -> dict:
    """JSON-able description that ``from_meta`` turns back into this quantizer."""
    return {"name": self.name, "d": self.d, "code_bits": self.code_bits}

  def save(self, directory: str) -> None:
    """Writes the learned parameters into ``directory`` (the files ``state_files``)."""
    del directory

  def load_state(self, read: Callable[[str], bytes], directory: str = "") -> None:
    """Restores what ``save`` wrote (called by ``from_meta``); ``read(name)`` returns the
    bytes of the saved file ``name`` (one of ``state_files``) of ``directory``."""
    del read, directory

  def describe(self) -> str:
    """A short description for result tables (e.g. "Zn lattice (d=24, r2=79)")."""
    return f"{self.name} ({self.code_bits} bits)"

  def __repr__(self) -> str:
    return f"{type(self).__name__}(name={self.name!r}, d={self.d}, code_bits={self.code_bits})"


class ZnQuantizer(Quantizer):
  """Zn sphere lattice codes; asymmetric search (float queries against decoded points,
  descending inner products), or symmetric (queries quantized too) with ``symmetric``.

  Example:
    >>> q = ZnQuantizer(lattice.zn_codec(24, 64))
    >>> (q.name, q.code_bits, q.code_width, q.bytes_per_vector)
    ('lattice', 64, 2, 8)
  """

  def __init__(self, codec: lattice.ZnSphereCodec, symmetric: bool = False):
    if not isinstance(codec, lattice.ZnSphereCodec):
      raise ValueError(f"codec must be a lattice.ZnSphereCodec, got {type(codec).__name__}")
    self.codec, self.symmetric = codec, bool(symmetric)
    self.name, self.d = LATTICE, codec.d

  @classmethod
  def make(cls, name: str, d: int, bits: int | None = None, r2: int | None = None
           ) -> "ZnQuantizer":
    """The sphere of squared radius ``r2``, or the largest whose codes fit ``bits``
    (default 64 without ``r2``)."""
    return cls(lattice.zn_codec(d, 64 if bits is None and r2 is None else bits, r2))

  @classmethod
  def for_config(cls, name: str, config, bits: int | None = None) -> "ZnQuantizer":
    """The model's own lattice (``make_codec(config)``, the one it was validated or trained
    end to end with) when its codes fit ``bits`` (or ``bits`` is None), else the largest
    sphere whose codes fit ``bits``."""
    own = make_codec(config)
    if bits is None or own.code_bits <= check_int("bits", bits, minimum=1):
      return cls(own)
    return cls.make(name, config.d_out, bits)

  @classmethod
  def shape_param(cls, d: int, bits: int) -> int:
    """The largest r² whose Zn codes of dimension d fit ``bits``."""
    return lattice.zn_r2_for_bits(d, bits)

  @classmethod
  def candidate_shapes(cls, bits: int, d_outs) -> list[tuple[int, int]]:
    """Each of ``d_outs`` with the largest r² whose code fits ``bits`` (dimensions where
    none fits are skipped); no codec is built."""
    out = []
    for d in d_outs:
      try:
        out.append((int(d), lattice.zn_r2_for_bits(int(d), bits)))
      except ValueError:
        continue  # no sphere of Z^d fits this budget
    return out

  @property
  def code_bits(self) -> int:
    return self.codec.code_bits

  @property
  def code_width(self) -> int:
    return self.codec.code_words

  @property
  def code_dtype(self) -> type:
    return np.uint32

  @property
  def bytes_per_vector(self) -> int:
    """ceil(code_bits / 8): the bytes of the code's information (8 for a 64-bit code)."""
    return (self.code_bits + 7) // 8

  def encode(self, y) -> np.ndarray:
    return np.asarray(self.codec.encode(y), np.uint32)

  @property
  def encode_core(self) -> Callable:
    return self.codec.encode_core

  def decode(self, codes) -> np.ndarray:
    """Unit-norm lattice points f32[n, d]."""
    return np.asarray(self.codec.decode(codes), np.float32)

  def search(self, yq, codes, k: int, mesh: Mesh | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """D: f32[nq, k] inner products with the decoded points, descending."""
    D, I = search.search_lattice(yq, codes, self.codec, k, symmetric=self.symmetric,
                                 mesh=mesh)
    return np.asarray(D), np.asarray(I)

  def search_vectors(self, yq, yb, k: int, mesh: Mesh | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric search among the normalized nearest lattice points of yb, found without
    computing their codes (the protocol training has validated with since the first
    release). The points are ``l2_normalize(quantize(yb))``; ``decode`` scales by
    1/sqrt(r2) instead, which may differ in the last bit, so a near-tie can rank
    differently from ``search(yq, encode(yb))``."""
    if self.symmetric:
      return super().search_vectors(yq, yb, k, mesh)
    points = l2_normalize(self.codec.quantize(yb))
    D, I = search.knn(yq, points, k, metric="ip", mesh=mesh)
    return np.asarray(D), np.asarray(I)

  def meta(self) -> dict:
    return dict(super().meta(), r2=self.codec.r2)

  def describe(self) -> str:
    return f"Zn lattice (d={self.d}, r2={self.codec.r2})"


class SignQuantizer(Quantizer):
  """One sign bit per dimension (``binary.sign_codes``), symmetric Hamming search.

  Example:
    >>> q = SignQuantizer(24)
    >>> q.encode(np.ones((1, 24), np.float32)).tolist(), q.bytes_per_vector
    ([[255, 255, 255]], 3)
  """

  def __init__(self, d: int):
    self.name, self.d = SIGN, check_int("d", d, minimum=1)

  @classmethod
  def make(cls, name: str, d: int, bits: int | None = None) -> "SignQuantizer":
    if bits is not None and bits != d:
      raise ValueError(f"the sign quantizer has one bit per output dimension: bits={bits} "
                       f"but d={d}")
    return cls(d)

  @classmethod
  def candidate_shapes(cls, bits: int, d_outs=()) -> list[tuple[int, None]]:
    """The one shape of a ``bits``-bit sign code: d_out = bits."""
    return [(bits, None)]

  @property
  def code_bits(self) -> int:
    return self.d

  @property
  def code_width(self) -> int:
    return binary.num_bytes(self.d)

  @property
  def code_dtype(self) -> type:
    return np.uint8

  def encode(self, y) -> np.ndarray:
    check_vectors("y", y, d=self.d)
    return np.asarray(binary.sign_codes(y), np.uint8)

  @property
  def encode_core(self) -> Callable:
    return binary.sign_codes_core

  def decode(self, codes) -> np.ndarray:
    """The ±1 vertices scaled to unit norm, f32[n, d]."""
    return np.asarray(binary.unpack(codes, self.d), np.float32) / np.float32(np.sqrt(self.d))

  def search(self, yq, codes, k: int, mesh: Mesh | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    """D: i32[nq, k] Hamming distances, ascending.

    Raises ValueError naming ``yq`` or ``codes`` (the database codes) when either has the
    wrong shape or dtype."""
    check_vectors("yq", yq, d=self.d)
    # The database codes first: a wrong width must name them, not the queries' codes.
    self.check_codes("codes", codes)
    if yq.shape[0] == 0:  # no queries: empty results (k still checked against the codes)
      k = check_int("k", k, minimum=1, maximum=codes.shape[0])
      return np.zeros((0, k), np.int32), np.zeros((0, k), np.int32)
    D, I = search.hamming_knn(self.encode(yq), codes, k, mesh=mesh)
    return np.asarray(D), np.asarray(I)


class FaissQuantizer(Quantizer):
  """A faiss standalone codec (``sa_encode``/``sa_decode``) from an index-factory string,
  or "LSH{bits}" / "ITQ{bits}" (see ``faiss_factory.build_index``); searched by faiss on the
  CPU over an index filled with the given codes. D: faiss' distances (squared L2 for
  PQ/OPQ/SQ, ascending).
  """

  state_files = (_FAISS_FILE,)

  @classmethod
  def make(cls, name: str, d: int, bits: int | None = None) -> "FaissQuantizer":
    q = cls(name, d)
    if bits is not None and bits != q.code_bits:
      raise ValueError(f"faiss quantizer {name!r} on d={d} makes {q.code_bits}-bit codes, "
                       f"not bits={bits}")
    return q

  def __init__(self, factory: str, d: int):
    self.name, self.d = factory, check_int("d", d, minimum=1)
    try:
      self.index = faiss_factory.build_index(factory, self.d)
      self._code_size = int(self.index.sa_code_size())
    except (ValueError, RuntimeError) as e:
      raise ValueError(f"quantizer={factory!r} is neither one of {names()} nor a faiss "
                       f"index-factory string of a standalone codec on d={self.d}: {e}") from e
    self._filled: tuple[np.ndarray, object] | None = None

  @property
  def code_bits(self) -> int:
    return 8 * self._code_size

  @property
  def code_width(self) -> int:
    return self._code_size

  @property
  def code_dtype(self) -> type:
    return np.uint8

  @property
  def needs_training(self) -> bool:
    return not self.index.is_trained

  def _require_trained(self) -> None:
    if self.needs_training:
      raise ValueError(f"faiss quantizer {self.name!r} is not trained: call "
                       "train(training_vectors) before encoding")

  def train(self, y) -> None:
    check_vectors("y", y, d=self.d)
    try:
      self.index.train(np.ascontiguousarray(y, np.float32))
    except RuntimeError as e:
      raise ValueError(f"faiss quantizer {self.name!r} cannot train on {y.shape[0]} "
                       f"vectors: {e}") from e
    self._filled = None

  def encode(self, y) -> np.ndarray:
    check_vectors("y", y, d=self.d)
    self._require_trained()
    return self.index.sa_encode(np.ascontiguousarray(y, np.float32))

  def decode(self, codes) -> np.ndarray:
    self.check_codes("codes", codes)
    self._require_trained()
    try:
      return self.index.sa_decode(np.ascontiguousarray(codes))
    except RuntimeError as e:  # e.g. ITQ: its rotation has no inverse in faiss
      raise ValueError(f"faiss quantizer {self.name!r} cannot decode codes: {e}") from e

  def _index_over(self, codes: np.ndarray):
    """A copy of the trained index holding ``codes`` (reused while the same array is
    searched again)."""
    faiss = faiss_factory.faiss_module()
    if self._filled is not None and self._filled[0] is codes:
      return self._filled[1]
    filled = faiss.deserialize_index(faiss.serialize_index(self.index))
    # A pre-transform (OPQ, ITQ, PCA) encodes with its inner index: fill that one.
    target = faiss.downcast_index(filled)
    while isinstance(target, faiss.IndexPreTransform):
      target = faiss.downcast_index(target.index)
    try:
      target.add_sa_codes(np.ascontiguousarray(codes))
    except RuntimeError as e:
      raise ValueError(f"faiss quantizer {self.name!r} cannot search stored codes: {e}") from e
    node = faiss.downcast_index(filled)
    while isinstance(node, faiss.IndexPreTransform):  # keeps the wrappers' counts true
      node.ntotal = codes.shape[0]
      node = faiss.downcast_index(node.index)
    self._filled = (codes, filled)
    return filled

  def search(self, yq, codes, k: int, mesh: Mesh | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
    del mesh  # faiss searches on the CPU
    check_vectors("yq", yq, d=self.d)
    self.check_codes("codes", codes)
    self._require_trained()
    k = check_int("k", k, minimum=1, maximum=codes.shape[0])
    D, I = self._index_over(codes).search(np.ascontiguousarray(yq, np.float32), k)
    return D, I.astype(np.int32)

  def save(self, directory: str) -> None:
    faiss = faiss_factory.faiss_module()
    faiss.write_index(self.index, os.path.join(directory, _FAISS_FILE))

  def load_state(self, read: Callable[[str], bytes], directory: str = "") -> None:
    faiss = faiss_factory.faiss_module()
    path = os.path.join(directory, _FAISS_FILE)
    try:
      stored = faiss.deserialize_index(np.frombuffer(read(_FAISS_FILE), np.uint8))
    except RuntimeError as e:
      raise ValueError(f"{path} is a corrupt faiss index (faiss cannot read it: {e})") from e
    if stored.d != self.d or stored.ntotal != 0 or int(stored.sa_code_size()) != self._code_size:
      raise ValueError(f"{path} holds d={stored.d} ntotal={stored.ntotal}, not an empty "
                       f"{self.name!r} quantizer on d={self.d}")
    self.index, self._filled = stored, None


# ---------------------------------------------------------------------------------------
# The registry: the one place that maps names to quantizer classes.

_REGISTRY: dict[str, type[Quantizer]] = {}


def register_quantizer(name: str, cls: type[Quantizer]) -> type[Quantizer]:
  """Makes ``cls`` the quantizer called ``name`` (returns ``cls``).

  Raises:
    ValueError: ``name`` is taken (by another class or an alias) or ``cls`` is not a
      ``Quantizer`` subclass.
  """
  if not isinstance(name, str) or not name.isidentifier():
    raise ValueError(f"quantizer name {name!r} must be an identifier")
  if not (isinstance(cls, type) and issubclass(cls, Quantizer)):
    raise ValueError(f"{cls!r} is not a Quantizer subclass")
  if name in ALIASES or _REGISTRY.get(name, cls) is not cls:
    raise ValueError(f"quantizer name {name!r} is taken")
  _REGISTRY[name] = cls
  return cls


def names() -> tuple[str, ...]:
  """The registered quantizer names (faiss factory strings are accepted besides them)."""
  return tuple(_REGISTRY)


def canonical_name(name: str) -> str:
  """``name`` with an old spelling replaced by its name ("zn" -> "lattice").

  Example:
    >>> canonical_name("zn"), canonical_name("sign"), canonical_name("PQ8")
    ('lattice', 'sign', 'PQ8')
  """
  return ALIASES.get(name, name)


def quantizer_class(name: str) -> type[Quantizer]:
  """The class of the quantizer ``name`` (an alias is resolved); ``FaissQuantizer`` for a
  name that is not registered (a faiss index-factory string)."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"quantizer={name!r} must be one of {names()} or a faiss factory string")
  return _REGISTRY.get(canonical_name(name), FaissQuantizer)


def metric_key(name: str, k: int) -> str:
  """The key of quantizer ``name``'s 1-recall@k in training histories and results.

  Example:
    >>> metric_key("zn", 10)
    'lattice_R@10'
  """
  return f"{canonical_name(name)}_R@{k}"


def make_quantizer(name: str, d: int, bits: int | None = None, *, r2: int | None = None
                   ) -> Quantizer:
  """The quantizer ``name`` on d-dimensional catalyzed vectors.

  Args:
    name: a registered name ("lattice" (alias "zn"): Zn sphere lattice, "sign": one bit per
      dimension) or a faiss index-factory string of a standalone codec ("PQ8",
      "OPQ8_32,PQ8", "LSH64", ...).
    d: input dimension (the catalyzer's d_out).
    bits: code size. "lattice": the budget (see ``lattice.zn_codec``; default 64 without
      ``r2``). "sign": must be d when given. faiss: must equal the factory's code size.
    r2: "lattice" only: the lattice sphere's squared radius.

  Raises:
    ValueError: unknown name, or a size that does not match.

  Example:
    >>> make_quantizer("lattice", 24).meta()
    {'name': 'lattice', 'd': 24, 'code_bits': 64, 'r2': 79}
  """
  cls = quantizer_class(name)
  name = canonical_name(name)
  d = check_int("d", d, minimum=1)
  if bits is not None:
    bits = check_int("bits", bits, minimum=1)
  if r2 is not None:
    if cls is not ZnQuantizer:
      raise ValueError(f"r2={r2} is a parameter of the 'lattice' quantizer, not of {name!r}")
    return cls.make(name, d, bits, r2=r2)
  return cls.make(name, d, bits)


def make_codec(config) -> lattice.ZnSphereCodec:
  """The Zn sphere codec of a ``TrainConfig``: ``zn_codec(d_out, bits, r2)``, i.e. ``r2``, or
  the largest sphere whose codes fit ``bits`` (raises if d_out and r2 do not fit the
  requested bits). The lattice a model validates and trains end to end with."""
  if config.d_out is None:
    raise ValueError("d_out is not set: spreading_jax.fit chooses it (selection.py)")
  return lattice.zn_codec(config.d_out, config.bits, config.r2)


def for_model(name: str, config, bits: int | None = None) -> Quantizer:
  """The quantizer ``name`` on a catalyzer's outputs (``config``: its ``TrainConfig``).

  "lattice" is the model's own lattice (``make_codec(config)``) when its codes fit ``bits``
  (or ``bits`` is None), else the largest sphere whose codes fit ``bits``. Other names:
  ``make_quantizer(name, d_out, bits)``.
  """
  if bits is not None:
    bits = check_int("bits", bits, minimum=1)
  return quantizer_class(name).for_config(canonical_name(name), config, bits)


def validation_quantizers(config) -> list[Quantizer]:
  """The quantizers training validates a model of ``config`` with: ``VALIDATED`` (the
  lattice at the model's own sphere and the sign bits), then ``config.quantizer`` when it
  is another one. Their recalls are the history's ``{name}_R@k``."""
  want = list(VALIDATED)
  own = canonical_name(config.quantizer)
  if own not in want:
    want.append(own)
  return [for_model(name, config) for name in want]


def from_meta(meta: dict, read: Callable[[str], bytes] | None = None,
              directory: str = "") -> Quantizer:
  """Rebuilds a quantizer from its ``meta()`` and, when it saved files, their bytes
  (``read(name)``: the content of the saved file ``name`` of ``directory``). A "name"
  written before issue 29 ("zn") is read as its name now ("lattice").

  Raises:
    ValueError: the description is malformed or does not match the rebuilt quantizer.
  """
  if not isinstance(meta, dict):
    raise ValueError(f"quantizer description must be a JSON object, got {type(meta).__name__}")
  name, d, bits = meta.get("name"), meta.get("d"), meta.get("code_bits")
  if not isinstance(name, str) or not isinstance(d, int) or not isinstance(bits, int):
    raise ValueError(f"quantizer description {meta!r} needs a string 'name' and integer "
                     "'d' and 'code_bits'")
  lattice_q = quantizer_class(name) is ZnQuantizer
  r2 = meta.get("r2")
  if lattice_q and not isinstance(r2, int):
    raise ValueError(f"quantizer description {meta!r} needs an integer 'r2'")
  q = make_quantizer(name, d, None if lattice_q else bits, r2=r2 if lattice_q else None)
  if q.code_bits != bits:
    raise ValueError(f"quantizer description says {bits}-bit codes but {name!r} on d={d} "
                     f"makes {q.code_bits}-bit codes")
  if read is not None:
    q.load_state(read, directory)
  return q


register_quantizer(LATTICE, ZnQuantizer)
register_quantizer(SIGN, SignQuantizer)
