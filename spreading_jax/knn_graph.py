"""Approximate kNN graphs refined by neighbour-of-neighbour search (NN-descent).

Used by per-epoch negative mining on CPU (``mining.NegativeMiner``): the catalyzer's
outputs move little from one epoch to the next, so last epoch's neighbour lists, their
reverse edges and the neighbours of those neighbours hold nearly all of this epoch's
nearest neighbours. Scoring those few hundred candidates per row costs a small fraction
of an exact n x n search. The original code mines on CPU with an approximate HNSW index
for the same reason.

Algorithm: Dong, Charikar, Li, "Efficient k-nearest neighbor graph construction for generic
similarity measures" (WWW 2011), one local join per call, every candidate rescored.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from spreading_jax import search, sharding
from spreading_jax._validation import check_int

_CHUNK = 512  # rows scored together: [chunk, candidates, d] gathered vectors stay ~50 MB


def reverse_neighbors(graph, fan: int, width: int):
  """For each vector j, up to ``width`` vectors i that list j among their first ``fan``
  neighbours: i32[n, width], rows padded with j itself.

  Examples:
    >>> g = jnp.array([[0, 1], [1, 2], [2, 1]])
    >>> reverse_neighbors(g, 2, 2).tolist()
    [[0, 0], [0, 1], [1, 2]]
  """
  n = graph.shape[0]
  src = jnp.repeat(jnp.arange(n, dtype=jnp.int32), fan)
  dst = graph[:, :fan].reshape(-1)
  order = jnp.argsort(dst, stable=True)
  dst, src = dst[order], src[order]
  # Position of each edge within its target's group of incoming edges.
  rank = jnp.arange(dst.shape[0]) - jnp.searchsorted(dst, dst, side="left")
  rev = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32)[:, None], (n, width))
  rows = jnp.where(rank < width, dst, n)  # out of range: dropped
  return rev.at[rows, jnp.minimum(rank, width - 1)].set(src, mode="drop")


def _refine_rows(yq, yb, graph, rev, rows, k: int, fan: int, fan_nn: int):
  """New top-``k`` lists of ``rows`` (i32[c]) among their candidates."""
  nb = jnp.concatenate([graph[rows, :fan], rev[rows]], axis=1)
  cand = jnp.concatenate([graph[rows], rev[rows],
                          graph[nb, :fan_nn].reshape(rows.shape[0], -1)], axis=1)
  cand = jnp.sort(cand, axis=1)
  dup = jnp.concatenate([jnp.zeros_like(cand[:, :1], bool), cand[:, 1:] == cand[:, :-1]],
                        axis=1)
  scores = jnp.einsum("cd,cmd->cm", yq[rows], yb[cand],
                      precision=jax.lax.Precision.HIGHEST)
  scores = jnp.where(dup, -jnp.inf, scores)
  # Ties to the lower id, as in the exact search: candidates are sorted by id.
  _, pos = jax.lax.top_k(scores, k)
  return jnp.take_along_axis(cand, pos, axis=1)


@functools.partial(jax.jit, static_argnames=("k", "fan", "fan_nn", "reverse", "mesh"))
def _refine(yq, yb, graph, *, k, fan, fan_nn, reverse, mesh):
  n = graph.shape[0]
  rev = reverse_neighbors(graph, fan, reverse)
  ndev = sharding.mesh_size(mesh)
  rows = jnp.arange(sharding.round_up(n, _CHUNK * ndev), dtype=jnp.int32)
  rows = jnp.minimum(rows, n - 1)  # padding rows repeat the last one; cut below

  def local(rows, yq, yb, graph, rev):
    return jax.lax.map(lambda r: _refine_rows(yq, yb, graph, rev, r, k, fan, fan_nn),
                       rows.reshape(-1, _CHUNK)).reshape(-1, k)

  if mesh is None:
    out = local(rows, yq, yb, graph, rev)
  else:
    out = jax.shard_map(local, mesh=mesh, in_specs=(P(sharding.axis_name(mesh)),) + (P(),) * 4,
                        out_specs=P(sharding.axis_name(mesh)))(rows, yq, yb, graph, rev)
  return out[:n]


def refine(yq, yb, graph, *, fan: int = 32, fan_nn: int = 16, reverse: int = 16,
           mesh: Mesh | None = None):
  """One round of neighbour-of-neighbour refinement of an approximate kNN graph.

  Row i's candidates are its current list, up to ``reverse`` vectors that list i among
  their first ``fan`` neighbours, and the first ``fan_nn`` neighbours of each of its first
  ``fan`` neighbours and of those reverse neighbours; every candidate is rescored exactly
  (inner product) and the best ``k`` kept, ties to the lower id.

  Args:
    yq: f32[n, d] query vectors; row i's list holds the neighbours of yq[i].
    yb: f32[n, d] database vectors (``yq`` itself, or its quantization).
    graph: i32[n, k] current neighbour lists (ids into yb), best first; the new lists have
      the same width.
    fan, fan_nn, reverse: how far the join looks (cost ~ n * (k + reverse + (fan + reverse)
      * fan_nn) inner products).
    mesh: optional mesh; rows are split over its data axis.

  Returns:
    i32[n, k], best first.
  """
  graph = jnp.asarray(graph)
  n, k = graph.shape
  if yq.shape != yb.shape or yq.shape[0] != n:
    raise ValueError(f"yq {yq.shape}, yb {yb.shape} and graph {graph.shape} must have the "
                     "same number of rows (and yq, yb the same dimension)")
  if graph.dtype != jnp.int32:
    raise ValueError(f"graph must hold int32 ids, got {graph.dtype}")
  fan = check_int("fan", fan, minimum=1, maximum=k)
  fan_nn = check_int("fan_nn", fan_nn, minimum=1, maximum=k)
  reverse = check_int("reverse", reverse, minimum=1)
  if mesh is not None:
    yq, yb, graph = (sharding.replicate(a, mesh) for a in (yq, yb, graph))
  return _refine(jnp.asarray(yq), jnp.asarray(yb), graph, k=k, fan=fan, fan_nn=fan_nn,
                 reverse=reverse, mesh=mesh)


def sampled_recall(yq, yb, graph, k: int, rows: np.ndarray, *, mesh: Mesh | None = None
                   ) -> float:
  """Estimated recall@k of ``graph``: the fraction of the exact ``k`` nearest neighbours of
  ``yq[rows]`` (inner product) found among the first ``k`` ids of their lists."""
  rows = jnp.asarray(rows)
  _, exact = search.knn(yq[rows], yb, k, metric="ip", mesh=mesh)
  found = (jnp.asarray(graph)[rows, :k, None] == exact[:, None, :]).any(axis=2)
  return float(found.mean())
