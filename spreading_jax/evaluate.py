"""Evaluation protocols: 1-recall@k of a quantizer applied to (catalyzed) vectors.

``evaluate_quantizer`` takes a ``Dataset`` and a ``transform`` (raw vectors -> vectors the
quantizer sees: a trained catalyzer's ``apply``, a random projection, or None for the raw
vectors), encodes the database, searches the queries and returns ``{k: recall}``;
``quantizer_recalls`` is the same protocol on vectors already transformed (training's
validation). The paper's experiments that combine them live in ``experiments/``
(``experiments/run.py``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from jax.sharding import Mesh

from spreading_jax import lattice, quantizers
from spreading_jax._validation import check_int
from spreading_jax.datasets import Dataset
from spreading_jax.metrics import recall_at
from spreading_jax.sampling import sample_rows

Transform = Callable[[np.ndarray], np.ndarray]
KS = (1, 10, 100)


def fitting_ks(nb: int, ks: Sequence[int] = KS) -> tuple[int, ...]:
  """The recall ranks of ``ks`` that a database (or a result list) of nb rows can report.

  Raises:
    ValueError: none fits.

  Example:
    >>> fitting_ks(50), fitting_ks(1000, (1, 10))
    ((1, 10), (1, 10))
  """
  out = tuple(k for k in ks if k <= nb)
  if not out:
    raise ValueError(f"no k in {tuple(ks)} fits a database of {nb} vectors")
  return out


def _apply(transform: Transform | None, x) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return np.asarray(x if transform is None else transform(x), np.float32)


def evaluate_quantizer(dataset: Dataset, transform: Transform | None,
                       quantizer: quantizers.Quantizer, *, ks: Sequence[int] = KS,
                       mesh: Mesh | None = None, max_train: int = 100_000,
                       seed: int = 0) -> dict[int, float]:
  """Any quantizer on (transformed) vectors: the database is encoded chunk by chunk, the
  transformed queries are searched against the codes.

  Args:
    dataset: a ``Dataset`` (base, query, groundtruth; train when the quantizer learns).
    transform: raw vectors -> the quantizer's input (None: raw vectors).
    quantizer: a ``quantizers.Quantizer``; one that ``needs_training`` is trained on at
      most ``max_train`` transformed training vectors drawn with ``seed``.
    ks: recall ranks; ranks above nb are dropped.
    mesh: optional mesh for the search (Zn and sign quantizers).

  Returns:
    {k: 1-recall@k}.
  """
  ks = fitting_ks(dataset.nb, ks)
  if quantizer.needs_training:
    quantizer.train(_apply(transform, sample_rows(dataset.train, max_train, seed)))
  codes = quantizers.encode_in_chunks(lambda x: quantizer.encode(_apply(transform, x)),
                                      dataset.base)
  _, ids = quantizer.search(_apply(transform, dataset.query), codes, max(ks), mesh=mesh)
  return recall_at(ids, dataset.groundtruth, ks)


def quantizer_recalls(quantizer: quantizers.Quantizer, yq, yb, groundtruth, *,
                      ks: Sequence[int] = KS, mesh: Mesh | None = None,
                      hits: dict | None = None, max_train: int = 100_000,
                      seed: int = 0) -> dict[str, float]:
  """``evaluate_quantizer`` on vectors already transformed: the queries yq f32[nq, d]
  searched among the quantized database yb f32[nb, d] (``Quantizer.search_vectors``).

  Args:
    quantizer: a ``quantizers.Quantizer``; one that ``needs_training`` is trained on at
      most ``max_train`` rows of yb drawn with ``seed`` (never the queries).
    groundtruth: i[nq, >=1] true neighbours of the queries in yb (column 0 counts).
    ks: recall ranks; those above nb and above the groundtruth's width are dropped.
    hits: when given, receives bool[nq] per key: whether each query's true nearest
      neighbour is in its top k (paired comparisons, ``selection.paired_gain``).

  Returns:
    {"{name}_R@{k}": 1-recall@k} (``quantizers.metric_key``).
  """
  ks = fitting_ks(min(yb.shape[0], np.shape(groundtruth)[1]), ks)
  if quantizer.needs_training:
    quantizer.train(sample_rows(yb, max_train, seed))
  _, ids = quantizer.search_vectors(yq, yb, max(ks), mesh=mesh)
  per_query: dict = {}
  out = {}
  for k, v in recall_at(ids, groundtruth, ks, per_query).items():
    key = quantizers.metric_key(quantizer.name, k)
    out[key] = v
    if hits is not None:
      hits[key] = per_query[k]
  return out


def evaluate_lattice(dataset: Dataset, transform: Transform | None,
                     codec: lattice.ZnSphereCodec, *, ks: Sequence[int] = KS,
                     symmetric: bool = False, mesh: Mesh | None = None) -> dict[int, float]:
  """Catalyzer + Zn lattice: database encoded to lattice codes, asymmetric search (the
  paper's main protocol), or symmetric with ``symmetric=True``."""
  return evaluate_quantizer(dataset, transform, quantizers.ZnQuantizer(codec, symmetric),
                            ks=ks, mesh=mesh)


def evaluate_sign(dataset: Dataset, transform: Transform | None, *, ks: Sequence[int] = KS,
                  mesh: Mesh | None = None) -> dict[int, float]:
  """Catalyzer + sign bits: one bit per output dimension, symmetric Hamming search."""
  d = _apply(transform, dataset.query[:1]).shape[1]
  return evaluate_quantizer(dataset, transform, quantizers.SignQuantizer(d), ks=ks, mesh=mesh)


def random_projection(d_in: int, d_out: int, seed: int = 0) -> Transform:
  """A random orthogonal projection to ``d_out`` dims followed by L2 normalization.

  The catalyzer-free baseline for a fixed quantizer: the same lattice applied to a
  projection that preserves angles on average but was not trained to spread the data.
  """
  d_in = check_int("d_in", d_in, minimum=1)
  d_out = check_int("d_out", d_out, minimum=1, maximum=d_in)
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((d_in, d_out)))  # orthonormal columns
  q = q.astype(np.float32)

  def transform(x):
    y = np.asarray(x, np.float32) @ q
    return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)

  return transform


def format_table(rows: Sequence[dict], ks: Sequence[int] = KS) -> str:
  """Markdown table of rows {"method", "bits", "recall": {k: r}} as percentages."""
  head = "| method | bits | " + " | ".join(f"R@{k}" for k in ks) + " |"
  lines = [head, "|---|---|" + "---|" * len(ks)]
  for r in rows:
    rec = r["recall"]
    cells = [f"{100 * rec[k]:.1f}" if k in rec else "" for k in ks]
    lines.append(f"| {r['method']} | {r.get('bits', '')} | " + " | ".join(cells) + " |")
  return "\n".join(lines)
