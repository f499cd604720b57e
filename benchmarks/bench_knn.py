"""Exact kNN (k=100): spreading_jax.search.knn vs faiss.IndexFlatL2, same data, same threads.

    python benchmarks/bench_knn.py              # 10k x 1M at d=24 and d=96, plus siftsmall
    python benchmarks/bench_knn.py --nq 1000 --nb 100000 --repeats 3   # quick

Writes experiments/results/bench_knn.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import median, table, timeit, write_result  # noqa: E402

from spreading_jax import datasets, search  # noqa: E402


def unit(rng, n, d):
  x = rng.standard_normal((n, d), dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_case(name, xq, xb, k, repeats, threads):
  import faiss
  faiss.omp_set_num_threads(threads)
  xq_j, xb_j = jax.device_put(xq), jax.device_put(xb)

  def ours():
    jax.block_until_ready(search.knn(xq_j, xb_j, k))

  index = faiss.IndexFlatL2(xb.shape[1])
  index.add(xb)
  t_ours = timeit(ours, repeats)
  t_faiss = timeit(lambda: index.search(xq, k), repeats)
  _, i_ours = search.knn(xq_j, xb_j, k)
  _, i_faiss = index.search(xq, k)
  agree = float(np.mean(np.asarray(i_ours)[:, 0] == i_faiss[:, 0]))
  nq = xq.shape[0]
  row = {"case": name, "nq": nq, "nb": xb.shape[0], "d": xb.shape[1], "k": k,
         "jax_qps": nq / median(t_ours), "faiss_qps": nq / median(t_faiss),
         "jax_times_s": t_ours, "faiss_times_s": t_faiss, "top1_agreement": agree}
  row["ratio"] = row["jax_qps"] / row["faiss_qps"]
  print(f"{name}: jax {row['jax_qps']:.0f} q/s, faiss {row['faiss_qps']:.0f} q/s, "
        f"ratio {row['ratio']:.2f}", flush=True)
  return row


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--nq", type=int, default=10_000)
  p.add_argument("--nb", type=int, default=1_000_000)
  p.add_argument("--dims", type=int, nargs="+", default=[24, 96])
  p.add_argument("--k", type=int, default=100)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  args = p.parse_args(argv)
  rng = np.random.default_rng(0)
  rows = []
  for d in args.dims:
    xb, xq = unit(rng, args.nb, d), unit(rng, args.nq, d)
    rows.append(bench_case(f"random d={d}", xq, xb, args.k, args.repeats, args.threads))
  try:
    ds = datasets.load_dataset("siftsmall")
    rows.append(bench_case("siftsmall", np.asarray(ds.query), np.asarray(ds.base), args.k,
                           max(args.repeats, 5), args.threads))
  except ValueError as e:
    print(f"siftsmall skipped: {e}")
  print(table(rows, ["case", "nq", "nb", "d", "jax_qps", "faiss_qps", "ratio"]))
  path = write_result("bench_knn", {"benchmark": "exact kNN vs faiss.IndexFlatL2",
                                    "threads": args.threads, "rows": rows})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
