"""End-to-end encoding throughput, raw float vector -> 64-bit code, vs faiss OPQ8_64,PQ8;
and the streaming batch-encode pipeline from files (--pipeline, --files).

    python benchmarks/bench_encode.py                        # 200k vectors, d=96, 3 runs
    python benchmarks/bench_encode.py --n 50000 --repeats 2  # quick
    python benchmarks/bench_encode.py --pipeline --repeats 3 # host costs, pipelined rates
    python benchmarks/bench_encode.py --files                # 10M-row files (accelerators)

Ours: ``encode.make_encoder`` (catalyzer 96->1024->1024->24 forward + Zn lattice
quantization + ranking, r2=79, one jitted program over equal batches of <= 65536 rows),
with the two halves also timed alone for the cost model. faiss: ``OPQ8_64,PQ8`` ``sa_encode``
(rotation + PQ assignment), trained on separate vectors (training not timed). Same data,
same threads, warm-up excluded, median of --repeats interleaved runs. The data are
Deep1M-shaped synthetic vectors (``_common.deep_like``). Writes
experiments/results/bench_encode.json.

--pipeline (``pipeline_main``): for d_in in --dims, float32 (.fvecs) and uint8 (.bvecs)
files of --n rows (default 1M: 16 chunks, so that a job's fixed costs, such as hashing a
file of up to 64 MiB whole for the resume fingerprint, do not pass for a per-row rate; about
10 min with --repeats 3 on 2 idle cores) written under --tmp and read once (page-cached),
with the paper-sized catalyzer (d_in -> 1024 -> 1024 -> 24, r2=79; untrained weights: the
costs depend on the shapes only):

* host-side cost per 1M vectors of each step, chunk by chunk (65536 rows), before (the
  unpipelined encoder of the previous round: read, convert to float32, NaN/Inf check,
  copy float32 to the device, one after the other) and after (``EncodeStream``:
  ``encode.travel``, a view of the file's row bytes; no host conversion or check; the
  bytes copied as they are);
* rates, medians of --repeats interleaved runs: "forward only" (catalyzer forward of
  device-resident float32 blocks), "compute only" (the whole block program on
  device-resident blocks: forward, NaN/Inf check, lattice encode), "stream"
  (``EncodeStream`` from the memory-mapped file, codes into host memory), "encode_file"
  (the same plus the .npy output, progress records and rename) and "before" (the previous
  round's loop), and each rate's ratio to "forward only"; also each case's process CPU
  seconds (all threads) per 1M vectors and the ratio of "forward only"'s to them, which a
  busy shared machine distorts less than the wall clock.

Writes experiments/results/bench_encode_pipeline.json.

--files (``files_main``, for a lent accelerator): ``encode_file`` on a page-cached
--n-files x 96 .fvecs and --n-files x 128 .bvecs (default 10M rows each, 3.8 GB and
1.3 GB under --tmp) and ``SpreadingIndex.add`` of --n-files x 96 float32 from host
memory, after a warm-up; records the device name. Writes
experiments/results/bench_encode_files_<platform>.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from _common import (deep_like, deep_like_setup, device_batches, encode_cases,  # noqa: E402
                     interleaved, median, table, write_result)

from spreading_jax import encode, sharding  # noqa: E402
from spreading_jax.quantizers import make_codec  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--n", type=int, default=None,
                 help="vectors encoded per run (default 200000; 1048576 with --pipeline)")
  p.add_argument("--d", type=int, default=96)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--threads", type=int, default=os.cpu_count())
  p.add_argument("--pipeline", action="store_true", help="the pipeline mode (see above)")
  p.add_argument("--files", action="store_true", help="the 10M-row files mode (see above)")
  p.add_argument("--dims", type=int, nargs="+", default=[96, 128], help="--pipeline d_in")
  p.add_argument("--hidden", type=int, nargs="+", default=[1024, 1024])
  p.add_argument("--d-out", type=int, default=24, help="catalyzer output (--pipeline/--files)")
  p.add_argument("--r2", type=int, default=79, help="lattice r2 (--pipeline/--files)")
  p.add_argument("--chunk", type=int, default=65536, help="rows per chunk (--pipeline)")
  p.add_argument("--n-files", type=int, default=10_000_000, help="rows per file (--files)")
  p.add_argument("--tmp", default=None, help="directory for the vector files (default: the "
                 "system's temporary directory)")
  p.add_argument("--name", default=None, help="result file name (without .json)")
  args = p.parse_args(argv)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  if args.pipeline:
    return pipeline_main(args)
  if args.files:
    return files_main(args)
  args.n = args.n or 200_000
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



def _command(argv) -> str:
  """The command line as run, without machine paths (--tmp DIR)."""
  argv = list(argv)
  for i, a in enumerate(argv[:-1]):
    if a == "--tmp":
      argv[i + 1] = "DIR"
  return " ".join(["python benchmarks/bench_encode.py"] + argv)


def random_model(d_in: int, hidden, d_out: int = 24, r2: int = 79, seed: int = 0):
  """A catalyzer d_in -> hidden -> d_out with initial weights (TrainResult)."""
  from spreading_jax.catalyzer import Catalyzer
  from spreading_jax.config import TrainConfig
  from spreading_jax.model import TrainResult
  module = Catalyzer(d_out=d_out, hidden=tuple(hidden))
  v = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, d_in)), train=False)
  config = TrainConfig(d_out=d_out, r2=r2, bits=64, hidden=list(hidden))
  return TrainResult(v["params"], v["batch_stats"], config, d_in, 1.0)


def _write_file(tmp: str, n: int, d: int, kind: str) -> str:
  """An n x d .fvecs (float32, deep_like) or .bvecs (uint8, SIFT-like) file, written in
  pieces and read once (so that it is page-cached)."""
  from spreading_jax import vecs_io
  path = os.path.join(tmp, f"bench_{n}x{d}.{kind}")
  if not os.path.exists(path):
    rng = np.random.default_rng(d)
    step = 1 << 20
    with open(path, "wb") as f:
      for s in range(0, n, step):
        m = min(step, n - s)
        if kind == "fvecs":
          x = deep_like(m, d, seed=s // step)
        else:
          x = np.minimum(rng.gamma(1.5, 20.0, (m, d)), 255).astype(np.uint8)
        row = np.empty((m, 4 + d * x.itemsize), np.uint8)
        row[:, :4] = np.frombuffer(np.array(d, "<i4").tobytes(), np.uint8)
        row[:, 4:] = x.view(np.uint8).reshape(m, -1)
        row.tofile(f)
  x = vecs_io.read_vectors(path)
  for s in range(0, x.shape[0], 1 << 20):
    np.asarray(x[s:s + (1 << 20)]).sum()  # page it in
  return path


def _old_encode(model, x, chunk: int, codes: np.ndarray) -> None:
  """The previous round's encode_file loop (the "before"): per chunk, on the host, read
  and convert to float32, check NaN/Inf, pad; then send, encode and read back (the host
  check above was its only one: the encoder's device check is off)."""
  enc = encode.make_encoder(model, check_finite=False)
  for s in range(0, x.shape[0], chunk):
    xb = np.asarray(x[s:s + chunk], np.float32)
    assert np.isfinite(xb).all()
    m = xb.shape[0]
    codes[s:s + m] = np.asarray(enc(jnp.asarray(sharding.pad_rows(xb, chunk))))[:m]


def host_costs(x, chunk: int, repeats: int) -> dict:
  """Seconds per 1M vectors of each host-side step, before and after (medians)."""
  per_m = 1e6 / x.shape[0]
  spans = [(s, min(x.shape[0], s + chunk)) for s in range(0, x.shape[0], chunk)]
  block = encode.block_rows()

  def read():
    return [np.ascontiguousarray(x[a:b]) for a, b in spans]

  rows = read()
  as_f32 = [np.asarray(r, np.float32) for r in rows]
  sent = [encode.travel(x[a:b])[0] for a, b in spans]
  steps = {
      "before: read": read,
      "before: convert to float32": lambda: [np.asarray(r, np.float32) for r in rows],
      "before: NaN/Inf check": lambda: [bool(np.isfinite(r).all()) for r in as_f32],
      "before: copy float32 to device": lambda: jax.block_until_ready(
          [jnp.asarray(sharding.pad_rows(r, chunk)) for r in as_f32]),
      "after: read (encode.travel)": lambda: [encode.travel(x[a:b]) for a, b in spans],
      "after: copy to device (as it travels)": lambda: jax.block_until_ready(
          [jax.device_put(r[i:i + block]) for r in sent for i in range(0, len(r), block)]),
  }
  out = {}
  for name, fn in steps.items():
    fn()
    ts = []
    for _ in range(repeats):
      t = time.perf_counter()
      fn()
      ts.append(time.perf_counter() - t)
    out[name] = median(ts) * per_m
  out["after: convert to float32"] = 0.0 if x.dtype in encode._TRAVEL_DTYPES else None
  out["after: NaN/Inf check"] = 0.0  # in the compiled program (included in "compute only")
  return out


def _interleaved_wall_cpu(cases: dict, repeats: int):
  """Like ``_common.interleaved`` (one warm-up round, then ``repeats`` rounds of every
  case in turn), also recording the process CPU seconds of each run (all threads): on a
  shared machine the wall clock counts other jobs' time, the CPU seconds only this
  process's work."""
  for fn in cases.values():
    fn()
  wall, cpu = ({name: [] for name in cases} for _ in range(2))
  for _ in range(repeats):
    for name, fn in cases.items():
      t, c = time.perf_counter(), time.process_time()
      fn()
      wall[name].append(time.perf_counter() - t)
      cpu[name].append(time.process_time() - c)
  return wall, cpu


def pipeline_main(args):
  from spreading_jax.model import _forward_fn
  n = args.n or 1 << 20  # 16 chunks: a job's fixed costs (fingerprint, files) amortized
  tmp = args.tmp or tempfile.gettempdir()
  block = encode.block_rows()
  results, rows = [], []
  for d in args.dims:
    model = random_model(d, args.hidden, args.d_out, args.r2)
    codec = make_codec(model.config)
    program = encode._block_program(model.module, codec.encode_core)
    fwd = _forward_fn(model.module)
    scale = np.float32(model.input_scale)
    for kind in ("fvecs", "bvecs"):
      from spreading_jax.vecs_io import read_vectors
      path = _write_file(tmp, n, d, kind)
      x = read_vectors(path)
      costs = host_costs(x, args.chunk, args.repeats)
      blocks = []
      for s in range(0, n, block):
        raw, layout = encode.travel(x[s:s + block])
        blocks.append((jax.device_put(sharding.pad_rows(raw, block)), layout))
      fblocks = [jnp.asarray(sharding.pad_rows(np.asarray(x[s:s + block], np.float32), block))
                 for s in range(0, n, block)]
      codes = np.empty((n, codec.code_words), np.uint32)
      out = os.path.join(tmp, f"bench_codes_{d}_{kind}.npy")

      def stream():
        with encode.EncodeStream(model, x, then=codec.encode_core, chunk=args.chunk) as st:
          for lo, hi, c in st:
            codes[lo:hi] = c

      def to_file():
        assert encode.encode_file(model, path, out, chunk=args.chunk)
        os.remove(out)

      cases = {
          "forward only": lambda: jax.block_until_ready(
              [fwd(model.variables, b, scale) for b in fblocks]),
          "compute only": lambda: jax.block_until_ready(
              [program(model.variables, b, scale, layout=lay) for b, lay in blocks]),
          "stream": stream,
          "encode_file": to_file,
          "before": lambda: _old_encode(model, x, args.chunk, codes),
      }
      times, cpu = _interleaved_wall_cpu(cases, args.repeats)
      ref = n / median(times["forward only"])
      cpu_ref = median(cpu["forward only"])
      case_rows = []
      for name, ts in times.items():
        rate = n / median(ts)
        case_rows.append({"d_in": d, "input": f"{kind} ({x.dtype})", "case": name,
                          "vectors_per_s": rate, "ratio_to_forward_only": rate / ref,
                          "median_s": median(ts), "times_s": ts,
                          "cpu_s_per_1M": median(cpu[name]) * 1e6 / n,
                          "cpu_ratio_to_forward_only": cpu_ref / median(cpu[name]),
                          "cpu_s": cpu[name]})
      rows += case_rows
      results.append({"d_in": d, "input": kind, "dtype": str(x.dtype),
                      "host_s_per_1M": costs, "rates": case_rows})
      print(f"d_in={d} {kind}: host seconds per 1M vectors")
      print(table([{"step": k, "s_per_1M": v} for k, v in costs.items()],
                  ["step", "s_per_1M"]))
      print(table(case_rows, ["d_in", "input", "case", "vectors_per_s",
                              "ratio_to_forward_only", "cpu_s_per_1M",
                              "cpu_ratio_to_forward_only"]))
  path = write_result(args.name or "bench_encode_pipeline", {
      "n": n, "chunk": args.chunk, "block_rows": block, "hidden": args.hidden,
      "d_out": args.d_out, "r2": args.r2, "repeats": args.repeats, "devices": jax.device_count(),
      "load_average": os.getloadavg(), "results": results, "command": _command(args.argv)})
  print(f"wrote {path}")
  return results


def files_main(args):
  from spreading_jax.index import SpreadingIndex
  n = args.n_files
  tmp = args.tmp or tempfile.gettempdir()
  dev = jax.devices()[0]
  mesh = sharding.make_mesh() if jax.local_device_count() > 1 else None
  rows = []
  for d, kind in ((96, "fvecs"), (128, "bvecs")):
    model = random_model(d, args.hidden, args.d_out, args.r2)
    t = time.perf_counter()
    path = _write_file(tmp, n, d, kind)
    print(f"{path}: written and page-cached in {time.perf_counter() - t:.1f} s")
    out = os.path.join(tmp, f"bench_codes_{d}.npy")
    times = []
    for i in range(1 + args.repeats):  # the first run compiles
      t = time.perf_counter()
      assert encode.encode_file(model, path, out, chunk=args.chunk, mesh=mesh)
      if i:
        times.append(time.perf_counter() - t)
      os.remove(out)
    rows.append({"case": f"encode_file {n} x {d} .{kind}", "vectors_per_s": n / median(times),
                 "times_s": times})
    print(rows[-1])
  model = random_model(96, args.hidden, args.d_out, args.r2)
  x = deep_like(min(n, 1 << 20), 96, seed=3)
  x = np.concatenate([x] * (-(-n // x.shape[0])))[:n]
  times = []
  for i in range(1 + args.repeats):
    index = SpreadingIndex(model, "zn")
    t = time.perf_counter()
    index.add(x, chunk=args.chunk, mesh=mesh)
    if i:
      times.append(time.perf_counter() - t)
  rows.append({"case": f"SpreadingIndex.add {n} x 96 float32 (host numpy)",
               "vectors_per_s": n / median(times), "times_s": times})
  print(table(rows, ["case", "vectors_per_s"]))
  path = write_result(args.name or f"bench_encode_files_{dev.platform}", {
      "n": n, "chunk": args.chunk, "block_rows": encode.block_rows(), "hidden": args.hidden,
      "d_out": args.d_out, "r2": args.r2, "device": dev.device_kind, "platform": dev.platform,
      "devices": jax.device_count(),
      "rows": rows, "command": _command(args.argv)})
  print(f"wrote {path}")
  return rows


if __name__ == "__main__":
  main()
