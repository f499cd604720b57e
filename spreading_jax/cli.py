"""Command line: ``spreading-jax COMMAND`` or ``python -m spreading_jax COMMAND``.

User mistakes (missing file, bad dimension, incompatible model) print one line on stderr
and exit with status 2, without a traceback.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

COMMANDS = {}


def command(name: str, help: str):
  """Registers ``fn(args)`` as subcommand ``name``; ``fn.configure(parser)`` adds its flags."""
  def wrap(fn):
    COMMANDS[name] = (fn, help)
    return fn
  return wrap


class UserError(Exception):
  """An error caused by the user's input: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------------
# demo

def _configure_demo(p):
  p.add_argument("--dataset", default="wordllama-256",
                 help="dataset name or ann-benchmarks .hdf5 path (default: wordllama-256)")
  p.add_argument("--root", default=None, help="data root (default: $SPREADING_DATA or "
                 "../shared/data)")
  p.add_argument("--epochs", type=int, default=8, help="training epochs (default: 8)")
  p.add_argument("--lambda-koleo", type=float, default=0.05,
                 help="KoLeo weight (default 0.05, the original code's default)")
  p.add_argument("--out", default="experiments/results/demo",
                 help="where the table, JSON and plot go")
  p.add_argument("--seed", type=int, default=0)


@command("demo", "train on the default dataset, print a recall table, write a plot")
def demo(args):
  from spreading_jax import data, evaluate, lattice
  from spreading_jax.train import TrainConfig, train

  ds = data.load_dataset(args.dataset, args.root)
  print(f"dataset {ds.name}: train {ds.train.shape}, base {ds.base.shape}, "
        f"query {ds.query.shape} (models train on `train` only)", flush=True)
  config = TrainConfig(epochs=args.epochs, lambda_koleo=args.lambda_koleo, seed=args.seed,
                       val_every=max(1, args.epochs // 4), val_queries=500)
  t0 = time.perf_counter()
  result = train(config, ds)
  train_s = time.perf_counter() - t0
  codec = lattice.ZnSphereCodec(config.d_out, config.lattice_r2())
  rows = []

  def add(method, bits, fn):
    t = time.perf_counter()
    rows.append({"method": method, "bits": bits, "recall": fn(),
                 "seconds": round(time.perf_counter() - t, 2)})
    print(f"  {method}: {rows[-1]['recall']}", flush=True)

  print("evaluating on the held-out queries against the database", flush=True)
  add(f"catalyzer + Zn lattice (d={config.d_out}, r2={codec.r2})", codec.code_bits,
      lambda: evaluate.evaluate_lattice(ds, result.apply, codec))
  rot = evaluate.random_projection(ds.d, config.d_out, seed=args.seed)
  add(f"random projection + Zn lattice (d={config.d_out}, r2={codec.r2})", codec.code_bits,
      lambda: evaluate.evaluate_lattice(ds, rot, codec))
  add(f"catalyzer + sign ({config.d_out} bits)", config.d_out,
      lambda: evaluate.evaluate_sign(ds, result.apply))
  try:
    from spreading_jax import baselines
    add("OPQ8_64,PQ8 on raw vectors (faiss)", 64,
        lambda: baselines.evaluate_faiss(ds, "OPQ8_64,PQ8"))
  except (ImportError, AttributeError) as e:
    print(f"  faiss baseline skipped: {e}")
  table = evaluate.format_table(rows)
  print()
  print(table)
  out = Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  payload = {"dataset": ds.name, "config": config.to_dict(), "train_seconds": round(train_s, 1),
             "history": result.history, "rows": rows,
             "command": "python -m spreading_jax demo " + " ".join(sys.argv[2:])}
  from spreading_jax.data import atomic_output
  with atomic_output(out / "demo.json") as tmp:
    Path(tmp).write_text(json.dumps(payload, indent=2, default=str))
  with atomic_output(out / "demo.md") as tmp:
    Path(tmp).write_text(table + "\n")
  plot = _plot_training(result.history, out / "training.png")
  print(f"\nwrote {out / 'demo.json'}, {out / 'demo.md'} and {plot}")


demo.configure = _configure_demo


def _plot_training(history, path: Path) -> Path:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from spreading_jax.data import atomic_output
  epochs = [h["epoch"] for h in history]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  ax1.plot(epochs, [h["loss"] for h in history], marker=".", label="loss")
  ax1.plot(epochs, [h["triplet"] for h in history], marker=".", label="triplet")
  ax1.set_xlabel("epoch"), ax1.set_title("training loss"), ax1.legend()
  val = [h for h in history if "lattice_R@10" in h]
  for key in ("lattice_R@1", "lattice_R@10", "lattice_R@100", "sign_R@10"):
    if val and key in val[0]:
      ax2.plot([h["epoch"] for h in val], [h[key] for h in val], marker="o", label=key)
  ax2.set_xlabel("epoch"), ax2.set_title("validation 1-recall"), ax2.legend()
  fig.tight_layout()
  with atomic_output(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110)
  plt.close(fig)
  return path


# ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog="spreading-jax", description=__doc__.splitlines()[0])
  parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
  sub = parser.add_subparsers(dest="command", required=True)
  for name, (fn, help) in COMMANDS.items():
    p = sub.add_parser(name, help=help, description=fn.__doc__ or help)
    getattr(fn, "configure", lambda p: None)(p)
  return parser


def main(argv=None) -> int:
  parser = build_parser()
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                      format="%(levelname)s %(name)s: %(message)s")
  fn, _ = COMMANDS[args.command]
  try:
    fn(args)
  except (UserError, ValueError, FileNotFoundError) as e:
    if args.verbose:
      raise
    print(f"spreading-jax {args.command}: error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"spreading-jax {args.command}: interrupted", file=sys.stderr)
    return 130
  return 0


if __name__ == "__main__":
  sys.exit(main())
