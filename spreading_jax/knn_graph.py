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
from spreading_jax._validation import check_int, check_mesh, check_vectors

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
    yq: f32[n, d] query vectors (numpy or jax); row i's list holds the neighbours of yq[i].
    yb: f32[n, d] database vectors (``yq`` itself, or its quantization).
    graph: i32[n, k] current neighbour lists (ids into yb, each in [0, n)), best first; the
      new lists have the same width. A numpy graph's ids are range-checked (one pass on
      the host); a jax array's are not (that would read it back every epoch): out-of-range
      ids in a device graph give unspecified lists.
    fan, fan_nn, reverse: how far the join looks (cost ~ n * (k + reverse + (fan + reverse)
      * fan_nn) inner products).
    mesh: optional 1-D ``jax.sharding.Mesh``; rows are split over its data axis.

  Returns:
    i32[n, k], best first.

  Raises:
    ValueError: yq or yb is not a 2-D real array (or they differ in shape); graph is not
      a 2-D int32 array with one non-empty row per vector; a numpy graph holds an id
      outside [0, n); fan, fan_nn or reverse out of range.
    TypeError: ``mesh`` is not a ``jax.sharding.Mesh`` or None.

  Values of yq and yb are not scanned (NaN/Inf give unspecified lists): this runs every
  epoch of graph mining.
  """
  mesh = check_mesh(mesh)
  check_vectors("yq", yq, finite=False)
  check_vectors("yb", yb, finite=False)
  graph = _check_graph(graph, yq.shape[0])
  n, k = graph.shape
  if yq.shape != yb.shape:
    raise ValueError(f"yq {tuple(yq.shape)} and yb {tuple(yb.shape)} must have the same "
                     "shape: row i of yb is vector i")
  if graph.dtype != jnp.int32:  # a host graph is int32 after _check_graph
    raise ValueError(f"graph must hold int32 ids, got {graph.dtype}")
  graph = jnp.asarray(graph)
  fan = check_int("fan", fan, minimum=1, maximum=k)
  fan_nn = check_int("fan_nn", fan_nn, minimum=1, maximum=k)
  reverse = check_int("reverse", reverse, minimum=1)
  if mesh is not None:
    yq, yb, graph = (sharding.replicate(a, mesh) for a in (yq, yb, graph))
  return _refine(jnp.asarray(yq), jnp.asarray(yb), graph, k=k, fan=fan, fan_nn=fan_nn,
                 reverse=reverse, mesh=mesh)


def _check_graph(graph, n: int):
  """``graph`` (a numpy or jax array; a list becomes numpy) after checking that it is a
  2-D [n, >= 1] array and, on the host, that its ids lie in [0, n) (ValueError)."""
  from_list = not hasattr(graph, "shape") or not hasattr(graph, "dtype")
  if from_list:
    graph = np.asarray(graph)
  if len(graph.shape) != 2:
    raise ValueError(f"graph must be 2-D [n, k] neighbour lists, got shape "
                     f"{tuple(graph.shape)}")
  if graph.shape[0] != n:
    raise ValueError(f"graph has {graph.shape[0]} rows but yq has {n}: yq, yb and graph "
                     "must have the same number of rows (one neighbour list per vector)")
  if n == 0 or graph.shape[1] == 0:
    raise ValueError(f"graph has shape {tuple(graph.shape)}: no vectors or no neighbours")
  if not np.issubdtype(np.dtype(graph.dtype), np.integer):
    raise ValueError(f"graph must hold integer ids (int32), got {graph.dtype}")
  if isinstance(graph, np.ndarray):  # O(n k) on the host; a device graph is not read back
    lo, hi = int(graph.min()), int(graph.max())
    if lo < 0 or hi >= n:
      bad = lo if lo < 0 else hi
      row = int(np.argwhere(graph == bad)[0, 0])
      raise ValueError(f"graph holds id {bad} (row {row}) outside [0, {n}): ids index the "
                       f"{n} vectors")
  # Host ids (a list, or numpy of any integer dtype, e.g. int64 from argsort or faiss) are
  # in range, so they fit int32: the dtype the device work uses.
  return graph.astype(np.int32, copy=False) if isinstance(graph, np.ndarray) else graph


def sampled_recall(yq, yb, graph, k: int, rows: np.ndarray, *, mesh: Mesh | None = None
                   ) -> float:
  """Estimated recall@k of ``graph``: the fraction of the exact ``k`` nearest neighbours of
  ``yq[rows]`` (inner product) found among the first ``k`` ids of their lists.

  Args:
    yq, yb: f32[n, d] queries and database, as in ``refine``.
    graph: [n, width] neighbour lists (numpy or jax); ids are range-checked when numpy.
    k: 1 <= k <= width (the lists must hold k ids) and k <= n.
    rows: a non-empty 1-D integer array of sampled rows, each in [0, n).
    mesh: optional 1-D ``jax.sharding.Mesh`` for the exact search.

  Returns:
    The recall in [0, 1].

  Raises:
    ValueError: k larger than the lists' width (they could never hold the k neighbours),
      rows empty, not 1-D integers, or outside [0, n), or a bad graph (see ``refine``).
    TypeError: ``mesh`` is not a ``jax.sharding.Mesh`` or None.
  """
  mesh = check_mesh(mesh)
  check_vectors("yq", yq, finite=False)
  graph = _check_graph(graph, yq.shape[0])
  n, width = graph.shape
  k = check_int("k", k, minimum=1)
  if k > width:
    raise ValueError(f"k={k} is larger than the graph's width {width}: lists of {width} ids "
                     f"cannot hold the {k} nearest neighbours")
  rows = np.asarray(rows)
  if rows.ndim != 1 or not (np.issubdtype(rows.dtype, np.integer) or rows.size == 0):
    raise ValueError(f"rows must be a 1-D integer array of row ids, got shape {rows.shape} "
                     f"dtype {rows.dtype}")
  if rows.size == 0:
    raise ValueError("rows is empty: a recall over no sampled rows is undefined")
  if rows.min() < 0 or rows.max() >= n:
    bad = rows[(rows < 0) | (rows >= n)][0]
    raise ValueError(f"rows holds {bad}, outside [0, {n}): rows index the {n} vectors")
  rows = jnp.asarray(rows)
  _, exact = search.knn(yq[rows], yb, k, metric="ip", mesh=mesh)
  found = (jnp.asarray(graph)[rows, :k, None] == exact[:, None, :]).any(axis=2)
  return float(found.mean())
