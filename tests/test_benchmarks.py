"""The benchmark scripts run (CPU smoke sizes) and the search hot paths do not recompile."""
import importlib
import json
import os
import sys

import chex
import jax
import numpy as np
import pytest

from spreading_jax import hamming, search

BENCH = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks")


def _bench_module(name):
  sys.path.insert(0, os.path.abspath(BENCH))
  try:
    return importlib.import_module(name)
  finally:
    sys.path.pop(0)


def test_bench_accel_small_runs_on_cpu(tmp_path, monkeypatch):
  common = _bench_module("_common")
  monkeypatch.setattr(common, "RESULTS", tmp_path)
  accel = _bench_module("bench_accel")
  out = accel.main(["--small", "--n-train", "1024", "--nb", "2048", "--nq", "32",
                    "--hidden", "32", "32", "--repeats", "1", "--name", "smoke"])
  saved = json.loads((tmp_path / "smoke.json").read_text())
  assert saved["device_kind"] == jax.devices()[0].device_kind
  assert saved["epochs_run"] == 2 and len(saved["history"]) == 2
  for key in ("sgd_s_per_epoch", "mining_s_per_epoch", "epoch_s", "encode_vectors_per_s"):
    assert saved[key] > 0, key
  assert saved["projected_160_epochs_s"] == pytest.approx(160 * saved["epoch_s"])
  assert all(v > 0 for v in saved["search_qps"].values())
  assert all(v > 0 for v in saved["achieved_flops"].values())
  assert out["nb"] == 2048


def test_bench_train_and_mining_run_at_smoke_size(tmp_path, monkeypatch):
  common = _bench_module("_common")
  monkeypatch.setattr(common, "RESULTS", tmp_path)
  _bench_module("bench_train").main(["--n", "600", "--repeats", "1", "--mine-n", "2000"])
  saved = json.loads((tmp_path / "bench_train.json").read_text())
  assert saved["rows"][0]["vectors_per_s"] > 0 and saved["projection"]["epoch_s_500k_projected"] > 0
  _bench_module("bench_mining").main(["--n", "3000", "--epochs", "1"])
  row = json.loads((tmp_path / "bench_mining.json").read_text())["rows"][0]
  assert row["exact_s"] > 0 and row["graph"][0]["recall"] > 0.5
  assert 40 <= row["graph"][0]["rank_median"] <= 60 and row["faiss_hnsw"][0]["seconds"] > 0


@pytest.mark.parametrize("name, argv, check", [
    ("bench_knn", ["--nq", "16", "--nb", "3000", "--dims", "8", "--repeats", "1",
                   "--no-siftsmall"], lambda r: r["top1_agreement"] == 1.0),
    ("bench_code_search", ["--nq", "16", "--nb", "3000", "--repeats", "1"],
     lambda r: r.get("same_distances", True) and r.get("top1_agreement", 1.0) > 0.9),
])
def test_search_benchmarks_run_at_smoke_size(name, argv, check, tmp_path, monkeypatch):
  # The search benchmarks behind README rows must still run against the current API.
  pytest.importorskip("faiss")
  common = _bench_module("_common")
  monkeypatch.setattr(common, "RESULTS", tmp_path)
  _bench_module(name).main(argv)
  rows = json.loads((tmp_path / f"{name}.json").read_text())["rows"]
  assert rows and all(check(r) for r in rows), rows


def test_bench_accel_skips_full_scale_without_accelerator(capsys):
  if jax.devices()[0].platform != "cpu":
    pytest.skip("an accelerator is present: the full-scale run is not skipped")
  assert _bench_module("bench_accel").main([]) is None
  assert "no accelerator" in capsys.readouterr().out


def test_device_peak_table():
  accel = _bench_module("bench_accel")
  assert accel.device_peak("NVIDIA H100 80GB HBM3")["name"] == "H100"
  assert accel.device_peak("NVIDIA H100 PCIe")["name"] == "H100 PCIe"
  assert accel.device_peak("TPU v5 lite")["bf16"] == 197.0
  assert accel.device_peak("cpu") is None


@pytest.mark.parametrize("which", ["ip", "l2", "hamming"])
def test_search_does_not_retrace_across_database_sizes(which, monkeypatch):
  # Database sizes that pad to the same block count must reuse the compiled search (the
  # valid row count is traced, not baked in), and so must new query/database values.
  # One compilation traces the score function twice: the chunk-maxima pass and the re-scoring;
  # hamming_knn enters through topk_search, whose shape check traces it once more abstractly
  # (jax.eval_shape, cached per query/database signature, not per size).
  module, name, traces = {"ip": (search, "ip_score", 2), "l2": (search, "l2_score", 2),
                          "hamming": (hamming, "hamming_score", 3)}[which]
  monkeypatch.setattr(module, name, chex.assert_max_traces(getattr(module, name), n=traces))
  rng = np.random.default_rng(0)
  for nb in (1000, 1001, 1020):
    if which == "hamming":
      base = rng.integers(0, 256, (nb, 8), dtype=np.uint8)
      search.hamming_knn(base[:16], base, 10)
    else:
      xb = rng.standard_normal((nb, 12)).astype(np.float32)
      search.knn(xb[:16] + 0.5, xb, 10, metric=which)


def test_bench_encode_pipeline_and_files_modes_run_at_smoke_size(tmp_path, monkeypatch):
  # The modes behind the README's pipeline numbers and the accelerator files run (issue 28).
  common = _bench_module("_common")
  monkeypatch.setattr(common, "RESULTS", tmp_path)
  bench = _bench_module("bench_encode")
  small = ["--hidden", "16", "--d-out", "8", "--r2", "10", "--repeats", "1", "--tmp",
           str(tmp_path)]
  # --chunk of one block: the "before" loop reuses the block program (one compile fewer).
  results = bench.main(["--pipeline", "--n", "5000", "--dims", "24", "--chunk", "2048", *small])
  assert [r["input"] for r in results] == ["fvecs", "bvecs"]
  for r in results:
    assert {c["case"] for c in r["rates"]} == {"forward only", "compute only", "stream",
                                               "encode_file", "before"}
    assert all(c["vectors_per_s"] > 0 for c in r["rates"])
    assert r["host_s_per_1M"]["after: NaN/Inf check"] == 0.0
  saved = json.loads((tmp_path / "bench_encode_pipeline.json").read_text())
  assert "DIR" in saved["command"] and str(tmp_path) not in saved["command"]
  rows = bench.main(["--files", "--n-files", "3000", "--name", "files", *small])
  assert len(rows) == 3 and all(r["vectors_per_s"] > 0 for r in rows)
  assert json.loads((tmp_path / "files.json").read_text())["device"] == \
      jax.devices()[0].device_kind
