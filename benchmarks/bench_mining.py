"""Per-epoch hard-negative mining cost: exact kNN of every training output among all of them.

    python benchmarks/bench_mining.py                 # 500k x 24-d unit vectors, the paper size
    python benchmarks/bench_mining.py --n 100000      # quick (also projected to 500k: x25)

Times the call the training loop makes each epoch, ``search.knn(y, y, rank_negative + 1,
metric="ip")`` on unit vectors (rank_negative=50), after one warm-up call (compilation),
median of --repeats. For reference, faiss.IndexFlatIP's exact search of the same query
set runs in the same process on the first --faiss-queries rows (its time is scaled to n
queries: exact search is linear in the number of queries). Writes
experiments/results/bench_mining.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import faiss_threads, median, write_result  # noqa: E402

from spreading_jax import search  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=500_000)
  p.add_argument("--d", type=int, default=24)
  p.add_argument("--rank-negative", type=int, default=50)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--faiss-queries", type=int, default=20_000)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  y = rng.standard_normal((args.n, args.d), dtype=np.float32)
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  yd = jax.device_put(y)
  k = args.rank_negative + 1

  def ours():
    jax.block_until_ready(search.knn(yd, yd, k, metric="ip"))

  loads = [os.getloadavg()[0]]
  t = time.perf_counter()
  ours()  # warm-up: compiles
  warm = time.perf_counter() - t
  times = []
  for _ in range(args.repeats):
    t = time.perf_counter()
    ours()
    times.append(time.perf_counter() - t)
    loads.append(os.getloadavg()[0])
  faiss = faiss_threads(args.threads)
  index = faiss.IndexFlatIP(args.d)
  index.add(y)
  nf = min(args.faiss_queries, args.n)
  t = time.perf_counter()
  index.search(y[:nf], k)
  t_faiss = (time.perf_counter() - t) * args.n / nf
  row = {"n": args.n, "d": args.d, "k": k, "seconds": median(times), "times_s": times,
         "first_call_s_with_compile": warm, "faiss_flat_ip_s_projected": t_faiss,
         "faiss_queries_timed": nf, "load_averages": loads, "target_s": 60.0,
         # Exact mining is quadratic in n: the projection to the paper's 500k vectors.
         "seconds_projected_500k": median(times) * (500_000 / args.n) ** 2}
  print(f"mining {args.n} x {args.d}-d, k={k}: {row['seconds']:.1f} s per epoch "
        f"(faiss IndexFlatIP, {nf} queries timed, scaled: {t_faiss:.1f} s; "
        f"load {loads[0]:.1f}..{max(loads):.1f}); projected to 500k: "
        f"{row['seconds_projected_500k']:.0f} s", flush=True)
  path = write_result("bench_mining", {"benchmark": "per-epoch exact negative mining",
                                       "threads": args.threads, "rows": [row],
                                       "command": "python " + " ".join(sys.argv)})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
