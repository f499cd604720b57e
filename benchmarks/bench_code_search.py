"""Search on compressed codes vs faiss, same data, same threads.

  * asymmetric lattice search (float queries vs 64-bit Zn codes, decoded block by block
    inside the scan) vs faiss.IndexFlatIP over the already-decoded vectors;
  * Hamming search on 64-bit sign codes vs faiss.IndexBinaryFlat.

    python benchmarks/bench_code_search.py                       # 1k queries x 1M codes
    python benchmarks/bench_code_search.py --nb 100000 --repeats 2   # quick

Ours and faiss run interleaved (load spikes hit both), after warm-up rounds (compilation),
medians of --repeats rounds. Writes experiments/results/bench_code_search.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import faiss_threads, interleaved, median, table, write_result  # noqa: E402

from spreading_jax import binary, lattice, search  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--nq", type=int, default=1000)
  p.add_argument("--nb", type=int, default=1_000_000)
  p.add_argument("--k", type=int, default=100)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  args = p.parse_args(argv)
  faiss = faiss_threads(args.threads)
  rng = np.random.default_rng(0)
  codec = lattice.ZnSphereCodec(24, 79)
  xb = rng.standard_normal((args.nb, 24), dtype=np.float32)
  xq = rng.standard_normal((args.nq, 24), dtype=np.float32)
  xq /= np.linalg.norm(xq, axis=1, keepdims=True)
  codes = np.asarray(codec.encode(xb))  # encoded chunk by chunk inside
  decoded = np.asarray(codec.decode(codes))
  codes_j, xq_j = jax.device_put(codes), jax.device_put(xq)
  rows = []

  index = faiss.IndexFlatIP(24)
  index.add(decoded)
  load = os.getloadavg()[0]
  times = interleaved({
      "ours": lambda: jax.block_until_ready(search.search_lattice(xq_j, codes_j, codec, args.k)),
      "faiss": lambda: index.search(xq, args.k)}, args.repeats)
  t_ours, t_faiss = times["ours"], times["faiss"]
  _, i_ours = search.search_lattice(xq_j, codes_j, codec, args.k)
  _, i_faiss = index.search(xq, args.k)
  rows.append({"case": "lattice asymmetric (codes) vs IndexFlatIP (decoded floats)",
               "ours_qps": args.nq / median(t_ours), "faiss_qps": args.nq / median(t_faiss),
               "top1_agreement": float(np.mean(np.asarray(i_ours)[:, 0] == i_faiss[:, 0])),
               "ours_times_s": t_ours, "faiss_times_s": t_faiss, "load_average_before": load})

  yb = np.concatenate([xb, rng.standard_normal((args.nb, 40), dtype=np.float32)], axis=1)
  yq = np.concatenate([xq, rng.standard_normal((args.nq, 40), dtype=np.float32)], axis=1)
  cb, cq = np.asarray(binary.sign_codes(yb)), np.asarray(binary.sign_codes(yq))  # 64 bits
  cb_j, cq_j = jax.device_put(cb), jax.device_put(cq)
  bindex = faiss.IndexBinaryFlat(64)
  bindex.add(cb)
  load = os.getloadavg()[0]
  times = interleaved({
      "ours": lambda: jax.block_until_ready(search.hamming_knn(cq_j, cb_j, args.k)),
      "faiss": lambda: bindex.search(cq, args.k)}, args.repeats)
  t_ours, t_faiss = times["ours"], times["faiss"]
  d_ours, _ = search.hamming_knn(cq_j, cb_j, args.k)
  d_faiss, _ = bindex.search(cq, args.k)
  rows.append({"case": "Hamming 64-bit vs IndexBinaryFlat",
               "ours_qps": args.nq / median(t_ours), "faiss_qps": args.nq / median(t_faiss),
               "same_distances": bool(np.array_equal(np.asarray(d_ours), d_faiss)),
               "ours_times_s": t_ours, "faiss_times_s": t_faiss, "load_average_before": load})
  for r in rows:
    r["ratio"] = r["ours_qps"] / r["faiss_qps"]
  print(table(rows, ["case", "ours_qps", "faiss_qps", "ratio"]))
  path = write_result("bench_code_search", {"nq": args.nq, "nb": args.nb, "k": args.k,
                                            "threads": args.threads, "rows": rows,
                                            "load_average_after": os.getloadavg(),
                                            "command": "python " + " ".join(sys.argv)})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
