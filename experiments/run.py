"""Runs one of the paper's experiments from a config file (big_vision style).

    python experiments/run.py experiments/configs/table1_lattice.py:fashion-mnist
    python experiments/run.py experiments/configs/dout_sweep.py:siftsmall --set epochs=1

A config is a python file whose ``get_config(arg)`` returns a dict: "train", the whole
``TrainConfig`` the experiment starts from (each experiment varies the fields its grid
sweeps), and the experiment's own keys of ``KEYS`` (``arg`` is the text after ":", the
dataset); its docstring states the exact command, the expected runtime and the numbers a
recorded run produced. The same file format is ``spreading-jax train --config``'s
(``spreading_jax.cli.load_config`` reads both). ``--set key=value`` replaces any
TrainConfig field (parsed by its type, e.g. ``--set batch_size=128 --set bn_mode=joint``)
or one of ``KEYS``; it changes that field only (``--set epochs=160`` keeps the config's
``val_every``: set it too). The run writes ``<out>/<name>.json`` (command, config, the whole
TrainConfig, versions, device, wall time, every row and the training histories),
``<out>/<name>.md`` and PNG plots; ``<out>`` defaults to ``experiments/results/<dataset>/``.
``--log-dir DIR`` also writes TensorBoard event files of every trained model to
``DIR/<name>/<model>/``, one step per epoch.

Experiments (the ``experiment`` key): ``table1_lattice``, ``table2_binary``,
``crossval_lambda``, ``dout_sweep``, ``lattice_ablation``, ``validation_ranking``,
``auto_shape``; each sweeps ``grid`` (or its paper default) and returns recall rows built
from ``spreading_jax.evaluate``'s protocols.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Callable, Sequence

import numpy as np

from spreading_jax import baselines, datasets, evaluate, lattice, report, selection
from spreading_jax.autoshape import fit
from spreading_jax.cli import load_config
from spreading_jax.train import (TrainConfig, TrainResult, split_indices, train,
                                 train_many, validation_recalls, validation_split)


def _optional(parse: Callable[[str], Any]) -> Callable[[str], Any]:
  """A --set parser that reads "none" as None and anything else with ``parse``."""
  return lambda text: None if text.strip().lower() in ("none", "null") else parse(text)


def _numbers(text: str) -> tuple[float, ...]:
  """``"16,32"`` -> (16, 32); ``"0,0.05"`` -> (0, 0.05) (integers stay integers)."""
  try:
    return tuple(int(v) if v.strip().lstrip("-").isdigit() else float(v)
                 for v in text.split(","))
  except ValueError:
    raise ValueError(f"{text!r} must be comma-separated numbers") from None


def _integer(text: str) -> int:
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"{text!r} must be an integer") from None


# The experiment's own keys beside "train": name -> (default, parser of a --set value).
KEYS: dict[str, tuple[Any, Callable[[str], Any]]] = {
    "experiment": (None, str),                 # one of EXPERIMENTS
    "name": (None, _optional(str)),            # report file stem (default: the experiment)
    "dataset": ("fashion-mnist", str),
    "root": (None, _optional(str)),            # data root (default: $SPREADING_DATA)
    "nb": (None, _optional(_integer)),         # subset sizes (None: the whole split)
    "nq": (None, _optional(_integer)),
    "nt": (None, _optional(_integer)),
    "grid": (None, _optional(_numbers)),       # the swept values (None: the paper's)
}
LAMBDAS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
Rows = list[dict]
Models = dict[str, TrainResult]


def _faiss_row(rows: Rows, method: str, name: str, dataset, bits: int, transform=None) -> None:
  try:
    rows.append({"method": method, "bits": bits,
                 "recall": baselines.evaluate_method(name, dataset, bits, transform)})
  except ImportError as e:
    rows.append({"method": f"{method} (skipped: {e})", "bits": bits, "recall": {}})


def _logged(config: TrainConfig, name: str) -> TrainConfig:
  """``config`` with its TensorBoard events (when ``log_dir`` is set) in ``log_dir/name``:
  one TensorBoard run per trained model."""
  if config.log_dir is None:
    return config
  return config.replace(log_dir=os.path.join(config.log_dir, name))


def table1_lattice(dataset, config: TrainConfig, grid=None) -> tuple[Rows, Models]:
  """64-bit table: PQ, OPQ, LSQ on raw vectors; catalyzer + OPQ / lattice / end-to-end."""
  del grid
  rows = []
  for name in ("pq", "opq", "lsq"):
    _faiss_row(rows, name.upper(), name, dataset, config.bits)
  model = fit(_logged(config, "catalyzer"), dataset)
  codec = lattice.zn_codec(config.d_out, config.bits, config.r2)
  _faiss_row(rows, "catalyzer+OPQ", "opq", dataset, config.bits, model.apply)
  rows.append({"method": "catalyzer+lattice", "bits": codec.code_bits,
               "recall": evaluate.evaluate_lattice(dataset, model.apply, codec)})
  e2e = fit(_logged(config.replace(end_to_end=True), "end-to-end"), dataset)
  rows.append({"method": "catalyzer+lattice end-to-end", "bits": codec.code_bits,
               "recall": evaluate.evaluate_lattice(dataset, e2e.apply, codec)})
  return rows, {"catalyzer": model, "end-to-end": e2e}


def table2_binary(dataset, config: TrainConfig, grid: Sequence[int] | None = None
                  ) -> tuple[Rows, Models]:
  """Binary codes: LSH, ITQ and catalyzer + sign with d_out = bits."""
  rows, models = [], {}
  for b in grid or (16, 32, 64, 128):
    _faiss_row(rows, "LSH", "lsh", dataset, b)
    _faiss_row(rows, "ITQ", "itq", dataset, b)
    model = fit(_logged(config.replace(d_out=b, r2=None, bits=b), f"catalyzer_{b}"), dataset)
    rows.append({"method": "catalyzer+sign", "bits": b,
                 "recall": evaluate.evaluate_sign(dataset, model.apply)})
    models[f"catalyzer_{b}"] = model
  return rows, models


def crossval_lambda(dataset, config: TrainConfig, grid: Sequence[float] | None = None
                    ) -> tuple[Rows, Models]:
  """λ grid, trained as one program (``train_many``): the λ with the best validation lattice
  R@10 (best epoch) is selected; every row reports test recall."""
  rows, best, models = [], None, {}
  codec = lattice.zn_codec(config.d_out, config.bits, config.r2)
  grid = tuple(grid or LAMBDAS)
  trained = train_many([_logged(config.replace(lambda_koleo=lam), f"lambda={lam}")
                        for lam in grid], dataset)
  for lam, model in zip(grid, trained):
    val = [h["lattice_R@10"] for h in model.history if "lattice_R@10" in h]
    score = max(val) if val else float("nan")
    rows.append({"method": f"lambda={lam} (val R@10 {score:.3f})", "bits": codec.code_bits,
                 "recall": evaluate.evaluate_lattice(dataset, model.apply, codec), "val": score,
                 "lambda": lam})
    models[f"lambda={lam}"] = model
    if val and (best is None or score > best["val"]):
      best = rows[-1]
  if best is not None:
    best["method"] += " <- selected"
    models["catalyzer"] = models[f"lambda={best['lambda']}"]
  return rows, models


def dout_sweep(dataset, config: TrainConfig, grid: Sequence[int] | None = None
               ) -> tuple[Rows, Models]:
  """Fixed bit budget, varying d_out with the largest radius whose code fits."""
  rows, models = [], {}
  for d_out in grid or (16, 24, 32, 40):
    codec = lattice.zn_codec(d_out, config.bits)
    model = fit(_logged(config.replace(d_out=d_out, r2=codec.r2), f"catalyzer_{d_out}"),
                dataset)
    rows.append({"method": f"d_out={d_out} r2={codec.r2}", "bits": codec.code_bits,
                 "recall": evaluate.evaluate_lattice(dataset, model.apply, codec)})
    models[f"catalyzer_{d_out}"] = model
  return rows, models


def lattice_ablation(dataset, config: TrainConfig, grid: Sequence[float] | None = None
                     ) -> tuple[Rows, Models]:
  """Does the catalyzer help the fixed lattice, and does KoLeo help the catalyzer? The same
  lattice on a random orthogonal projection to d_out dims, then on catalyzers trained with
  each λ of the grid (default λ=0.01 and λ=0)."""
  codec = lattice.zn_codec(config.d_out, config.bits, config.r2)
  proj = evaluate.random_projection(dataset.d, config.d_out, seed=config.seed)
  rows = [{"method": "random projection + Zn lattice", "bits": codec.code_bits,
           "lambda": None, "recall": evaluate.evaluate_lattice(dataset, proj, codec)}]
  models = {}
  for lam in grid or (0.01, 0.0):
    t = time.perf_counter()
    model = fit(_logged(config.replace(lambda_koleo=lam), f"lambda={lam:g}"), dataset)
    rows.append({"method": f"catalyzer (λ={lam:g}) + Zn lattice", "bits": codec.code_bits,
                 "lambda": lam, "train_seconds": round(time.perf_counter() - t, 1),
                 "recall": evaluate.evaluate_lattice(dataset, model.apply, codec)})
    models[f"lambda={lam:g}"] = model
  return rows, models


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
  """Spearman rank correlation (average ranks for ties).

  Example:
    >>> spearman([1, 2, 3, 4], [10, 30, 20, 40])
    0.8
  """
  def ranks(v):
    v = np.asarray(v, np.float64)
    order = np.argsort(v, kind="stable")
    r = np.empty(v.size)
    r[order] = np.arange(v.size)
    for x in np.unique(v):  # ties share their mean rank
      r[v == x] = r[v == x].mean()
    return r
  ra, rb = ranks(a), ranks(b)
  ra, rb = ra - ra.mean(), rb - rb.mean()
  den = float(np.sqrt((ra ** 2).sum() * (rb ** 2).sum()))
  return round(float((ra * rb).sum()) / den, 4) if den else float("nan")


def validation_ranking(dataset, config: TrainConfig, grid=None) -> tuple[Rows, Models]:
  """Does validation rank candidates as the test does? The λ grid (at the paper's d_out, as
  one program) and the d_out grid (``grid``, default 16 ... 64, at λ=0.05, each with the
  largest r² that fits ``bits``), each model trained once on the training vectors less
  ``val_queries`` held-out queries; its validation recall@10 is measured against (a) a
  database carved out of the training vectors (min(10k, n/5) rows, the previous default)
  and (b) every training vector but the queries (the current default), beside its test
  recall. Rows "Spearman ..." give the rank correlation of (a) and (b) with the test."""
  n = dataset.nt
  tc = config.replace(r2=None, val_every=1)
  train_idx, q_idx, b_idx = split_indices(n, tc)
  small = np.sort(np.random.default_rng(tc.seed + 3).permutation(b_idx)[
      :min(10_000, b_idx.size // 5)])
  x = dataset.train
  splits = {"small": validation_split(x[q_idx], x[small]),
            "large": validation_split(x[q_idx], x[b_idx])}
  xt = np.asarray(x[train_idx], np.float32)
  base = tc.replace(val_every=0)
  paper_d, paper_r2 = selection.incumbent_shape(config.bits)
  shapes = dict(selection.candidate_shapes(config.bits, "lattice",
                                           grid or selection.D_OUT_GRID))
  shapes[paper_d] = paper_r2
  runs = [("lambda", paper_d, lam) for lam in selection.PAPER_LAMBDAS] + [
      ("d_out", d, selection.PAPER_LAMBDA) for d in shapes if d != paper_d]
  configs = [base.replace(d_out=d, r2=shapes[d], lambda_koleo=lam) for _, d, lam in runs]
  trained = train_many([_logged(c, f"d_out={c.d_out},lambda={c.lambda_koleo:g}")
                        for c in configs], xt)
  rows, models = [], {}
  for (kind, d, lam), c, model in zip(runs, configs, trained):
    codec = lattice.zn_codec(c.d_out, c.bits, c.r2)
    yq = model.apply(x[q_idx])
    val = {k: validation_recalls(yq, model.apply(s.base), s, codec)["lattice_R@10"]
           for k, s in splits.items()}
    rows.append({"method": f"d_out={d} r2={c.r2} lambda={lam:g} (val R@10 small database "
                 f"{val['small']:.3f}, large {val['large']:.3f})", "bits": codec.code_bits,
                 "grid": kind, "d_out": d, "lambda": lam, "val_small": val["small"],
                 "val_large": val["large"],
                 "recall": evaluate.evaluate_lattice(dataset, model.apply, codec)})
    models[f"d_out={d},lambda={lam:g}"] = model
  shared = next(r for r in rows
                if r["d_out"] == paper_d and r["lambda"] == selection.PAPER_LAMBDA)
  for kind in ("lambda", "d_out"):
    grid_rows = [r for r in rows if r["grid"] == kind] + ([shared] if kind == "d_out" else [])
    test = [r["recall"][10] for r in grid_rows]
    rho = {k: spearman([r[f"val_{k}"] for r in grid_rows], test) for k in ("small", "large")}
    rows.append({"method": f"Spearman rho, validation vs test R@10 over the {kind} grid: small "
                 f"database {rho['small']}, large database {rho['large']}", "bits": "",
                 "grid": kind, "recall": {}, "spearman_small": rho["small"],
                 "spearman_large": rho["large"],
                 "validation_queries": int(q_idx.size), "db_small": int(small.size),
                 "db_large": int(b_idx.size)})
  return rows, models


def auto_shape(dataset, config: TrainConfig, grid=None) -> tuple[Rows, Models]:
  """The library's default (``fit``: the paper's shape unless a screened candidate beats it
  beyond the validation noise) against the paper's shape and faiss, for 64-bit lattice codes
  (vs OPQ8_64,PQ8 and LSQ) and 64-bit sign codes (vs LSH and ITQ); the selection's choice,
  reason, cost and screening table (validation recalls, gain and its bootstrap lower bound
  per candidate) are in each default row."""
  del grid
  rows, models = [], {}
  bits = config.bits
  for quantizer in ("lattice", "sign"):
    auto = config.replace(quantizer=quantizer, d_out=None, r2=None, lambda_koleo=None)
    t = time.perf_counter()
    model = fit(_logged(auto, f"{quantizer}_default"), dataset)
    seconds = time.perf_counter() - t
    paper_d, paper_r2 = selection.incumbent_shape(bits, quantizer)
    paper = auto.replace(d_out=paper_d, r2=paper_r2, lambda_koleo=selection.PAPER_LAMBDA)

    def recall(m, quantizer=quantizer):
      if quantizer == "sign":
        return evaluate.evaluate_sign(dataset, m.apply)
      return evaluate.evaluate_lattice(dataset, m.apply, lattice.zn_codec(
          m.config.d_out, m.config.bits, m.config.r2))

    c, sel = model.config, model.selection or {}
    rows.append({"method": f"catalyzer + {quantizer}, default (chosen: d_out={c.d_out} "
                 f"lambda={c.lambda_koleo:g})", "bits": bits, "recall": recall(model),
                 "d_out": c.d_out, "r2": c.r2, "lambda": c.lambda_koleo,
                 "train_seconds": round(seconds, 1), "selection_s": sel.get("cost_s"),
                 "selection_row_epochs": sel.get("row_epochs"), "reason": sel.get("reason"),
                 "selection_table": sel.get("table")})
    models[f"{quantizer}_default"] = model
    if (c.d_out, c.lambda_koleo) == (paper.d_out, paper.lambda_koleo):
      rows.append({**rows[-1], "method": f"catalyzer + {quantizer}, the paper's shape (the "
                   "same run: the default kept it)"})
    else:
      t = time.perf_counter()
      ref = train(_logged(paper, f"{quantizer}_paper"), dataset)
      rows.append({"method": f"catalyzer + {quantizer}, the paper's shape", "bits": bits,
                   "recall": recall(ref), "d_out": paper.d_out, "r2": paper.r2,
                   "lambda": paper.lambda_koleo,
                   "train_seconds": round(time.perf_counter() - t, 1)})
      models[f"{quantizer}_paper"] = ref
    for name in (("opq_paper", "lsq") if quantizer == "lattice" else ("lsh", "itq")):
      label = baselines.opq_paper_factory(dataset.d, bits) if name == "opq_paper" else name.upper()
      _faiss_row(rows, label, name, dataset, bits)
  models["catalyzer"] = models["lattice_default"]
  return rows, models


EXPERIMENTS: dict[str, Callable[..., tuple[Rows, Models]]] = {
    f.__name__: f for f in (table1_lattice, table2_binary, crossval_lambda, dout_sweep,
                            lattice_ablation, validation_ranking, auto_shape)}


def run(config: dict, out: str | None = None, command: str | None = None,
        log_dir: str | None = None) -> dict:
  """Runs ``config`` (``load_config``'s dict: "train" and ``KEYS``) and writes its report;
  returns the JSON payload.

  With ``log_dir``, every trained model writes TensorBoard events to
  ``log_dir/<name>/<model>`` (e.g. ``runs/crossval_lambda/lambda=0.01``)."""
  name = config["experiment"]
  if name not in EXPERIMENTS:
    raise ValueError(f"experiment={name!r}; known: {sorted(EXPERIMENTS)}")
  stem = config["name"] or name
  ds = datasets.load_dataset(config["dataset"], config["root"])
  if config["nb"] or config["nq"] or config["nt"]:
    ds = ds.subset(nb=config["nb"], nq=config["nq"], nt=config["nt"])
  tc = config["train"]
  if log_dir is not None:
    tc = tc.replace(log_dir=os.path.join(log_dir, stem))
  out = out or os.path.join("experiments", "results", os.path.basename(str(config["dataset"])))
  start = time.time()
  grid = config["grid"]
  grid = None if grid is None else tuple(grid) if isinstance(grid, (list, tuple)) else (grid,)
  rows, models = EXPERIMENTS[name](ds, tc, grid)
  wall = time.time() - start
  ks = tuple(k for k in evaluate.KS if k <= ds.nb)
  table = evaluate.format_table(rows, ks)
  report.recall_bars(rows, ks, os.path.join(out, f"{stem}.png"))
  lams = [r for r in rows if r.get("lambda") is not None]
  if name == "crossval_lambda" and lams:
    report.recall_curve(
        {f"R@{k}": [(r["lambda"], r["recall"][k]) for r in lams if r["lambda"] > 0]
         for k in ks}, os.path.join(out, f"{stem}_lambda.png"),
        levels={f"R@{k}": r["recall"][k] for k in ks for r in lams if r["lambda"] == 0},
        xlabel="λ (KoLeo weight); dashed: λ=0", ylabel="test 1-recall (catalyzer + lattice)",
        logx=True)
  unique = {}  # "catalyzer" may alias another entry (crossval's selected λ)
  for n, m in models.items():
    if all(m is not other for other in unique.values()):
      unique[n] = m
  if models:
    model = models.get("catalyzer", next(iter(models.values())))
    report.nn_distance_histogram(ds, model.apply, os.path.join(out, f"{stem}_nn_hist.png"))
    report.plot_training({n: m.history for n, m in unique.items()},
                         os.path.join(out, f"{stem}_training.png"))
  command = report.portable_command(command or " ".join(["python", *sys.argv]))
  payload = {"experiment": name, "command": command,
             "config": {k: v for k, v in config.items() if k != "train"},
             "train_config": tc.replace(log_dir=None).to_dict(), "seed": tc.seed,
             "versions": report.environment(), "wall_time_s": wall,
             "sizes": {"nt": ds.nt, "nb": ds.nb, "nq": ds.nq},
             "rows": [{**r, "recall": {str(k): v for k, v in r["recall"].items()}}
                      for r in rows],
             "histories": {n: m.history for n, m in unique.items()}}
  report.write_report(out, stem, payload,
                      f"# {stem} on {config['dataset']}\n\n`{command}`\n\n{table}\n\n"
                      f"wall time {wall:.0f} s, nt={ds.nt} nb={ds.nb} nq={ds.nq}\n")
  print(table)
  return payload


def main(argv: Sequence[str] | None = None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("config", help="config file, optionally with :ARG (e.g. "
                 "experiments/configs/table1_lattice.py:siftsmall)")
  p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                 help="replace a TrainConfig field or a config key (repeatable), e.g. "
                 "--set epochs=1 --set batch_size=128")
  p.add_argument("--out", default=None, help="report directory (default "
                 "experiments/results/<dataset>/)")
  p.add_argument("--log-dir", default=None, help="TensorBoard event files of every trained "
                 "model, in LOG_DIR/<name>/<model>/ (one step per epoch)")
  args = p.parse_args(argv)
  try:
    config = load_config(args.config, args.set, KEYS)
    if config["experiment"] not in EXPERIMENTS:
      raise ValueError(f"{args.config}: experiment={config['experiment']!r}; known: "
                       f"{sorted(EXPERIMENTS)}")
  except ValueError as e:
    p.error(str(e))
  argv = sys.argv[1:] if argv is None else list(argv)
  return run(config, args.out, command=" ".join(["python experiments/run.py", *argv]),
             log_dir=args.log_dir)


if __name__ == "__main__":
  main()
