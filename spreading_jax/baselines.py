"""faiss baselines (PQ, OPQ, LSQ, LSH, ITQ) behind one interface, at a checked bit budget.

faiss is an optional dependency: it is imported lazily and a missing install raises an
``ImportError`` whose message callers can print as "skipped".
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import numpy as np

from spreading_jax import evaluate, metrics, sampling
from spreading_jax.faiss_factory import (  # noqa: F401 (re-exported)
    MAX_FACTORY_NUMBER, build_index, faiss_module, index_code_bits)

Transform = Callable[[np.ndarray], np.ndarray]
MAX_TRAIN = 100_000
LSQ_MAX_TRAIN = 10_000  # LSQ training is slow; a smaller sample keeps it in minutes.


def _apply(transform: Transform | None, x) -> np.ndarray:
  y = np.asarray(x if transform is None else transform(x), np.float32)
  return np.ascontiguousarray(y)


def opq_factory(d: int, m: int = 8) -> str:
  """OPQ{m}_{4m},PQ{m} when d allows the 4m-dim rotation, else OPQ{m},PQ{m} (d must be % m)."""
  if d >= 4 * m:
    return f"OPQ{m}_{4 * m},PQ{m}"
  return f"OPQ{m},PQ{m}"


def opq_paper_factory(d: int, bits: int) -> str:
  """The paper's OPQ at ``bits`` bits: a rotation to ``bits`` dims, 8 per 8-bit
  sub-quantizer (OPQ8_64,PQ8 at 64 bits). Needs d >= bits.

  >>> opq_paper_factory(96, 64)
  'OPQ8_64,PQ8'
  """
  if d < bits:
    raise ValueError(f"the paper's OPQ rotates to {bits} dims; the vectors have only d={d}")
  return f"OPQ{bits // 8}_{bits},PQ{bits // 8}"


def adc_only(index):
  """The index, with faiss' polysemous training switched off in its product quantizer.

  A "PQ{m}" in a factory string trains a relabelling of each sub-quantizer's centroids
  after k-means, for polysemous Hamming filtering. The baselines search by asymmetric
  distance, which the relabelling leaves unchanged (same centroids, same distances, same
  results), so it is skipped: it took 9 of the 26 s of OPQ8_64,PQ8 on the demo's 784-d
  images. Other indexes are returned unchanged.
  """
  faiss = faiss_module()
  inner = faiss.downcast_index(index)
  while isinstance(inner, faiss.IndexPreTransform):
    inner = faiss.downcast_index(inner.index)
  if isinstance(inner, faiss.IndexPQ):
    inner.do_polysemous_training = False
  return index


def code_bits(factory: str, d: int) -> int:
  """Bits per vector of ``factory`` on d dims (from the index's code size)."""
  return index_code_bits(build_index(factory, d))


def evaluate_faiss(dataset, factory: str, transform: Transform | None = None, *,
                   ks: Sequence[int] = (1, 10, 100), train_vectors=None,
                   max_train: int = MAX_TRAIN, seed: int = 0) -> dict[int, float]:
  """1-recall@k of a faiss index trained, filled and searched on (transformed) vectors.

  Args:
    dataset: a ``Dataset`` (train f32[nt, d], base f32[nb, d], query f32[nq, d],
      groundtruth i[nq, >=1]).
    factory: a ``faiss.index_factory`` string, or "LSH{bits}" / "ITQ{bits}".
    transform: raw vectors -> vectors the index sees (None: raw).
    ks: recall ranks; ranks above nb are dropped.
    train_vectors: training vectors f32[n, d] instead of ``dataset.train``.
    max_train: at most this many training rows, drawn with ``seed``.
    seed: seed of the training sample.

  Returns:
    {k: recall}.
  """
  ks = evaluate.fitting_ks(dataset.nb, ks)
  xt = _apply(transform, sampling.sample_rows(np.asarray(
      dataset.train if train_vectors is None else train_vectors), max_train, seed))
  xb, xq = _apply(transform, dataset.base), _apply(transform, dataset.query)
  if not xt.shape[1] == xb.shape[1] == xq.shape[1]:
    raise ValueError(f"train d={xt.shape[1]}, base d={xb.shape[1]}, query d={xq.shape[1]} differ")
  index = adc_only(build_index(factory, xb.shape[1]))
  index.train(xt)
  index.add(xb)
  _, ids = index.search(xq, max(ks))
  return metrics.recall_at(ids, dataset.groundtruth, ks)


class Baseline(NamedTuple):
  """A faiss method: ``factory(d, bits)`` gives its factory string; ``bits`` the budgets
  it supports; ``max_train`` caps its training sample."""
  description: str
  factory: Callable[[int, int], str]
  bits: tuple[int, ...]
  max_train: int = MAX_TRAIN


BASELINES: dict[str, Baseline] = {
    "pq": Baseline("product quantization, 8-bit sub-quantizers", lambda d, b: f"PQ{b // 8}",
                   (16, 32, 64, 128)),
    "opq": Baseline("optimized PQ (rotation + PQ)", lambda d, b: opq_factory(d, b // 8),
                    (16, 32, 64, 128)),
    "opq_paper": Baseline("optimized PQ as in the paper (rotation to `bits` dims + PQ)",
                          opq_paper_factory, (16, 32, 64, 128)),
    "lsq": Baseline("local search quantization, 8-bit codebooks",
                    lambda d, b: f"LSQ{b // 8}x8", (16, 32, 64), LSQ_MAX_TRAIN),
    "lsh": Baseline("binary LSH: random rotation + sign", lambda d, b: f"LSH{b}",
                    (16, 32, 64, 128)),
    "itq": Baseline("iterative quantization: PCA + learned rotation + sign",
                    lambda d, b: f"ITQ{b}", (16, 32, 64, 128)),
}


def evaluate_method(name: str, dataset, bits: int, transform: Transform | None = None, *,
                    ks: Sequence[int] = (1, 10, 100),
                    max_train: int | None = None) -> dict[int, float]:
  """Recall of the baseline ``name`` (a key of ``BASELINES``) at exactly ``bits`` bits.

  ``transform`` turns e.g. "opq" into "catalyzer+opq". Raises ValueError for an unknown
  name or when the index's code size differs from the budget.
  """
  if name not in BASELINES:
    raise ValueError(f"unknown baseline {name!r}; known: {sorted(BASELINES)}")
  method = BASELINES[name]
  d = _apply(transform, np.asarray(dataset.query[:1])).shape[1]
  factory = method.factory(d, bits)
  got = code_bits(factory, d)
  if got != bits:
    raise ValueError(f"{name} ({factory!r}) on d={d} uses {got} bits, not the budget {bits}")
  return evaluate_faiss(dataset, factory, transform, ks=ks,
                        max_train=method.max_train if max_train is None else max_train)
