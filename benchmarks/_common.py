"""Shared helpers of the benchmarks: timing, environment description, JSON output."""
from __future__ import annotations

import json
import os
import platform
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


def median(xs) -> float:
  return float(statistics.median(xs))


def environment() -> dict:
  """What the numbers were measured on."""
  env = {"jax": jax.__version__, "backend": jax.default_backend(),
         "devices": [d.device_kind for d in jax.devices()], "cpu_count": os.cpu_count(),
         "machine": platform.machine(), "processor": _cpu_model(),
         "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
  try:
    import faiss
    env["faiss"] = faiss.__version__
  except ImportError:
    pass
  return env


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def write_result(name: str, payload: dict) -> Path:
  """Writes experiments/results/<name>.json (atomically) and returns its path."""
  from spreading_jax.data import atomic_output
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
