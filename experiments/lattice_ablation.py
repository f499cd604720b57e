"""Does the catalyzer help the fixed 64-bit lattice, and does KoLeo help the catalyzer?

Trains the paper's network (d_in→1024→1024→24, lattice r²=79: 64-bit codes) with λ>0 and
with λ=0, and compares catalyzer + Zn lattice against the same lattice applied to a
random orthogonal projection of the input to 24 dims. Test recall is on the dataset's
real queries against its database; models train on the training vectors only.

    python experiments/lattice_ablation.py --dataset siftsmall --epochs 10
    python experiments/lattice_ablation.py --dataset fashion-mnist --epochs 10

Writes experiments/results/<dataset>/lattice_ablation.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np

from spreading_jax import _files, datasets, evaluate, lattice
from spreading_jax.train import TrainConfig, train


def run(dataset: str, epochs: int, lambdas=(0.01, 0.0), seed: int = 0, out: str | None = None,
        hidden=(1024, 1024), root=None) -> dict:
  ds = datasets.load_dataset(dataset, root)
  codec = lattice.ZnSphereCodec(24, 79)
  rows = []
  t0 = time.perf_counter()
  proj = evaluate.random_projection(ds.d, 24, seed=seed)
  rows.append({"method": "random projection + Zn lattice", "bits": codec.code_bits,
               "lambda": None, "recall": evaluate.evaluate_lattice(ds, proj, codec)})
  histories = {}
  for lam in lambdas:
    config = TrainConfig(epochs=epochs, lambda_koleo=lam, seed=seed, hidden=tuple(hidden),
                         val_every=max(1, epochs // 5), verbose=True)
    t = time.perf_counter()
    model = train(config, ds)
    rows.append({"method": f"catalyzer (λ={lam:g}) + Zn lattice", "bits": codec.code_bits,
                 "lambda": lam, "train_seconds": round(time.perf_counter() - t, 1),
                 "recall": evaluate.evaluate_lattice(ds, model.apply, codec)})
    histories[str(lam)] = model.history
  table = evaluate.format_table(rows)
  payload = {"experiment": "lattice_ablation", "dataset": ds.name, "epochs": epochs,
             "seed": seed, "hidden": list(hidden), "lattice": {"d": 24, "r2": 79},
             "rows": rows, "histories": histories,
             "wall_seconds": round(time.perf_counter() - t0, 1),
             "jax": jax.__version__, "device": jax.devices()[0].device_kind,
             "command": "python " + " ".join(sys.argv)}
  out = Path(out or Path(__file__).parent / "results" / ds.name)
  out.mkdir(parents=True, exist_ok=True)
  with _files.atomic_output(out / "lattice_ablation.json") as tmp:
    Path(tmp).write_text(json.dumps(payload, indent=2, default=str))
  with _files.atomic_output(out / "lattice_ablation.md") as tmp:
    Path(tmp).write_text(f"`{payload['command']}`\n\n{table}\n")
  print(table)
  return payload


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dataset", default="siftsmall")
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None)
  p.add_argument("--hidden", default="1024,1024")
  args = p.parse_args(argv)
  run(args.dataset, args.epochs, seed=args.seed, out=args.out,
      hidden=tuple(int(h) for h in args.hidden.split(",")))


if __name__ == "__main__":
  main()
