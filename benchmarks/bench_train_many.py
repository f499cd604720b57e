"""K models of one shape as one program (``train.train_many``'s vmapped epoch) against the
same K epochs run one after the other, on the same data and negatives.

    python benchmarks/bench_train_many.py                  # K=6 (the λ grid), 10k x 96-d
    python benchmarks/bench_train_many.py --n 4000 --repeats 2   # quick

Times compiled epochs only (after a warm-up epoch that compiles, results blocked on),
interleaved round by round so that load on a shared machine hits both; reports the medians
and their ratio. Writes experiments/results/bench_train_many.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import interleaved, median, table, write_result  # noqa: E402

from spreading_jax import selection  # noqa: E402
from spreading_jax import train as T  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=10_000, help="training vectors")
  p.add_argument("--d", type=int, default=96, help="input dimension")
  p.add_argument("--models", type=int, default=len(selection.PAPER_LAMBDAS),
                 help="models K (default: the paper's λ grid)")
  p.add_argument("--repeats", type=int, default=5)
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  x = rng.standard_normal((args.n, args.d), dtype=np.float32)
  pos = rng.integers(0, args.n, (args.n, 10)).astype(np.int32)
  neg = rng.integers(0, args.n, (args.n,)).astype(np.int32)
  lams = [selection.PAPER_LAMBDAS[i % len(selection.PAPER_LAMBDAS)] for i in range(args.models)]
  configs = [T.TrainConfig(d_out=24, lambda_koleo=lam, epochs=10) for lam in lams]
  steps = T.steps_per_epoch(configs[0], args.n)
  states = [T.make_train_state(c, args.d, steps, jax.random.PRNGKey(i))
            for i, c in enumerate(configs)]
  xd, pd = jnp.asarray(x), jnp.asarray(pos)
  one = T.make_epoch_fn(args.n, 64, False)
  many = T.make_epoch_fn(args.n, 64, False, models=True)
  hold = {"seq": states, "many": jax.tree_util.tree_map(lambda *a: jnp.stack(a), *states)}
  negs = jnp.stack([jnp.asarray(neg)] * args.models)
  keys = jnp.stack([jax.random.PRNGKey(i) for i in range(args.models)])

  def run_seq():
    out = []
    for i, s in enumerate(hold["seq"]):
      s, m = one(s, xd, pd, negs[i], keys[i])
      out.append(s)
    jax.block_until_ready((out, m))
    hold["seq"] = out

  def run_many():
    s, m = many(hold["many"], xd, pd, negs, keys)
    jax.block_until_ready((s, m))
    hold["many"] = s

  times = interleaved({"sequential": run_seq, "one program": run_many}, args.repeats)
  seq, one_prog = median(times["sequential"]), median(times["one program"])
  row = {"K": args.models, "n": args.n, "d": args.d, "steps_per_epoch": steps,
         "sequential_s": round(seq, 3), "one_program_s": round(one_prog, 3),
         "speedup": round(seq / one_prog, 3), "device": jax.devices()[0].device_kind,
         "sequential_runs_s": [round(t, 3) for t in times["sequential"]],
         "one_program_runs_s": [round(t, 3) for t in times["one program"]]}
  print(table([row], ["K", "n", "d", "steps_per_epoch", "sequential_s", "one_program_s",
                      "speedup", "device"]))
  path = write_result("bench_train_many", {
      "command": "python benchmarks/bench_train_many.py " + " ".join(sys.argv[1:] if argv is None
                                                                   else argv),
      "rows": [row]})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
