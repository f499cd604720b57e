"""Search quality measures: the paper's 1-recall@k."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from spreading_jax._validation import check_int


def recall_at(indices, groundtruth, ks: Sequence[int] = (1, 10, 100),
              hits: dict | None = None) -> dict[int, float]:
  """The paper's 1-recall@k: fraction of queries whose true nearest neighbour is in the top k.

  Args:
    indices: i32[nq, K] search results (K >= max(ks)).
    groundtruth: i32[nq, >=1]; column 0 is the true nearest neighbour.
    ks: the k values to report.
    hits: optional dict that receives {k: bool[nq]}, whether each query's true nearest
      neighbour is in its top k (paired comparisons of two models on the same queries).

  Returns:
    {k: recall} with recall in [0, 1].

  Example:
    >>> recall_at(np.array([[3, 1], [0, 2]]), np.array([[1], [5]]), ks=(1, 2))
    {1: 0.0, 2: 0.5}
  """
  indices, groundtruth = np.asarray(indices), np.asarray(groundtruth)
  if indices.ndim != 2 or groundtruth.ndim != 2:
    raise ValueError(f"indices {indices.shape} and groundtruth {groundtruth.shape} must be 2-D")
  if indices.shape[0] != groundtruth.shape[0]:
    raise ValueError(f"indices has {indices.shape[0]} queries but groundtruth has "
                     f"{groundtruth.shape[0]}")
  out = {}
  for k in ks:
    k = check_int("k", k, minimum=1)
    if k > indices.shape[1]:
      raise ValueError(f"recall@{k} needs at least {k} results per query, got {indices.shape[1]}")
    hit = np.any(indices[:, :k] == groundtruth[:, :1], axis=1)
    out[k] = float(hit.mean()) if len(hit) else 0.0
    if hits is not None:
      hits[k] = hit
  return out
