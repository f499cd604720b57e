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
