"""Training-dynamics fidelity: the original PyTorch recipe next to ours on one fixed real split.

Runs the original code (facebookresearch/spreadingvectors, CC-BY-NC; never part of this
repository: pass a checkout of it with --reference-dir) through its own epoch function
``train.triplet_optimize``, and ``spreading_jax.train.train`` with the same hyper-parameters,
on the same training vectors, for several seeds each. Both sides are validated with the
same code (our lattice / sign recall on a fixed validation split of training-set vectors),
so only the training recipe differs. Writes per-epoch KoLeo, triplet loss, violating-triplet
count and validation recall of every run, plus tolerances derived from the seed spread, to
a JSON fixture that ``tests/test_fidelity.py`` checks a fresh run of ours against.

Needs a Python with torch (CPU) and this project's requirements:

    python experiments/fidelity.py --reference-dir <checkout of spreadingvectors> \\
        --out tests/fixtures/fidelity.json

Without faiss installed, the original searches neighbours with its exact torch fallback
(the GPU path of the original is exact too), which needs the training-set size to be a
multiple of 500.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
import types

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from spreading_jax import datasets  # noqa: E402
from spreading_jax import train as T  # noqa: E402

METRICS = ("koleo", "triplet", "violations", "lattice_R@1", "lattice_R@10")
# The fixed split: rows of the shipped dataset's training vectors.
SPLIT = {"train": (0, 2000), "val_query": (2000, 2200), "val_base": (2200, 2700)}
# The recipe compared (the paper's network and optimizer at λ=0.01, a value of the paper's
# cross-validation grid where the conventions visibly matter).
CONFIG = T.TrainConfig(d_out=24, r2=79, epochs=8, batch_size=64,
                       lr_schedule=(0.1, 0.1, 0.05, 0.01), momentum=0.9, lambda_koleo=0.01,
                       rank_positive=10, rank_negative=50, val_every=1, verbose=False)


def fidelity_split(dataset_name: str = "fashion-mnist-mini", root=None) -> dict:
  """The fixed split's arrays (float32) and a sha256 of their bytes."""
  ds = datasets.load_dataset(dataset_name, root)
  out = {k: np.ascontiguousarray(ds.train[a:b], np.float32) for k, (a, b) in SPLIT.items()}
  if out["val_base"].shape[0] != SPLIT["val_base"][1] - SPLIT["val_base"][0]:
    raise ValueError(f"{dataset_name} has fewer than {SPLIT['val_base'][1]} training vectors")
  from spreading_jax.checkpoint import fingerprint
  out["sha256"] = fingerprint(out["train"], out["val_query"], out["val_base"])
  return out


def run_ours(split: dict, config: T.TrainConfig, seed: int) -> list[dict]:
  """Per-epoch records of our training on the split."""
  result = T.train(config.replace(seed=seed), split["train"],
                   validation=(split["val_query"], split["val_base"]))
  return [{k: r[k] for k in ("epoch",) + METRICS} for r in result.history]


def run_original(split: dict, config: T.TrainConfig, seed: int, reference_dir: str,
                 threads: int) -> list[dict]:
  """Per-epoch records of the original's ``triplet_optimize`` on the split."""
  import torch
  from _torch_reference import _import_reference, build_reference_net
  torch.set_num_threads(threads)
  train_mod, lib_net = _import_reference(reference_dir)
  metrics = sys.modules["lib.metrics"]
  xt = split["train"]
  codec = T.make_codec(config)
  val = T.validation_split(split["val_query"], split["val_base"])
  # The original's __main__ order: seed both RNGs, input-space kNN (self included), net.
  np.random.seed(seed)
  torch.manual_seed(seed)
  gt_nn = metrics.get_nearestneighbors(xt, xt, config.rank_positive, device="cpu")
  net = build_reference_net(lib_net, xt.shape[1], config.hidden[0], config.d_out)
  recalls = []

  def val_func(net, epoch, args, all_logs):
    net.eval()
    yq = lib_net.forward_pass(net, val.query, 1024)
    yb = lib_net.forward_pass(net, val.base, 1024)
    recalls.append(T.validation_recalls(yq, yb, val, codec))
    return recalls[-1]

  args = types.SimpleNamespace(
      lr_schedule=",".join(str(v) for v in config.lr_schedule), epochs=config.epochs,
      quantizer_train="", device="cpu", momentum=config.momentum,
      batch_size=config.batch_size, lambda_uniform=config.lambda_koleo,
      rank_negative=config.rank_negative, val_freq=config.val_every)
  with contextlib.redirect_stdout(io.StringIO()):
    logs = train_mod.triplet_optimize(xt, gt_nn, net, args, val_func)
  return [{"epoch": log["epoch"] + 1, "koleo": log["loss_uniform"],
           "triplet": log["loss_triplet"], "violations": log["offending"],
           "lattice_R@1": r["lattice_R@1"], "lattice_R@10": r["lattice_R@10"]}
          for log, r in zip(logs, recalls)]


def tolerances(runs: dict[str, list[list[dict]]], factor: float = 3.0) -> dict:
  """Bands a sound run of ours must stay in around the original's seed mean, per metric:
  ``per_epoch`` (factor x the larger per-epoch seed standard deviation of the two sides,
  floored at 5% of the value for the loss and the count, 0.02 for KoLeo (a log-distance)
  and 0.01 for recalls) and ``epoch_mean`` (the same for the
  average over epochs, whose seed spread is much smaller, so it is the sharper test)."""
  out: dict[str, dict] = {"per_epoch": {}, "epoch_mean": {}}
  for m in METRICS:
    sides = {side: np.array([[r[m] for r in run] for run in side_runs], np.float64)
             for side, side_runs in runs.items()}
    ref = np.abs(sides["original"].mean(axis=0))
    floor = (np.full_like(ref, 0.01) if "_R@" in m else np.full_like(ref, 0.02)
             if m == "koleo" else 0.05 * ref)
    std = np.max([a.std(axis=0, ddof=1) for a in sides.values()], axis=0)
    out["per_epoch"][m] = np.maximum(factor * std, floor).tolist()
    std_mean = max(a.mean(axis=1).std(ddof=1) for a in sides.values())
    out["epoch_mean"][m] = float(max(factor * std_mean, float(np.mean(floor))))
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--reference-dir",
                 help="a checkout of github.com/facebookresearch/spreadingvectors")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--dataset", default="fashion-mnist-mini")
  p.add_argument("--root", default=None, help="data root for --dataset (default: shipped)")
  p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
  p.add_argument("--out", default=os.path.join(ROOT, "tests", "fixtures", "fidelity.json"))
  p.add_argument("--retolerance", action="store_true",
                 help="only recompute the tolerances of the existing --out record from its runs")
  args = p.parse_args(argv)
  if args.retolerance:
    with open(args.out) as f:
      record = json.load(f)
    record["tolerance"] = tolerances(record["runs"])
    _write(record, args.out)
    return 0
  if not args.reference_dir:
    p.error("--reference-dir is required (a checkout of the original code)")
  split = fidelity_split(args.dataset, args.root)
  runs: dict[str, list] = {"original": [], "ours": []}
  t0 = time.time()
  for seed in args.seeds:
    runs["original"].append(run_original(split, CONFIG, seed, args.reference_dir, args.threads))
    runs["ours"].append(run_ours(split, CONFIG, seed))
    print(f"seed {seed}: original R@10 {runs['original'][-1][-1]['lattice_R@10']:.3f} "
          f"ours {runs['ours'][-1][-1]['lattice_R@10']:.3f} ({time.time() - t0:.0f}s)")
  commit = subprocess.run(["git", "-C", args.reference_dir, "rev-parse", "HEAD"],
                          capture_output=True, text=True).stdout.strip() or None
  record = {
      "command": "python experiments/fidelity.py --reference-dir <spreadingvectors checkout> "
                 + " ".join(f"--seeds {' '.join(map(str, args.seeds))}".split())
                 + (f" --dataset {args.dataset}" if args.dataset != "fashion-mnist-mini" else ""),
      "reference": {"repository": "github.com/facebookresearch/spreadingvectors",
                    "commit": commit, "function": "train.triplet_optimize"},
      "dataset": args.dataset, "split": SPLIT, "split_sha256": split["sha256"],
      "config": {k: v for k, v in CONFIG.to_dict().items()
                 if k not in ("verbose", "checkpoint_dir", "seed")},
      "seeds": args.seeds, "runs": runs, "tolerance": tolerances(runs),
  }
  _write(record, args.out)
  return 0


def _write(record: dict, path: str) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, path)
  print(f"wrote {path}")


if __name__ == "__main__":
  sys.exit(main())
