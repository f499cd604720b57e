"""Shared helpers of the benchmarks: timing, environment description, JSON output."""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import jax

RESULTS = Path(__file__).resolve().parents[1] / "experiments" / "results"


def timeit(fn, repeats: int, warmup: int = 1) -> list[float]:
  """Wall-clock seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

  ``fn`` must block until its work is done (``block_until_ready`` for JAX results).
  """
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return times


def interleaved(cases: dict, repeats: int, warmup: int = 1) -> dict[str, list[float]]:
  """Wall-clock seconds of every ``fn()`` in ``cases`` ({name: fn}) over ``repeats`` rounds,
  after ``warmup`` rounds (compilation, first touch). Each round runs every case in turn,
  so load spikes on a shared machine hit all of them. Each ``fn`` must block until done.
  """
  for _ in range(warmup):
    for fn in cases.values():
      fn()
  times = {name: [] for name in cases}
  for _ in range(repeats):
    for name, fn in cases.items():
      t = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t)
  return times


def median(xs) -> float:
  return float(statistics.median(xs))


def environment() -> dict:
  """What the numbers were measured on (``report.environment``, the one writer)."""
  from spreading_jax.report import environment as report_environment
  return report_environment(machine=True)


def write_result(name: str, payload: dict) -> Path:
  """Writes experiments/results/<name>.json (atomically) and returns its path; its
  ``command`` is recorded with placeholders for this machine's paths
  (``report.portable_command``)."""
  from spreading_jax._files import atomic_output
  from spreading_jax.report import portable_command
  if isinstance(payload.get("command"), str):
    payload = dict(payload, command=portable_command(payload["command"]))
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / f"{name}.json"
  with atomic_output(path) as tmp:
    with open(tmp, "w") as f:
      json.dump(dict(payload, environment=environment()), f, indent=2)
  return path


def table(rows: list[dict], columns: list[str]) -> str:
  """A Markdown table of ``rows`` restricted to ``columns``."""
  def fmt(v):
    return f"{v:.3g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def device_batches(x, max_batch: int = 65536):
  """Device-resident equal batches of at most ``max_batch`` rows of x (the last one
  zero-padded by fewer than 8 * count rows, so padding does not inflate the timings)."""
  import jax.numpy as jnp
  from spreading_jax import sharding
  count = -(-len(x) // max_batch)
  batch = sharding.round_up(-(-len(x) // count), 8)
  return [jnp.asarray(sharding.pad_rows(x[s:s + batch], batch)) for s in range(0, len(x), batch)]


def encode_cases(model, codec, batches) -> dict:
  """The batch-job encode path on device-resident ``batches`` and its two halves, as
  {name: fn} for ``timeit``/``interleaved``: "end-to-end" (``encode.make_encoder``: raw
  vectors -> codes, with its default NaN/Inf check: one scalar read back per call),
  "end-to-end, unchecked" (``check_finite=False``: calls dispatch asynchronously),
  "catalyzer forward" and "lattice encode" (quantize + rank)."""
  from spreading_jax import encode
  from spreading_jax.model import _forward_fn
  enc = encode.make_encoder(model, codec=codec)
  unchecked = encode.make_encoder(model, codec=codec, check_finite=False)
  fwd = _forward_fn(model.module)

  def forward():
    return jax.block_until_ready([fwd(model.variables, b, model.input_scale) for b in batches])

  ys = forward()
  lattice_encode = jax.jit(codec.encode_core)
  return {"end-to-end": lambda: jax.block_until_ready([enc(b) for b in batches]),
          "end-to-end, unchecked": lambda: jax.block_until_ready([unchecked(b) for b in batches]),
          "catalyzer forward": forward,
          "lattice encode": lambda: jax.block_until_ready([lattice_encode(y) for y in ys])}


def deep_like(n: int, d: int = 96, seed: int = 0, clusters: int = 1000):
  """n float32 vectors shaped like Deep1M (d=96, clustered, unit norm): a stand-in with the
  same size and cost when the real files are not on the machine. Throughput depends on
  the shapes only; recall numbers are not taken from it."""
  import numpy as np
  rng = np.random.default_rng(seed)
  centers = rng.standard_normal((clusters, d), dtype=np.float32)
  x = centers[rng.integers(0, clusters, n)] + 0.5 * rng.standard_normal((n, d), dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def small_trained_model(xt, d_out: int = 24, r2: int = 79, num_train: int = 5000):
  """A paper-sized catalyzer (d_in->1024->1024->d_out) trained for one epoch on
  ``num_train`` rows: real weights and BatchNorm statistics for throughput measurements."""
  from spreading_jax.train import TrainConfig, train
  config = TrainConfig(epochs=1, d_out=d_out, r2=r2, val_every=0, num_train=num_train,
                       verbose=False)
  return train(config, xt)


def deep_like_setup(d: int, threads: int, train_rows: int = 20_000):
  """The shared start of the encode/search benchmarks: faiss with ``threads`` OpenMP
  threads, Deep1M-shaped training vectors (seed 1) and a catalyzer trained on them.

  Returns (faiss module, training vectors, TrainResult).
  """
  faiss = faiss_threads(threads)
  xt = deep_like(train_rows, d, seed=1)
  return faiss, xt, small_trained_model(xt)


def faiss_threads(threads: int):
  """Sets faiss' OpenMP threads; returns the module."""
  import faiss
  faiss.omp_set_num_threads(threads)
  return faiss
