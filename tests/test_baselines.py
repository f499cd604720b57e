"""faiss baselines on a small real subset: recall in range, code sizes at the budget."""
import pytest

pytest.importorskip("faiss")

from spreading_jax import baselines  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_faiss_thread")


@pytest.fixture(scope="module")
def small(mini):
  return mini.subset(nb=2000, nq=50, nt=2000)


@pytest.mark.parametrize("factory,bits", [("PQ8", 64), ("PQ2", 16), ("OPQ8_32,PQ8", 64),
                                          ("LSH64", 64), ("ITQ32", 32)])
def test_code_bits(factory, bits):
  assert baselines.code_bits(factory, 128) == bits


def test_opq_factory_falls_back_for_small_d():
  assert baselines.opq_factory(128, 8) == "OPQ8_32,PQ8"
  assert baselines.opq_factory(16, 8) == "OPQ8,PQ8"
  with pytest.raises(ValueError, match="only d=24"):
    baselines.opq_paper_factory(24, 64)


def test_pq_recall_in_range(small):
  rec = baselines.evaluate_method("pq", small, 16, max_train=2000)
  assert set(rec) == {1, 10, 100}
  assert 0 < rec[100] <= 1 and rec[1] <= rec[10] <= rec[100]


@pytest.mark.parametrize("name", ["lsh", "itq"])
def test_binary_baselines_run(small, name):
  rec = baselines.evaluate_method(name, small, 32)
  assert 0 < rec[100] <= 1 and rec[1] <= rec[10] <= rec[100]


def test_itq_beats_nothing_and_transform_changes_d(small):
  half = lambda x: x[:, :392]  # noqa: E731
  rec = baselines.evaluate_method("itq", small, 64, transform=half)
  assert 0 < rec[100] <= 1


def test_errors(small):
  with pytest.raises(ValueError, match="unknown baseline"):
    baselines.evaluate_method("nope", small, 64)
  with pytest.raises(ValueError, match="not the budget"):
    baselines.evaluate_method("pq", small, 12)


def test_baselines_skip_the_polysemous_relabelling_and_search_the_same():
  """evaluate_faiss trains PQ without faiss' polysemous relabelling (seconds of CPU on
  784-d inputs), which must not change what an ADC search returns: same distances and ids
  as the factory's own index. Red when ``adc_only`` leaves the training on (the flag) or
  touches another setting of the index (the results)."""
  import faiss
  import numpy as np
  rng = np.random.default_rng(0)
  xt, xb, xq = (rng.standard_normal((n, 64)).astype(np.float32) for n in (1500, 1000, 20))
  results = []
  for index in (baselines.build_index("OPQ4_32,PQ4x4", 64),
                baselines.adc_only(baselines.build_index("OPQ4_32,PQ4x4", 64))):
    index.train(xt)
    index.add(xb)
    results.append(index.search(xq, 10))
    pq = faiss.downcast_index(faiss.downcast_index(index).index)
    results[-1] += (pq.do_polysemous_training,)
  assert results[0][2] and not results[1][2]
  np.testing.assert_array_equal(results[0][1], results[1][1])
  np.testing.assert_array_equal(results[0][0], results[1][0])
