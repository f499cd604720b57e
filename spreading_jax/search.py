"""Exact k-nearest-neighbour search of float vectors (``knn``), on the top-k engine.

``knn`` runs on the engine of ``topk`` (``topk.topk_search``: chunk maxima, then an exact
re-scoring of the best chunks; see that module), with l2 centring and an exact re-rank.
The code searches built on the same engine live beside their codes and are re-exported
here: ``hamming_knn`` (``hamming.py``, sign codes) and ``search_lattice``
(``lattice_search.py``, Zn lattice codes); so are ``topk_search`` and ``recall_at``
(``metrics.py``). Exact float64 groundtruth, built on ``knn``, is ``groundtruth.py``.

Large float searches (``knn`` on a CPU from d=40, see ``_screened`` for when) run stage 1
in bfloat16: each chunk's maximum plus a proven bound on the bfloat16 error is an upper
bound of its float32 maximum, stage 2 re-scores the ``k + max(k, 32)`` chunks of highest
bound in float32, and a query is exact when its k-th score beats every bound left out. The
few queries where it does not (scores closer than the bfloat16 error) are searched again
in float32. It pays where bfloat16 products run faster than float32 ones (CPUs with
AVX512-BF16; see the README's search section and benchmarks/bench_knn.py).

The score functions ``l2_score``, ``ip_score`` and their bfloat16 screens ``l2_screen``,
``ip_screen`` (``topk.ScreenFn``) are public, for use with ``topk.topk_search`` and
``topk.run_screened``.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from spreading_jax import sharding, topk
from spreading_jax._validation import check_mesh, check_vectors, is_concrete
# Re-exported: the searches that live beneath this module.
from spreading_jax.hamming import hamming_knn  # noqa: F401
from spreading_jax.lattice_search import search_lattice  # noqa: F401
from spreading_jax.metrics import recall_at  # noqa: F401
from spreading_jax.topk import Tiles, ip_score, topk_search  # noqa: F401


# ---------------------------------------------------------------------------------------
# Float vectors.

def l2_score(xq, xb, half_norm):
  """f32[qb, d], f32[bb, d], f32[bb] (``half_norms``) -> f32[qb, bb] xq.xb - |xb|^2 / 2,
  larger is nearer."""
  # Ranking by 0.5*|xb|^2 - xq.xb is ranking by L2 (the query norm is a constant per row).
  return jnp.dot(xq, xb.T, precision=jax.lax.Precision.HIGHEST) - half_norm[None, :]


def _l2_score_centred(xq, xb, half_norm, centre):
  # l2_score of the rows moved by -centre: the subtraction fuses into the copy of each
  # block into the tile, so the database is never copied whole.
  return l2_score(xq, xb - centre, half_norm)


def _bf16_split(x):
  """x -> (bfloat16 x, |x - that| per row): the rounded rows and what rounding moved."""
  lo = x.astype(jnp.bfloat16)
  r = x - lo.astype(jnp.float32)
  return lo, jnp.sqrt(jnp.sum(r * r, axis=1))


def _bf16_screen(xq, xb, row_norm, half_norm=None):
  """bfloat16 scores of xq against xb (float32 products and sums: faster than the float32
  matmul on CPUs with AVX512-BF16 and on GPU/TPU matrix units), minus the half norms if
  given, with their error bound (see ``topk.ScreenFn``):

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


def l2_screen(xq, xb, half_norm):
  """The bfloat16 screen of ``l2_score`` (a ``topk.ScreenFn``)."""
  return _bf16_screen(xq, xb, jnp.sqrt(2.0 * half_norm), half_norm)


def _l2_screen_centred(xq, xb, half_norm, centre):
  return l2_screen(xq, xb - centre, half_norm)


def ip_screen(xq, xb):
  """The bfloat16 screen of ``ip_score`` (a ``topk.ScreenFn``)."""
  return _bf16_screen(xq, xb, jnp.sqrt(jnp.sum(xb * xb, axis=1)))


# The bfloat16 screen of each float32 score (``_screened``).
_SCREENS = {l2_score: l2_screen, _l2_score_centred: _l2_screen_centred,
            ip_score: ip_screen}


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


@functools.partial(jax.jit, static_argnames=("k", "rerank"))
def _rerank_l2(xq, xb, ids, k: int, rerank: int):
  """Exact re-rank: xq f32[nq, d], candidate ids i32[nq, kc] into xb -> the k nearest by
  squared L2 computed from differences (no |x|^2 - 2<x, q> cancellation), ties to the
  lower id, gathering at most ``rerank`` elements (``Tiles.rerank``) at once (at least one
  query: zero queries are one empty block). -> (f32[nq, k], i32[nq, k])."""
  nq, kc = ids.shape
  rows = topk.items_within(rerank, nq, kc * xq.shape[1])
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
        recall_target: float | None = None, tiles: Tiles | None = None):
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
    tiles: size limits of the engine and of the re-rank, and where the bfloat16 screen
      starts (default: ``topk.default_tiles()``, by backend).

  Raises:
    ValueError: a bad metric; xq or xb not 2-D real arrays of one dimension, empty xb,
      NaN/Inf values; k not an int in [1, nb].
    TypeError: ``mesh`` is not a ``jax.sharding.Mesh`` or None.

  Example:
    >>> xb = np.eye(3, dtype=np.float32)
    >>> D, I = knn(xb[:1], xb, 2)
    >>> I.tolist()
    [[0, 1]]
  """
  if metric not in ("l2", "ip"):
    raise ValueError(f"metric must be 'l2' or 'ip', got {metric!r}")
  mesh = check_mesh(mesh)
  check_vectors("xb", xb, min_rows=1)
  check_vectors("xq", xq, d=xb.shape[1])
  k = topk.check_k(k, xb.shape[0])
  xq, xb = _as_float(xq), _as_float(xb)
  nb = xb.shape[0]
  recall_target = topk.check_recall_target(recall_target)
  tiles = tiles or topk.default_tiles()
  sizes = dict(mesh=mesh, query_block=query_block, base_block=base_block,
               recall_target=recall_target, tiles=tiles)
  if metric == "ip":
    plan = topk.make_plan(xq.shape[0], nb, k, **sizes)
    xbp = sharding.pad_rows(xb, plan.db_rows)
    return _screened(ip_score, xq, (xbp,), nb, plan, mesh, tiles)
  kc = min(nb, k + _rerank_margin(k))
  plan = topk.make_plan(xq.shape[0], nb, kc, **sizes)
  # Data whose squares leave float32's range is searched scaled by a power of two (exact:
  # only exponents move) and its distances scaled back. The magnitude comes from the
  # queries and the centre's sample; rows beyond the sample show up as non-finite norms.
  centre, sample_max = _sample_centre(xb)
  shift = _l2_shift(float(jnp.maximum(_max_abs(xq), sample_max)))
  for attempt in range(2):
    xqs, xbs = (xq, xb) if not shift else (_scaled(xq, -shift), _scaled(xb, -shift))
    if shift:
      centre, _ = _sample_centre(xbs)
    xbp = sharding.pad_rows(xbs, plan.db_rows)
    if np.any(np.asarray(centre)):  # one small read back
      score, extra = _l2_score_centred, (centre,)
      half_norm, xqc = half_norms(xbp, centre), xqs - centre
    else:
      score, extra, half_norm, xqc = l2_score, (), half_norms(xbp), xqs
    if attempt or np.isfinite(float(jnp.max(half_norm))):
      break
    shift = _l2_shift(float(_max_abs(xb)), force=True)  # outliers: the whole database
  _, i = _screened(score, xqc, (xbp, half_norm), nb, plan, mesh, tiles, extra)
  d, i = _rerank_l2(xqs, xbs, i, k, tiles.rerank)
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


# ``Tiles.screen_rows``: the screen pays for each extra row it re-scores per query with the
# bfloat16 matmul's saving on this many database rows (the time saved per score against
# the time per re-scored row, at d=128 on a 2-core CPU). From k + max(k, 32) chunks: k=100
# from 459k rows, k=10 from 131k.


def _screen_chunks(k: int) -> int:
  """Chunks re-scored per query and segment behind a bfloat16 screen: ``k + max(k, 32)``
  where an exact first stage takes k, as the screen's error (~2^-8 |q| |x|) blurs the
  order of close chunks (the 32 are for small k, whose k-th score is no further from the
  rest). Share of queries shown exact on random unit vectors, k=100 (l2, 112 candidates):
  100% at d=24, 96, 128 (1M rows), 256 (500k) and 784 (200k); with k + max(k // 2, 32)
  100% up to d=256 but 33% at d=784; on siftsmall, fashion-mnist and wordllama-256, k=1,
  10, 100, l2 and ip: 100%."""
  return k + max(k, 32)


def _screened(score_fn, xq, db, n_valid, plan: topk.SearchPlan, mesh, tiles: Tiles,
              extra=()):
  """The engine's search (``topk.run``) with a bfloat16 first stage (``_SCREENS[score_fn]``,
  ``topk.run_screened``): exact either way. -> (scores, ids). With ``recall_target``,
  below ``Tiles.screen_dim``, on accelerators (not measured yet), on databases too small
  to pay for the wider second stage (``Tiles.screen_rows``) and inside a trace
  (``jax.jit``: the fallback needs a read back) the float32 search runs alone."""
  screen_fn = _SCREENS.get(score_fn)
  k, chunks = plan.k, _screen_chunks(plan.k)
  extra_rows = (chunks - k) * topk.CHUNK
  if (plan.recall_target is not None or screen_fn is None or tiles.screen_dim is None
      or xq.shape[1] < tiles.screen_dim
      or n_valid // sharding.mesh_size(mesh) < tiles.screen_rows * extra_rows
      or not all(map(is_concrete, (xq,) + tuple(db)))):  # traced: no read back
    return topk.run(score_fn, xq, db, n_valid, plan, mesh=mesh, extra=extra)[:2]
  return topk.run_screened(score_fn, screen_fn, xq, db, n_valid,
                           dataclasses.replace(plan, screen_chunks=chunks), mesh=mesh,
                           extra=extra)


@jax.jit
def _sample_centre(xb):
  """(``_center``, max |x|) of every (nb // 65536)-th row of xb: 64k-128k rows, or all
  below 128k."""
  sample = xb[::max(1, xb.shape[0] // _CENTER_SAMPLE)]
  return _center(sample), jnp.max(jnp.abs(sample), initial=0.0)


@jax.jit
def half_norms(xb, centre=None):
  """0.5 |xb - centre|^2 per row (centre None: 0), in one pass, without a centred copy."""
  xb = xb if centre is None else xb - centre
  return 0.5 * jnp.sum(xb * xb, axis=1)
