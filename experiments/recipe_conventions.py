"""The measured effect of each training-recipe convention (TrainConfig's bn_mode, init,
neighbors_include_self, drop_remainder, input_scaling): wordllama-256, λ=0.01, 8 epochs,
64-bit Zn codes (d=24, r²=79), test 1-recall@1/10/100 in %.

    python experiments/recipe_conventions.py --root DATA_ROOT [variant names...]

Writes experiments/results/wordllama-256/recipe_conventions.json.
"""
import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from spreading_jax import datasets, evaluate  # noqa: E402
from spreading_jax import train as T  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
p.add_argument("--root", default=None, help="data root holding wordllama-wamerican/")
p.add_argument("variants", nargs="*", help="names of the variants to run (default: all)")
args = p.parse_args()
ds = datasets.load_dataset("wordllama-256", args.root)
OUT = os.path.join(ROOT, "experiments", "results", "wordllama-256", "recipe_conventions.json")
base = T.TrainConfig(d_out=24, r2=79, epochs=8, lambda_koleo=0.01, verbose=False)
old = dict(  # the conventions this library used before it followed the original
    bn_mode="joint", init="flax", neighbors_include_self=False, drop_remainder=True,
    input_scaling="mean_norm")
variants = [("original conventions (default)", {}), ("all previous conventions", old),
            ("joint BatchNorm", dict(bn_mode="joint")), ("flax init", dict(init="flax")),
            ("self excluded", dict(neighbors_include_self=False))]
only = [v for v in variants if v[0] in args.variants] or variants
out = {}
for name, ch in only:
  two_seeds = name in ("original conventions (default)", "all previous conventions")
  for seed in ((0, 1) if two_seeds else (0,)):
    t = time.time()
    r = T.train(base.replace(seed=seed, **ch), ds)
    rec = evaluate.evaluate_lattice(ds, r.apply, T.make_codec(r.config))
    out.setdefault(name, []).append({
        "seed": seed, "test": rec, "koleo": [h["koleo"] for h in r.history],
        "val_last": {k: v for k, v in r.history[-1].items() if k.startswith("lattice")},
        "s": time.time() - t})
    print(name, seed, {k: round(v * 100, 1) for k, v in rec.items()}, round(time.time() - t),
          flush=True)
    with open(OUT + ".tmp", "w") as f:
      json.dump(out, f, indent=1)
    os.replace(OUT + ".tmp", OUT)
