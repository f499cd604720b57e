"""Shape selection (selection.py) on a dataset at a 64-bit budget, against the paper's fixed
shape and the faiss baselines, and whether the short screening runs rank the output
dimensions as full runs do.

    python experiments/shape_selection.py --dataset fashion-mnist-mini --epochs 10

Writes experiments/results/<dataset>/shape_selection.{json,md} (appended to as it goes, so
a partial run keeps what it measured). Steps: (1) lattice: selection of (d_out, r², λ), the
chosen shape trained fully, the paper's d_out=24 r²=79 λ=0.05 trained the same way,
OPQ8_64,PQ8; (2) sign codes: λ chosen at d_out=64, against LSH and ITQ at 64 bits; (3) with
--agreement, every screened d_out trained fully at λ=0.05, to compare the two rankings.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from spreading_jax import baselines, datasets, evaluate, report, selection  # noqa: E402
from spreading_jax import train as T  # noqa: E402
from spreading_jax._files import atomic_output  # noqa: E402


def _pct(rec: dict) -> str:
  return "/".join(f"{100 * rec[k]:.1f}" for k in sorted(rec))


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dataset", default="fashion-mnist-mini")
  p.add_argument("--root", default=None)
  p.add_argument("--epochs", type=int, default=10)
  p.add_argument("--bits", type=int, default=64)
  p.add_argument("--agreement", action="store_true",
                 help="also train every screened d_out fully (ranking agreement)")
  p.add_argument("--steps", default="lattice,sign", help="which of lattice,sign to run")
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  ds = datasets.load_dataset(args.dataset, args.root).as_float32()
  out = args.out or os.path.join(ROOT, "experiments", "results", os.path.basename(args.dataset))
  os.makedirs(out, exist_ok=True)
  path = os.path.join(out, "shape_selection.json")
  record = json.load(open(path)) if os.path.exists(path) else {}
  record.update({"dataset": ds.name, "epochs": args.epochs, "bits": args.bits,
                 "command": report.portable_command(
                     "python experiments/shape_selection.py " + " ".join(sys.argv[1:]))})
  base = T.TrainConfig(epochs=args.epochs, bits=args.bits, verbose=False,
                       val_every=max(1, args.epochs // 5))

  def save():
    with atomic_output(path) as tmp:
      with open(tmp, "w") as f:
        json.dump(record, f, indent=1, default=str)

  def fit(config, name):
    t = time.perf_counter()
    model = T.train(config, ds)
    seconds = time.perf_counter() - t
    if config.quantizer == "sign":
      rec = evaluate.evaluate_sign(ds, model.apply)
    else:
      rec = evaluate.evaluate_lattice(ds, model.apply, T.make_codec(model.config))
    c = model.config
    row = {"method": name, "d_out": c.d_out, "r2": c.r2 if c.quantizer == "lattice" else None,
           "lambda_koleo": c.lambda_koleo, "recall": rec,
           "train_seconds": round(seconds, 1), "selection": model.selection}
    print(f"{name}: d_out={c.d_out} r2={row['r2']} λ={c.lambda_koleo:g} R@1/10/100 "
          f"{_pct(rec)} ({seconds:.0f}s)", flush=True)
    return row

  steps = args.steps.split(",")
  if "lattice" in steps and "lattice" not in record:
    rows = [fit(base, f"catalyzer + Zn, shape chosen ({args.epochs} epochs)")]
    record["lattice"] = rows
    save()
    rows.append(fit(base.replace(d_out=24, r2=79, lambda_koleo=0.05),
                    "catalyzer + Zn, paper shape d=24 r²=79 λ=0.05"))
    save()
    t = time.perf_counter()
    rows.append({"method": "OPQ8_64,PQ8 (faiss, raw vectors)",
                 "recall": baselines.evaluate_faiss(ds, "OPQ8_64,PQ8"),
                 "train_seconds": round(time.perf_counter() - t, 1)})
    save()
  if "sign" in steps and "sign" not in record:
    rows = [fit(base.replace(quantizer="sign", d_out=args.bits),
                f"catalyzer + sign, λ chosen ({args.epochs} epochs)")]
    record["sign"] = rows
    save()
    rows.append(fit(base.replace(quantizer="sign", d_out=args.bits, lambda_koleo=0.05),
                    "catalyzer + sign, λ=0.05"))
    for name in (f"LSH{args.bits}", f"ITQ{args.bits}"):
      rows.append({"method": f"{name} (faiss)", "recall": baselines.evaluate_faiss(ds, name)})
      save()
  if args.agreement and "agreement" not in record:
    screened = record["lattice"][0]["selection"]["table"]
    rows = []
    for row in screened:
      if row["lambda_koleo"] != selection.SCREEN_LAMBDA:
        continue
      full = fit(base.replace(d_out=row["d_out"], r2=row["r2"], lambda_koleo=row["lambda_koleo"]),
                 f"full run d={row['d_out']}")
      rows.append({"d_out": row["d_out"], "r2": row["r2"],
                   "screen_val_R@10": row["lattice_R@10"], "full_test": full["recall"]})
      record["agreement"] = rows
      save()
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
