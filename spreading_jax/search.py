"""Exact k-nearest-neighbour search: float vectors, binary codes and lattice codes.

Every search here is the same engine (``topk_search``), a two-stage exact selection:

1. Score a block of queries against a block of the database and keep only the maximum of
   each chunk of ``_CHUNK`` consecutive rows. The block's scores never leave the cache-sized
   tile; what is stored is 1/32 of them.
2. Per query, take the ``k`` chunks with the largest maxima, gather their rows, score them
   again and take the top ``k`` of those ``32 k`` candidates.

This is exact: if an element of the true top-k lay in a chunk outside the chosen ``k``, each
chosen chunk would hold an element (its maximum) ranked before it, so ``k`` elements would
rank before it. Ties resolve to the lower id because equal maxima pick the lower chunk and
the candidates are scored in id order. Stage 1 has no data-dependent branch, so a search
costs one matmul-and-max pass over the database plus a small gather, instead of a running
top-k merged block by block. The database is visited in segments (bounding the stored
maxima, and the rows a ``prepare_fn`` decodes at a time); each segment's top-k is merged
into the running one. With a mesh, the database is split over the mesh's data axis with
``jax.shard_map``; each device keeps a local top-k and the results are merged.
``lax.approx_max_k`` is an opt-in (``recall_target``) for the chunk choice on accelerators.

Large float searches (``knn`` on a CPU from d=40, see ``_screened`` for when) run stage 1
in bfloat16: each chunk's maximum plus a proven bound on the bfloat16 error is an upper
bound of its float32 maximum, stage 2 re-scores the ``k + max(k, 32)`` chunks of highest
bound in float32, and a query is exact when its k-th score beats every bound left out. The
few queries where it does not (scores closer than the bfloat16 error) are searched again
in float32. On a 2-core Zen 4 CPU this is 1.3x faster at d=128 (bfloat16 products run at
1.5x the float32 rate).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from spreading_jax import binary, sharding
from spreading_jax._validation import check_int, check_vectors, is_concrete

# Rows per chunk: the unit whose maximum stage 1 keeps.
_CHUNK = 32
# From this many rows a database is searched in place, not copied into a padded array
# (whose length is shared by nearby sizes, which then reuse one compiled search).
_UNPADDED_ROWS = 1 << 17


class _Tiles(NamedTuple):
  """Tile limits of the engine on one kind of backend."""
  elements: int      # scores in one (query block x database block) tile
  query_block: int   # most queries in a block
  maxima: int        # stored chunk maxima per query block and segment
  prepared: int      # elements of one prepared (e.g. decoded) segment
  rescore: int | None  # gathered elements re-scored at once (None: one query at a time)
  rerank: int        # gathered elements of knn's exact l2 re-rank at once
  screen_dim: int | None  # knn from this dimension takes the bfloat16 screen (None: never)


# CPU: a 4 MB tile stays in cache through the max pass; 64 MB of maxima (a 1M-row
# segment at 512 queries); 128 MB of decoded floats; stage 2 one query at a time; the l2
# re-rank 16 MB at a time (1k queries x 112 candidates x 128-d: 20 ms, 34 ms in 58 MB).
# The bfloat16 screen from d=40 (1k x 1M, k=100, screen vs float32 engine, medians of
# 10: d=24 0.72 vs 0.68 s, 32 0.76 vs 0.74, 48 1.00 vs 1.08, 64 0.93 vs 1.07, 128 1.33
# vs 1.73): below, the matmul is too small a share of the search to pay for the wider
# second stage.
_CPU_TILES = _Tiles(1 << 20, 512, 1 << 24, 1 << 25, None, 1 << 22, 40)
# GPU/TPU: each scan step is a kernel launch, so tiles are 32x larger (2048 x 16384), and
# segments of up to 1M rows (256 MB of maxima per query block) cost fewer re-scoring
# passes. Measured on an H200: mining 500k x 500k x 24-d took 3.70 s with the CPU tiles,
# 1.78 s with these tiles and 262k-row segments, 1.60 s in one segment; 1k x 1M x 96-d
# kNN ran at 67k q/s instead of 44k. Stage 2 re-scores up to 256 MB of gathered rows at once.
# No bfloat16 screen yet: it has not been measured on an accelerator (where it replaces the
# six-pass float32 matmul of Precision.HIGHEST with one bfloat16 pass).
_ACCEL_TILES = _Tiles(1 << 25, 2048, 1 << 26, 1 << 25, 1 << 26, 1 << 24, None)


def _tiles() -> _Tiles:
  return _CPU_TILES if jax.default_backend() == "cpu" else _ACCEL_TILES


ScoreFn = Callable[..., jax.Array]
# screen_fn(xq_block, *db_block) -> (scores f32[qb, bb], q_scale f32[qb, m],
# row_scale f32[bb, m], row_offset f32[bb]): a cheap score within
# sum_j q_scale[q, j] row_scale[x, j] + row_offset[x] of score_fn's (see ``_screened``).
ScreenFn = Callable[..., tuple]


def _block_sizes(nq: int, nb_local: int, k: int, query_block: int | None,
                 base_block: int | None) -> tuple[int, int]:
  # The fewest query blocks of at most ``_Tiles.query_block``, split evenly (1000 queries:
  # two blocks of 504 on a CPU, not 512 + 488 padded to 1024).
  tiles = _tiles()
  nqb = -(-max(nq, 1) // tiles.query_block)
  qb = query_block or sharding.round_up(-(-max(nq, 1) // nqb), 8)
  bb = base_block or max(2048, tiles.elements // qb)
  bb = min(bb, sharding.round_up(max(nb_local, 1), 128))
  # A block holds whole chunks and at least k rows.
  return qb, sharding.round_up(max(bb, k), _CHUNK)


def _segment_rows(nb_local: int, qb: int, bb: int, prepared_width: int,
                  super_block: int | None) -> int:
  """Rows per segment: a multiple of bb that splits nb_local into near-equal parts.

  A segment is as long as the stored chunk maxima allow (``_Tiles.maxima``) and, with a
  ``prepare_fn``, as its prepared rows allow (``_Tiles.prepared``): every segment costs
  one re-scoring pass, so fewer is faster.
  """
  tiles = _tiles()
  cap = super_block or tiles.maxima // qb * _CHUNK
  if prepared_width and not super_block:
    cap = min(cap, tiles.prepared // prepared_width)
  cap = max(bb, cap // bb * bb)
  parts = -(-max(nb_local, 1) // cap)
  return sharding.round_up(-(-max(nb_local, 1) // parts), bb)


def _merge_topk(s1, i1, s2, i2, k):
  # Concatenating in id order and a stable top-k keep ties ordered by lower id.
  s = jnp.concatenate([s1, s2], axis=1)
  i = jnp.concatenate([i1, i2], axis=1)
  s, pos = jax.lax.top_k(s, k)
  return s, jnp.take_along_axis(i, pos, axis=1)


def _clean(s, valid):
  # Rows that do not count (``_valid``) score -inf; top_k orders -0.0 below +0.0, so zeros
  # are canonicalized for equal scores to tie by id.
  return jnp.where(valid, jnp.where(s == 0, 0.0, s), -jnp.inf)


def _block_starts(nblocks: int, bb: int, base, n_src: int):
  """(nominal start, read start) of each block of a segment that begins at row ``base`` of a
  source of ``n_src`` rows. A block that would run past the source's end is read from
  ``n_src - bb`` instead; its rows before the nominal start belong to earlier blocks and
  are masked. Unpadded databases are read in place this way, without a padded copy."""
  nominal = base + jnp.arange(nblocks, dtype=jnp.int32) * bb
  return nominal, jnp.minimum(nominal, n_src - bb)


def _valid(rows, nominal, id0, n_valid):
  # A source row counts if its block has not seen it before and it is not padding.
  return (rows >= nominal) & (id0 + rows < n_valid)


def _chunk_maxima(score_fn: ScoreFn, xq, src, nominal, starts, bb: int, id0, n_valid,
                  screen_fn: ScreenFn | None = None):
  """Stage 1: f32[qb, nblocks * bb / _CHUNK], the maximum score of each chunk of a segment.

  The segment is the blocks of ``bb`` rows of ``src`` at ``nominal`` and read at ``starts``
  (``_block_starts``); source row r has id ``id0 + r``. Rows that do not count (``_valid``)
  score -inf and the maxima's zeros are +0.0, so that chunks compare as their best real,
  cleaned scores do. With ``screen_fn`` each value is instead an upper bound of the chunk's
  best ``score_fn`` score: the screen's maximum plus its error bound (NaN counts as +inf).
  """
  qb, nc, nblocks = xq.shape[0], bb // _CHUNK, nominal.shape[0]

  def by_chunk(x):
    return x.reshape(x.shape[:-1] + (nc, _CHUNK))

  def step(maxima, inputs):
    j, nom, start = inputs
    block = tuple(jax.lax.dynamic_slice_in_dim(a, start, bb) for a in src)
    # [qb, bb] in the score's own dtype (integer scores stay integer: converting the whole
    # tile to float cost 3x the Hamming scoring itself); fused into the max below.
    if screen_fn is None:
      s = score_fn(xq, *block)
    else:
      s, q_scale, row_scale, row_offset = screen_fn(xq, *block)
    low = -jnp.inf if jnp.issubdtype(s.dtype, jnp.floating) else jnp.iinfo(s.dtype).min
    valid = _valid(start + jnp.arange(bb, dtype=jnp.int32), nom, id0, n_valid)
    m = jnp.max(by_chunk(jnp.where(valid[None, :], s, low)), axis=2)
    m = jnp.where(m == low, -jnp.inf, m.astype(jnp.float32))
    if screen_fn is not None:
      # Each term's bound at the chunk's largest row scale: [qb, m] x [m, nc].
      row_max = jnp.max(by_chunk(row_scale.T), axis=2)
      err = (jnp.dot(q_scale, row_max, precision=jax.lax.Precision.HIGHEST)
             + jnp.max(by_chunk(row_offset), axis=1)[None, :])
      m = m + err
      m = jnp.where(jnp.isnan(m), jnp.inf, m)
    return jax.lax.dynamic_update_slice(maxima, m[:, None, :], (0, j, 0)), None

  maxima = jnp.full((qb, nblocks, nc), -jnp.inf, jnp.float32)
  maxima, _ = jax.lax.scan(step, maxima,
                           (jnp.arange(nblocks, dtype=jnp.int32), nominal, starts))
  maxima = maxima.reshape(qb, nblocks * nc)
  return jnp.where(maxima == 0, 0.0, maxima)


def _segment_topk(score_fn: ScoreFn, xq, src, base, nblocks: int, k: int, bb: int, id0,
                  n_valid, recall_target: float | None, screen_fn: ScreenFn | None = None,
                  screen_chunks: int = 0):
  """Exact top-k of xq [qb, ...] over one segment (see ``_chunk_maxima``).
  -> (f32[qb, k'], i32[qb, k'] ids, f32[qb] bound) with k' = min(k, segment rows),
  descending, ties to the lower id. With ``screen_fn`` the ``screen_chunks`` chunks of
  highest bound are re-scored and ``bound`` is at least every bound left out (-inf if
  none): the result is exact where its k-th score is above it. Without, ``bound`` is -inf.
  """
  qb = xq.shape[0]
  nominal, starts = _block_starts(nblocks, bb, base, src[0].shape[0])
  maxima = _chunk_maxima(score_fn, xq, src, nominal, starts, bb, id0, n_valid, screen_fn)
  kc = min(screen_chunks if screen_fn is not None else k, maxima.shape[1])
  bound = jnp.full((qb,), -jnp.inf, jnp.float32)
  if screen_fn is not None and kc < maxima.shape[1]:
    # The lowest chosen bound is >= every bound left out. (Slicing top_k's outputs, e.g.
    # taking kc + 1 and the last value, makes XLA:CPU sort the whole row: 50x slower.)
    vals, top = jax.lax.top_k(maxima, kc)
    bound = jnp.min(vals, axis=1)
  elif recall_target is None:
    top = jax.lax.top_k(maxima, kc)[1]
  else:
    top = jax.lax.approx_max_k(maxima, kc, recall_target=recall_target)[1]
  top = jnp.sort(top, axis=1)  # candidates in id order: ties go to the lower id
  nc = bb // _CHUNK
  first = starts[top // nc] + top % nc * _CHUNK  # i32[qb, kc]: each chunk's first row
  width = kc * _CHUNK
  kk = min(k, width)
  offsets = jnp.arange(_CHUNK, dtype=jnp.int32)

  def rescore(args):
    q, first, nom = args
    rows = (first[:, None] + offsets).reshape(width)
    cand = tuple(jnp.take(a, rows, axis=0) for a in src)
    valid = _valid(rows, jnp.repeat(nom, _CHUNK), id0, n_valid)
    s = _clean(score_fn(q[None], *cand)[0].astype(jnp.float32), valid)
    vals, pos = jax.lax.top_k(s, kk)
    return vals, id0 + rows[pos]

  per_query = width * sum(int(np.prod(a.shape[1:])) for a in src)
  vals, ids = jax.lax.map(rescore, (xq, first, nominal[top // nc]),
                          batch_size=_rescore_batch(qb, per_query))
  return vals, ids, bound


def _rescore_batch(qb: int, per_query: int) -> int | None:
  """Queries re-scored together (a vmap) in stage 2, each gathering ``per_query`` elements.
  On a CPU one at a time: batching the gathers and matrix-vector products measured slower
  (0.24 s vs 0.17 s per 1k queries at d=128). On a GPU/TPU as much of the query block as
  ``_Tiles.rescore`` allows: a loop of tiny steps would be launch-bound."""
  budget = _tiles().rescore
  return None if budget is None else _items_within(budget, qb, per_query)


def _items_within(budget: int, n: int, size: int) -> int:
  """How many of ``n`` items of ``size`` elements each fit in ``budget`` elements (at least
  1, at most n; 1 when n is 0)."""
  return max(1, min(n, budget // max(size, 1)))


def _empty_topk(shape):
  return jnp.full(shape, -jnp.inf, jnp.float32), jnp.full(shape, -1, jnp.int32)


def _search_local(score_fn, xq, db, k, qb, bb, seg, n_valid, offset, prepare_fn=None,
                  recall_target=None, extra=(), screen_fn=None, screen_chunks=0):
  """Top-k of every query over this device's rows ``db``.

  Segments of ``seg`` rows are visited in id order and searched by every query block; each
  segment's top-k is merged into the running one. With ``prepare_fn`` (e.g. codes ->
  decoded vectors) ``db`` is padded to whole segments and each is prepared once; without,
  ``db`` may end anywhere after its first block and is read in place. ``extra`` arrays
  (not split by rows) are passed to ``score_fn`` after the database rows.
  """
  if extra:
    base_fn, base_screen = score_fn, screen_fn
    score_fn = lambda q, *rows: base_fn(q, *rows, *extra)  # noqa: E731
    if screen_fn is not None:
      screen_fn = lambda q, *rows: base_screen(q, *rows, *extra)  # noqa: E731
  nq_pad = xq.shape[0]
  nqb = nq_pad // qb
  xq_blocks = xq.reshape((nqb, qb) + xq.shape[1:])
  n_src = db[0].shape[0]
  nseg = -(-n_src // seg)
  nblocks = seg // bb
  kk = min(k, seg)

  def step(best, s):
    if prepare_fn is not None:
      rows = tuple(jax.lax.dynamic_slice_in_dim(a, s * seg, seg) for a in db)
      src, base, id0 = tuple(prepare_fn(*rows)), 0, offset + s * seg
    else:
      src, base, id0 = db, s * seg, offset

    def by_query_block(args):
      q, bs, bi, bound = args
      s, i, b = _segment_topk(score_fn, q, src, base, nblocks, kk, bb, id0, n_valid,
                              recall_target, screen_fn, screen_chunks)
      return _merge_topk(bs, bi, s, i, k) + (jnp.maximum(bound, b),)

    return jax.lax.map(by_query_block, (xq_blocks,) + tuple(best)), None

  best = _empty_topk((nqb, qb, k)) + (jnp.full((nqb, qb), -jnp.inf, jnp.float32),)
  (s, i, bound), _ = jax.lax.scan(step, best, jnp.arange(nseg, dtype=jnp.int32))
  return s.reshape(nq_pad, k), i.reshape(nq_pad, k), bound.reshape(nq_pad)


@functools.partial(jax.jit, static_argnames=("score_fn", "k", "qb", "bb", "seg", "mesh",
                                             "prepare_fn", "recall_target", "screen_fn",
                                             "screen_chunks"))
def _topk_search(score_fn, xq, db, n_valid, extra=(), *, k, qb, bb, seg, mesh,
                 prepare_fn=None, recall_target=None, screen_fn=None, screen_chunks=0):
  """-> (scores, ids, exact): ``exact`` bool[nq] is True where the result is exact (always,
  without ``screen_fn``): its k-th score beats every bound the screen left out."""
  opts = dict(prepare_fn=prepare_fn, recall_target=recall_target, extra=extra,
              screen_fn=screen_fn, screen_chunks=screen_chunks)
  if mesh is None:
    s, i, bound = _search_local(score_fn, xq, db, k, qb, bb, seg, n_valid, 0, **opts)
    return s, i, (s[:, -1] > bound) | (screen_fn is None)
  axis = sharding.axis_name(mesh)
  local_n = db[0].shape[0] // sharding.mesh_size(mesh)
  n_db = len(db)

  def local(xq, *arrays):
    db, extra = arrays[:n_db], arrays[n_db:]
    offset = jax.lax.axis_index(axis).astype(jnp.int32) * local_n
    s, i, bound = _search_local(score_fn, xq, db, k, qb, bb, seg, n_valid, offset,
                                **dict(opts, extra=extra))
    # Gather every shard's top-k in shard (= id) order, then merge.
    s = jax.lax.all_gather(s, axis, axis=1, tiled=True)
    i = jax.lax.all_gather(i, axis, axis=1, tiled=True)
    s, pos = jax.lax.top_k(s, k)
    bound = jax.lax.pmax(bound, axis)
    return s, jnp.take_along_axis(i, pos, axis=1), (s[:, -1] > bound) | (screen_fn is None)

  specs = (P(),) + tuple(P(axis) for _ in db) + tuple(P() for _ in extra)
  fn = jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=(P(), P(), P()),
                     check_vma=False)
  return fn(xq, *db, *extra)


def _check_recall_target(recall_target):
  if recall_target is None:
    return None
  r = float(recall_target)
  if not 0.0 < r <= 1.0:
    raise ValueError(f"recall_target must be in (0, 1], got {recall_target!r}")
  return r


def topk_search(score_fn: ScoreFn, xq, db: Sequence, k: int, *, mesh: Mesh | None = None,
                query_block: int | None = None, base_block: int | None = None,
                prepare_fn: Callable | None = None, super_block: int | None = None,
                recall_target: float | None = None):
  """Generic blocked, optionally sharded, exact top-k by a score function.

  Args:
    score_fn: a hashable function ``score_fn(xq_block, *db_block) -> [qb, bb]`` (float, or
      integer below 2^24 in magnitude); larger is better. It must be a module-level function
      (or otherwise stable) so that the compiled search is cached, and score a row the same
      way whatever block it is in.
    xq: [nq, ...] queries.
    db: tuple of arrays sharing a leading axis nb (e.g. vectors and their norms).
    k: number of results, 1 <= k <= nb.
    mesh: optional 1-D mesh; the database is sharded over its data axis.
    query_block, base_block: tile sizes (defaults: a 1M-score tile and up to 512 queries
      on a CPU, a 32M-score tile and up to 2048 queries on a GPU/TPU; see ``_Tiles``);
      base_block is rounded up to a multiple of 32 rows (a chunk).
    prepare_fn: optional hashable ``prepare_fn(*db_rows) -> tuple`` applied once to each
      segment of database rows (e.g. decoding codes); ``score_fn`` then receives the
      prepared arrays. Use it when per-row work costs more than scoring.
    super_block: rows per segment (default: as many as keep the stored chunk maxima within
      64 MB per query block on a CPU, 256 MB on a GPU/TPU, and, with ``prepare_fn``, the
      prepared rows within 128 MB); rounded to a multiple of base_block.
    recall_target: opt-in approximate choice of the candidate chunks with
      ``lax.approx_max_k`` at this recall (fast on TPU; elsewhere XLA may fall back to an
      exact top-k). None (default): exact, with deterministic ties.

  Returns:
    (scores f32[nq, k] descending, ids i32[nq, k]); ties are broken by lower id.
  """
  db = tuple(db)
  recall_target = _check_recall_target(recall_target)
  nb = db[0].shape[0]
  width = 0
  if prepare_fn is not None:
    rows = tuple(jax.ShapeDtypeStruct((1,) + a.shape[1:], a.dtype) for a in db)
    width = sum(int(np.prod(o.shape)) for o in jax.eval_shape(prepare_fn, *rows))
  plan = _plan(xq.shape[0], nb, k, mesh, query_block, base_block, width, super_block)
  db = tuple(sharding.pad_rows(jnp.asarray(a), plan[3]) for a in db)
  return _run(score_fn, xq, db, nb, k, plan, mesh, prepare_fn, recall_target)[:2]


def _plan(nq: int, nb: int, k: int, mesh, query_block, base_block, prepared_width: int,
          super_block) -> tuple[int, int, int, int]:
  """(query block, base block, segment rows, padded database rows) of a search;
  ``prepared_width``: elements per prepared row (0 without a ``prepare_fn``)."""
  ndev = sharding.mesh_size(mesh)
  nb_local = -(-nb // ndev)
  qb, bb = _block_sizes(nq, nb_local, k, query_block, base_block)
  seg = _segment_rows(nb_local, qb, bb, prepared_width, super_block)
  if mesh is None and not prepared_width and nb >= max(bb, _UNPADDED_ROWS):
    return qb, bb, seg, nb  # read in place (see _block_starts)
  return qb, bb, seg, sharding.round_up(nb, seg * ndev)


def _run(score_fn, xq, db, n_valid: int, k: int, plan, mesh, prepare_fn=None,
         recall_target=None, extra=(), screen_fn=None, screen_chunks=0):
  """Searches a database already padded to ``plan``'s row count; rows >= n_valid are
  padding. ``extra``: arrays every ``score_fn`` call receives after the rows (replicated
  on a mesh). -> (scores, ids, exact) as ``_topk_search``."""
  qb, bb, seg, _ = plan
  nq = xq.shape[0]
  xq = sharding.pad_rows(jnp.asarray(xq), sharding.round_up(nq, qb))
  if mesh is not None:
    db = tuple(sharding.shard_rows(a, mesh) for a in db)
    xq = sharding.replicate(xq, mesh)
    extra = tuple(sharding.replicate(a, mesh) for a in extra)
  s, i, exact = _topk_search(score_fn, xq, db, jnp.int32(n_valid), tuple(extra), k=k, qb=qb,
                             bb=bb, seg=seg, mesh=mesh, prepare_fn=prepare_fn,
                             recall_target=recall_target, screen_fn=screen_fn,
                             screen_chunks=screen_chunks)
  return s[:nq], i[:nq], exact[:nq]


# ---------------------------------------------------------------------------------------
# Float vectors.

def _l2_score(xq, xb, half_norm):
  # Ranking by 0.5*|xb|^2 - xq.xb is ranking by L2 (the query norm is a constant per row).
  return jnp.dot(xq, xb.T, precision=jax.lax.Precision.HIGHEST) - half_norm[None, :]


def _l2_score_centred(xq, xb, half_norm, centre):
  # _l2_score of the rows moved by -centre: the subtraction fuses into the copy of each
  # block into the tile, so the database is never copied whole.
  return _l2_score(xq, xb - centre, half_norm)


def _ip_score(xq, xb):
  return jnp.dot(xq, xb.T, precision=jax.lax.Precision.HIGHEST)


def _bf16_split(x):
  """x -> (bfloat16 x, |x - that| per row): the rounded rows and what rounding moved."""
  lo = x.astype(jnp.bfloat16)
  r = x - lo.astype(jnp.float32)
  return lo, jnp.sqrt(jnp.sum(r * r, axis=1))


def _bf16_screen(xq, xb, row_norm, half_norm=None):
  """bfloat16 scores of xq against xb (float32 products and sums: 1.5x the float32 matmul
  on a Zen 4 CPU with AVX512-BF16, several times it on GPU/TPU matrix units), minus the
  half norms if given, with their error bound (see ``ScreenFn``):

  |q.x - q'.x'| = |(q - q').x + q'.(x - x')| <= |q - q'| |x| + |q'| |x - x'| (q', x' the
  rounded vectors; Cauchy-Schwarz twice, with the rounding residuals' actual norms, about
  half the worst case u|q| of 8-bit significands). Summing d products in float32, here and
  in the reference score, adds at most 2 d 2^-23 |q| |x| (2^-23: truncating adders too); the
  float32 subtraction of a half norm rounds by 2^-24 of |score| in each; bfloat16 units may
  flush subnormals, covered by the absolute terms. 25% slack on top.
  """
  d = xq.shape[1]
  q_lo, q_res = _bf16_split(xq)
  x_lo, x_res = _bf16_split(xb)
  s = jax.lax.dot_general(q_lo, x_lo, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32)
  q_norm = jnp.sqrt(jnp.sum(xq * xq, axis=1))
  q_scale = 1.25 * jnp.stack([q_res + (2 * d + 1) * 2.0 ** -23 * q_norm, q_norm], axis=1)
  row_scale = jnp.stack([row_norm + d * 2.0 ** -110, x_res], axis=1)
  row_offset = d * 2.0 ** -120 * (1.0 + row_norm)
  if half_norm is not None:
    s = s - half_norm[None, :]
    row_offset = row_offset + 2.0 ** -22 * half_norm
  return s, q_scale, row_scale, row_offset


def _l2_screen(xq, xb, half_norm):
  return _bf16_screen(xq, xb, jnp.sqrt(2.0 * half_norm), half_norm)


def _l2_screen_centred(xq, xb, half_norm, centre):
  return _l2_screen(xq, xb - centre, half_norm)


def _ip_screen(xq, xb):
  return _bf16_screen(xq, xb, jnp.sqrt(jnp.sum(xb * xb, axis=1)))


# The bfloat16 screen of each float32 score (``_screened``).
_SCREENS = {_l2_score: _l2_screen, _l2_score_centred: _l2_screen_centred,
            _ip_score: _ip_screen}


def _check_k(k, nb):
  k = check_int("k", k, minimum=1)
  if k > nb:
    raise ValueError(f"k={k} is larger than the database size nb={nb}")
  return k


def _as_float(x):
  x = x if isinstance(x, jax.Array) else np.asarray(x)
  return jnp.asarray(x, dtype=jnp.float32)


# Database rows whose statistics place the centre of an l2 search.
_CENTER_SAMPLE = 1 << 16


def _rerank_margin(k: int) -> int:
  """Extra candidates the l2 search re-ranks exactly."""
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


def _rerank_rows(nq: int, kc: int, d: int) -> int:
  """Queries re-ranked per gather: kc candidates of d floats each, within ``_Tiles.rerank``
  (at least 1: zero queries are one empty block)."""
  return _items_within(_tiles().rerank, nq, kc * d)


@functools.partial(jax.jit, static_argnames=("k",))
def _rerank_l2(xq, xb, ids, k: int):
  """Exact re-rank: xq f32[nq, d], candidate ids i32[nq, kc] into xb -> the k nearest by
  squared L2 computed from differences (no |x|^2 - 2<x, q> cancellation), ties to the
  lower id. -> (f32[nq, k], i32[nq, k])."""
  nq, kc = ids.shape
  rows = _rerank_rows(nq, kc, xq.shape[1])
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

  On a CPU, from d=40 and on large databases (k=100: from 459k rows per device), the first
  pass over the database scores in bfloat16 with a proven error bound; only the queries
  whose result it cannot prove exact are searched again in float32 (one read back of nq
  booleans decides), so the result is the float32 search's either way.

  L2 is exact on data far from the origin too: both sides are centred (exactly, see
  ``_center``; the centre comes from a strided sample of 64k-128k database rows) on the
  database's middle before the matmul-based scoring, which otherwise subtracts large,
  nearly equal numbers, and the best ``k + max(8, k // 8)`` candidates are re-ranked by
  distances computed from coordinate differences. The database is centred block by block
  as it is scored, never copied; the centre is read back to the host (d floats) so that
  zero-mean data skips the subtraction.

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
  nb = xb.shape[0]
  recall_target = _check_recall_target(recall_target)
  if metric == "ip":
    plan = _plan(xq.shape[0], nb, k, mesh, query_block, base_block, 0, None)
    xbp = sharding.pad_rows(xb, plan[3])
    return _screened(_ip_score, xq, (xbp,), nb, k, plan, mesh, recall_target)
  kc = min(nb, k + _rerank_margin(k))
  plan = _plan(xq.shape[0], nb, kc, mesh, query_block, base_block, 0, None)
  # Data whose squares leave float32's range is searched scaled by a power of two (exact:
  # only exponents move) and its distances scaled back. The magnitude comes from the
  # queries and the centre's sample; rows beyond the sample show up as non-finite norms.
  centre, sample_max = _sample_centre(xb)
  shift = _l2_shift(float(jnp.maximum(_max_abs(xq), sample_max)))
  for attempt in range(2):
    xqs, xbs = (xq, xb) if not shift else (_scaled(xq, -shift), _scaled(xb, -shift))
    if shift:
      centre, _ = _sample_centre(xbs)
    xbp = sharding.pad_rows(xbs, plan[3])
    if np.any(np.asarray(centre)):  # one small read back
      score, extra = _l2_score_centred, (centre,)
      half_norm, xqc = _half_norms(xbp, centre), xqs - centre
    else:
      score, extra, half_norm, xqc = _l2_score, (), _half_norms(xbp), xqs
    if attempt or np.isfinite(float(jnp.max(half_norm))):
      break
    shift = _l2_shift(float(_max_abs(xb)), force=True)  # outliers: the whole database
  _, i = _screened(score, xqc, (xbp, half_norm), nb, kc, plan, mesh, recall_target, extra)
  d, i = _rerank_l2(xqs, xbs, i, k)
  if shift:
    top = float(jnp.max(d)) * 2.0 ** (2 * shift) if d.size else 0.0
    if top > _F32_MAX:
      raise ValueError(f"squared L2 distances up to {top:.3g} exceed float32's range "
                       f"({_F32_MAX:.3g}); divide the vectors by a power of two (the ids "
                       "do not change)")
    d = _scaled(d, 2 * shift)
  return d, i


_F32_MAX = float(jnp.finfo(jnp.float32).max)
# Magnitudes (powers of two) an l2 search runs at unscaled: squares of differences down
# to 2^-24 of 2^-20 and sums of d squares of 2^41 stay normal float32 numbers.
_L2_RANGE = (-20, 40)


def _l2_shift(top: float, force: bool = False) -> int:
  """The power of two s such that data of largest magnitude ``top`` is searched as
  x * 2^-s, of magnitude in [2^39, 2^40): the top of ``_L2_RANGE``, so that the smallest
  differences keep as much range as the largest leave them. 0 when ``top`` is within
  ``_L2_RANGE`` (unless ``force``) or 0."""
  if not top or not np.isfinite(top):
    return 0
  e = int(np.floor(np.log2(top)))
  return e - (_L2_RANGE[1] - 1) if force or not _L2_RANGE[0] <= e < _L2_RANGE[1] else 0


@jax.jit
def _max_abs(x):
  return jnp.max(jnp.abs(x), initial=0.0)


@functools.partial(jax.jit, static_argnames=("e",))
def _scaled(x, e: int):
  """x * 2^e, exact while the result is a normal float32 (ldexp: no 2^e constant, which
  would leave float32's range for |e| > 127)."""
  return jnp.ldexp(x, jnp.int32(e))


# The screen pays for each extra row it re-scores per query with the bfloat16 matmul's
# saving on this many database rows (2 cores, d=128: ~3.5e-10 s saved per score, 4.5e-8 s
# per re-scored row; k=100 at 1k queries, screen vs float32: 250k rows 0.60 vs 0.59 s, 1M
# 1.33 vs 1.73 s). From k + max(k, 32) chunks: k=100 from 459k rows, k=10 from 131k.
_SCREEN_ROWS = 128


def _screen_chunks(k: int) -> int:
  """Chunks re-scored per query and segment behind a bfloat16 screen: ``k + max(k, 32)``
  where an exact first stage takes k, as the screen's error (~2^-8 |q| |x|) blurs the
  order of close chunks (the 32 are for small k, whose k-th score is no further from the
  rest). Share of queries shown exact on random unit vectors, k=100 (l2, 112 candidates):
  100% at d=24, 96, 128 (1M rows), 256 (500k) and 784 (200k); with k + max(k // 2, 32)
  100% up to d=256 but 33% at d=784; on siftsmall, fashion-mnist and wordllama-256, k=1,
  10, 100, l2 and ip: 100%."""
  return k + max(k, 32)


def _screened(score_fn, xq, db, n_valid, k, plan, mesh, recall_target, extra=()):
  """``_run`` with a bfloat16 first stage (``_SCREENS[score_fn]``) whose error is bounded,
  so the chunks it leaves out provably hold nothing better than the k-th result; queries
  where that cannot be shown (the bound is too close) are searched again in float32. Exact
  either way. -> (scores, ids). With ``recall_target``, below ``_Tiles.screen_dim``, on
  accelerators (not measured yet), on databases too small to pay for the wider second
  stage (``_SCREEN_ROWS``) and inside a trace (``jax.jit``: the fallback needs a read back)
  the float32 search runs alone."""
  screen_fn = _SCREENS.get(score_fn)
  screen_dim = _tiles().screen_dim
  extra_rows = (_screen_chunks(k) - k) * _CHUNK
  if (recall_target is not None or screen_fn is None or screen_dim is None
      or xq.shape[1] < screen_dim
      or n_valid // sharding.mesh_size(mesh) < _SCREEN_ROWS * extra_rows
      or not all(map(is_concrete, (xq,) + tuple(db)))):  # traced: no read back
    return _run(score_fn, xq, db, n_valid, k, plan, mesh, recall_target=recall_target,
                extra=extra)[:2]
  s, i, exact = _run(score_fn, xq, db, n_valid, k, plan, mesh, extra=extra,
                     screen_fn=screen_fn, screen_chunks=_screen_chunks(k))
  redo = np.flatnonzero(~np.asarray(exact))  # nq booleans read back
  if redo.size:
    # Padded to a power of two: a handful of compiled shapes, not one per count.
    n = sharding.round_up_pow2(int(redo.size), 8)
    rows = jnp.asarray(np.pad(redo, (0, n - redo.size)))
    # Same blocks and segments (the database is padded for them), fewer queries a block.
    s2, i2, _ = _run(score_fn, jnp.take(xq, rows, axis=0), db, n_valid, k,
                     (min(plan[0], n),) + tuple(plan[1:]), mesh, extra=extra)
    s = s.at[redo].set(s2[:redo.size])
    i = i.at[redo].set(i2[:redo.size])
  return s, i


@jax.jit
def _sample_centre(xb):
  """(``_center``, max |x|) of every (nb // 65536)-th row of xb: 64k-128k rows, or all
  below 128k."""
  sample = xb[::max(1, xb.shape[0] // _CENTER_SAMPLE)]
  return _center(sample), jnp.max(jnp.abs(sample), initial=0.0)


@jax.jit
def _half_norms(xb, centre=None):
  """0.5 |xb - centre|^2 per row (centre None: 0), in one pass, without a centred copy."""
  xb = xb if centre is None else xb - centre
  return 0.5 * jnp.sum(xb * xb, axis=1)


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
  """-Hamming distance, u32[qb, W] x u32[bb, W] -> i32[qb, bb]: xor and popcount word by
  word, which XLA vectorizes (AVX-512 VPOPCNTDQ on recent x86)."""
  dist = jnp.zeros((xq.shape[0], xb.shape[0]), jnp.int32)
  for w in range(xq.shape[1]):
    dist = dist + jax.lax.population_count(xq[:, None, w] ^ xb[None, :, w]).astype(jnp.int32)
  return -dist


def hamming_knn(query_codes, base_codes, k: int, *, mesh: Mesh | None = None,
                query_block: int | None = None, base_block: int | None = None,
                recall_target: float | None = None):
  """Exact Hamming kNN on packed bit codes.

  query_codes: u8[nq, B], base_codes: u8[nb, B] -> (D i32[nq, k] ascending, I i32[nq, k]).
  Ties are broken by lower index. Sharded over ``mesh`` like ``knn``. Distances are
  xor + popcount on 32-bit words, kept as integers through the chunk maxima of the engine
  every search shares (``topk_search``).
  """
  binary.check_codes("base_codes", base_codes)
  binary.check_codes("query_codes", query_codes, base_codes.shape[1])
  k = _check_k(k, base_codes.shape[0])
  q, b = _pack_words(jnp.asarray(query_codes)), _pack_words(jnp.asarray(base_codes))
  s, i = topk_search(_hamming_score, q, (b,), k, mesh=mesh, query_block=query_block,
                     base_block=base_block, recall_target=recall_target)
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
      decoded one segment (up to 128 MB of decoded floats) at a time, once per call.

  Returns:
    (scores f32[nq, k] descending inner products, ids i32[nq, k]); ties to the lower id.
  """
  check_vectors("xq", xq, d=codec.d)
  codec.check_codes(codes)
  k = _check_k(k, codes.shape[0])
  xq = _as_float(xq)
  if symmetric:
    xq = codec.decode(codec.encode(xq))
  # Decoding costs more than scoring: each segment of codes is decoded once and then
  # scored against every query block like a float database.
  return topk_search(_ip_score, xq, (jnp.asarray(codes),), k, mesh=mesh,
                     query_block=query_block, base_block=base_block,
                     prepare_fn=_lattice_decode_fn(codec), super_block=super_block)


# ---------------------------------------------------------------------------------------
# Metrics.

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
