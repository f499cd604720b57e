"""Approximate (graph) negative mining: the NN-descent kernel, the miner's recall check, its
exact fallback and its calibrated column, and training with it.

Bugs these tests were checked against (each made on purpose once): candidates kept in id
order instead of rescored, duplicates not removed (test_refine_*), the reverse edges
dropped (test_reverse_edges_*); the recall check skipped
(test_miner_falls_back_to_exact_below_target); the column not calibrated
(test_calibrated_column_follows_the_exact_rank).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spreading_jax import knn_graph, mining, search, sharding
from spreading_jax import train as T


def _sphere(n, d, seed):
  x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _exact(y, k):
  return np.asarray(search.knn(y, y, k, metric="ip")[1])


def _recall(approx, exact, k):
  return float((approx[:, :k, None] == exact[:, None, :k]).any(axis=2).mean())


@pytest.fixture(scope="module")
def drifted():
  """Unit vectors before and after a small move: last epoch's graph and this epoch's."""
  y0 = _sphere(4000, 12, 0)
  y1 = y0 + 0.15 * _sphere(4000, 12, 1)
  y1 /= np.linalg.norm(y1, axis=1, keepdims=True)
  return y0, y1, _exact(y0, 40), _exact(y1, 40)


def _scores(y, ids):
  return np.einsum("nd,nkd->nk", y, y[ids])


def test_refine_keeps_an_exact_graph_exact(drifted):
  _, y1, _, truth = drifted
  new = np.asarray(knn_graph.refine(y1, y1, jnp.asarray(truth)))
  # Equal up to the order of near-ties (the two kernels round sums differently).
  np.testing.assert_allclose(_scores(y1, new), _scores(y1, truth), atol=1e-6)
  assert np.mean(new == truth) > 0.999


def test_refine_recovers_most_neighbours_after_a_move(drifted):
  _, y1, old, truth = drifted
  before = _recall(old, truth, 30)
  new = np.asarray(knn_graph.refine(y1, y1, jnp.asarray(old)))
  assert np.all(np.sort(new, axis=1)[:, 1:] != np.sort(new, axis=1)[:, :-1])  # no duplicates
  after = _recall(new, truth, 30)
  assert before < 0.85 and after > 0.93, (before, after)
  # Every list is sorted by the exact score, best first.
  scores = _scores(y1, new)
  assert np.all(np.diff(scores, axis=1) <= 1e-6)


def test_reverse_edges_reach_vectors_nobody_lists_first():
  # Vector 3 lists 0 but 0 does not list 3: only the reverse edge brings 3 to 0's list.
  graph = jnp.array([[0, 1], [1, 0], [2, 1], [3, 0]], jnp.int32)
  rev = np.asarray(knn_graph.reverse_neighbors(graph, 2, 3))
  assert set(rev[0]) == {0, 1, 3}
  y = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.99, 0.01]], np.float32)
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  new = np.asarray(knn_graph.refine(y, y, graph, fan=2, fan_nn=2, reverse=3))
  assert new[0].tolist() == [0, 3]


def test_refine_sharded_equals_unsharded(drifted):
  if jax.device_count() < 4:
    pytest.skip("needs XLA_FLAGS=--xla_force_host_platform_device_count=4 (make test sets it)")
  _, y1, old, _ = drifted
  one = knn_graph.refine(y1, y1, jnp.asarray(old))
  four = knn_graph.refine(y1, y1, jnp.asarray(old), mesh=sharding.make_mesh(4))
  np.testing.assert_array_equal(np.asarray(one), np.asarray(four))


def test_refine_rejects_bad_input(drifted):
  _, y1, old, _ = drifted
  with pytest.raises(ValueError, match="same number of rows"):
    knn_graph.refine(y1[:10], y1[:10], jnp.asarray(old))
  with pytest.raises(ValueError, match="int32"):
    knn_graph.refine(y1, y1, jnp.asarray(old, jnp.float32))
  with pytest.raises(ValueError, match="fan=41"):
    knn_graph.refine(y1, y1, jnp.asarray(old), fan=41)


def test_calibrated_column_follows_the_exact_rank():
  exact = np.array([[1, 2, 3, 4, 5, 6]] * 3)
  # Lists that missed id 2: column 2 holds exact rank 3, so rank 3 is read from column 2.
  approx = np.array([[1, 3, 4, 5]] * 3)
  assert mining._calibrated_column(approx, exact, 3) == (1, 3.0)
  assert mining._calibrated_column(exact, exact, 3) == (2, 3.0)


def test_miner_falls_back_to_exact_below_target(drifted):
  y0, y1, old, truth = drifted
  for include_self in (True, False):
    exact = mining.hard_negatives(y1, y1, 20, include_self=include_self)
    miner = mining.NegativeMiner(20, include_self=include_self, method="graph",
                                 recall_target=1.0, max_rounds=1)
    miner.start(old[:, :miner.width(len(y1))])
    np.testing.assert_array_equal(miner(jnp.asarray(y1), jnp.asarray(y1)), exact)
    assert miner.last["exact"] and miner.last["rounds"] == 1 and miner.last["recall"] < 1.0


def test_miner_refines_and_stays_near_the_exact_rank(drifted):
  y0, y1, old, truth = drifted
  miner = mining.NegativeMiner(20, method="graph", recall_target=0.8)
  y0d, y1d = jnp.asarray(y0), jnp.asarray(y1)
  np.testing.assert_array_equal(miner(y0d, y0d), mining.hard_negatives(y0, y0, 20))
  assert miner.last["exact"] and miner.last["rounds"] == 0  # nothing to refine yet
  neg = miner(y1d, y1d)
  assert not miner.last["exact"] and miner.last["recall"] >= 0.8
  s = np.einsum("nd,nd->n", y1, y1[neg])
  rank = (y1 @ y1.T > s[:, None] + 1e-6).sum(1) + 1
  assert abs(np.median(rank) - 20) <= 1 and np.percentile(rank, 90) <= 26


def test_miner_rejects_a_bad_seed():
  miner = mining.NegativeMiner(20, method="graph")
  with pytest.raises(ValueError, match="seed lists"):
    miner.start(np.zeros((100, 5), np.int32))


def test_auto_method_follows_the_original():
  assert mining.mining_method("auto", 500_000, "cpu") == "graph"
  assert mining.mining_method("auto", 500_000, "gpu") == "exact"
  assert mining.mining_method("auto", 50_000, "cpu") == "exact"
  assert mining.mining_method("graph", 100, "tpu") == "graph"
  with pytest.raises(ValueError, match="mining="):
    mining.mining_method("hnsw", 10, "cpu")
  with pytest.raises(ValueError, match="mining="):
    T.TrainConfig(mining="hnsw")


def test_training_with_graph_mining(mini):
  x = np.asarray(mini.train[:1500])
  config = T.TrainConfig(d_out=8, r2=10, bits=32, hidden=(32, 32), epochs=3, batch_size=32,
                         lambda_koleo=0.1, val_every=0, verbose=False, mining="graph",
                         rank_negative=20)
  result = T.train(config, x)
  assert len(result.history) == 3
  for h in result.history:
    assert "mining_recall" in h and "mining_exact" in h
    # The input-space lists seed epoch 1: it refines them (and may fall back to exact).
    assert h["mining_recall"] is not None


def _small_graph():
  y = _sphere(64, 8, 3).astype(np.float32)
  return y, _exact(y, 8).astype(np.int32)


@pytest.mark.parametrize("bad_id", [10**6, -3])
def test_refine_rejects_ids_outside_the_vectors(bad_id):
  # A host graph's ids are range-checked (they used to come back as neighbours).
  y, g = _small_graph()
  g[5, 2] = bad_id
  with pytest.raises(ValueError, match=f"graph holds id {bad_id} .row 5. outside \\[0, 64\\)"):
    knn_graph.refine(y, y, g, fan=4, fan_nn=4, reverse=4)


def test_refine_rejects_bad_shapes_and_types():
  y, g = _small_graph()
  with pytest.raises(ValueError, match="graph must be 2-D"):
    knn_graph.refine(y, y, g[:, 0])
  with pytest.raises(ValueError, match="yq must be an array, got list"):
    knn_graph.refine(y.tolist(), y, g, fan=4, fan_nn=4)
  with pytest.raises(ValueError, match="yq .64, 8. and yb .64, 4. must have the same shape"):
    knn_graph.refine(y, y[:, :4], g, fan=4, fan_nn=4)
  with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
    knn_graph.refine(y, y, g, fan=4, fan_nn=4, mesh="cpu")
  # A list graph, or a numpy graph of int64 ids (argsort's, faiss'), is read as int32 ids,
  # as before the checks.
  ref = np.asarray(knn_graph.refine(y, y, g, fan=4, fan_nn=4))
  for other in (g.tolist(), g.astype(np.int64)):
    np.testing.assert_array_equal(knn_graph.refine(y, y, other, fan=4, fan_nn=4), ref)


@pytest.mark.parametrize("k, rows, match", [
    (20, np.arange(5), "k=20 is larger than the graph's width 8"),
    (4, np.array([500]), "rows holds 500, outside \\[0, 64\\)"),
    (4, np.array([-1]), "rows holds -1, outside"),
    (4, np.arange(0), "rows is empty"),
    (4, np.array([1.0]), "rows must be a 1-D integer array"),
])
def test_sampled_recall_rejects_bad_input(k, rows, match):
  # Each of these returned a recall (1.0, or NaN for no rows) instead of an error.
  y, g = _small_graph()
  with pytest.raises(ValueError, match=match):
    knn_graph.sampled_recall(jnp.asarray(y), jnp.asarray(y), g, k, rows)
  assert knn_graph.sampled_recall(jnp.asarray(y), jnp.asarray(y), jnp.asarray(g), 8,
                                  np.arange(5)) == 1.0
