"""Shared fixtures: the dataset shipped in the package, so every test runs on a fresh clone.

A dataset that cannot be loaded skips its tests locally but fails them under CI=true, so a
broken install never looks green in CI.
"""
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request

import pytest

os.environ.setdefault("TQDM_DISABLE", "1")

# XLA:CPU compiles fast for the tests (set before any backend starts; subprocesses and
# pytest-xdist workers inherit it): compiling is most of this suite's time. The LLVM
# backend at -O1 compiles faster than the default -O2, and XLA:CPU's older elemental
# emitters (--xla_cpu_use_fusion_emitters=false) halve what remains (a 2-epoch fit of a
# small catalyzer: XLA backend compile 6.3-6.7 s -> 2.9-3.2 s, 2 runs each, on a 2-core
# CPU). Not -O0: it compiles a little faster still but leaves the exact kNN's blocked
# kernel unvectorized, and the tests run it on 784-d images (2,944 x 2,944: 6.6 s at -O0,
# 0.34 s at -O1; the suite on a fresh clone, 2 cores: 498 s at -O0, 469 s at -O1).
# XLA's own HLO optimizations still run and there is no fast-math at any setting; results
# agree up to float rounding (e.g. fused multiply-adds), which no test may depend on.
# Flags the user set in XLA_FLAGS win, e.g. --xla_backend_optimization_level=3 (the
# default); the emitter flag is kept only where this jaxlib knows it (XLA aborts on an
# unknown flag), which a short probe checks once.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
  _flags = f"{_flags} --xla_backend_optimization_level=1".strip()
if "xla_cpu_use_fusion_emitters" not in _flags:
  _probe = subprocess.run(
      [sys.executable, "-c", "import jax; jax.devices()"], capture_output=True, timeout=300,
      env=dict(os.environ, XLA_FLAGS=f"{_flags} --xla_cpu_use_fusion_emitters=false",
               JAX_PLATFORMS="cpu"))
  if _probe.returncode == 0:
    _flags = f"{_flags} --xla_cpu_use_fusion_emitters=false"
os.environ["XLA_FLAGS"] = _flags

# One jax persistent compilation cache for the whole run, in a fresh temporary directory
# (set before jax starts; subprocesses and pytest-xdist workers inherit it): the CLI,
# signal and multi-process tests start many Python processes that compile the same
# training and encoding programs, and each would otherwise compile them again. Cached
# executables are the ones XLA compiled for the same program and flags, so results do not
# change; a cache the user set in JAX_COMPILATION_CACHE_DIR is left alone.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="spreading-jax-tests-jit-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)


def _load(name):
  from spreading_jax import datasets
  try:
    return datasets.load_dataset(name)
  except ValueError as e:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
      pytest.fail(f"dataset {name!r} is missing under CI=true: {e}")
    pytest.skip(f"dataset {name!r} not available: {e}")


@pytest.fixture(autouse=True)
def _hermetic_data_locations(tmp_path_factory, monkeypatch):
  """Tests never read the user's data root or cache (each test gets an empty cache) and
  never reach the network (only servers a test starts on 127.0.0.1)."""
  monkeypatch.delenv("SPREADING_DATA", raising=False)
  monkeypatch.setenv("SPREADING_CACHE", str(tmp_path_factory.mktemp("cache")))
  urlopen = urllib.request.urlopen

  def local_only(request, *args, **kwargs):
    url = getattr(request, "full_url", request)
    if urllib.parse.urlsplit(url).hostname != "127.0.0.1":
      raise AssertionError(f"a test tried to reach the network: {url}")
    return urlopen(request, *args, **kwargs)

  monkeypatch.setattr(urllib.request, "urlopen", local_only)


@pytest.fixture(scope="session")
def mini():
  """fashion-mnist-mini: 784-d real images, 20k train / 10k base / 1k queries, exact gt."""
  return _load("fashion-mnist-mini")


@pytest.fixture(scope="session")
def tiny_model_dir(mini, tmp_path_factory):
  """A tiny model trained once through the CLI's `train` on the shipped dataset (1 epoch on
  2,944 rows = 46 full batches, d_out=8, r2=10, 32-bit budget), for the tests that need *a*
  trained model: test_cli (which checks the command), test_index and test_evaluate."""
  from spreading_jax.cli import main
  tmp = tmp_path_factory.mktemp("tiny_model")
  config = {"d_out": 8, "r2": 10, "bits": 32, "hidden": [32, 32], "epochs": 1, "val_every": 0,
            "lambda_koleo": 0.05, "verbose": False, "num_train": 2944}
  (tmp / "config.json").write_text(json.dumps(config))
  with pytest.MonkeyPatch.context() as mp:  # session scope: the autouse fixture is not active
    mp.delenv("SPREADING_DATA", raising=False)
    mp.setenv("SPREADING_CACHE", str(tmp / "cache"))
    assert main(["train", "fashion-mnist-mini", "--config", str(tmp / "config.json"),
                 "--out", str(tmp / "model")]) == 0
  return tmp / "model"


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
