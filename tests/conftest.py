"""Shared fixtures: real datasets resolved through SPREADING_DATA (default ../shared/data)."""
import os

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")


def _load(name):
  from spreading_jax import datasets
  try:
    root = datasets.data_root()
  except ValueError as e:
    pytest.skip(f"real data not found: {e}")
  return datasets.load_dataset(name, root)


@pytest.fixture(scope="session")
def siftsmall():
  return _load("siftsmall")


@pytest.fixture(scope="session")
def wordllama():
  return _load("wordllama-256")


@pytest.fixture(scope="module")
def one_faiss_thread():
  """faiss limited to one OpenMP thread (its threads oversubscribe 2-core CI machines)."""
  try:
    import faiss
  except ImportError:
    yield
    return
  n = faiss.omp_get_max_threads()
  faiss.omp_set_num_threads(1)
  yield
  faiss.omp_set_num_threads(n)
