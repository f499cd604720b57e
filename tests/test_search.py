"""Exact search kernels against numpy references, on real and random data."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from spreading_jax import binary, search, sharding, topk


def naive_knn(xq, xb, k, metric="l2"):
  xq, xb = np.asarray(xq, np.float64), np.asarray(xb, np.float64)
  if metric == "l2":
    d = ((xq[:, None, :] - xb[None, :, :]) ** 2).sum(-1)
  else:
    d = -(xq @ xb.T)
  i = np.argsort(d, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(d, i, axis=1), i


def four_device_mesh():
  if jax.device_count() < 4:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4 (make test sets it)")
  return sharding.make_mesh(4)


@settings(max_examples=12, deadline=None)
@given(nq=st.integers(1, 40), nb=st.integers(1, 700), d=st.integers(1, 20),
       k=st.integers(1, 50), metric=st.sampled_from(["l2", "ip"]), seed=st.integers(0, 99))
def test_blocked_equals_naive(nq, nb, d, k, metric, seed):
  k = min(k, nb)
  rng = np.random.default_rng(seed)
  # Small integers make exact ties common, which exercises the tie-breaking rule.
  xb = rng.integers(-3, 4, (nb, d)).astype(np.float32)
  xq = rng.integers(-3, 4, (nq, d)).astype(np.float32)
  D, I = search.knn(xq, xb, k, metric=metric, query_block=8, base_block=128)
  Dr, Ir = naive_knn(xq, xb, k, metric)
  np.testing.assert_array_equal(np.asarray(I), Ir)
  np.testing.assert_allclose(np.asarray(D), Dr if metric == "l2" else -Dr, atol=1e-4)


def _stable_topk(scores, k):
  """Reference top-k of each row of scores (larger first), ties to the lower column."""
  i = np.argsort(-scores, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(scores, i, axis=1), i


def _scores(case, q, n, rng):
  """Score matrices that corner the chunk choice; the engine's segments here are the ids
  [0, 2048) and [2048, 4096), 64 chunks of 32 each, and k = 40."""
  s = rng.integers(0, 40, (q, n)).astype(np.float32)  # many ties
  if case == "concentrated":
    # Each row's best 40 lie in two chunks of the first segment: chunk a holds a 60 and 31
    # fifties, chunk b 9 fifties, so the 40th place is a tie among fifties that the lower id
    # must win even when b < a (b's maximum ranks below a's); 60 other chunks have a 49.
    for r in range(q):
      a, b = rng.choice(64, 2, replace=False)
      s[r, a * 32:(a + 1) * 32] = 50
      s[r, a * 32 + rng.integers(32)] = 60
      s[r, b * 32 + rng.choice(32, 9, replace=False)] = 50
      for c in rng.choice(np.setdiff1d(np.arange(n // 32), [a, b]), 60, replace=False):
        s[r, c * 32 + rng.integers(32)] = 49
  elif case == "spread":
    # Each row's best 40 lie one per chunk, in 40 of the first segment's 64 chunks.
    for r in range(q):
      for c in rng.choice(64, 40, replace=False):
        s[r, c * 32 + rng.integers(32)] = 50
  elif case == "padding":
    # Row 0 (which padding rows also look up) scores best; the next 39 lie one per chunk in
    # real chunks of the second segment, where the padding (ids >= nb) would take slots.
    s[:, 0] = 100
    for r in range(q):
      for c in rng.choice(np.arange(64, n // 32 - 1), 39, replace=False):
        s[r, c * 32 + rng.integers(32)] = 50
  elif case == "tail":
    # The best scores fill the last 170 rows. Read in place (nb = 3990), the last block is
    # moved back to row 3734, over rows block 3584 has seen: the best 40 (3820-3859) span
    # both blocks, and the seen rows must not come back as duplicates.
    s[:, n - 170:] = 50
  elif case == "all equal":
    s[:] = 7.0
  elif case == "signed zeros":
    # The best scores are zeros, -0.0 in the lower half of each segment and +0.0 in the
    # upper, so that lower chunks' maxima are -0.0; equal scores must go to the lower ids.
    zeros = np.where(np.arange(n) % 2048 < 1024, -0.0, 0.0).astype(np.float32)
    s = np.where(s > 1, -1.0, zeros[None, :]).astype(np.float32)
  return s


def _lookup_score(xq, rows):
  """Scores given as a matrix: query row i scores database row j (which holds j) xq[i, j]."""
  return jnp.take(xq, rows[:, 0], axis=1)


def _assert_engine_exact(scores, k=40, tiles=None):
  """topk_search over looked-up ``scores`` (8 queries, 256-row blocks, 2048-row segments)
  equals a stable sort of them, zeros canonicalized."""
  rows = np.arange(scores.shape[1], dtype=np.int32)[:, None]
  s, i = topk.topk_search(_lookup_score, scores, (rows,), k, query_block=8,
                          base_block=256, super_block=2048, tiles=tiles)
  ref_s, ref_i = _stable_topk(np.where(scores == 0, 0.0, scores), k)
  np.testing.assert_array_equal(np.asarray(i), ref_i)
  np.testing.assert_array_equal(np.asarray(s), ref_s)


@pytest.mark.parametrize("case", ["ties", "concentrated", "spread", "padding", "tail",
                                  "all equal", "signed zeros"])
@pytest.mark.parametrize("nb", [4096, 3990])
@pytest.mark.parametrize("in_place", [False, True])
def test_chunk_selection_is_exact_with_ties(case, nb, in_place):
  # A score function that looks scores up makes them a given matrix (-0.0 included), so the
  # engine's chunk choice and re-scoring are checked against a stable sort of them, over
  # several blocks and two segments of 64 chunks (more than k), with padding when nb is not
  # a multiple of the block, or (in_place) read in place, the last block moved back to fit.
  tiles = topk.default_tiles()
  if in_place:
    tiles = tiles._replace(in_place_rows=0)
  _assert_engine_exact(_scores(case, 8, nb, np.random.default_rng(len(case) + nb)),
                       tiles=tiles)


@pytest.mark.parametrize("case", ["concentrated", "padding", "tail"])
def test_batched_rescoring_is_exact(case):
  # Accelerators re-score a whole query block at once (a vmap); CPUs one query at a time.
  # A budget of 3 queries' gathers (40 chunks of 32 one-element rows each): 8 = 3 + 3 + 2.
  tiles = topk.CPU_TILES._replace(rescore=3 * 40 * 32, in_place_rows=0)
  _assert_engine_exact(_scores(case, 8, 3990, np.random.default_rng(1)), tiles=tiles)


def test_rescore_batch_by_backend():
  def batch(tiles, per_query):
    return topk.make_plan(512, 10**6, 100, tiles=tiles).rescore_batch(per_query)
  assert batch(topk.CPU_TILES, 3584 * 128) is None  # CPU: one query at a time
  assert batch(topk.ACCEL_TILES, 3584 * 128) == (1 << 26) // (3584 * 128)  # 146
  assert batch(topk.ACCEL_TILES, 3200 * 24) == 512  # lattice d=24: the whole block
  assert batch(topk.ACCEL_TILES, 1 << 30) == 1


def _sizes(plan):
  return plan.query_block, plan.base_block, plan.segment_rows, plan.db_rows


def test_tiles_by_backend(monkeypatch):
  # (query block, base block, segment rows, database rows) of 1k queries x 1M rows, and of
  # mining-shaped 500k x 500k: CPU tiles of ~1M scores, two 504-query blocks; accelerator
  # tiles of ~32M scores (fewer kernel launches) and one segment.
  cpu, accel = topk.CPU_TILES, topk.ACCEL_TILES
  assert _sizes(topk.make_plan(1000, 10**6, 100, tiles=cpu)) == (504, 2080, 1000480, 10**6)
  # The l2 re-rank gathers 16 MB of candidates at a time on a CPU.
  assert topk.items_within(cpu.rerank, 1000, 112 * 128) == 292
  assert topk.items_within(accel.rerank, 1000, 112 * 128) == 1000
  assert cpu.screen_dim == 40 and accel.screen_dim is None
  assert _sizes(topk.make_plan(1000, 10**6, 100, tiles=accel)) == (1000, 33568, 1007040, 10**6)
  assert _sizes(topk.make_plan(500_000, 500_000, 51, tiles=accel)) == (
      2048, 16384, 507904, 500_000)
  # Without tiles, the backend's.
  assert topk.default_tiles() == (cpu if jax.default_backend() == "cpu" else accel)
  assert topk.default_tiles("gpu") == accel and topk.default_tiles("cpu") == cpu
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert _sizes(topk.make_plan(1000, 10**6, 100)) == (1000, 33568, 1007040, 10**6)


def test_screened_run_needs_screen_chunks():
  """A screened run whose plan re-scores fewer than k chunks per query (screen_chunks left
  at 0) is refused with a clear error, instead of selecting no candidates."""
  rng = np.random.default_rng(2)
  xb = rng.standard_normal((300, 8)).astype(np.float32)
  plan = topk.make_plan(4, 300, 10)
  db = topk.pad((xb,), plan)
  with pytest.raises(ValueError, match="screen_chunks=0"):
    topk.run(search.ip_score, xb[:4], db, 300, plan, screen_fn=search.ip_screen)
  # With enough chunks (here every real one) the screened run is the exact search.
  _, i, _ = topk.run(search.ip_score, xb[:4], db, 300, topk.make_plan(4, 300, 10, screen_chunks=10),
                     screen_fn=search.ip_screen)
  _, ref = _stable_topk(xb[:4].astype(np.float64) @ xb.T.astype(np.float64), 10)
  np.testing.assert_array_equal(np.asarray(i), ref)


def test_padding_and_negative_zero_never_win():
  # l2 scores of zero-padded rows are 0, above every real score here: they must not be
  # returned; -0.0 and +0.0 scores tie by id.
  xb = np.zeros((70, 4), np.float32)
  xb[::2] = 1.0  # even rows score 0.5*4 - 2 = +0; odd rows 0 - 0 = 0
  xq = np.full((3, 4), 0.5, np.float32)
  _, i = search.knn(xq, xb, 70, metric="ip", base_block=128)
  ref = np.argsort(-(xq.astype(np.float64) @ xb.T.astype(np.float64)), axis=1, kind="stable")
  np.testing.assert_array_equal(np.asarray(i), ref)
  s, i = topk.topk_search(search.l2_score, xq - 0.5, (xb - 0.5, 0.5 * ((xb - 0.5) ** 2).sum(1)),
                          70, base_block=128)
  assert set(np.asarray(i)[0].tolist()) == set(range(70))


def _l2_float64(xq, xb):
  # Exact for integer data (every term is an integer below 2^53).
  xq, xb = np.asarray(xq, np.float64), np.asarray(xb, np.float64)
  return (xq * xq).sum(1)[:, None] + (xb * xb).sum(1)[None, :] - 2 * xq @ xb.T


@pytest.mark.parametrize("screen", [False, True])
def test_exact_against_faiss_on_real_images_ties_included(mini, screen, monkeypatch):
  # fashion-mnist-mini: 784-d integer pixels, many exactly tied distances. With the
  # bfloat16 screen forced on (base + train, 30k rows: 938 chunks, 224 re-scored) every
  # query must be shown exact in its first pass.
  faiss = pytest.importorskip("faiss")
  xb, xq = np.asarray(mini.base), np.asarray(mini.query)[:200]
  screened = _spy_screen(monkeypatch)
  tiles = topk.CPU_TILES
  if screen:
    xb = np.concatenate([xb, np.asarray(mini.train)])
    tiles = tiles._replace(screen_rows=1)
  index = faiss.IndexFlatL2(xb.shape[1])
  index.add(xb)
  Df, If = index.search(xq, 100)
  D, I = search.knn(xq, xb, 100, tiles=tiles)
  assert screened == [screen]
  D, I = np.asarray(D), np.asarray(I)
  ref_d, ref = _stable_topk(-_l2_float64(xq, xb), 100)
  np.testing.assert_array_equal(I, ref)  # ties: lower id first
  np.testing.assert_array_equal(D, -ref_d)  # exact integers (all below 2^24 here)
  # faiss agrees up to its own float32 rounding of |x|^2 + |q|^2 - 2<x, q> (~5e7 here):
  # its ids differ from ours only between distances within that rounding.
  np.testing.assert_allclose(Df, D, rtol=1e-5, atol=8)
  assert np.all(np.abs(D[I != If] - Df[I != If]) <= 1e-5 * D[I != If] + 8)
  assert (I == If).mean() > 0.95


def test_exact_against_faiss_on_integer_data_full_of_ties():
  faiss = pytest.importorskip("faiss")
  rng = np.random.default_rng(7)
  xb = rng.integers(0, 3, (20_000, 6)).astype(np.float32)
  xq = rng.integers(0, 3, (40, 6)).astype(np.float32)
  index = faiss.IndexFlatL2(6)
  index.add(xb)
  Df, _ = index.search(xq, 300)
  for mesh in [None] + ([sharding.make_mesh(4)] if jax.device_count() >= 4 else []):
    D, I = search.knn(xq, xb, 300, mesh=mesh, base_block=2048)
    np.testing.assert_array_equal(np.asarray(D), Df)
    d = ((xq[:, None, :] - xb[None]) ** 2).sum(-1)
    _, ref = _stable_topk(-d, 300)
    np.testing.assert_array_equal(np.asarray(I), ref)


@pytest.mark.parametrize("offset", [1e4, -3e4])
def test_l2_exact_with_a_large_common_offset(mini, offset):
  # Real images + a constant: |x|^2 - 2<x, q> cancels most digits, and float32 scoring
  # alone picks wrong neighbours. Integer data stays exact in float32 differences.
  xb = np.asarray(mini.base)[:4000] + np.float32(offset)
  xq = np.asarray(mini.query)[:40] + np.float32(offset)
  ref_d, ref_i = _stable_topk(-_l2_float64(xq, xb), 100)
  for mesh in [None] + ([sharding.make_mesh(4)] if jax.device_count() >= 4 else []):
    D, I = search.knn(xq, xb, 100, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(I), ref_i)
    np.testing.assert_array_equal(np.asarray(D), -ref_d)


def test_l2_offset_database_read_in_place():
  # From 2^17 rows the database is searched in place (its last block overlaps the one before)
  # and centred block by block as it is scored: the ids must be the exact ones, ties to the
  # lower id, on integer data far from the origin.
  rng = np.random.default_rng(12)
  nb = topk.default_tiles().in_place_rows + 77
  xb = rng.integers(-4, 5, (nb, 6)).astype(np.float32) + np.float32(3e6)
  xq = np.concatenate([xb[-3:], rng.integers(-4, 5, (9, 6)).astype(np.float32) + 3e6])
  ref_d, ref_i = _stable_topk(-_l2_float64(xq, xb), 40)
  D, I = search.knn(xq, xb, 40)
  np.testing.assert_array_equal(np.asarray(I), ref_i)
  np.testing.assert_array_equal(np.asarray(D), -ref_d)


def test_l2_large_offset_on_float_data():
  rng = np.random.default_rng(8)
  xb = rng.standard_normal((5000, 32)).astype(np.float32) + np.float32(1000.0)
  xq = rng.standard_normal((50, 32)).astype(np.float32) + np.float32(1000.0)
  d64 = ((xq[:, None, :].astype(np.float64) - xb[None].astype(np.float64)) ** 2).sum(-1)
  ref_d, ref_i = _stable_topk(-d64, 20)
  D, I = search.knn(xq, xb, 20)
  assert (np.asarray(I) == ref_i).mean() > 0.995  # float32 rounding of the distances only
  np.testing.assert_allclose(np.asarray(D), -ref_d, rtol=1e-4)


@pytest.mark.parametrize("scale", [1e-30, 1e-3, 1.0, 3e15])
@pytest.mark.parametrize("d", [3, 128, 784])
def test_bf16_screen_bounds_the_float32_score(scale, d):
  # The bound (q_scale x row_scale + row_offset) must hold against both float32 scores the
  # engine compares with: the tile matmul and stage 2's one-query product, on heavy-tailed
  # data at scales from near-subnormal products to near-overflowing ones.
  rng = np.random.default_rng(d)
  xb = (rng.standard_t(2, (700, d)) * scale).astype(np.float32)
  xq = (rng.standard_t(2, (40, d)) * scale).astype(np.float32)
  xb[:5] = xq[:5]  # a query's own row: the largest inner product it can meet
  half = search.half_norms(jnp.asarray(xb))
  cases = [(search.ip_score, search.ip_screen, (jnp.asarray(xb),)),
           (search.l2_score, search.l2_screen, (jnp.asarray(xb), half))]
  for score_fn, screen_fn, rows in cases:
    approx, q_scale, row_scale, row_offset = map(np.asarray, screen_fn(jnp.asarray(xq), *rows))
    err = q_scale.astype(np.float64) @ row_scale.T + row_offset[None, :]
    tile = np.asarray(score_fn(jnp.asarray(xq), *rows))
    one = np.stack([np.asarray(score_fn(jnp.asarray(q[None]), *rows))[0] for q in xq])
    for ref in (tile, one):
      assert np.all(np.isfinite(ref))
      assert np.all(np.abs(approx.astype(np.float64) - ref) <= err), screen_fn.__name__
    if scale >= 1e-3:  # and is not vacuous where products are normal (1e-60 underflows)
      qx = np.outer(np.linalg.norm(xq, axis=1), np.linalg.norm(xb, axis=1))
      assert np.median(err / qx) < 0.02


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_screened_search_equals_float32_search(metric, monkeypatch):
  # Above 32 chunks per query the bfloat16 screen leaves chunks out; on well-separated data
  # every query is shown exact without a second pass, and the result is the float32
  # engine's, scores and ids, on one device and on four. (The screen is forced on: from
  # its real size threshold, ``test_screen_only_where_it_pays``, this would take 131k rows.)
  rng = np.random.default_rng(21)
  xb = rng.standard_normal((40_000, 40)).astype(np.float32)
  xq = rng.standard_normal((60, 40)).astype(np.float32)
  screened = _spy_screen(monkeypatch)
  tiles = topk.CPU_TILES._replace(screen_rows=1)
  D, I = search.knn(xq, xb, 10, metric=metric, tiles=tiles)
  assert screened == [True]  # no float32 pass
  if jax.device_count() >= 4:
    Ds, Is = search.knn(xq, xb, 10, metric=metric, mesh=sharding.make_mesh(4), tiles=tiles)
    np.testing.assert_array_equal(np.asarray(Is), np.asarray(I))
    np.testing.assert_array_equal(np.asarray(Ds), np.asarray(D))
  screened.clear()
  D32, I32 = search.knn(xq, xb, 10, metric=metric, tiles=tiles._replace(screen_dim=None))
  assert screened == [False]
  np.testing.assert_array_equal(np.asarray(I), np.asarray(I32))
  np.testing.assert_array_equal(np.asarray(D), np.asarray(D32))


class _Runs(list):
  """For each engine run (``topk.run``) of ``knn``: whether it took the screen; and in
  ``exact`` the run's ``exact`` flags."""
  exact: list


def _spy_screen(monkeypatch):
  runs, run = _Runs(), topk.run
  runs.exact = []

  def spy(*args, **kwargs):
    runs.append(kwargs.get("screen_fn") is not None)
    out = run(*args, **kwargs)
    runs.exact.append(out[2])
    return out

  monkeypatch.setattr(topk, "run", spy)
  return runs


def test_screen_only_where_it_pays(monkeypatch):
  # On a CPU from d=40 and from 128 database rows per extra re-scored row (k=10: 32 extra
  # chunks, 131072 rows); per device on a mesh.
  screened = _spy_screen(monkeypatch)
  cpu = topk.CPU_TILES
  rng = np.random.default_rng(3)
  xb = rng.standard_normal((131_072, 40)).astype(np.float32)
  xq = rng.standard_normal((5, 40)).astype(np.float32)
  for xb_, xq_, expect in [(xb, xq, True), (xb[:-1], xq, False),
                           (xb[:, :39], xq[:, :39], False)]:
    screened.clear()
    search.knn(xq_, xb_, 10, tiles=cpu)
    assert screened == [expect], (xb_.shape, expect)
  if jax.device_count() >= 4:
    screened.clear()
    search.knn(xq, xb, 10, mesh=sharding.make_mesh(4), tiles=cpu)
    assert screened == [False]
  # Inside jax.jit there is no read back for the fallback: the float32 engine alone.
  screened.clear()
  _, traced = jax.jit(lambda q, b: search.knn(q, b, 10, metric="ip", tiles=cpu))(xq, xb)
  assert screened == [False]
  _, eager = search.knn(xq, xb, 10, metric="ip", tiles=cpu)
  np.testing.assert_array_equal(np.asarray(traced), np.asarray(eager))


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_screen_too_coarse_falls_back_to_float32(metric, monkeypatch):
  # Rows ~1e-3 apart around two opposite unit vectors (so centring cannot help): their
  # scores differ by less than the screen's error (~2^-8), so it shows no query exact and
  # every query is searched again in float32. The ids must be the exact ones all the same
  # (without the second search, most are wrong).
  rng = np.random.default_rng(5)
  v = rng.standard_normal(48).astype(np.float32)
  v /= np.linalg.norm(v)
  xb = np.concatenate([v + 1e-3 * rng.standard_normal((10_000, 48)),
                       -v + 1e-3 * rng.standard_normal((10_000, 48))]).astype(np.float32)
  xq = (v + 1e-3 * rng.standard_normal((20, 48))).astype(np.float32)
  xq[-4:] = -xq[-4:]
  k = 10
  screened = _spy_screen(monkeypatch)
  D, I = search.knn(xq, xb, k, metric=metric, tiles=topk.CPU_TILES._replace(screen_rows=1))
  assert screened == [True, False]  # the screen, then float32 for every query
  assert not np.asarray(screened.exact[0]).any()  # the screen showed no query exact
  if metric == "l2":
    ref = -_l2_float64(xq, xb)
  else:
    ref = np.asarray(xq, np.float64) @ np.asarray(xb, np.float64).T
  ref_s, ref_i = _stable_topk(ref, k)
  assert (np.asarray(I) == ref_i).mean() > 0.99  # float32 rounding of near-equal scores
  np.testing.assert_allclose(np.asarray(D), ref_s if metric == "ip" else -ref_s, rtol=1e-5)


def test_recall_target_opt_in():
  rng = np.random.default_rng(9)
  xb = rng.standard_normal((4000, 16)).astype(np.float32)
  xq = rng.standard_normal((20, 16)).astype(np.float32)
  _, exact = search.knn(xq, xb, 10)
  _, approx = search.knn(xq, xb, 10, recall_target=0.9)
  hits = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(np.asarray(approx), np.asarray(exact))])
  assert hits >= 0.9
  with pytest.raises(ValueError, match="recall_target"):
    search.knn(xq, xb, 10, recall_target=1.5)


def test_default_blocks_wide_database():
  rng = np.random.default_rng(1)
  xb = rng.standard_normal((70_001, 8)).astype(np.float32)
  xq = rng.standard_normal((70, 8)).astype(np.float32)
  D, I = search.knn(xq, xb, 100)
  _, Ir = naive_knn(xq, xb, 100)
  assert (np.asarray(I) == Ir).mean() > 0.999  # float32 vs float64 rounding only


@pytest.mark.parametrize("nb", [997, 4096])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_sharded_equals_unsharded(nb, metric):
  mesh = four_device_mesh()
  rng = np.random.default_rng(nb)
  xb = rng.standard_normal((nb, 24)).astype(np.float32)
  xq = rng.standard_normal((33, 24)).astype(np.float32)
  D1, I1 = search.knn(xq, xb, 37, metric=metric, base_block=256)
  D4, I4 = search.knn(xq, xb, 37, metric=metric, mesh=mesh, base_block=256)
  np.testing.assert_array_equal(np.asarray(I1), np.asarray(I4))
  np.testing.assert_allclose(np.asarray(D1), np.asarray(D4), rtol=1e-6, atol=1e-6)


def test_knn_reproduces_the_shipped_groundtruth(mini):
  xq, gt = mini.query[:100], mini.groundtruth[:100]
  D, I = search.knn(xq, mini.base, 100)
  D, I = np.asarray(D), np.asarray(I)
  xb, q = np.asarray(mini.base, np.float64), np.asarray(xq, np.float64)
  exact = lambda ids: ((q[:, None, :] - xb[ids]) ** 2).sum(-1)  # noqa: E731
  d_gt = exact(gt)
  # 784 pixels up to 255: squared distances exceed float32's exact integers, so the
  # float32 ranking matches the exact one up to rounding (relative 1e-6), not bit for bit.
  np.testing.assert_allclose(D, d_gt, rtol=1e-5)
  np.testing.assert_allclose(exact(I), d_gt, rtol=1e-5)
  assert (I != gt).mean() < 0.01
  assert search.recall_at(I, gt)[1] >= 0.99


def test_hamming_exact_against_faiss_binary_flat():
  faiss = pytest.importorskip("faiss")
  rng = np.random.default_rng(10)
  base = rng.integers(0, 256, (30_000, 8), dtype=np.uint8)
  base[5000:5100] = base[17]  # exact duplicates: ties at distance 0
  query = np.concatenate([rng.integers(0, 256, (30, 8), dtype=np.uint8), base[17:18]])
  index = faiss.IndexBinaryFlat(64)
  index.add(base)
  Df, _ = index.search(query, 150)
  ham = np.unpackbits(query[:, None, :] ^ base[None, :, :], axis=2).sum(2)
  _, ref = _stable_topk(-ham.astype(np.float64), 150)
  for mesh in [None] + ([sharding.make_mesh(4)] if jax.device_count() >= 4 else []):
    D, I = search.hamming_knn(query, base, 150, mesh=mesh, base_block=4096)
    np.testing.assert_array_equal(np.asarray(D), Df)
    np.testing.assert_array_equal(np.asarray(I), ref)


def test_hamming_knn_matches_naive_and_sharded():
  rng = np.random.default_rng(3)
  base = rng.integers(0, 256, (1501, 8), dtype=np.uint8)
  query = rng.integers(0, 256, (40, 8), dtype=np.uint8)
  D, I = search.hamming_knn(query, base, 25, base_block=256)
  ham = np.unpackbits(query[:, None, :] ^ base[None, :, :], axis=2).sum(2)
  ref = np.argsort(ham, axis=1, kind="stable")[:, :25]
  np.testing.assert_array_equal(np.asarray(I), ref)
  np.testing.assert_array_equal(np.asarray(D), np.take_along_axis(ham, ref, 1))
  if jax.device_count() >= 4:
    D4, I4 = search.hamming_knn(query, base, 25, base_block=256, mesh=sharding.make_mesh(4))
    np.testing.assert_array_equal(np.asarray(I4), ref)


def test_sign_codes_hamming_equals_sign_disagreements():
  rng = np.random.default_rng(4)
  y = rng.standard_normal((300, 19)).astype(np.float32)
  codes = binary.sign_codes(y)
  assert codes.shape == (300, 3) and codes.dtype == np.uint8
  np.testing.assert_array_equal(np.asarray(binary.unpack(codes, 19)), np.where(y >= 0, 1.0, -1.0))
  D, I = search.hamming_knn(codes[:5], codes, 3)
  s = np.sign(y + (y == 0))
  disagree = (s[:5, None, :] != s[None, :, :]).sum(-1)
  np.testing.assert_array_equal(np.asarray(D), np.sort(disagree, axis=1)[:, :3])


def test_recall_at():
  I = np.array([[3, 1, 2], [0, 2, 1], [7, 8, 9]])
  gt = np.array([[1, 0], [5, 0], [7, 1]])
  assert search.recall_at(I, gt, ks=(1, 2, 3)) == {1: 1 / 3, 2: 2 / 3, 3: 2 / 3}
  with pytest.raises(ValueError, match="recall@4"):
    search.recall_at(I, gt, ks=(4,))
  with pytest.raises(ValueError, match="queries"):
    search.recall_at(I[:2], gt)


@pytest.mark.parametrize("bad, match", [
    (dict(k=0), "k=0"),
    (dict(k=11), "larger than the database"),
    (dict(k=2.5), "integer"),
    (dict(xq=np.zeros((3, 5), np.float32)), "d=5"),
    (dict(xq=np.zeros(4, np.float32)), "2-D"),
    (dict(xq=np.full((2, 4), np.nan, np.float32)), "NaN"),
    (dict(xb=np.array([[np.inf] * 4] * 10, np.float32)), "NaN or Inf"),
    (dict(xq=np.zeros((2, 4), bool)), "dtype"),
    (dict(xq=np.zeros((2, 4), np.complex64)), "dtype"),
    (dict(metric="cosine"), "metric"),
])
def test_knn_rejects_bad_input(bad, match):
  args = dict(xq=np.zeros((2, 4), np.float32), xb=np.ones((10, 4), np.float32), k=3, metric="l2")
  args.update(bad)
  with pytest.raises(ValueError, match=match):
    search.knn(args["xq"], args["xb"], args["k"], metric=args["metric"])


def test_hamming_rejects_bad_codes():
  base = np.zeros((10, 8), np.uint8)
  with pytest.raises(ValueError, match="uint8"):
    search.hamming_knn(np.zeros((2, 8), np.int32), base, 1)
  with pytest.raises(ValueError, match="bytes"):
    search.hamming_knn(np.zeros((2, 4), np.uint8), base, 1)
  with pytest.raises(ValueError, match="larger than"):
    search.hamming_knn(np.zeros((2, 8), np.uint8), base, 11)


def test_search_lattice_asymmetric_symmetric_and_sharded():
  from spreading_jax.lattice import ZnSphereCodec
  codec = ZnSphereCodec(24, 79)
  rng = np.random.default_rng(5)
  codes = np.asarray(codec.encode(rng.standard_normal((700, 24)).astype(np.float32)))
  xq = rng.standard_normal((30, 24)).astype(np.float32)
  s1, i1 = search.search_lattice(xq, codes, codec, 20, base_block=256)
  # Asymmetric search = exact inner-product search over the decoded unit points.
  _, ref = search.knn(xq, np.asarray(codec.decode(codes)), 20, metric="ip")
  np.testing.assert_array_equal(np.asarray(i1), np.asarray(ref))
  if jax.device_count() >= 4:
    _, i4 = search.search_lattice(xq, codes, codec, 20, base_block=256,
                                  mesh=sharding.make_mesh(4))
    np.testing.assert_array_equal(np.asarray(i4), np.asarray(i1))
  _, isym = search.search_lattice(xq, codes, codec, 20, symmetric=True, base_block=256)
  xq_q = np.asarray(codec.decode(codec.encode(xq)))
  _, ref_sym = search.knn(xq_q, np.asarray(codec.decode(codes)), 20, metric="ip")
  np.testing.assert_array_equal(np.asarray(isym), np.asarray(ref_sym))
  # Several decoded segments and query blocks, single device and sharded, against a
  # numpy reference (stable sort: ties to the lower id).
  points = np.asarray(codec.decode(codes), np.float64)
  ref_ids = np.argsort(-(xq.astype(np.float64) @ points.T), axis=1, kind="stable")[:, :20]
  for mesh in [None] + ([sharding.make_mesh(4)] if jax.device_count() >= 4 else []):
    _, ib = search.search_lattice(xq, codes, codec, 20, query_block=8, base_block=128,
                                  super_block=256, mesh=mesh)
    np.testing.assert_array_equal(np.asarray(ib), ref_ids)
  with pytest.raises(ValueError, match="words"):
    search.search_lattice(xq, codes[:, :1], codec, 5)


# -- input checks of the engine and its callers (static: shapes, dtypes, types) -----------

def _tiny():
  x = np.random.default_rng(0).standard_normal((40, 16)).astype(np.float32)
  return jnp.asarray(x[:5]), jnp.asarray(x)


@pytest.mark.parametrize("args, match", [
    (dict(k=41), "k=41 is larger than the database size nb=40"),
    (dict(k=0), "k=0 must be >= 1"),
    (dict(k=2.5), "k must be an integer"),
    (dict(xq="d8"), r"xq \[nq, 8\] float32 against database rows \[nb, 16\]"),
    (dict(xq="1d"), "xq must be at least 2-D"),
    (dict(db=()), "db is empty"),
    (dict(db="bare"), "db must be a tuple of arrays"),
    (dict(db="rows"), "db arrays must share their rows"),
])
def test_topk_search_rejects_bad_input(args, match):
  # A k beyond the database used to pad with id -1 / score -inf; the others crashed deep
  # inside JAX. No caller relies on the padding: knn, hamming_knn and search_lattice refuse
  # k > nb, and shards pad internally.
  xq, xb = _tiny()
  xq = {"d8": xq[:, :8], "1d": xq[0], None: xq}[args.get("xq")]
  db = {"bare": xb, "rows": (xb, xb[:10]), (): (), None: (xb,)}[args.get("db")]
  with pytest.raises(ValueError, match=match):
    topk.topk_search(topk.ip_score, xq, db, args.get("k", 3))


def test_topk_search_rejects_a_score_of_the_wrong_shape():
  xq, xb = _tiny()
  with pytest.raises(ValueError, match=r"score_fn must return a \[queries, rows\] matrix"):
    topk.topk_search(_transposed_score, xq, (xb,), 3)


def _transposed_score(xq, xb):
  return jnp.dot(xb, xq.T)


def test_mesh_must_be_a_mesh():
  xq, xb = _tiny()
  codes = np.zeros((40, 2), np.uint8)
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh.*got str"):
    search.knn(xq, xb, 3, mesh="cpu")
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    search.hamming_knn(codes[:2], codes, 3, mesh="cpu")
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    topk.topk_search(topk.ip_score, xq, (xb,), 3, mesh=jax.devices())
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    sharding.mesh_size("cpu")


def test_search_lattice_rejects_a_codec_that_is_not_one():
  from spreading_jax.lattice import zn_codec
  codec = zn_codec(8, bits=16)
  xq = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
  codes = np.asarray(codec.encode(xq))
  with pytest.raises(TypeError, match="codec must be a lattice.ZnSphereCodec.*NoneType"):
    search.search_lattice(xq, codes, None, 2)
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    search.search_lattice(xq, codes, codec, 2, mesh="cpu")


def test_hamming_width_mismatch_names_both_arrays():
  with pytest.raises(ValueError, match="query_codes have 1 bytes per code but base_codes have 3"):
    search.hamming_knn(np.zeros((2, 1), np.uint8), np.zeros((5, 3), np.uint8), 1)
  with pytest.raises(ValueError, match="query_codes must be a 2-D uint8 array .* got list"):
    search.hamming_knn([[0], [1]], np.zeros((5, 1), np.uint8), 1)  # said "got shape None"


@pytest.mark.parametrize("gt, ks, match", [
    (np.zeros((3, 0), np.int64), (1,), "no column"),
    (np.array([[1.5], [5], [7]]), (1,), "groundtruth must hold integer ids"),
    (np.array([[1], [-1], [7]]), (1,), "negative id -1 .query 1."),
    (np.array([[1], [5], [7]]), "3", "ks must be an int or a sequence"),
])
def test_recall_at_rejects_bad_groundtruth(gt, ks, match):
  I = np.array([[3, 1, 2], [0, 2, 1], [7, 8, 9]])
  with pytest.raises(ValueError, match=match):
    search.recall_at(I, gt, ks=ks)


def test_recall_at_edge_cases():
  I = np.array([[3, 1, 2], [-1, -1, -1], [7, 8, 9]])  # -1: no result, a miss
  gt = np.array([[1], [5], [7]])
  assert search.recall_at(I, gt, ks=2) == {2: 2 / 3}  # one int
  with pytest.raises(ValueError, match="no queries"):
    search.recall_at(I[:0], gt[:0], ks=(1,))
  with pytest.raises(ValueError, match="indices must hold integer ids"):
    search.recall_at(I.astype(np.float32), gt, ks=(1,))
  with pytest.raises(ValueError, match="recall@4 needs at least 4 results"):
    search.recall_at(I, gt, ks=(1, 4))


@pytest.mark.parametrize("kw, match", [
    (dict(query_block=0), "query_block=0 must be >= 1"),
    (dict(base_block=-5), "base_block=-5 must be >= 1"),
    (dict(query_block=-7), "query_block=-7 must be >= 1"),  # failed in pad_rows, unnamed
])
def test_tile_sizes_must_be_positive(kw, match):
  x = np.random.default_rng(0).standard_normal((300, 8)).astype(np.float32)
  with pytest.raises(ValueError, match=match):
    search.knn(x, x, 5, **kw)


def test_make_mesh_names_a_count_below_one():
  for n in (0, -1):
    with pytest.raises(ValueError, match=f"num_devices={n} must be >= 1"):
      sharding.make_mesh(n)
  with pytest.raises(ValueError, match="num_devices must be an integer"):
    sharding.make_mesh(1.5)
  with pytest.raises(ValueError, match="devices are available"):
    sharding.make_mesh(jax.device_count() + 1)
