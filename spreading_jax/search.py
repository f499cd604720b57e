"""Exact k-nearest-neighbour search: float vectors, binary codes and lattice codes.

Every search here is the same engine: score a block of queries against a block of the
database, fold the block into a running top-k, and scan over database blocks so that memory
stays bounded (never an ``nq x nb`` matrix). With a mesh, the database is split over the
mesh's data axis with ``jax.shard_map``; each device keeps a local top-k and the results
are merged.

The selection (``_select_into``) is threshold-pruned: the running k-th best score of each
query is a lower bound on what can still enter its top-k, so a block is cut into chunks of
``_CHUNK`` scores and only chunks whose maximum beats that bound are gathered and merged.
After the first blocks almost no chunk does, and a block costs one pass that takes chunk
maxima instead of a top-k over every score. When a row group has more surviving chunks than
the pruned paths hold, that group falls back to the exact two-stage top-k of the whole
block, so the result is always exact. ``lax.approx_max_k`` is an opt-in (``recall_target``)
for accelerators.
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
# Scores per chunk: the unit of pruning (and of the two-stage top-k, see _block_topk).
_CHUNK = 32
# Capacities, in chunks, of the pruned selection paths (tried smallest first).
_PRUNED_CHUNKS = (8, 16, 32, 64)

ScoreFn = Callable[..., jax.Array]


def _block_sizes(nq: int, nb_local: int, k: int, query_block: int | None,
                 base_block: int | None, d: int = 0) -> tuple[int, int]:
  # Narrow vectors: the score tile is cheap, so favour long rows; wider ones: more queries
  # per block make the matmul more efficient.
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


def _clean(s, ids, n_valid):
  # Padding rows (id >= n_valid) score -inf; top_k orders -0.0 below +0.0, so zeros are
  # canonicalized for equal scores to tie by id.
  return jnp.where(ids < n_valid, jnp.where(s == 0, 0.0, s), -jnp.inf)


def _select_into(best_s, best_i, s, ids, k: int, n_valid):
  """Folds one block into a running top-k, exactly.

  best_s f32[q, k] (descending), best_i i32[q, k]: the running top-k, whose ids are all
  lower than ``ids``; s f32[q, b]: the block's raw scores; ids i32[b]: their ids
  (increasing), those >= n_valid being padding.

  A score equal to the running k-th best cannot enter (its id is higher), so only chunks
  whose maximum is strictly above it are candidates. If every row holds at most f such
  chunks, those chunks alone are merged (the smallest capacity f of ``_PRUNED_CHUNKS``
  that fits; nothing at all when no row has one); otherwise the exact top-k of the whole
  block is. Padding and -0.0 are cleaned on the gathered candidates only (chunks are
  picked on raw maxima, which can only over-select), so on the pruned paths the block is
  read once, for its chunk maxima, and never rewritten.
  """
  q, b = s.shape
  chunk = _CHUNK if b % _CHUNK == 0 else 1
  nc = b // chunk
  chunks = s.reshape(q, nc, chunk)
  maxima = jnp.max(chunks, axis=2)  # f32[q, nc]
  need = jnp.max(jnp.sum((maxima > best_s[:, k - 1:k]).astype(jnp.int32), axis=1))
  tiers = [f for f in _PRUNED_CHUNKS if f < nc and f * chunk < b]

  def pruned(f):
    # The f chunks with the largest maxima hold every candidate chunk (there are <= f);
    # visited in index order so that ties still resolve to the lower id.
    sel = jnp.sort(jax.lax.top_k(maxima, f)[1], axis=1)  # i32[q, f]
    cols = (sel[:, :, None] * chunk + jnp.arange(chunk, dtype=jnp.int32)).reshape(q, f * chunk)
    vals = _clean(jnp.take_along_axis(s, cols, axis=1), ids[cols], n_valid)
    return _merge_topk(best_s, best_i, vals, ids[cols], k)

  def full():
    vals, cols = _block_topk(_clean(s, ids[None, :], n_valid), min(k, b))
    return _merge_topk(best_s, best_i, vals, ids[cols], k)

  branches = [lambda: (best_s, best_i)] + [functools.partial(pruned, f) for f in tiers] + [full]
  # 0: nothing beats the bound; i: the i-th capacity fits; last: the exact fallback.
  branch = jnp.sum((need > jnp.array([0] + tiers, jnp.int32)).astype(jnp.int32))
  return jax.lax.switch(branch, branches)


def _empty_topk(shape):
  return jnp.full(shape, -jnp.inf, jnp.float32), jnp.full(shape, -1, jnp.int32)


def _scan_database(score_fn: ScoreFn, xq, db, k: int, bb: int, n_valid, offset, best,
                   recall_target: float | None):
  """Folds ``db`` rows [0, nb_pad) of this shard into the running top-k ``best`` of ``xq``.

  xq: [qb, ...]; db: tuple of arrays with a common leading axis nb_pad (a multiple of bb);
  best: (f32[qb, k], i32[qb, k]) over ids lower than ``offset``. Ids are ``offset + row``;
  rows with id >= n_valid are padding and never returned ahead of a real row.
  """
  nb_pad = db[0].shape[0]
  nblocks = nb_pad // bb
  blocks = tuple(a.reshape((nblocks, bb) + a.shape[1:]) for a in db)
  kb = min(k, bb)

  def step(carry, inputs):
    block, j = inputs
    s = score_fn(xq, *block).astype(jnp.float32)  # f32[qb, bb]
    ids = offset + j * bb + jnp.arange(bb, dtype=jnp.int32)
    if recall_target is not None:
      vals, pos = jax.lax.approx_max_k(_clean(s, ids[None, :], n_valid), kb,
                                       recall_target=recall_target)
      return _merge_topk(*carry, vals, ids[pos], k), None
    return _select_into(*carry, s, ids, k, n_valid), None

  best, _ = jax.lax.scan(step, best, (blocks, jnp.arange(nblocks, dtype=jnp.int32)))
  return best


def _search_queries(score_fn, xq, db, k, qb, bb, n_valid, offset, prepare_fn=None, sb=None,
                    recall_target=None):
  """Runs ``_scan_database`` over query blocks (sequentially, to bound memory).

  With ``prepare_fn`` the database is visited in super-blocks of ``sb`` rows, each turned
  once by ``prepare_fn(*rows) -> tuple`` (e.g. codes -> decoded vectors) and then searched
  by every query block: work done per database row (decoding) is paid once per call
  instead of once per query block. The running top-k (and so the pruning bound) carries
  over from one super-block to the next.
  """
  nq_pad = xq.shape[0]
  nqb = nq_pad // qb
  xq_blocks = xq.reshape((nqb, qb) + xq.shape[1:])

  def by_query_block(rows, start, best):
    return jax.lax.map(
        lambda a: _scan_database(score_fn, a[0], rows, k, bb, n_valid, start, (a[1], a[2]),
                                 recall_target),
        (xq_blocks,) + tuple(best))

  best = _empty_topk((nqb, qb, k))
  if prepare_fn is None:
    s, i = by_query_block(db, offset, best)
  else:
    nsb = db[0].shape[0] // sb
    super_blocks = tuple(a.reshape((nsb, sb) + a.shape[1:]) for a in db)

    def step(best, inputs):
      rows, j = inputs
      return by_query_block(tuple(prepare_fn(*rows)), offset + j * sb, best), None

    (s, i), _ = jax.lax.scan(step, best, (super_blocks, jnp.arange(nsb, dtype=jnp.int32)))
  return s.reshape(nq_pad, k), i.reshape(nq_pad, k)


@functools.partial(jax.jit, static_argnames=("score_fn", "k", "qb", "bb", "mesh", "prepare_fn",
                                             "sb", "recall_target"))
def _topk_search(score_fn, xq, db, n_valid, *, k, qb, bb, mesh, prepare_fn=None, sb=None,
                 recall_target=None):
  if mesh is None:
    return _search_queries(score_fn, xq, db, k, qb, bb, n_valid, 0, prepare_fn, sb,
                           recall_target)
  axis = sharding.axis_name(mesh)
  local_n = db[0].shape[0] // sharding.mesh_size(mesh)

  def local(xq, *db):
    offset = jax.lax.axis_index(axis).astype(jnp.int32) * local_n
    s, i = _search_queries(score_fn, xq, db, k, qb, bb, n_valid, offset, prepare_fn, sb,
                           recall_target)
    # Gather every shard's top-k in shard (= id) order, then merge.
    s = jax.lax.all_gather(s, axis, axis=1, tiled=True)
    i = jax.lax.all_gather(i, axis, axis=1, tiled=True)
    s, pos = jax.lax.top_k(s, k)
    return s, jnp.take_along_axis(i, pos, axis=1)

  db_specs = tuple(P(axis) for _ in db)
  fn = jax.shard_map(local, mesh=mesh, in_specs=(P(),) + db_specs, out_specs=(P(), P()),
                     check_vma=False)
  return fn(xq, *db)


def _check_recall_target(recall_target):
  if recall_target is None:
    return None
  r = float(recall_target)
  if not 0.0 < r <= 1.0:
    raise ValueError(f"recall_target must be in (0, 1], got {recall_target!r}")
  return r


def topk_search(score_fn: ScoreFn, xq, db: Sequence, k: int, *, mesh: Mesh | None = None,
                query_block: int | None = None, base_block: int | None = None,
                prepare_fn: Callable | None = None, prepared_dim: int | None = None,
                super_block: int | None = None, recall_target: float | None = None):
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
    recall_target: opt-in approximate selection with ``lax.approx_max_k`` at this recall
      (fast on TPU; elsewhere XLA may fall back to an exact top-k). None (default): the
      exact, threshold-pruned selection with deterministic ties.

  Returns:
    (scores f32[nq, k] descending, ids i32[nq, k]); ties are broken by lower id.
  """
  db = tuple(db)
  recall_target = _check_recall_target(recall_target)
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
                      prepare_fn=prepare_fn, sb=sb, recall_target=recall_target)
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


# Re-ranking of the l2 search: rows of queries per gather, and the extra candidates.
_RERANK_ROWS = 1024


def _rerank_margin(k: int) -> int:
  return max(8, k // 8)


def _center(xb):
  """A centre for xb that makes ``x - centre`` exact in float32.

  Per coordinate: the mean (taken relative to the first row, so a large common offset
  does not cost accuracy), rounded to a multiple of the largest power of two <= the
  coordinate's standard deviation. Any x near the data is then a multiple of ulp(x) <=
  that power, so the difference is exact, and integer data stays integer (its ties stay
  exact ties). A constant coordinate is centred on its value.
  """
  x0 = xb[0]
  dev = xb - x0
  mean = jnp.mean(dev, axis=0)
  std = jnp.sqrt(jnp.maximum(jnp.mean(dev * dev, axis=0) - mean * mean, 0.0))
  grid = jnp.exp2(jnp.floor(jnp.log2(jnp.where(std > 0, std, 1.0))))
  centre = jnp.round((x0 + mean) / grid) * grid
  return jnp.where(std > 0, centre, x0)


@functools.partial(jax.jit, static_argnames=("k",))
def _rerank_l2(xq, xb, ids, k: int):
  """Exact re-rank: xq f32[nq, d], candidate ids i32[nq, kc] into xb -> the k nearest by
  squared L2 computed from differences (no |x|^2 - 2<x, q> cancellation), ties to the
  lower id. -> (f32[nq, k], i32[nq, k])."""
  nq, kc = ids.shape
  rows = max(1, min(_RERANK_ROWS, nq))  # zero queries: one empty block shape
  nq_pad = sharding.round_up(nq, rows)
  xq_b = sharding.pad_rows(xq, nq_pad).reshape(nq_pad // rows, rows, xq.shape[1])
  ids_b = sharding.pad_rows(ids, nq_pad).reshape(nq_pad // rows, rows, kc)

  def one(args):
    q, i = args
    diff = q[:, None, :] - jnp.take(xb, i, axis=0)  # f32[rows, kc, d]
    d = jnp.sum(diff * diff, axis=2)
    d, i = jax.lax.sort((d, i), dimension=1, num_keys=2)
    return d[:, :k], i[:, :k]

  d, i = jax.lax.map(one, (xq_b, ids_b))
  return d.reshape(nq_pad, k)[:nq], i.reshape(nq_pad, k)[:nq]


def knn(xq, xb, k: int, *, metric: str = "l2", mesh: Mesh | None = None,
        query_block: int | None = None, base_block: int | None = None,
        recall_target: float | None = None):
  """Exact k-nearest neighbours. xq: f32[nq, d], xb: f32[nb, d] -> (D f32[nq, k], I i32[nq, k]).

  For ``metric="l2"`` D holds squared L2 distances in ascending order; for ``"ip"`` inner
  products in descending order. Ties are broken by lower index. The computation is
  blocked over queries and database and jit-compiled; with ``mesh`` the database is
  sharded over the mesh's data axis and the result is identical to the unsharded call.

  L2 is exact on data far from the origin too: both sides are centred (exactly, see
  ``_center``) on the database's middle before the matmul-based scoring, which otherwise
  subtracts large, nearly equal numbers, and the best ``k + max(8, k // 8)`` candidates
  are re-ranked by distances computed from coordinate differences.

  Args:
    xq: queries, any real dtype (converted to float32).
    xb: database vectors, same dimension.
    k: number of neighbours, 1 <= k <= nb.
    metric: "l2" or "ip".
    mesh: optional 1-D ``jax.sharding.Mesh`` (see ``sharding.make_mesh``).
    query_block, base_block: optional tile sizes.
    recall_target: opt-in approximate selection (``lax.approx_max_k``, see
      ``topk_search``); None (default) is exact.

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
  opts = dict(mesh=mesh, query_block=query_block, base_block=base_block,
              recall_target=recall_target)
  if metric == "ip":
    return topk_search(_ip_score, xq, (xb,), k, **opts)
  kc = min(xb.shape[0], k + _rerank_margin(k))
  xbc, xqc = _centered(xb, xq)
  half_norm = 0.5 * jnp.sum(xbc * xbc, axis=1)
  _, i = topk_search(_l2_score, xqc, (xbc, half_norm), kc, **opts)
  return _rerank_l2(xq, xb, i, k)


@jax.jit
def _centered(xb, xq):
  c = _center(xb)
  return xb - c, xq - c


# ---------------------------------------------------------------------------------------
# Binary codes.

@jax.jit
def _pack_words(codes):
  """u8[n, B] -> u32[n, ceil(B / 4)] (zero bytes pad the last word: they are equal in
  every code, so they never add to a distance)."""
  n, nbytes = codes.shape
  codes = jnp.pad(codes, ((0, 0), (0, -nbytes % 4)))
  # The word count is explicit: reshape cannot infer a -1 axis from zero rows.
  return jax.lax.bitcast_convert_type(codes.reshape(n, -(-nbytes // 4), 4), jnp.uint32)


def _hamming_score(xq, xb):
  """-Hamming distance, u32[qb, W] x u32[bb, W] -> f32[qb, bb] (exact integers): xor and
  popcount word by word, which XLA vectorizes (AVX-512 VPOPCNTDQ on recent x86)."""
  dist = jnp.zeros((xq.shape[0], xb.shape[0]), jnp.int32)
  for w in range(xq.shape[1]):
    dist = dist + jax.lax.population_count(xq[:, None, w] ^ xb[None, :, w]).astype(jnp.int32)
  return -dist.astype(jnp.float32)


def hamming_knn(query_codes, base_codes, k: int, *, mesh: Mesh | None = None,
                query_block: int | None = None, base_block: int | None = None,
                recall_target: float | None = None):
  """Exact Hamming kNN on packed bit codes.

  query_codes: u8[nq, B], base_codes: u8[nb, B] -> (D i32[nq, k] ascending, I i32[nq, k]).
  Ties are broken by lower index. Sharded over ``mesh`` like ``knn``. Distances are
  xor + popcount on 32-bit words; the selection is the same threshold-pruned engine as
  every search (integer distances make its strict "beats the k-th best" test prune hard).
  """
  binary.check_codes("base_codes", base_codes)
  binary.check_codes("query_codes", query_codes, base_codes.shape[1])
  k = _check_k(k, base_codes.shape[0])
  q, b = _pack_words(jnp.asarray(query_codes)), _pack_words(jnp.asarray(base_codes))
  s, i = topk_search(_hamming_score, q, (b,), k, mesh=mesh, query_block=query_block,
                     base_block=base_block, prepared_dim=8 * base_codes.shape[1],
                     recall_target=recall_target)
  return (-s).astype(jnp.int32), i


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
