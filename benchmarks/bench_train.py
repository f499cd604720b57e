"""Training throughput of one epoch vs the original PyTorch code, same machine, data, threads.

    python benchmarks/bench_train.py                         # 50k x 96-d, paper network
    python benchmarks/bench_train.py --n 10000 --repeats 2   # quick

The PyTorch side runs facebookresearch/spreadingvectors' own epoch function from a temporary
checkout (see benchmarks/_torch_reference.py) in a separate interpreter with CPU torch
(``--torch-python`` or $SPREADING_TORCH_PYTHON, and a clone of the original given by
``--git-dir`` or $SPREADINGVECTORS_GIT_DIR); without them that column is skipped, saying so.
Also reports the step as a fraction of this machine's float32 matmul peak, the per-epoch
negative-mining time, and a projection of the full recipe (500k vectors, 160 epochs).
Writes experiments/results/bench_train.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import RESULTS, median, table, timeit, write_result  # noqa: E402

from spreading_jax import mining  # noqa: E402
from spreading_jax import train as T  # noqa: E402


def unit(rng, n, d):
  x = rng.standard_normal((n, d), dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def matmul_peak(sizes: tuple[int, ...] = (1024, 2048), repeats: int = 7) -> float:
  """FLOP/s of a large float32 matmul on the default device: the best of a few sizes and runs.

  A peak is a best case, so the fastest run counts (a median would let one busy moment on a
  shared machine lower the peak and inflate the step's fraction of it).
  """
  best = 0.0
  for n in sizes:
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    t = min(timeit(lambda: f(a).block_until_ready(), repeats))
    best = max(best, 2 * n ** 3 / t)
  return best


def step_flops(d_in: int, hidden: int, d_out: int, batch: int) -> float:
  """Matmul FLOPs of one training step: forward on 3*batch rows, backward ~2x forward."""
  per_row = 2 * (d_in * hidden + hidden * hidden + hidden * d_out)
  return 3 * (3 * batch) * per_row


def time_jax_epoch(x, pos, neg, config, repeats):
  n, d_in = x.shape
  steps = T.steps_per_epoch(config, n)
  state = T.make_train_state(config, d_in, steps, jax.random.PRNGKey(0))
  epoch = T.make_epoch_fn(n, config.batch_size, config.drop_remainder)
  xd, pd, nd = jnp.asarray(x), jnp.asarray(pos), jnp.asarray(neg)
  holder = {"state": state, "i": 0}

  def run():
    holder["i"] += 1
    s, m = epoch(holder["state"], xd, pd, nd, jax.random.PRNGKey(holder["i"]))
    jax.block_until_ready(m)
    holder["state"] = s

  times = timeit(run, repeats, warmup=1)  # the warm-up epoch compiles
  return times, steps


def time_mining(n: int, d_out: int, repeats: int) -> float:
  # The call the training loop makes each epoch (rank_negative=50: 51 neighbours).
  y = unit(np.random.default_rng(1), n, d_out)
  yd = jnp.asarray(y)
  return median(timeit(lambda: mining.hard_negatives(yd, yd, 50), repeats))


def _graph_mining_500k() -> float | None:
  """Median graph-mining seconds per epoch at 500k from bench_mining.json, if measured."""
  path = RESULTS / "bench_mining.json"
  try:
    row = json.loads(path.read_text())["rows"][0]
  except (OSError, ValueError, KeyError, IndexError):
    return None
  return row.get("graph_s_median") if row.get("n") == 500_000 else None


def run_torch(torch_python, git_dir, x, pos, neg, threads, repeats):
  if not torch_python or not os.path.exists(torch_python):
    print(f"PyTorch reference skipped: no Python with torch given ({torch_python!r}); pass "
          "--torch-python or set SPREADING_TORCH_PYTHON (see _torch_reference.py)")
    return None
  if not git_dir:
    print("PyTorch reference skipped: no clone of the original repo given; pass --git-dir "
          "or set SPREADINGVECTORS_GIT_DIR (see _torch_reference.py)")
    return None
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "data.npz")
    np.savez(path, x=x, pos=pos, neg=neg)
    cmd = [torch_python, os.path.join(os.path.dirname(__file__), "_torch_reference.py"),
           "--data", path, "--threads", str(threads), "--repeats", str(repeats), "--json",
           "--git-dir", git_dir]
    out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode:
    print(f"PyTorch reference failed: {out.stderr.strip().splitlines()[-1:]}")
    return None
  return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=50_000)
  p.add_argument("--d", type=int, default=96)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--mine-n", type=int, default=100_000,
                 help="vectors for the negative-mining timing (projected to 500k)")
  p.add_argument("--torch-python", default=os.environ.get("SPREADING_TORCH_PYTHON"),
                 help="a Python with CPU torch (default: $SPREADING_TORCH_PYTHON)")
  p.add_argument("--git-dir", default=os.environ.get("SPREADINGVECTORS_GIT_DIR"),
                 help="git clone of the original repo (default: $SPREADINGVECTORS_GIT_DIR)")
  args = p.parse_args(argv)

  rng = np.random.default_rng(0)
  x = unit(rng, args.n, args.d)
  pos = mining.positives(jnp.asarray(x), 10)
  neg = mining.hard_negatives(jnp.asarray(x), jnp.asarray(x), 50)
  config = T.TrainConfig(d_out=24, r2=79, lambda_koleo=0.01, batch_size=64, epochs=160,
                         verbose=False)

  times, steps = time_jax_epoch(x, pos, neg, config, args.repeats)
  t_epoch = median(times)
  ours = {"impl": "spreading-jax", "epoch_s": t_epoch, "epoch_s_all": times,
          "vectors_per_s": steps * 64 / t_epoch, "ms_per_step": 1e3 * t_epoch / steps}
  peak = matmul_peak()
  flops = step_flops(args.d, 1024, 24, 64)
  ours["fraction_of_matmul_peak"] = flops / (t_epoch / steps) / peak
  print(f"jax: {ours['vectors_per_s']:.0f} vectors/s, {ours['ms_per_step']:.2f} ms/step, "
        f"{100 * ours['fraction_of_matmul_peak']:.0f}% of matmul peak ({peak / 1e9:.0f} GFLOP/s)",
        flush=True)

  ref = run_torch(args.torch_python, args.git_dir, x, pos, neg, args.threads, args.repeats)
  rows = [ours]
  if ref is not None:
    rows.append({"impl": f"original PyTorch ({ref.get('torch')})",
                 "vectors_per_s": ref["vectors_per_s"], "ms_per_step": ref["ms_per_step"],
                 "epoch_s": ref["epoch_s"]})
    ours["ratio_vs_torch"] = ours["vectors_per_s"] / ref["vectors_per_s"]
    print(f"torch: {ref['vectors_per_s']:.0f} vectors/s, {ref['ms_per_step']:.2f} ms/step; "
          f"ratio {ours['ratio_vs_torch']:.2f}x", flush=True)

  # Mining per epoch at 500k: the graph miner's time from bench_mining.py (what
  # mining="auto" runs on a CPU there) when it was measured at 500k, else exact search
  # measured at --mine-n and projected (quadratic in n).
  t_mine = time_mining(args.mine_n, 24, max(1, args.repeats - 1))
  projection = {"mining_exact_s_measured": t_mine, "mining_n": args.mine_n,
                "mining_exact_s_500k_projected": t_mine * (500_000 / args.mine_n) ** 2}
  mine_500k, how = projection["mining_exact_s_500k_projected"], "exact, projected"
  graph = _graph_mining_500k()
  if graph is not None and jax.default_backend() == "cpu":
    projection["mining_graph_s_500k_measured"] = mine_500k = graph
    how = "graph, measured by bench_mining.py"
  epoch_500k = 500_000 / ours["vectors_per_s"] + mine_500k
  projection.update(epoch_s_500k_projected=epoch_500k,
                    full_recipe_hours_projected=160 * epoch_500k / 3600)
  hours = projection["full_recipe_hours_projected"]
  print(f"negative mining: exact {t_mine:.2f} s for {args.mine_n} vectors -> "
        f"{projection['mining_exact_s_500k_projected']:.0f} s at 500k (projected); used "
        f"{mine_500k:.0f} s per epoch ({how}); full recipe (500k x 160 epochs) ~ {hours:.1f} h "
        "on this device", flush=True)
  print(table(rows, ["impl", "vectors_per_s", "ms_per_step", "epoch_s"]))
  path = write_result("bench_train", {
      "benchmark": "one training epoch, 96->1024->1024->24, batch 64",
      "n": args.n, "d": args.d, "threads": args.threads, "matmul_peak_flops": peak,
      "step_flops": flops, "rows": rows, "reference": ref, "projection": projection,
      "command": "python " + " ".join([sys.argv[0]] + (argv or sys.argv[1:]))})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
