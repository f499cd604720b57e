"""The paper recipe at full scale on one accelerator: what a GPU/TPU owner runs with one command.

    make bench-accel                              # = python benchmarks/bench_accel.py
    python benchmarks/bench_accel.py --small      # CPU smoke run (seconds), same code paths

Deep1M-shaped synthetic data (``_common.deep_like``: 96-d, clustered, unit norm; the costs
depend on the shapes only): 500k training vectors, 1M database vectors, 1k queries.
Measures, on the default JAX device:

* training: ``spreading_jax.train.train(TrainConfig(epochs=E), x)`` with the paper's
  network and batch; per epoch, from ``result.history``, the negative-mining seconds
  (``mining_s``) and the rest (``time_s - mining_s``: the SGD steps); the first epoch
  (compilation) is left out; projected 160-epoch time = 160 x (median epoch);
* encode: ``SpreadingIndex(model, "zn", bits=64).encode`` of the 1M vectors from host
  memory (catalyzer forward + lattice encode, codes back on the host), after a warm-up
  call; and the batch-job path, ``encode.make_encoder`` on device-resident batches of
  <= 65536 rows, with its catalyzer forward and lattice encode also timed alone;
* search: queries/s over the 1M 64-bit codes: the index end to end (queries through the
  catalyzer, lattice search), the lattice search kernel on device-resident codes, and
  Hamming search over 64-bit sign codes, k=100, after warm-up, median of --repeats;
* achieved FLOP/s of the SGD steps, the encode and the mining, against the device's
  peak from ``PEAKS`` (by device name) and against a measured large matmul.

Without an accelerator the full-scale run is skipped (it would take hours on a CPU) unless
--force is given; ``make bench`` therefore picks this up only where a GPU or TPU is present.
Writes experiments/results/bench_accel.json (bench_accel_small.json with --small).
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
from _common import (deep_like, device_batches, encode_cases, median, table,  # noqa: E402
                     timeit, write_result)

from spreading_jax import binary, search, topk  # noqa: E402
from spreading_jax.index import SpreadingIndex  # noqa: E402
from spreading_jax.train import TrainConfig, train  # noqa: E402

# Dense matmul peaks in TFLOP/s by device-name substring (vendor datasheets; no sparsity).
# fp32: plain float32 FMA units; tf32/bf16: tensor-core / MXU rates. JAX's default float32
# matmul precision on NVIDIA Ampere+ runs on TF32 tensor cores, on TPU on bf16 passes.
PEAKS = {
    "H200": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "H100 PCIe": {"fp32": 51.0, "tf32": 378.0, "bf16": 756.0},
    "H100": {"fp32": 67.0, "tf32": 494.7, "bf16": 989.4},
    "A100": {"fp32": 19.5, "tf32": 156.0, "bf16": 312.0},
    "L4": {"fp32": 30.3, "tf32": 60.0, "bf16": 121.0},
    "A10G": {"fp32": 31.2, "tf32": 62.5, "bf16": 125.0},
    "V100": {"fp32": 15.7, "tf32": None, "bf16": None},
    "T4": {"fp32": 8.1, "tf32": None, "bf16": None},
    "TPU v4": {"fp32": None, "tf32": None, "bf16": 275.0},
    "TPU v5 lite": {"fp32": None, "tf32": None, "bf16": 197.0},
    "TPU v5e": {"fp32": None, "tf32": None, "bf16": 197.0},
    "TPU v5p": {"fp32": None, "tf32": None, "bf16": 459.0},
    "TPU v6": {"fp32": None, "tf32": None, "bf16": 918.0},
}


def device_peak(kind: str) -> dict | None:
  """The PEAKS entry whose name occurs in the device kind (longest name first)."""
  for name in sorted(PEAKS, key=len, reverse=True):
    if name.lower() in kind.lower():
      return dict(PEAKS[name], name=name)
  return None


def measured_matmul_flops(n: int, repeats: int = 5) -> float:
  """FLOP/s of an n x n float32 matmul at JAX's default precision on the default device."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
  f = jax.jit(lambda a: a @ a)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t)
  return 2 * n ** 3 / median(times)


def forward_flops(d_in: int, hidden, d_out: int) -> int:
  """Matmul FLOPs of one catalyzer forward per vector."""
  dims = [d_in, *hidden, d_out]
  return 2 * sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--small", action="store_true",
                 help="a seconds-long CPU smoke run of the same code paths")
  p.add_argument("--force", action="store_true", help="run full scale even on a CPU")
  p.add_argument("--n-train", type=int, default=None)
  p.add_argument("--nb", type=int, default=None)
  p.add_argument("--nq", type=int, default=None)
  p.add_argument("--d", type=int, default=96)
  p.add_argument("--epochs", type=int, default=None,
                 help="epochs actually run (the first, compiling, one is not counted)")
  p.add_argument("--hidden", type=int, nargs="+", default=None)
  p.add_argument("--k", type=int, default=100)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--name", default=None, help="result file name (default bench_accel[_small])")
  args = p.parse_args(argv)
  small = args.small
  n_train = args.n_train or (4096 if small else 500_000)
  nb = args.nb or (8192 if small else 1_000_000)
  nq = args.nq or (256 if small else 1000)
  epochs = args.epochs or (2 if small else 3)
  hidden = tuple(args.hidden or ((128, 128) if small else (1024, 1024)))
  if epochs < 2:
    p.error("--epochs must be >= 2: the first epoch compiles and is not counted")
  device = jax.devices()[0]
  kind = device.device_kind
  if device.platform == "cpu" and not (small or args.force):
    print(f"bench_accel: skipped, no accelerator (default JAX device: {kind}). Run "
          "`python benchmarks/bench_accel.py --small` for a CPU smoke run, or --force for the "
          "full scale on this CPU (hours).")
    return None

  print(f"device: {kind} ({device.platform}, {jax.device_count()} device(s)); "
        f"train {n_train} x {args.d}, base {nb}, queries {nq}, {epochs} epochs", flush=True)
  xt = deep_like(n_train, args.d, seed=1)
  xb = deep_like(nb, args.d, seed=2)
  xq = deep_like(nq, args.d, seed=3)

  # The paper's 64-bit lattice setting, d_out and λ fixed (unset, train() would first
  # select them by validation runs, which is not what is timed here).
  config = TrainConfig(epochs=epochs, hidden=hidden, d_out=24, r2=79, lambda_koleo=0.05,
                       batch_size=64, val_every=0, verbose=False)
  t = time.perf_counter()
  model = train(config, xt)
  train_wall = time.perf_counter() - t
  counted = model.history[1:]
  mining = median([r["mining_s"] for r in counted])
  epoch_s = median([r["time_s"] for r in counted])
  sgd = median([r["time_s"] - r["mining_s"] for r in counted])
  steps = n_train // config.batch_size
  # One step: forward on anchors, positives and negatives (3 x batch rows), backward ~2x.
  step_flops = 3 * 3 * config.batch_size * forward_flops(args.d, hidden, config.d_out)
  mining_flops = 2 * n_train * n_train * config.d_out

  index = SpreadingIndex(model, "zn", bits=64)
  encode_times = timeit(lambda: index.encode(xb), args.repeats)
  enc_rate = nb / median(encode_times)
  # The batch-job path: the jitted encoder on device-resident batches (no host transfers),
  # and its two halves alone.
  device_times = {name: timeit(fn, args.repeats) for name, fn in
                  encode_cases(model, index.quantizer.codec, device_batches(xb)).items()}
  device_rates = {k: nb / median(v) for k, v in device_times.items()}
  index.add(xb)
  codes = jax.device_put(index.codes)
  yq = jax.device_put(model.apply(xq))
  yb = model.apply(xb)
  sign_b = jax.device_put(binary.sign_codes(np.concatenate(
      [yb, np.random.default_rng(4).standard_normal((nb, 40), dtype=np.float32)], 1)))
  sign_q = jax.device_put(binary.sign_codes(np.concatenate(
      [np.asarray(yq), np.random.default_rng(5).standard_normal((nq, 40), dtype=np.float32)], 1)))
  search_e2e = timeit(lambda: index.search(xq, args.k), args.repeats)
  search_kernel = timeit(lambda: jax.block_until_ready(
      search.search_lattice(yq, codes, index.quantizer.codec, args.k)), args.repeats)
  search_ham = timeit(lambda: jax.block_until_ready(
      search.hamming_knn(sign_q, sign_b, args.k)), args.repeats)

  mm = measured_matmul_flops(1024 if small else 8192)
  peak = device_peak(kind)
  achieved = {"sgd_steps": steps * step_flops / sgd,
              "encode": device_rates["end-to-end"] * forward_flops(args.d, hidden, config.d_out),
              "mining": mining_flops / mining}
  rows = [
      {"what": "SGD steps per epoch", "value": sgd, "unit": "s"},
      {"what": "negative mining per epoch", "value": mining, "unit": "s"},
      {"what": "epoch (median, compile excluded)", "value": epoch_s, "unit": "s"},
      {"what": "projected 160 epochs", "value": 160 * epoch_s / 60, "unit": "min"},
      {"what": "encode, host to host (index.encode)", "value": enc_rate, "unit": "vec/s"},
      {"what": "encode, device-resident (jitted encoder)", "value": device_rates["end-to-end"],
       "unit": "vec/s"},
      {"what": "  same, check_finite=False (no read back per call)",
       "value": device_rates["end-to-end, unchecked"], "unit": "vec/s"},
      {"what": "  of which catalyzer forward alone", "value": device_rates["catalyzer forward"],
       "unit": "vec/s"},
      {"what": "  of which lattice encode alone", "value": device_rates["lattice encode"],
       "unit": "vec/s"},
      {"what": f"search, index end to end, {nb} codes", "value": nq / median(search_e2e),
       "unit": "q/s"},
      {"what": f"search, lattice kernel, {nb} codes", "value": nq / median(search_kernel),
       "unit": "q/s"},
      {"what": f"search, Hamming 64-bit, {nb} codes", "value": nq / median(search_ham),
       "unit": "q/s"},
      {"what": "SGD steps achieved", "value": achieved["sgd_steps"] / 1e12, "unit": "TFLOP/s"},
      {"what": "encode achieved", "value": achieved["encode"] / 1e12, "unit": "TFLOP/s"},
      {"what": "mining achieved", "value": achieved["mining"] / 1e12, "unit": "TFLOP/s"},
      {"what": "measured matmul (default precision)", "value": mm / 1e12, "unit": "TFLOP/s"},
  ]
  print(table(rows, ["what", "value", "unit"]))
  fractions = {}
  if peak is not None:
    for prec in ("fp32", "tf32", "bf16"):
      if peak.get(prec):
        fractions[prec] = {k: v / (peak[prec] * 1e12) for k, v in achieved.items()}
    print(f"peak ({peak['name']}): {peak}; fraction of peak: {fractions}")
  else:
    print(f"no datasheet peak listed for {kind!r}: compare with the measured matmul")
  name = args.name or ("bench_accel_small" if small else "bench_accel")
  payload = {
      "benchmark": "paper recipe at full scale on one device" + (" (--small)" if small else ""),
      "device_kind": kind, "platform": device.platform, "device_count": jax.device_count(),
      "n_train": n_train, "nb": nb, "nq": nq, "d": args.d, "hidden": list(hidden),
      "epochs_run": epochs, "k": args.k, "history": model.history,
      "train_wall_s": train_wall, "sgd_s_per_epoch": sgd, "mining_s_per_epoch": mining,
      "epoch_s": epoch_s, "projected_160_epochs_s": 160 * epoch_s,
      "encode_vectors_per_s": enc_rate, "encode_times_s": encode_times,
      "encode_device_resident_vectors_per_s": device_rates,
      "encode_device_resident_times_s": device_times,
      "search_qps": {"index_end_to_end": nq / median(search_e2e),
                     "lattice_kernel": nq / median(search_kernel),
                     "hamming_64bit": nq / median(search_ham)},
      "search_times_s": {"index_end_to_end": search_e2e, "lattice_kernel": search_kernel,
                         "hamming_64bit": search_ham},
      "engine_tiles": topk.default_tiles()._asdict(),
      "achieved_flops": achieved, "measured_matmul_flops": mm, "peak_tflops": peak,
      "fraction_of_peak": fractions, "rows": rows,
      "command": "python " + " ".join([sys.argv[0]] + list(argv if argv is not None
                                                             else sys.argv[1:]))}
  path = write_result(name, payload)
  print(f"wrote {path}")
  return payload


if __name__ == "__main__":
  main()
