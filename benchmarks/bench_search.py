"""Search throughput over 1M compressed vectors, raw float queries in, vs faiss OPQ8_64,PQ8.

    python benchmarks/bench_search.py                            # 1k queries x 1M codes
    python benchmarks/bench_search.py --nb 200000 --repeats 2    # quick

Ours: ``SpreadingIndex(model, "zn", bits=64).search`` end to end (catalyzer forward of the
queries + asymmetric search over 64-bit Zn codes, decoded block by block inside the scan,
sharded over all local devices). faiss: ``OPQ8_64,PQ8`` (rotation + PQ8 with asymmetric
distance tables) on the raw vectors, trained on separate vectors. Same data (Deep1M-shaped
synthetic, ``_common.deep_like``), same k, same threads; adds and training are not timed;
warm-up excluded, median of --repeats interleaved runs. Writes
experiments/results/bench_search.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import jax

sys.path.insert(0, os.path.dirname(__file__))
from _common import (deep_like, deep_like_setup, interleaved, median, table,  # noqa: E402
                     write_result)

from spreading_jax.index import SpreadingIndex  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--nq", type=int, default=1000)
  p.add_argument("--nb", type=int, default=1_000_000)
  p.add_argument("--d", type=int, default=96)
  p.add_argument("--k", type=int, default=100)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  args = p.parse_args(argv)
  faiss, xt, model = deep_like_setup(args.d, args.threads)
  xb = deep_like(args.nb, args.d, seed=2)
  xq = deep_like(args.nq, args.d, seed=3)

  t = time.perf_counter()
  ours = SpreadingIndex(model, "zn", bits=64)
  ours.add(xb)
  add_ours = time.perf_counter() - t
  t = time.perf_counter()
  opq = faiss.index_factory(args.d, "OPQ8_64,PQ8")
  opq.train(xt)
  t_train = time.perf_counter() - t
  t = time.perf_counter()
  opq.add(xb)
  add_faiss = time.perf_counter() - t
  assert ours.bytes_per_vector == opq.sa_code_size() == 8

  cases = {"ours SpreadingIndex zn 64-bit": lambda: ours.search(xq, args.k),
           "faiss OPQ8_64,PQ8": lambda: opq.search(xq, args.k)}
  # Both return host numpy arrays, so the work is done when they return.
  times = interleaved(cases, args.repeats)
  rows = [{"case": name, "queries_per_s": args.nq / median(ts), "median_s": median(ts),
           "times_s": ts} for name, ts in times.items()]
  for r in rows:
    r["ratio_vs_faiss"] = r["queries_per_s"] / rows[1]["queries_per_s"]
  print(table(rows, ["case", "queries_per_s", "median_s", "ratio_vs_faiss"]))
  print(f"add {args.nb} vectors: ours {add_ours:.1f} s (catalyzer + lattice encode), "
        f"faiss {add_faiss:.1f} s (+ {t_train:.1f} s OPQ training)")
  path = write_result("bench_search", {
      "nq": args.nq, "nb": args.nb, "d": args.d, "k": args.k, "threads": args.threads,
      "code_bytes": 8, "devices": jax.device_count(), "load_average": os.getloadavg(),
      "add_seconds": {"ours": add_ours, "faiss": add_faiss, "faiss_train": t_train},
      "rows": rows, "command": "python " + " ".join(sys.argv)})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
