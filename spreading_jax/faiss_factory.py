"""faiss indexes from factory strings, sized before faiss allocates: the codecs behind
``quantizers.FaissQuantizer`` and the faiss baselines (``baselines.py``).

faiss is an optional dependency: it is imported on first use and a missing install raises
an ``ImportError`` whose message callers can print as "skipped".
"""
from __future__ import annotations

import re


def faiss_module():
  """The faiss module; ImportError saying how to install it when it is missing."""
  try:
    import faiss  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError("faiss is not installed (pip install faiss-cpu); faiss baselines are "
                      "unavailable") from e
  return faiss


def index_code_bits(index) -> int:
  """Code size in bits of one vector in a trained (or untrained) faiss index."""
  if hasattr(index, "sa_code_size"):
    try:
      return int(index.sa_code_size()) * 8
    except RuntimeError:
      pass
  return int(index.code_size) * 8


# The largest number a factory string may hold (IVF lists, PQ sub-quantizers, output
# dimensions, code bits), and the most floats one such number may make faiss allocate on d
# dims (number x d: IVF centroids, OPQ/PCA/LSH matrices): 4 GiB.
MAX_FACTORY_NUMBER = 1 << 22
_MAX_FACTORY_FLOATS = 1 << 30
# PQ/RQ bits per sub-quantizer ("PQ8x12"): 2^bits centroids each.
_MAX_FACTORY_NBITS = 16


def _check_factory_sizes(factory: str, d: int) -> None:
  """ValueError for a factory string whose numbers would make faiss allocate without
  bound before it fails (e.g. "IVF100000000,PQ8": 10^8 inverted lists)."""
  if not isinstance(factory, str) or len(factory) > 256:
    raise ValueError(f"faiss factory string {str(factory)[:40]!r}... is not a short string")
  for m in re.finditer(r"(x?)(\d+)", factory):
    n = int(m.group(2))
    if m.group(1) and n > _MAX_FACTORY_NBITS:
      raise ValueError(f"faiss factory {factory!r}: x{n} bits per sub-quantizer is more than "
                       f"{_MAX_FACTORY_NBITS} (2^bits centroids each)")
    if n > MAX_FACTORY_NUMBER or n * max(int(d), 1) > _MAX_FACTORY_FLOATS:
      raise ValueError(f"faiss factory {factory!r}: {n} is larger than this library builds "
                       f"(at most {MAX_FACTORY_NUMBER}, and {n} x d={d} at most "
                       f"{_MAX_FACTORY_FLOATS} floats)")


def build_index(factory: str, d: int):
  """A faiss index for ``factory`` on d dims: "LSH{b}" and "ITQ{b}" are handled here
  (binary LSH with random rotation, and ITQ followed by sign bits); anything else goes
  through ``faiss.index_factory``."""
  _check_factory_sizes(factory, d)
  faiss = faiss_module()
  if factory.startswith("LSH") and factory[3:].isdigit():
    return faiss.IndexLSH(d, int(factory[3:]), True, False)  # random rotation, threshold 0
  if factory.startswith("ITQ") and factory[3:].isdigit():
    bits = int(factory[3:])
    if bits > d:
      raise ValueError(f"ITQ{bits} needs bits <= d={d}")
    return faiss.index_factory(d, f"ITQ{bits},LSHt")
  try:
    return faiss.index_factory(d, factory)
  except RuntimeError as e:
    raise ValueError(f"faiss cannot build {factory!r} on d={d}: {e}") from e
