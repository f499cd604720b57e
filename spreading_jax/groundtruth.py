"""Exact groundtruth: ``search.knn`` candidates re-ranked in float64, ties to the lower id."""
from __future__ import annotations

import numpy as np

from spreading_jax import search
from spreading_jax._validation import check_int


def _exact_rerank(query, base, cand: np.ndarray, k: int, metric: str) -> np.ndarray:
  """Re-scores candidate ids in float64 and keeps the k best, ties to the lower id.

  ``knn`` ranks in float32, so near-ties (closer than float32 rounding) may come
  out in either order; re-ranking a slightly larger candidate list in float64 makes the
  groundtruth exact and deterministic.
  """
  nq, kc = cand.shape
  d = base.shape[1]
  out = np.empty((nq, k), np.int32)
  # Small blocks (a few MiB of float64 candidates) stay in cache: several times faster.
  step = max(1, (1 << 19) // (kc * d))
  for s in range(0, nq, step):
    c = cand[s:s + step]
    x = np.asarray(base[c], np.float64)  # [b, kc, d]
    q = np.asarray(query[s:s + step], np.float64)
    ip = np.matmul(x, q[:, :, None])[..., 0]
    # ||x - q||^2 without the query's own norm, which does not change the order.
    score = np.einsum("bkd,bkd->bk", x, x) - 2 * ip if metric == "l2" else -ip
    order = np.lexsort((c, score), axis=-1)[:, :k]
    out[s:s + step] = np.take_along_axis(c, order, axis=-1)
  return out


def exact_groundtruth(query, base, k: int = 100, metric: str = "l2") -> np.ndarray:
  """Exact k nearest neighbours of each query in ``base``, ties broken by the lower id.

  Candidates come from ``search.knn`` (float32, blocked, jit-compiled), padded by a margin
  and re-ranked in float64, so the result does not depend on float32 rounding.

  Args:
    query: [nq, d] real vectors.
    base: [nb, d] real vectors (uint8 memmaps are fine).
    k: neighbours per query, 1 <= k <= nb.
    metric: "l2" (ascending squared distance) or "ip" (descending inner product).

  Returns:
    i32[nq, k] ids into ``base``.

  Example:
    >>> exact_groundtruth(np.array([[0.9, 0.]]), np.eye(2), k=2).tolist()
    [[0, 1]]
  """
  if metric not in ("l2", "ip"):
    raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
  k = check_int("k", k, minimum=1, maximum=base.shape[0])
  kc = min(base.shape[0], k + max(16, k // 4))
  _, cand = search.knn(query, base, kc, metric=metric)
  return _exact_rerank(query, base, np.asarray(cand), k, metric)
