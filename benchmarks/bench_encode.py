"""End-to-end encoding throughput, raw float vector -> 64-bit code, vs faiss OPQ8_64,PQ8.

    python benchmarks/bench_encode.py                        # 200k vectors, d=96, 3 runs
    python benchmarks/bench_encode.py --n 50000 --repeats 2  # quick

Ours: ``encode.make_encoder`` (catalyzer 96->1024->1024->24 forward + Zn lattice
quantization + ranking, r2=79, one jitted program over equal batches of <= 65536 rows),
with the two halves also timed alone for the cost model. faiss: ``OPQ8_64,PQ8`` ``sa_encode``
(rotation + PQ assignment), trained on separate vectors (training not timed). Same data,
same threads, warm-up excluded, median of --repeats interleaved runs. The data are
Deep1M-shaped synthetic vectors (``_common.deep_like``). Writes
experiments/results/bench_encode.json.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax

sys.path.insert(0, os.path.dirname(__file__))
from _common import (deep_like, deep_like_setup, device_batches, encode_cases,  # noqa: E402
                     interleaved, median, table, write_result)

from spreading_jax.config import make_codec  # noqa: E402

def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=200_000, help="vectors encoded per run")
  p.add_argument("--d", type=int, default=96)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  args = p.parse_args(argv)
  faiss, xt, model = deep_like_setup(args.d, args.threads)
  xb = deep_like(args.n, args.d, seed=2)
  codec = make_codec(model.config)
  batches = device_batches(xb)
  ours = {f"ours {name}": fn for name, fn in encode_cases(model, codec, batches).items()}

  opq = faiss.index_factory(args.d, "OPQ8_64,PQ8")
  opq.train(xt)
  assert opq.sa_code_size() == 8 and codec.code_bits <= 64

  def theirs():
    return opq.sa_encode(xb)

  cases = {**ours, "faiss OPQ8_64,PQ8 sa_encode": theirs}
  times = interleaved(cases, args.repeats)
  rows = [{"case": name, "vectors_per_s": args.n / median(ts), "median_s": median(ts),
           "times_s": ts} for name, ts in times.items()]
  ref = args.n / median(times["faiss OPQ8_64,PQ8 sa_encode"])
  for r in rows:
    r["ratio_vs_faiss"] = r["vectors_per_s"] / ref
  print(table(rows, ["case", "vectors_per_s", "median_s", "ratio_vs_faiss"]))
  flops = 2 * (args.d * 1024 + 1024 * 1024 + 1024 * 24)
  print(f"catalyzer forward: {flops / 1e6:.2f} MFLOP per vector, "
        f"{flops * rows[1]['vectors_per_s'] / 1e9:.1f} GFLOP/s achieved")
  path = write_result("bench_encode", {
      "n": args.n, "d": args.d, "d_out": 24, "r2": codec.r2, "code_bits": codec.code_bits,
      "threads": args.threads, "batch_rows": int(batches[0].shape[0]),
      "load_average": os.getloadavg(),
      "devices": jax.device_count(), "forward_flops_per_vector": flops, "rows": rows,
      "command": "python " + " ".join(sys.argv)})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
