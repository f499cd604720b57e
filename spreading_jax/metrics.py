"""Search quality measures: the paper's 1-recall@k."""
from __future__ import annotations

import numbers
from typing import Iterable, Sequence

import numpy as np

from spreading_jax._validation import check_int


def recall_at(indices, groundtruth, ks: Sequence[int] | int = (1, 10, 100),
              hits: dict | None = None) -> dict[int, float]:
  """The paper's 1-recall@k: fraction of queries whose true nearest neighbour is in the top k.

  Args:
    indices: integer [nq, K] search results, best first (K >= max(ks)); an id of -1 (or any
      id that is not the true neighbour) is a miss, e.g. "no result".
    groundtruth: integer [nq, >=1] ids; column 0, the true nearest neighbour of each query,
      must be a valid id (>= 0). Later columns are not read.
    ks: the k values to report: a sequence of ints, or one int.
    hits: optional dict that receives {k: bool[nq]}, whether each query's true nearest
      neighbour is in its top k (paired comparisons of two models on the same queries).

  Returns:
    {k: recall} with recall in [0, 1].

  Raises:
    ValueError: indices or groundtruth not 2-D integer arrays, with different numbers of
      queries or no query at all (a recall over no queries is undefined); groundtruth with
      no column or a negative id in column 0; a k that is not a positive int, or larger
      than K (a list of K results has no recall@k beyond K: it is not counted as if the
      list were longer).

  Example:
    >>> recall_at(np.array([[3, 1], [0, 2]]), np.array([[1], [5]]), ks=(1, 2))
    {1: 0.0, 2: 0.5}
  """
  indices, groundtruth = np.asarray(indices), np.asarray(groundtruth)
  if indices.ndim != 2 or groundtruth.ndim != 2:
    raise ValueError(f"indices {indices.shape} and groundtruth {groundtruth.shape} must be 2-D")
  for name, a in (("indices", indices), ("groundtruth", groundtruth)):
    if not np.issubdtype(a.dtype, np.integer):
      raise ValueError(f"{name} must hold integer ids, got dtype {a.dtype}")
  if indices.shape[0] != groundtruth.shape[0]:
    raise ValueError(f"indices has {indices.shape[0]} queries but groundtruth has "
                     f"{groundtruth.shape[0]}")
  if indices.shape[0] == 0:
    raise ValueError("indices and groundtruth have no queries: recall over no queries is "
                     "undefined")
  if groundtruth.shape[1] == 0:
    raise ValueError(f"groundtruth has shape {groundtruth.shape}: no column for the true "
                     "nearest neighbour")
  if groundtruth[:, 0].min() < 0:
    row = int(np.argmax(groundtruth[:, 0] < 0))
    raise ValueError(f"groundtruth holds the negative id {groundtruth[row, 0]} (query {row}): "
                     "the true nearest neighbour must be a valid id")
  if isinstance(ks, numbers.Integral):
    ks = (ks,)
  elif isinstance(ks, (str, bytes)) or not isinstance(ks, Iterable):
    raise ValueError(f"ks must be an int or a sequence of ints, got {type(ks).__name__}")
  out = {}
  for k in ks:
    k = check_int("k", k, minimum=1)
    if k > indices.shape[1]:
      raise ValueError(f"recall@{k} needs at least {k} results per query, got {indices.shape[1]}")
    hit = np.any(indices[:, :k] == groundtruth[:, :1], axis=1)
    out[k] = float(hit.mean())
    if hits is not None:
      hits[k] = hit
  return out
