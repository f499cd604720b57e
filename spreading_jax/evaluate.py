"""Evaluation protocols: 1-recall@k of a quantizer applied to (catalyzed) vectors.

Every protocol takes a ``Dataset`` and a ``transform`` (raw vectors -> vectors the quantizer
sees: a trained catalyzer's ``apply``, a random projection, or None for the raw vectors),
encodes the database, searches the queries and returns ``{k: recall}``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from jax.sharding import Mesh

from spreading_jax import binary, lattice, search
from spreading_jax._validation import check_int

Transform = Callable[[np.ndarray], np.ndarray]
KS = (1, 10, 100)


def _ks(groundtruth, nb: int, ks: Sequence[int]) -> tuple[int, ...]:
  out = tuple(k for k in ks if k <= nb)
  if not out:
    raise ValueError(f"no k in {tuple(ks)} fits a database of {nb} vectors")
  return out


def _apply(transform: Transform | None, x) -> np.ndarray:
  return np.asarray(x if transform is None else transform(x), np.float32)


def encode_lattice(codec: lattice.ZnSphereCodec, y, chunk: int = 65536) -> np.ndarray:
  """Lattice codes of y: f32[n, d] -> u32[n, code_words], encoded chunk by chunk."""
  parts = [np.asarray(codec.encode(np.asarray(y[s:s + chunk], np.float32)))
           for s in range(0, y.shape[0], chunk)]
  return np.concatenate(parts, axis=0)


def evaluate_lattice(dataset, transform: Transform | None, codec: lattice.ZnSphereCodec, *,
                     ks: Sequence[int] = KS, symmetric: bool = False,
                     mesh: Mesh | None = None) -> dict[int, float]:
  """Catalyzer + Zn lattice: database encoded to lattice codes, asymmetric search (the
  paper's main protocol), or symmetric with ``symmetric=True``."""
  ks = _ks(dataset.groundtruth, dataset.nb, ks)
  yb, yq = _apply(transform, dataset.base), _apply(transform, dataset.query)
  codes = encode_lattice(codec, yb)
  _, ids = search.search_lattice(yq, codes, codec, max(ks), symmetric=symmetric, mesh=mesh)
  return search.recall_at(ids, dataset.groundtruth, ks)


def evaluate_sign(dataset, transform: Transform | None, *, ks: Sequence[int] = KS,
                  mesh: Mesh | None = None) -> dict[int, float]:
  """Catalyzer + sign bits: one bit per output dimension, symmetric Hamming search."""
  ks = _ks(dataset.groundtruth, dataset.nb, ks)
  cb = binary.sign_codes(_apply(transform, dataset.base))
  cq = binary.sign_codes(_apply(transform, dataset.query))
  _, ids = search.hamming_knn(cq, cb, max(ks), mesh=mesh)
  return search.recall_at(ids, dataset.groundtruth, ks)


def evaluate_exact(dataset, transform: Transform | None = None, *, ks: Sequence[int] = KS,
                   mesh: Mesh | None = None) -> dict[int, float]:
  """Exact L2 search on the (transformed) vectors: the ceiling of any quantizer on them."""
  ks = _ks(dataset.groundtruth, dataset.nb, ks)
  _, ids = search.knn(_apply(transform, dataset.query), _apply(transform, dataset.base),
                      max(ks), mesh=mesh)
  return search.recall_at(ids, dataset.groundtruth, ks)


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
