"""Exact kNN (k=100): spreading_jax.search.knn vs faiss.IndexFlatL2, same data, same threads.

    python benchmarks/bench_knn.py                    # 1k x 1M at d=24, 96, 128, plus siftsmall
    python benchmarks/bench_knn.py --nb 100000 --repeats 3   # quick

Ours and faiss run interleaved (each round runs both, so load spikes on a shared machine
hit both); warm-up rounds (compilation) are excluded; medians of --repeats rounds; JAX
results are waited for with block_until_ready. Writes experiments/results/bench_knn.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import faiss_threads, interleaved, median, table, write_result  # noqa: E402

from spreading_jax import datasets, search  # noqa: E402


def unit(rng, n, d):
  x = rng.standard_normal((n, d), dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_case(name, xq, xb, k, repeats, threads):
  faiss = faiss_threads(threads)
  xq_j, xb_j = jax.device_put(xq), jax.device_put(xb)
  index = faiss.IndexFlatL2(xb.shape[1])
  index.add(xb)
  load = os.getloadavg()[0]
  times = interleaved({
      "jax": lambda: jax.block_until_ready(search.knn(xq_j, xb_j, k)),
      "faiss": lambda: index.search(xq, k)}, repeats)
  _, i_ours = search.knn(xq_j, xb_j, k)
  _, i_faiss = index.search(xq, k)
  nq = xq.shape[0]
  row = {"case": name, "nq": nq, "nb": xb.shape[0], "d": xb.shape[1], "k": k,
         "jax_qps": nq / median(times["jax"]), "faiss_qps": nq / median(times["faiss"]),
         "jax_times_s": times["jax"], "faiss_times_s": times["faiss"],
         "top1_agreement": float(np.mean(np.asarray(i_ours)[:, 0] == i_faiss[:, 0])),
         "load_average_before": load, "load_average_after": os.getloadavg()[0]}
  row["ratio"] = row["jax_qps"] / row["faiss_qps"]
  print(f"{name}: jax {row['jax_qps']:.0f} q/s, faiss {row['faiss_qps']:.0f} q/s, "
        f"ratio {row['ratio']:.2f} (load {load:.1f})", flush=True)
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--nq", type=int, default=1000)
  p.add_argument("--nb", type=int, default=1_000_000)
  p.add_argument("--dims", type=int, nargs="+", default=[24, 96, 128])
  p.add_argument("--k", type=int, default=100)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--no-siftsmall", action="store_true")
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  rows = []
  for d in args.dims:
    xb, xq = unit(rng, args.nb, d), unit(rng, args.nq, d)
    rows.append(bench_case(f"random d={d}", xq, xb, args.k, args.repeats, args.threads))
    del xb
  if not args.no_siftsmall:
    try:
      ds = datasets.load_dataset("siftsmall")
      rows.append(bench_case("siftsmall", np.asarray(ds.query), np.asarray(ds.base), args.k,
                             max(args.repeats, 5), args.threads))
    except ValueError as e:
      print(f"siftsmall skipped: {e}")
  print(table(rows, ["case", "nq", "nb", "d", "jax_qps", "faiss_qps", "ratio",
                     "top1_agreement"]))
  path = write_result("bench_knn", {"benchmark": "exact kNN vs faiss.IndexFlatL2",
                                    "threads": args.threads, "rows": rows,
                                    "command": "python " + " ".join(sys.argv)})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
