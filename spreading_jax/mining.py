"""Triplet mining: positives among exact input-space neighbours (once), hard negatives among
output-space neighbours (every epoch).

Sablayrolles et al. 2019, section 4: a positive is drawn among the k=10 nearest neighbours
of the anchor in input space; the negative is the 50th nearest neighbour in output space.
Where the paper is silent (does a vector count as its own neighbour?), the original code's
convention is the default: it does, in both lists.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from spreading_jax import search
from spreading_jax._validation import check_int


def drop_self(ids: np.ndarray, k: int) -> np.ndarray:
  """Removes each row's own id from its neighbour list. ids: i32[n, k+1] -> i32[n, k].

  Row i of ``ids`` lists neighbours of vector i, usually starting with i itself; with
  duplicate vectors i may sit later (or be absent, then the last column is dropped).

  Examples:
    >>> drop_self(np.array([[0, 5, 6], [4, 1, 7]]), 2).tolist()
    [[5, 6], [4, 7]]
  """
  ids = np.asarray(ids)
  n = ids.shape[0]
  is_self = ids == np.arange(n)[:, None]
  # Stable sort puts every non-self column first, in order.
  order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(ids, order, axis=1).astype(np.int32)


def positives(xt, rank_positive: int, *, include_self: bool = True,
              mesh: Mesh | None = None) -> np.ndarray:
  """Candidate positives: the ``rank_positive`` exact input-space neighbours of every row.

  Args:
    xt: f32[n, d] training vectors.
    rank_positive: how many neighbours are candidates.
    include_self: count each vector as its own first neighbour (the original code does:
      its positive is the anchor itself with probability 1/rank_positive).
    mesh: optional mesh to shard the kNN over.

  Returns:
    i32[n, rank_positive].
  """
  k = check_int("rank_positive", rank_positive, minimum=1)
  if include_self:
    _, ids = search.knn(xt, xt, k, mesh=mesh)
    return np.asarray(ids, np.int32)
  _, ids = search.knn(xt, xt, k + 1, mesh=mesh)
  return drop_self(ids, k)


def hard_negatives(yq, yb, rank_negative: int, *, include_self: bool = True,
                   mesh: Mesh | None = None) -> np.ndarray:
  """The ``rank_negative``-th output-space neighbour of every row: i32[n].

  Args:
    yq: f32[n, d] catalyzed training vectors (unit norm), the anchors.
    yb: f32[n, d] the same vectors as the database: ``yq`` itself, or its lattice
      quantization in end-to-end training (the original searches the unquantized outputs
      among the quantized ones). Row i of yb is vector i.
    rank_negative: rank of the negative in yq[i]'s neighbour list among yb.
    include_self: the list counts vector i itself (the original takes column
      rank_negative of the list that includes self, i.e. the (rank_negative - 1)-th other
      vector when self comes first); False skips it.
    mesh: optional mesh to shard the kNN over.
  """
  k = check_int("rank_negative", rank_negative, minimum=1)
  if yq.shape != yb.shape:
    raise ValueError(f"yq has shape {yq.shape} but yb has shape {yb.shape}; the database "
                     "row i must be vector i")
  # Unit vectors: the inner-product ranking equals the L2 ranking the original uses.
  if include_self:
    _, ids = search.knn(yq, yb, k, metric="ip", mesh=mesh)
    return np.asarray(jax.device_get(ids)[:, k - 1], np.int32)
  _, ids = search.knn(yq, yb, k + 1, metric="ip", mesh=mesh)
  return drop_self(ids, k)[:, k - 1]
