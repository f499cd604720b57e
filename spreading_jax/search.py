"""Exact k-nearest-neighbour search: float vectors, binary codes and lattice codes.

Every search here is the same engine: score a block of queries against a block of the
database, keep a running top-k, and scan over database blocks so that memory stays bounded
(never an ``nq x nb`` matrix). With a mesh, the database is split over the mesh's data axis
with ``jax.shard_map``; each device keeps a local top-k and the results are merged.
"""
from __future__ import annotations

import functools
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from spreading_jax import binary, sharding
from spreading_jax._validation import check_int, check_vectors

# Working set of one (query block x database block) score matrix, in elements.
_TILE_ELEMENTS = 1 << 22
# Rows per prepared (e.g. decoded) super-block: 64k rows of 24 floats is 6 MB.
_SUPER_BLOCK_ROWS = 1 << 16
_MAX_QUERY_BLOCK = 64
# Chunk width of the two-stage top-k (see _block_topk).
_CHUNK = 32

ScoreFn = Callable[..., jax.Array]


def _block_sizes(nq: int, nb_local: int, k: int, query_block: int | None,
                 base_block: int | None, d: int = 0) -> tuple[int, int]:
  # Narrow vectors: the score tile is cheap, so favour long rows (cheaper top-k);
  # wider ones: more queries per block make the matmul more efficient.
  max_qb = _MAX_QUERY_BLOCK if d <= 32 else 4 * _MAX_QUERY_BLOCK
  qb = query_block or min(max_qb, sharding.round_up(max(nq, 1), 8))
  bb = base_block or max(1024, _TILE_ELEMENTS // qb)
  bb = min(bb, sharding.round_up(max(nb_local, 1), 128))
  # A block must hold at least k candidates for the per-block top-k.
  return qb, max(bb, k)


def _merge_topk(s1, i1, s2, i2, k):
  # Concatenating in id order and a stable top-k keep ties ordered by lower id.
  s = jnp.concatenate([s1, s2], axis=1)
  i = jnp.concatenate([i1, i2], axis=1)
  s, pos = jax.lax.top_k(s, k)
  return s, jnp.take_along_axis(i, pos, axis=1)


def _block_topk(s, k: int, chunk: int = _CHUNK):
  """Exact top-k of each row of s: f32[q, b] -> (f32[q, k], i32[q, k]), ties to lower index.

  Two stages for wide rows: every element of the top k lies in one of the k chunks with
  the largest maxima (at most k chunks can hold an element >= it), so a top-k over the
  chunk maxima, a gather of those k chunks and a top-k over k*chunk elements replace one
  top-k over the whole row, which is the expensive primitive on CPU.
  """
  q, b = s.shape
  if b % chunk or b < 8 * k * chunk // 4:
    return jax.lax.top_k(s, k)
  chunks = s.reshape(q, b // chunk, chunk)
  _, top_chunks = jax.lax.top_k(jnp.max(chunks, axis=2), k)  # i32[q, k]
  # Visit the chosen chunks in index order so that ties still resolve to the lower index.
  top_chunks = jnp.sort(top_chunks, axis=1)
  cand = jnp.take_along_axis(chunks, top_chunks[:, :, None], axis=1).reshape(q, k * chunk)
  vals, pos = jax.lax.top_k(cand, k)
  cols = top_chunks[jnp.arange(q)[:, None], pos // chunk] * chunk + pos % chunk
  return vals, cols


def _scan_database(score_fn: ScoreFn, xq, db, k: int, bb: int, n_valid, offset):
  """Top-k (largest scores) of ``xq`` against ``db`` rows [0, nb_pad) of this shard.

  xq: [qb, ...]; db: tuple of arrays with a common leading axis nb_pad (a multiple of bb).
  Ids are ``offset + row``; rows with id >= n_valid are padding and never returned
  ahead of a real row.
  """
  nb_pad = db[0].shape[0]
  nblocks = nb_pad // bb
  blocks = tuple(a.reshape((nblocks, bb) + a.shape[1:]) for a in db)
  nq = xq.shape[0]
  kb = min(k, bb)

  def step(carry, inputs):
    best_s, best_i = carry
    block, j = inputs
    s = score_fn(xq, *block).astype(jnp.float32)  # f32[qb, bb]
    ids = offset + j * bb + jnp.arange(bb, dtype=jnp.int32)
    # top_k orders -0.0 below +0.0: canonicalize zeros so equal scores tie by id.
    s = jnp.where(ids[None, :] < n_valid, jnp.where(s == 0, 0.0, s), -jnp.inf)
    s, pos = _block_topk(s, kb)
    return _merge_topk(best_s, best_i, s, ids[pos], k), None

  init = (jnp.full((nq, k), -jnp.inf, jnp.float32), jnp.full((nq, k), -1, jnp.int32))
  (best_s, best_i), _ = jax.lax.scan(step, init, (blocks, jnp.arange(nblocks, dtype=jnp.int32)))
  return best_s, best_i


def _search_queries(score_fn, xq, db, k, qb, bb, n_valid, offset, prepare_fn=None, sb=None):
  """Runs ``_scan_database`` over query blocks (sequentially, to bound memory).

  With ``prepare_fn`` the database is visited in super-blocks of ``sb`` rows, each turned
  once by ``prepare_fn(*rows) -> tuple`` (e.g. codes -> decoded vectors) and then searched
  by every query block: work done per database row (decoding) is paid once per call
  instead of once per query block.
  """
  nq_pad = xq.shape[0]
  xq_blocks = xq.reshape((nq_pad // qb, qb) + xq.shape[1:])

  def by_query_block(rows, start):
    s, i = jax.lax.map(
        lambda q: _scan_database(score_fn, q, rows, k, bb, n_valid, start), xq_blocks)
    return s.reshape(nq_pad, k), i.reshape(nq_pad, k)

  if prepare_fn is None:
    return by_query_block(db, offset)
  nsb = db[0].shape[0] // sb
  super_blocks = tuple(a.reshape((nsb, sb) + a.shape[1:]) for a in db)

  def step(carry, inputs):
    rows, j = inputs
    s, i = by_query_block(tuple(prepare_fn(*rows)), offset + j * sb)
    return _merge_topk(*carry, s, i, k), None

  init = (jnp.full((nq_pad, k), -jnp.inf, jnp.float32), jnp.full((nq_pad, k), -1, jnp.int32))
  (s, i), _ = jax.lax.scan(step, init, (super_blocks, jnp.arange(nsb, dtype=jnp.int32)))
  return s, i


@functools.partial(jax.jit, static_argnames=("score_fn", "k", "qb", "bb", "mesh", "prepare_fn",
                                             "sb"))
def _topk_search(score_fn, xq, db, n_valid, *, k, qb, bb, mesh, prepare_fn=None, sb=None):
  if mesh is None:
    return _search_queries(score_fn, xq, db, k, qb, bb, n_valid, 0, prepare_fn, sb)
  axis = sharding.axis_name(mesh)
  local_n = db[0].shape[0] // sharding.mesh_size(mesh)

  def local(xq, *db):
    offset = jax.lax.axis_index(axis).astype(jnp.int32) * local_n
    s, i = _search_queries(score_fn, xq, db, k, qb, bb, n_valid, offset, prepare_fn, sb)
    # Gather every shard's top-k in shard (= id) order, then merge.
    s = jax.lax.all_gather(s, axis, axis=1, tiled=True)
    i = jax.lax.all_gather(i, axis, axis=1, tiled=True)
    s, pos = jax.lax.top_k(s, k)
    return s, jnp.take_along_axis(i, pos, axis=1)

  db_specs = tuple(P(axis) for _ in db)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(),) + db_specs, out_specs=(P(), P()),
                     check_vma=False)
  return fn(xq, *db)


def topk_search(score_fn: ScoreFn, xq, db: Sequence, k: int, *, mesh: Mesh | None = None,
                query_block: int | None = None, base_block: int | None = None,
                prepare_fn: Callable | None = None, prepared_dim: int | None = None,
                super_block: int | None = None):
  """Generic blocked, optionally sharded, exact top-k by a score function.

  Args:
    score_fn: a hashable function ``score_fn(xq_block, *db_block) -> f32[qb, bb]``; larger
      is better. It must be a module-level function (or otherwise stable) so that the
      compiled search is cached.
    xq: [nq, ...] queries.
    db: tuple of arrays sharing a leading axis nb (e.g. vectors and their norms).
    k: number of results, 1 <= k <= nb.
    mesh: optional 1-D mesh; the database is sharded over its data axis.
    query_block, base_block: tile sizes (defaults bound the tile to ~4M scores).
    prepare_fn: optional hashable ``prepare_fn(*db_rows) -> tuple`` applied once to each
      super-block of database rows (e.g. decoding codes); ``score_fn`` then receives the
      prepared arrays. Use it when per-row work costs more than scoring.
    prepared_dim: width of the prepared rows (picks the tile sizes; default: db's width).
    super_block: rows per prepared super-block (default ~64k, a multiple of base_block).

  Returns:
    (scores f32[nq, k] descending, ids i32[nq, k]); ties are broken by lower id.
  """
  db = tuple(db)
  nq, nb = xq.shape[0], db[0].shape[0]
  ndev = sharding.mesh_size(mesh)
  d = int(np.prod(db[0].shape[1:])) if db[0].ndim > 1 else 1
  nb_local = -(-nb // ndev)
  qb, bb = _block_sizes(nq, nb_local, k, query_block, base_block, prepared_dim or d)
  xq = sharding.pad_rows(jnp.asarray(xq), sharding.round_up(nq, qb))
  sb = None
  if prepare_fn is not None:
    sb = super_block or max(bb, _SUPER_BLOCK_ROWS // bb * bb)
    sb = min(sharding.round_up(sb, bb), sharding.round_up(nb_local, bb))
  nb_pad = sharding.round_up(nb, (sb or bb) * ndev)
  db = tuple(sharding.pad_rows(jnp.asarray(a), nb_pad) for a in db)
  if mesh is not None:
    db = tuple(sharding.shard_rows(a, mesh) for a in db)
    xq = sharding.replicate(xq, mesh)
  s, i = _topk_search(score_fn, xq, db, jnp.int32(nb), k=k, qb=qb, bb=bb, mesh=mesh,
                      prepare_fn=prepare_fn, sb=sb)
  return s[:nq], i[:nq]


# ---------------------------------------------------------------------------------------
# Float vectors.

def _l2_score(xq, xb, half_norm):
  # Ranking by 0.5*|xb|^2 - xq.xb is ranking by L2 (the query norm is a constant per row).
  return jnp.dot(xq, xb.T, precision=jax.lax.Precision.HIGHEST) - half_norm[None, :]


def _ip_score(xq, xb):
  return jnp.dot(xq, xb.T, precision=jax.lax.Precision.HIGHEST)


def _check_k(k, nb):
  k = check_int("k", k, minimum=1)
  if k > nb:
    raise ValueError(f"k={k} is larger than the database size nb={nb}")
  return k


def _as_float(x):
  x = x if isinstance(x, jax.Array) else np.asarray(x)
  return jnp.asarray(x, dtype=jnp.float32)


def knn(xq, xb, k: int, *, metric: str = "l2", mesh: Mesh | None = None,
        query_block: int | None = None, base_block: int | None = None):
  """Exact k-nearest neighbours. xq: f32[nq, d], xb: f32[nb, d] -> (D f32[nq, k], I i32[nq, k]).

  For ``metric="l2"`` D holds squared L2 distances in ascending order; for ``"ip"`` inner
  products in descending order. Ties are broken by lower index. The computation is
  blocked over queries and database and jit-compiled; with ``mesh`` the database is
  sharded over the mesh's data axis and the result is identical to the unsharded call.

  Args:
    xq: queries, any real dtype (converted to float32).
    xb: database vectors, same dimension.
    k: number of neighbours, 1 <= k <= nb.
    metric: "l2" or "ip".
    mesh: optional 1-D ``jax.sharding.Mesh`` (see ``sharding.make_mesh``).
    query_block, base_block: optional tile sizes.

  Example:
    >>> xb = np.eye(3, dtype=np.float32)
    >>> D, I = knn(xb[:1], xb, 2)
    >>> I.tolist()
    [[0, 1]]
  """
  if metric not in ("l2", "ip"):
    raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
  check_vectors("xb", xb, min_rows=1)
  check_vectors("xq", xq, d=xb.shape[1])
  k = _check_k(k, xb.shape[0])
  xq, xb = _as_float(xq), _as_float(xb)
  if metric == "ip":
    return topk_search(_ip_score, xq, (xb,), k, mesh=mesh, query_block=query_block,
                       base_block=base_block)
  half_norm = 0.5 * jnp.sum(xb * xb, axis=1)
  s, i = topk_search(_l2_score, xq, (xb, half_norm), k, mesh=mesh, query_block=query_block,
                     base_block=base_block)
  d = jnp.maximum(jnp.sum(xq * xq, axis=1, keepdims=True) - 2.0 * s, 0.0)
  return d, i


# ---------------------------------------------------------------------------------------
# Binary codes.

def _unpack_signs(codes):
  """u8[n, nbytes] -> f32[n, 8 * nbytes] of +1/-1 (padding bits included: they are equal
  in every code, so they add the same constant to every inner product)."""
  return (binary.unpack_all(codes),)


def hamming_knn(query_codes, base_codes, k: int, *, mesh: Mesh | None = None,
                query_block: int | None = None, base_block: int | None = None):
  """Exact Hamming kNN on packed bit codes.

  query_codes: u8[nq, B], base_codes: u8[nb, B] -> (D i32[nq, k] ascending, I i32[nq, k]).
  Ties are broken by lower index. Sharded over ``mesh`` like ``knn``.
  """
  binary.check_codes("base_codes", base_codes)
  binary.check_codes("query_codes", query_codes, base_codes.shape[1])
  k = _check_k(k, base_codes.shape[0])
  nbits = 8 * base_codes.shape[1]
  # For s, t in {-1, +1}^n: hamming(s, t) = (n - <s, t>) / 2, exact in float32 for
  # n < 2^24, so the search is a matrix product over unpacked signs (the CPU's fastest
  # primitive) instead of xor + popcount. Base codes are unpacked a super-block at a time.
  q = binary.unpack_all(jnp.asarray(query_codes))
  if query_block is None:  # integer scores tie a lot: long rows keep the top-k cheap
    query_block = min(64, sharding.round_up(max(q.shape[0], 1), 8))
  s, i = topk_search(_ip_score, q, (jnp.asarray(base_codes),), k, mesh=mesh,
                     query_block=query_block, base_block=base_block,
                     prepare_fn=_unpack_signs, prepared_dim=nbits)
  return jnp.round((nbits - s) / 2).astype(jnp.int32), i


# ---------------------------------------------------------------------------------------
# Lattice codes.

@functools.lru_cache(maxsize=None)
def _lattice_decode_fn(codec):
  """One decode function per codec (hashable, so the compiled search is reused)."""
  def prepare(codes):
    return (codec.decode(codes),)
  return prepare


def search_lattice(xq, codes, codec, k: int, *, symmetric: bool = False,
                   mesh: Mesh | None = None, query_block: int | None = None,
                   base_block: int | None = None, super_block: int | None = None):
  """Top-k search of float queries against a database of Zn lattice codes.

  Asymmetric (the paper's lattice search): the score is the inner product between the
  query and the decoded unit-norm lattice point, so for unit queries the ranking is the L2
  ranking. Symmetric: the query is quantized first, for comparison.

  Args:
    xq: f32[nq, d] queries (already mapped by the catalyzer).
    codes: u32[nb, codec.code_words] codes from ``codec.encode``.
    codec: a ``lattice.ZnSphereCodec`` of dimension d.
    k: number of results, 1 <= k <= nb.
    symmetric: quantize the queries too.
    mesh: optional mesh; the codes are sharded over its data axis.
    query_block, base_block, super_block: tile sizes (see ``topk_search``); codes are
      decoded one super-block at a time, once per call.

  Returns:
    (scores f32[nq, k] descending inner products, ids i32[nq, k]); ties to the lower id.
  """
  check_vectors("xq", xq, d=codec.d)
  codec.check_codes(codes)
  k = _check_k(k, codes.shape[0])
  xq = _as_float(xq)
  if symmetric:
    xq = codec.decode(codec.encode(xq))
  # Decoding costs more than scoring: each 64k-row super-block of codes is decoded once
  # and then scored against every query block like a float database.
  return topk_search(_ip_score, xq, (jnp.asarray(codes),), k, mesh=mesh,
                     query_block=query_block, base_block=base_block,
                     prepare_fn=_lattice_decode_fn(codec), prepared_dim=codec.d,
                     super_block=super_block)


# ---------------------------------------------------------------------------------------
# Metrics.

def recall_at(indices, groundtruth, ks: Sequence[int] = (1, 10, 100)) -> dict[int, float]:
  """The paper's 1-recall@k: fraction of queries whose true nearest neighbour is in the top k.

  Args:
    indices: i32[nq, K] search results (K >= max(ks)).
    groundtruth: i32[nq, >=1]; column 0 is the true nearest neighbour.
    ks: the k values to report.

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
  return out


# Exact groundtruth: the search above, made exact by a float64 re-rank.

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

  Candidates come from ``knn`` (float32, blocked, jit-compiled), padded by a margin
  and re-ranked in float64, so the result does not depend on float32 rounding.

  Args:
    query: [nq, d] real vectors.
    base: [nb, d] real vectors (uint8 memmaps are fine).
    k: neighbours per query, 1 <= k <= nb.
    metric: "l2" (ascending squared distance) or "ip" (descending inner product).

  Returns:
    i32[nq, k] ids into ``base``.
  """
  if metric not in ("l2", "ip"):
    raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
  k = check_int("k", k, minimum=1, maximum=base.shape[0])
  kc = min(base.shape[0], k + max(16, k // 4))
  _, cand = knn(query, base, kc, metric=metric)
  return _exact_rerank(query, base, np.asarray(cand), k, metric)
