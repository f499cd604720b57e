"""Per-epoch hard-negative mining cost at the paper's size, exact and graph (NN-descent).

    python benchmarks/bench_mining.py                 # 500k x 24-d unit vectors (~15 min)
    python benchmarks/bench_mining.py --n 100000      # quick

Epoch 0 is y0, uniform unit vectors (the hardest case for any index: KoLeo spreads the
catalyzer's outputs); each later epoch moves every vector, y_e = normalize(y_{e-1} + drift *
noise), and the exact-neighbour overlap between consecutive epochs is reported (real
training's overlap is not recorded; experiments/mining_methods.py compares the miners there).

Rows (each after a warm-up call on the same shapes, so compilation is not timed):
  exact   an exact search of every vector's 67 nearest among all (all n x n scores): what
          mining="exact" runs each epoch (for 50) and the graph miner's fallback;
  graph   what mining="graph" (CPU default from 100k vectors) runs at epochs 1..E, seeded
          with y0's exact lists: NN-descent rounds, the exact sample check, the fallback;
          with the exact rank of the mined negatives on 500 rows (target: rank_negative);
  faiss   the original code's CPU mining: faiss HNSW32, efSearch=64, built and searched
          on the same vectors each epoch (same rank measure; --faiss-epochs of them).
Writes experiments/results/bench_mining.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import faiss_threads, median, write_result  # noqa: E402

from spreading_jax import mining, search  # noqa: E402


def _sphere(rng, n, d):
  y = rng.standard_normal((n, d), dtype=np.float32)
  return y / np.linalg.norm(y, axis=1, keepdims=True)


def _ranks(y, neg, rows):
  """Exact 1-based rank (self counted) of each row's negative, over ``rows``."""
  s_neg = np.einsum("nd,nd->n", y[rows], y[neg[rows]])
  return (y[rows] @ y.T > s_neg[:, None] + 1e-6).sum(1) + 1


def _overlap(y_prev, y, rows, k):
  _, a = search.knn(y_prev[rows], y_prev, k, metric="ip")
  _, b = search.knn(y[rows], y, k, metric="ip")
  a, b = np.asarray(a), np.asarray(b)
  return float((a[:, :, None] == b[:, None, :]).any(2).mean())


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=500_000)
  p.add_argument("--d", type=int, default=24)
  p.add_argument("--rank-negative", type=int, default=50)
  p.add_argument("--epochs", type=int, default=3, help="graph epochs after y0")
  p.add_argument("--drift", type=float, default=0.1)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--faiss-epochs", type=int, default=1,
                 help="epochs of the HNSW reference (0 skips it)")
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  ys = [_sphere(rng, args.n, args.d)]
  for _ in range(args.epochs):
    y = ys[-1] + args.drift * _sphere(rng, args.n, args.d)
    ys.append(y / np.linalg.norm(y, axis=1, keepdims=True))
  rows = np.sort(rng.choice(args.n, 500, replace=False))
  rank = args.rank_negative
  loads = [os.getloadavg()[0]]
  out = {"n": args.n, "d": args.d, "rank_negative": rank, "drift": args.drift,
         "target_s": 60.0}

  # exact: what the graph miner's first call (or its fallback) runs, the width-67 exact
  # lists; the warm-up call compiles and its lists seed the graph miner's epoch 1.
  graph = mining.NegativeMiner(rank, method="graph")
  width = graph.width(args.n)
  y0 = jnp.asarray(ys[0])
  seed = np.asarray(search.knn(y0, y0, width, metric="ip")[1])
  t = time.perf_counter()
  jax.block_until_ready(search.knn(y0, y0, width, metric="ip"))
  out["exact_s"] = time.perf_counter() - t
  loads.append(os.getloadavg()[0])
  print(f"exact  epoch 0: {out['exact_s']:.1f} s ({width} neighbours of every vector)",
        flush=True)
  warm = mining.NegativeMiner(rank, method="graph", recall_target=1e-9)  # compiles refine
  warm.start(seed)
  warm(y0, y0)
  graph.start(seed)
  out["graph"] = []
  for e in range(1, args.epochs + 1):
    t = time.perf_counter()
    neg = graph(jnp.asarray(ys[e]), jnp.asarray(ys[e]))
    dt = time.perf_counter() - t
    r = _ranks(ys[e], neg, rows)
    row = dict(graph.last, epoch=e, seconds=dt, rank_median=float(np.median(r)),
               rank_p10=float(np.percentile(r, 10)), rank_p90=float(np.percentile(r, 90)),
               overlap_with_previous_epoch=_overlap(ys[e - 1], ys[e], rows[:200], rank))
    out["graph"].append(row)
    loads.append(os.getloadavg()[0])
    print(f"graph  epoch {e}: {dt:.1f} s, rounds {row['rounds']}, recall "
          f"{row['recall']:.3f}, exact fallback {row['exact']}, negative rank median "
          f"{row['rank_median']:.0f} (p10 {row['rank_p10']:.0f}, p90 {row['rank_p90']:.0f}); "
          f"neighbour overlap with the previous epoch {row['overlap_with_previous_epoch']:.2f}",
          flush=True)
  out["graph_s_median"] = median([r["seconds"] for r in out["graph"]])

  if args.faiss_epochs:
    faiss = faiss_threads(args.threads)
    out["faiss_hnsw"] = []
    for e in range(1, min(args.faiss_epochs, args.epochs) + 1):
      t = time.perf_counter()
      index = faiss.IndexHNSWFlat(args.d, 32, faiss.METRIC_INNER_PRODUCT)
      index.add(ys[e])
      index.hnsw.efSearch = 64
      _, ids = index.search(ys[e], rank)
      dt = time.perf_counter() - t
      r = _ranks(ys[e], ids[:, rank - 1], rows)
      out["faiss_hnsw"].append({"epoch": e, "seconds": dt, "rank_median": float(np.median(r)),
                                "rank_p10": float(np.percentile(r, 10)),
                                "rank_p90": float(np.percentile(r, 90))})
      loads.append(os.getloadavg()[0])
      print(f"faiss HNSW32 epoch {e}: {dt:.1f} s, negative rank median "
            f"{np.median(r):.0f} (p10 {np.percentile(r, 10):.0f}, p90 "
            f"{np.percentile(r, 90):.0f})", flush=True)
    out["faiss_hnsw_s_median"] = median([r["seconds"] for r in out["faiss_hnsw"]])
    out["speedup_graph_vs_faiss_hnsw"] = out["faiss_hnsw_s_median"] / out["graph_s_median"]
  out["speedup_graph_vs_exact"] = out["exact_s"] / out["graph_s_median"]
  out["load_averages"] = loads
  print(f"mining {args.n} x {args.d}-d: exact {out['exact_s']:.1f} s/epoch, graph "
        f"{out['graph_s_median']:.1f} s/epoch (median)"
        + (f", faiss HNSW {out['faiss_hnsw_s_median']:.1f} s/epoch: graph is "
           f"{out['speedup_graph_vs_faiss_hnsw']:.2f}x HNSW" if "faiss_hnsw" in out else "")
        + f"; load {loads[0]:.1f}..{max(loads):.1f}", flush=True)
  path = write_result("bench_mining", {"benchmark": "per-epoch negative mining",
                                       "threads": args.threads, "rows": [out],
                                       "command": "python " + " ".join(sys.argv)})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
