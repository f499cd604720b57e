"""The exact top-k engine beneath every search: tiles, segments, chunk maxima, re-scoring.

``topk_search(score_fn, xq, db, k)`` is a two-stage exact selection:

1. Score a block of queries against a block of the database and keep only the maximum of
   each chunk of ``CHUNK`` consecutive rows. The block's scores never leave the cache-sized
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

Screening (``run_screened``): stage 1 may run on a cheaper score whose error is bounded
(``ScreenFn``); each chunk's maximum plus the bound is then an upper bound of its real
maximum, stage 2 re-scores the ``SearchPlan.screen_chunks`` chunks of highest bound with
``score_fn``, and a query is exact when its k-th score beats every bound left out. The
queries where it does not are searched again without the screen.

The sizes of one search are a ``SearchPlan`` (``make_plan``), derived from the per-backend
limits in ``Tiles`` (``default_tiles``); both are plain values a caller may replace.
The searches built on the engine: ``search.knn`` (float vectors), ``hamming.hamming_knn``
(sign codes), ``lattice_search.search_lattice`` (Zn lattice codes).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, PartitionSpec as P

from spreading_jax import sharding
from spreading_jax._validation import check_int, check_mesh

# Rows per chunk: the unit whose maximum stage 1 keeps.
CHUNK = 32


def ip_score(xq, xb):
  """f32[qb, d], f32[bb, d] -> f32[qb, bb] inner products, at full float32 precision (the
  score of float kNN by inner product and of lattice-code search)."""
  return jnp.dot(xq, xb.T, precision=jax.lax.Precision.HIGHEST)


class Tiles(NamedTuple):
  """Size limits of the engine (and of ``search.knn`` above it) on one kind of backend."""
  elements: int      # scores in one (query block x database block) tile
  query_block: int   # most queries in a block
  maxima: int        # stored chunk maxima per query block and segment
  prepared: int      # elements of one prepared (e.g. decoded) segment
  rescore: int | None  # gathered elements re-scored at once (None: one query at a time)
  rerank: int        # gathered elements of knn's exact l2 re-rank at once
  screen_dim: int | None  # knn from this dimension takes the bfloat16 screen (None: never)
  # knn takes the screen from this many database rows (per device) per extra row it
  # re-scores per query (see ``search.knn``).
  screen_rows: int
  # From this many rows a database is searched in place, not copied into a padded array
  # (whose length is shared by nearby sizes, which then reuse one compiled search).
  in_place_rows: int


# CPU: a 4 MB tile stays in cache through the max pass; 64 MB of maxima (a 1M-row
# segment at 512 queries); 128 MB of decoded floats; stage 2 one query at a time; the l2
# re-rank 16 MB at a time (one 58 MB gather ran slower). The
# bfloat16 screen from d=40 (timed against the float32 engine on 1k x 1M, k=100, from
# d=24 to 128): below, the matmul is too small a share of the search to pay for the wider
# second stage.
CPU_TILES = Tiles(elements=1 << 20, query_block=512, maxima=1 << 24, prepared=1 << 25,
                  rescore=None, rerank=1 << 22, screen_dim=40, screen_rows=128,
                  in_place_rows=1 << 17)
# GPU/TPU: each scan step is a kernel launch, so tiles are 32x larger (2048 x 16384), and
# segments of up to 1M rows (256 MB of maxima per query block) cost fewer re-scoring
# passes (mining- and kNN-shaped sweeps on an H200: experiments/results/accel_tile_sweep.json).
# Stage 2 re-scores up to 256 MB of gathered rows at once.
# No bfloat16 screen yet: it has not been measured on an accelerator (where it replaces the
# six-pass float32 matmul of Precision.HIGHEST with one bfloat16 pass).
ACCEL_TILES = Tiles(elements=1 << 25, query_block=2048, maxima=1 << 26, prepared=1 << 25,
                    rescore=1 << 26, rerank=1 << 24, screen_dim=None, screen_rows=128,
                    in_place_rows=1 << 17)


def default_tiles(backend: str | None = None) -> Tiles:
  """``CPU_TILES`` on a CPU backend, ``ACCEL_TILES`` on a GPU/TPU (default: JAX's default
  backend)."""
  backend = backend or jax.default_backend()
  return CPU_TILES if backend == "cpu" else ACCEL_TILES


def items_within(budget: int, n: int, size: int) -> int:
  """How many of ``n`` items of ``size`` elements each fit in ``budget`` elements (at least
  1, at most n; 1 when n is 0)."""
  return max(1, min(n, budget // max(size, 1)))


@dataclasses.dataclass(frozen=True)
class SearchPlan:
  """The sizes of one search (hashable: a static argument of the compiled search).

  Attributes:
    k: results per query (and per segment, where a segment has that many rows).
    query_block: queries per block; the queries are padded to a multiple.
    base_block: database rows per tile, a multiple of ``CHUNK``.
    segment_rows: rows per segment, a multiple of ``base_block``.
    db_rows: rows of the database as the engine reads it: padded to whole segments on
      every device, or the real row count (read in place, see ``_block_starts``).
    recall_target: None (exact) or ``lax.approx_max_k``'s recall for the chunk choice.
    screen_chunks: chunks re-scored per query and segment behind a screen (``run`` with a
      ``screen_fn``); 0 without one.
    rescore: gathered elements re-scored at once in stage 2 (``Tiles.rescore``).
  """
  k: int
  query_block: int
  base_block: int
  segment_rows: int
  db_rows: int
  recall_target: float | None = None
  screen_chunks: int = 0
  rescore: int | None = None

  def rescore_batch(self, per_query: int) -> int | None:
    """Queries re-scored together (a vmap) in stage 2, each gathering ``per_query``
    elements. Without a ``rescore`` budget (CPU) one at a time: batching the gathers and
    matrix-vector products measured slower there.
    With one (GPU/TPU) as much of the query block as it allows: a loop of tiny steps
    would be launch-bound."""
    return None if self.rescore is None else items_within(self.rescore, self.query_block,
                                                         per_query)


def check_recall_target(recall_target) -> float | None:
  """None, or ``recall_target`` as a float in (0, 1] (ValueError otherwise)."""
  if recall_target is None:
    return None
  r = float(recall_target)
  if not 0.0 < r <= 1.0:
    raise ValueError(f"recall_target must be in (0, 1], got {recall_target!r}")
  return r


def check_k(k, nb: int) -> int:
  """``k`` as an int in [1, nb] (ValueError naming the problem otherwise)."""
  k = check_int("k", k, minimum=1)
  if k > nb:
    raise ValueError(f"k={k} is larger than the database size nb={nb}")
  return k


def _block_sizes(nq: int, nb_local: int, k: int, query_block: int | None,
                 base_block: int | None, tiles: Tiles) -> tuple[int, int]:
  # The fewest query blocks of at most ``Tiles.query_block``, split evenly (1000 queries:
  # two blocks of 504 on a CPU, not 512 + 488 padded to 1024).
  if query_block is not None:
    query_block = check_int("query_block", query_block, minimum=1)
  if base_block is not None:
    base_block = check_int("base_block", base_block, minimum=1)
  nqb = -(-max(nq, 1) // tiles.query_block)
  qb = query_block or sharding.round_up(-(-max(nq, 1) // nqb), 8)
  bb = base_block or max(2048, tiles.elements // qb)
  bb = min(bb, sharding.round_up(max(nb_local, 1), 128))
  # A block holds whole chunks and at least k rows.
  return qb, sharding.round_up(max(bb, k), CHUNK)


def _segment_rows(nb_local: int, qb: int, bb: int, prepared_width: int,
                  super_block: int | None, tiles: Tiles) -> int:
  """Rows per segment: a multiple of bb that splits nb_local into near-equal parts.

  A segment is as long as the stored chunk maxima allow (``Tiles.maxima``) and, with a
  ``prepare_fn``, as its prepared rows allow (``Tiles.prepared``): every segment costs
  one re-scoring pass, so fewer is faster.
  """
  cap = super_block or tiles.maxima // qb * CHUNK
  if prepared_width and not super_block:
    cap = min(cap, tiles.prepared // prepared_width)
  cap = max(bb, cap // bb * bb)
  parts = -(-max(nb_local, 1) // cap)
  return sharding.round_up(-(-max(nb_local, 1) // parts), bb)


def make_plan(nq: int, nb: int, k: int, *, mesh: Mesh | None = None,
              query_block: int | None = None, base_block: int | None = None,
              prepared_width: int = 0, super_block: int | None = None,
              recall_target: float | None = None, screen_chunks: int = 0,
              tiles: Tiles | None = None) -> SearchPlan:
  """The ``SearchPlan`` of ``nq`` queries over ``nb`` rows (split over ``mesh``).

  ``query_block``, ``base_block``, ``super_block`` (segment rows) override the sizes the
  ``tiles`` (default: ``default_tiles()``) give; ``prepared_width``: elements per prepared
  row (0 without a ``prepare_fn``).

  Example:
    >>> p = make_plan(1000, 10**6, 100, tiles=CPU_TILES)
    >>> (p.query_block, p.base_block, p.segment_rows, p.db_rows)
    (504, 2080, 1000480, 1000000)
  """
  tiles = tiles or default_tiles()
  ndev = sharding.mesh_size(mesh)
  nb_local = -(-nb // ndev)
  qb, bb = _block_sizes(nq, nb_local, k, query_block, base_block, tiles)
  seg = _segment_rows(nb_local, qb, bb, prepared_width, super_block, tiles)
  if mesh is None and not prepared_width and nb >= max(bb, tiles.in_place_rows):
    rows = nb  # read in place (see _block_starts)
  else:
    rows = sharding.round_up(nb, seg * ndev)
  return SearchPlan(k=k, query_block=qb, base_block=bb, segment_rows=seg, db_rows=rows,
                    recall_target=recall_target, screen_chunks=screen_chunks,
                    rescore=tiles.rescore)


ScoreFn = Callable[..., jax.Array]
# screen_fn(xq_block, *db_block) -> (scores f32[qb, bb], q_scale f32[qb, m],
# row_scale f32[bb, m], row_offset f32[bb]): a cheap score within
# sum_j q_scale[q, j] row_scale[x, j] + row_offset[x] of score_fn's (see ``run_screened``).
ScreenFn = Callable[..., tuple]


class _Segment(NamedTuple):
  """The rows one segment search reads: blocks of ``src`` rows at ``nominal`` read at
  ``starts`` (``_block_starts``); source row r has id ``id0 + r``; ids >= n_valid are
  padding."""
  src: tuple
  nominal: jax.Array
  starts: jax.Array
  id0: jax.Array
  n_valid: jax.Array


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


def _chunk_maxima(score_fn: ScoreFn, xq, seg: _Segment, bb: int,
                  screen_fn: ScreenFn | None = None):
  """Stage 1: f32[qb, nblocks * bb / CHUNK], the maximum score of each chunk of a segment.

  Rows that do not count (``_valid``) score -inf and the maxima's zeros are +0.0, so that
  chunks compare as their best real, cleaned scores do. With ``screen_fn`` each value is
  instead an upper bound of the chunk's best ``score_fn`` score: the screen's maximum plus
  its error bound (NaN counts as +inf).
  """
  qb, nc, nblocks = xq.shape[0], bb // CHUNK, seg.nominal.shape[0]

  def by_chunk(x):
    return x.reshape(x.shape[:-1] + (nc, CHUNK))

  def step(maxima, inputs):
    j, nom, start = inputs
    block = tuple(jax.lax.dynamic_slice_in_dim(a, start, bb) for a in seg.src)
    # [qb, bb] in the score's own dtype (integer scores stay integer: converting the whole
    # tile to float cost more than the Hamming scoring itself); fused into the max below.
    if screen_fn is None:
      s = score_fn(xq, *block)
    else:
      s, q_scale, row_scale, row_offset = screen_fn(xq, *block)
    low = -jnp.inf if jnp.issubdtype(s.dtype, jnp.floating) else jnp.iinfo(s.dtype).min
    valid = _valid(start + jnp.arange(bb, dtype=jnp.int32), nom, seg.id0, seg.n_valid)
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
                           (jnp.arange(nblocks, dtype=jnp.int32), seg.nominal, seg.starts))
  maxima = maxima.reshape(qb, nblocks * nc)
  return jnp.where(maxima == 0, 0.0, maxima)


def _segment_topk(score_fn: ScoreFn, xq, seg: _Segment, plan: SearchPlan,
                  screen_fn: ScreenFn | None = None):
  """Exact top-k of xq [qb, ...] over one segment (see ``_chunk_maxima``).
  -> (f32[qb, k'], i32[qb, k'] ids, f32[qb] bound) with k' = min(k, segment rows),
  descending, ties to the lower id. With ``screen_fn`` the ``plan.screen_chunks`` chunks of
  highest bound are re-scored and ``bound`` is at least every bound left out (-inf if
  none): the result is exact where its k-th score is above it. Without, ``bound`` is -inf.
  """
  qb, bb = xq.shape[0], plan.base_block
  k = min(plan.k, plan.segment_rows)
  maxima = _chunk_maxima(score_fn, xq, seg, bb, screen_fn)
  kc = min(plan.screen_chunks if screen_fn is not None else k, maxima.shape[1])
  bound = jnp.full((qb,), -jnp.inf, jnp.float32)
  if screen_fn is not None and kc < maxima.shape[1]:
    # The lowest chosen bound is >= every bound left out. (Slicing top_k's outputs, e.g.
    # taking kc + 1 and the last value, makes XLA:CPU sort the whole row, not select.)
    vals, top = jax.lax.top_k(maxima, kc)
    bound = jnp.min(vals, axis=1)
  elif plan.recall_target is None:
    top = jax.lax.top_k(maxima, kc)[1]
  else:
    top = jax.lax.approx_max_k(maxima, kc, recall_target=plan.recall_target)[1]
  top = jnp.sort(top, axis=1)  # candidates in id order: ties go to the lower id
  nc = bb // CHUNK
  first = seg.starts[top // nc] + top % nc * CHUNK  # i32[qb, kc]: each chunk's first row
  width = kc * CHUNK
  kk = min(k, width)
  offsets = jnp.arange(CHUNK, dtype=jnp.int32)

  def rescore(args):
    q, first, nom = args
    rows = (first[:, None] + offsets).reshape(width)
    cand = tuple(jnp.take(a, rows, axis=0) for a in seg.src)
    valid = _valid(rows, jnp.repeat(nom, CHUNK), seg.id0, seg.n_valid)
    s = _clean(score_fn(q[None], *cand)[0].astype(jnp.float32), valid)
    vals, pos = jax.lax.top_k(s, kk)
    return vals, seg.id0 + rows[pos]

  per_query = width * sum(int(np.prod(a.shape[1:])) for a in seg.src)
  vals, ids = jax.lax.map(rescore, (xq, first, seg.nominal[top // nc]),
                          batch_size=plan.rescore_batch(per_query))
  return vals, ids, bound


def _empty_topk(shape):
  return jnp.full(shape, -jnp.inf, jnp.float32), jnp.full(shape, -1, jnp.int32)


def _search_local(score_fn, xq, db, n_valid, offset, plan: SearchPlan, prepare_fn=None,
                  extra=(), screen_fn=None):
  """Top-k of every query over this device's rows ``db``; their ids start at ``offset``.

  Segments of ``plan.segment_rows`` rows are visited in id order and searched by every
  query block; each segment's top-k is merged into the running one. With ``prepare_fn``
  (e.g. codes -> decoded vectors) ``db`` is padded to whole segments and each is prepared
  once; without, ``db`` may end anywhere after its first block and is read in place.
  ``extra`` arrays (not split by rows) are passed to ``score_fn`` after the database rows.
  """
  if extra:
    base_fn, base_screen = score_fn, screen_fn
    score_fn = lambda q, *rows: base_fn(q, *rows, *extra)  # noqa: E731
    if screen_fn is not None:
      screen_fn = lambda q, *rows: base_screen(q, *rows, *extra)  # noqa: E731
  qb, bb, seg, k = plan.query_block, plan.base_block, plan.segment_rows, plan.k
  nq_pad = xq.shape[0]
  nqb = nq_pad // qb
  xq_blocks = xq.reshape((nqb, qb) + xq.shape[1:])
  n_src = db[0].shape[0]
  nseg = -(-n_src // seg)
  nblocks = seg // bb

  def step(best, s):
    if prepare_fn is not None:
      rows = tuple(jax.lax.dynamic_slice_in_dim(a, s * seg, seg) for a in db)
      src, base, id0 = tuple(prepare_fn(*rows)), 0, offset + s * seg
    else:
      src, base, id0 = db, s * seg, offset
    nominal, starts = _block_starts(nblocks, bb, base, src[0].shape[0])
    segment = _Segment(src, nominal, starts, id0, n_valid)

    def by_query_block(args):
      q, bs, bi, bound = args
      s, i, b = _segment_topk(score_fn, q, segment, plan, screen_fn)
      return _merge_topk(bs, bi, s, i, k) + (jnp.maximum(bound, b),)

    return jax.lax.map(by_query_block, (xq_blocks,) + tuple(best)), None

  best = _empty_topk((nqb, qb, k)) + (jnp.full((nqb, qb), -jnp.inf, jnp.float32),)
  (s, i, bound), _ = jax.lax.scan(step, best, jnp.arange(nseg, dtype=jnp.int32))
  return s.reshape(nq_pad, k), i.reshape(nq_pad, k), bound.reshape(nq_pad)


@functools.partial(jax.jit, static_argnames=("score_fn", "plan", "mesh", "prepare_fn",
                                             "screen_fn"))
def _topk_search(score_fn, xq, db, n_valid, extra=(), *, plan, mesh, prepare_fn=None,
                 screen_fn=None):
  """-> (scores, ids, exact): ``exact`` bool[nq] is True where the result is exact (always,
  without ``screen_fn``): its k-th score beats every bound the screen left out."""
  opts = dict(prepare_fn=prepare_fn, extra=extra, screen_fn=screen_fn)
  k = plan.k
  if mesh is None:
    s, i, bound = _search_local(score_fn, xq, db, n_valid, 0, plan, **opts)
    return s, i, (s[:, -1] > bound) | (screen_fn is None)
  axis = sharding.axis_name(mesh)
  local_n = db[0].shape[0] // sharding.mesh_size(mesh)
  n_db = len(db)

  def local(xq, *arrays):
    db, extra = arrays[:n_db], arrays[n_db:]
    offset = jax.lax.axis_index(axis).astype(jnp.int32) * local_n
    s, i, bound = _search_local(score_fn, xq, db, n_valid, offset, plan,
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


def run(score_fn: ScoreFn, xq, db: Sequence, n_valid: int, plan: SearchPlan, *,
        mesh: Mesh | None = None, prepare_fn: Callable | None = None, extra: Sequence = (),
        screen_fn: ScreenFn | None = None):
  """Searches a database already padded to ``plan.db_rows`` rows; rows >= n_valid are
  padding.

  Args:
    score_fn, prepare_fn: as in ``topk_search``.
    xq: [nq, ...] queries (padded here to whole query blocks).
    db: arrays of ``plan.db_rows`` rows (see ``pad``).
    n_valid: the real rows; ids >= n_valid are never returned.
    plan: the sizes (``make_plan``).
    mesh: optional 1-D mesh; ``db`` is sharded over its data axis.
    extra: arrays every ``score_fn`` call receives after the rows (replicated on a mesh).
    screen_fn: optional screen for stage 1 (``ScreenFn``); needs ``plan.screen_chunks``
      >= ``plan.k``.

  Returns:
    (scores f32[nq, k], ids i32[nq, k], exact bool[nq]); ``exact`` is True where the
    result is provably exact (everywhere without ``screen_fn``).
  """
  if screen_fn is not None and plan.screen_chunks < plan.k:
    raise ValueError(f"a screened search re-scores at least k={plan.k} chunks, but the "
                     f"plan has screen_chunks={plan.screen_chunks}")
  mesh = check_mesh(mesh)
  nq = xq.shape[0]
  xq = sharding.pad_rows(jnp.asarray(xq), sharding.round_up(nq, plan.query_block))
  if mesh is not None:
    db = tuple(sharding.shard_rows(a, mesh) for a in db)
    xq = sharding.replicate(xq, mesh)
    extra = tuple(sharding.replicate(a, mesh) for a in extra)
  s, i, exact = _topk_search(score_fn, xq, tuple(db), jnp.int32(n_valid), tuple(extra),
                             plan=plan, mesh=mesh, prepare_fn=prepare_fn,
                             screen_fn=screen_fn)
  return s[:nq], i[:nq], exact[:nq]


def run_screened(score_fn: ScoreFn, screen_fn: ScreenFn, xq, db: Sequence, n_valid: int,
                 plan: SearchPlan, *, mesh: Mesh | None = None, extra: Sequence = ()):
  """``run`` with ``screen_fn`` as stage 1, so the chunks it leaves out provably hold
  nothing better than the k-th result; queries where that cannot be shown (the bound is
  too close) are searched again with ``score_fn`` alone. Exact either way; needs concrete
  arrays (the fallback reads back nq booleans). -> (scores, ids) as ``run``."""
  s, i, exact = run(score_fn, xq, db, n_valid, plan, mesh=mesh, extra=extra,
                    screen_fn=screen_fn)
  redo = np.flatnonzero(~np.asarray(exact))  # nq booleans read back
  if redo.size:
    # Padded to a power of two: a handful of compiled shapes, not one per count.
    n = sharding.round_up_pow2(int(redo.size), 8)
    rows = jnp.asarray(np.pad(redo, (0, n - redo.size)))
    # Same blocks and segments (the database is padded for them), fewer queries a block.
    again = dataclasses.replace(plan, query_block=min(plan.query_block, n), screen_chunks=0)
    s2, i2, _ = run(score_fn, jnp.take(xq, rows, axis=0), db, n_valid, again, mesh=mesh,
                    extra=extra)
    s = s.at[redo].set(s2[:redo.size])
    i = i.at[redo].set(i2[:redo.size])
  return s, i


def pad(db: Sequence, plan: SearchPlan) -> tuple:
  """The database arrays padded with zero rows to ``plan.db_rows`` (as ``run`` reads them)."""
  return tuple(sharding.pad_rows(jnp.asarray(a), plan.db_rows) for a in db)


def topk_search(score_fn: ScoreFn, xq, db: Sequence, k: int, *, mesh: Mesh | None = None,
                query_block: int | None = None, base_block: int | None = None,
                prepare_fn: Callable | None = None, super_block: int | None = None,
                recall_target: float | None = None, tiles: Tiles | None = None):
  """Generic blocked, optionally sharded, exact top-k by a score function.

  Args:
    score_fn: a hashable function ``score_fn(xq_block, *db_block) -> [qb, bb]`` (float, or
      integer below 2^24 in magnitude); larger is better. It must be a module-level function
      (or otherwise stable) so that the compiled search is cached, and score a row the same
      way whatever block it is in.
    xq: [nq, ...] queries (at least 2-D; nq may be 0).
    db: a non-empty tuple of arrays sharing a leading axis nb (e.g. vectors and their
      norms), not a bare array.
    k: number of results, an int with 1 <= k <= nb. Every result is a real row: there is
      no padding with id -1 (a sharded search pads shards internally and never returns it).
    mesh: optional 1-D ``jax.sharding.Mesh``; the database is sharded over its data axis.
    query_block, base_block: tile sizes (defaults: a 1M-score tile and up to 512 queries
      on a CPU, a 32M-score tile and up to 2048 queries on a GPU/TPU; see ``Tiles``);
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
    tiles: size limits (default: ``default_tiles()``, by backend).

  Returns:
    (scores f32[nq, k] descending, ids i32[nq, k]); ties are broken by lower id.

  Raises:
    ValueError: k is not an int in [1, nb]; ``xq`` is not at least 2-D; ``db`` is empty,
      a bare array, or its arrays differ in rows; or ``score_fn`` (after ``prepare_fn``)
      cannot score ``xq`` against ``db`` rows into a [queries, rows] matrix (e.g. the
      dimensions differ). These checks are static (shapes and dtypes, one abstract trace
      per signature, cached): no device work and no read back.
    TypeError: ``mesh`` is not a ``jax.sharding.Mesh`` or None, or ``score_fn`` /
      ``prepare_fn`` is not hashable.

  Values are not scanned here (this is the hot path of every search): NaN scores rank in
  an unspecified order. The public searches check their inputs first (``search.knn`` and
  ``lattice_search.search_lattice`` reject NaN/Inf vectors; codes are integers).
  """
  db, nb = _check_db(db)
  mesh = check_mesh(mesh)
  xq_shape = getattr(xq, "shape", None)
  if xq_shape is None or getattr(xq, "dtype", None) is None:
    raise ValueError(f"xq must be an array [nq, ...], got {type(xq).__name__}")
  if len(xq_shape) < 2:
    raise ValueError(f"xq must be at least 2-D [nq, ...] (one row per query), got shape "
                     f"{tuple(xq_shape)}")
  k = check_k(k, nb)
  recall_target = check_recall_target(recall_target)
  width = _prepared_width(score_fn, prepare_fn, _signature(xq),
                          tuple(_signature(a) for a in db))
  plan = make_plan(xq.shape[0], nb, k, mesh=mesh, query_block=query_block,
                   base_block=base_block, prepared_width=width, super_block=super_block,
                   recall_target=recall_target, tiles=tiles)
  return run(score_fn, xq, pad(db, plan), nb, plan, mesh=mesh, prepare_fn=prepare_fn)[:2]


def _check_db(db) -> tuple[tuple, int]:
  """``db`` as a tuple of arrays sharing their rows, and that row count (ValueError)."""
  if hasattr(db, "shape"):
    raise ValueError(f"db must be a tuple of arrays sharing their rows, e.g. (xb,), got a "
                     f"bare array of shape {tuple(db.shape)}")
  db = tuple(db)
  if not db:
    raise ValueError("db is empty: topk_search needs at least one database array")
  for j, a in enumerate(db):
    shape = getattr(a, "shape", None)
    if shape is None or getattr(a, "dtype", None) is None:
      raise ValueError(f"db[{j}] must be an array, got {type(a).__name__}")
    if len(shape) < 1:
      raise ValueError(f"db[{j}] must have a leading axis of rows, got a scalar")
    if shape[0] != db[0].shape[0]:
      raise ValueError(f"db arrays must share their rows: db[0] has {db[0].shape[0]}, "
                       f"db[{j}] has {shape[0]}")
  return db, int(db[0].shape[0])


def _signature(a) -> tuple:
  """(shape without rows, dtype): what a compiled search depends on besides the rows."""
  return tuple(a.shape[1:]), np.dtype(a.dtype)


def _prepared_width(score_fn, prepare_fn, xq_sig, db_sigs) -> int:
  """Elements per prepared row (0 without ``prepare_fn``), after checking that score_fn
  scores these shapes (``_check_scores``). Cached per signature: a hot path."""
  for name, fn in (("score_fn", score_fn), ("prepare_fn", prepare_fn)):
    try:
      hash(fn)
    except TypeError:
      raise TypeError(f"{name} must be hashable (a module-level function), got "
                      f"{type(fn).__name__}") from None
  return _check_scores(score_fn, prepare_fn, xq_sig, db_sigs)


@functools.lru_cache(maxsize=256)
def _check_scores(score_fn, prepare_fn, xq_sig, db_sigs) -> int:
  # One abstract trace (jax.eval_shape: shapes only, nothing runs) of 2 queries against 3
  # rows: distinct sizes, so that a score of the wrong orientation shows too.
  qb, bb = 2, 3
  rows = tuple(jax.ShapeDtypeStruct((bb,) + s, t) for s, t in db_sigs)
  query = jax.ShapeDtypeStruct((qb,) + xq_sig[0], xq_sig[1])
  db_desc = ", ".join(f"[nb, {', '.join(map(str, s))}] {t}" if s else f"[nb] {t}"
                      for s, t in db_sigs)
  xq_desc = f"[nq, {', '.join(map(str, xq_sig[0]))}] {xq_sig[1]}"
  width = 0
  if prepare_fn is not None:
    try:
      rows = tuple(jax.eval_shape(prepare_fn, *rows))
    except Exception as e:  # noqa: BLE001 (re-raised with the shapes named)
      raise ValueError(f"prepare_fn cannot prepare database rows {db_desc}: "
                       f"{type(e).__name__}: {e}") from e
    width = sum(int(np.prod(o.shape[1:])) for o in rows)
  try:
    out = jax.eval_shape(score_fn, query, *rows)
  except Exception as e:  # noqa: BLE001
    raise ValueError(f"score_fn cannot score queries xq {xq_desc} against database rows "
                     f"{db_desc} (are the dimensions the same?): {type(e).__name__}: {e}"
                     ) from e
  if getattr(out, "shape", None) != (qb, bb):
    raise ValueError(f"score_fn must return a [queries, rows] matrix: {qb} queries xq "
                     f"{xq_desc} against {bb} rows of {db_desc} gave shape "
                     f"{getattr(out, 'shape', type(out).__name__)}")
  return width
