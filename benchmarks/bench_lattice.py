"""Zn lattice codec: encode/decode throughput of ZnSphereCodec vs faiss.ZnSphereCodec.

    python benchmarks/bench_lattice.py                        # 1M vectors, d=24 r2=79, 5 runs
    python benchmarks/bench_lattice.py --n 100000 --repeats 3 --stream-n 1000000   # quick

Same data, same machine, faiss limited to --threads OpenMP threads; warm-up runs excluded,
median of --repeats interleaved runs (ours and faiss alternate, so load spikes hit both;
the load average is recorded since other processes change what 2 threads can get).
Ours is the public API, input validation included. encode = search of the nearest point
+ ranking (faiss ``encode_multi``); decode = code -> point (faiss ``decode_multi``). The
streamed run encodes --stream-n vectors chunk by chunk in a fresh process and reports its
peak resident memory. Writes experiments/results/bench_lattice.json.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import median, table, write_result  # noqa: E402

from spreading_jax.lattice import ZnSphereCodec  # noqa: E402


def unit(rng, n, d):
  x = rng.standard_normal((n, d), dtype=np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _time(fn) -> float:
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t


def bench_codec(d: int, r2: int, n: int, repeats: int, threads: int, seed: int = 0) -> dict:
  """Encode/decode timings of ours and faiss on n random unit vectors."""
  import faiss
  faiss.omp_set_num_threads(threads)
  x = unit(np.random.default_rng(seed), n, d)
  codec = ZnSphereCodec(d, r2)
  ref = faiss.ZnSphereCodec(d, r2)
  xj = jax.device_put(x)

  def ours_encode():
    return jax.block_until_ready(codec.encode(xj))

  codes = ours_encode()
  codes_j = jax.device_put(codes)

  def ours_decode():
    return jax.block_until_ready(codec.decode(codes_j))

  f_codes = np.empty(n, np.uint64)
  f_points = np.empty((n, d), np.float32)

  def faiss_encode():
    ref.encode_multi(n, faiss.swig_ptr(x), faiss.swig_ptr(f_codes))

  def faiss_decode():
    ref.decode_multi(n, faiss.swig_ptr(f_codes), faiss.swig_ptr(f_points))

  for fn in (ours_encode, ours_decode, faiss_encode, faiss_decode):  # warm-up
    fn()
  times = {"ours_encode": [], "faiss_encode": [], "ours_decode": [], "faiss_decode": []}
  for _ in range(repeats):
    for name, fn in (("ours_encode", ours_encode), ("faiss_encode", faiss_encode),
                     ("ours_decode", ours_decode), ("faiss_decode", faiss_decode)):
      times[name].append(_time(fn))

  # Same points as faiss (up to exact ties) and an exact round trip.
  ours_points = np.asarray(codec.decode_points(codes))
  agree = float(np.mean(np.all(ours_points == np.rint(f_points), axis=1)))
  round_trip = bool(np.array_equal(np.asarray(codec.encode(ours_points)), np.asarray(codes)))
  row = {"d": d, "r2": r2, "code_bits": codec.code_bits, "n": n, "threads": threads,
         "agreement_with_faiss": agree, "round_trip": round_trip, "times_s": times}
  for op in ("encode", "decode"):
    ours, theirs = median(times[f"ours_{op}"]), median(times[f"faiss_{op}"])
    row[f"ours_{op}_vps"] = n / ours
    row[f"faiss_{op}_vps"] = n / theirs
    row[f"{op}_speedup"] = theirs / ours
  print(f"d={d} r2={r2}: encode ours {row['ours_encode_vps'] / 1e6:.2f} M/s, faiss "
        f"{row['faiss_encode_vps'] / 1e6:.2f} M/s (x{row['encode_speedup']:.2f}); decode ours "
        f"{row['ours_decode_vps'] / 1e6:.2f} M/s, faiss {row['faiss_decode_vps'] / 1e6:.2f} M/s "
        f"(x{row['decode_speedup']:.2f})", flush=True)
  return row


def stream_encode(d: int, r2: int, n: int, chunk: int, seed: int = 0) -> dict:
  """Encodes n vectors generated chunk by chunk; codes go to one preallocated array."""
  codec = ZnSphereCodec(d, r2)
  codes = np.empty((n, codec.code_words), np.uint32)
  rng = np.random.default_rng(seed)
  t = time.perf_counter()
  for start in range(0, n, chunk):
    m = min(chunk, n - start)
    codes[start:start + m] = np.asarray(codec.encode(unit(rng, m, d)))
  seconds = time.perf_counter() - t
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
  return {"n": n, "chunk": chunk, "seconds": seconds, "peak_rss_bytes": peak,
          "peak_rss_gib": peak / 2**30, "codes_bytes": codes.nbytes}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--d", type=int, default=24)
  p.add_argument("--r2", type=int, default=79)
  p.add_argument("--n", type=int, default=1_000_000)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--stream-n", type=int, default=10_000_000,
                 help="vectors for the streamed peak-memory run (0 to skip)")
  p.add_argument("--stream-chunk", type=int, default=1 << 20)
  p.add_argument("--stream-only", action="store_true", help=argparse.SUPPRESS)
  args = p.parse_args(argv)

  if args.stream_only:  # child process of the memory measurement
    print(json.dumps(stream_encode(args.d, args.r2, args.stream_n, args.stream_chunk)))
    return

  load_before = os.getloadavg()
  row = bench_codec(args.d, args.r2, args.n, args.repeats, args.threads)
  row["load_average_before_after"] = [load_before, os.getloadavg()]
  stream = None
  if args.stream_n:
    out = subprocess.run(
        [sys.executable, __file__, "--stream-only", "--d", str(args.d), "--r2", str(args.r2),
         "--stream-n", str(args.stream_n), "--stream-chunk", str(args.stream_chunk)],
        check=True, capture_output=True, text=True)
    stream = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"streamed encode of {stream['n']} vectors in chunks of {stream['chunk']}: "
          f"{stream['seconds']:.1f} s, peak RSS {stream['peak_rss_gib']:.2f} GiB", flush=True)
  rows = [{"op": op, "ours_Mvec_s": row[f"ours_{op}_vps"] / 1e6,
           "faiss_Mvec_s": row[f"faiss_{op}_vps"] / 1e6, "speedup": row[f"{op}_speedup"]}
          for op in ("encode", "decode")]
  print(table(rows, ["op", "ours_Mvec_s", "faiss_Mvec_s", "speedup"]))
  path = write_result("bench_lattice", {
      "benchmark": "Zn sphere codec encode/decode vs faiss.ZnSphereCodec",
      "protocol": f"{args.n} random unit vectors (seed 0), median of {args.repeats} "
                  "interleaved warm runs, faiss omp threads = --threads",
      "codec": row, "stream": stream, "table": rows})
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
