"""Evaluation protocols: 1-recall@k of a quantizer applied to (catalyzed) vectors.

Every protocol takes a ``Dataset`` and a ``transform`` (raw vectors -> vectors the quantizer
sees: a trained catalyzer's ``apply``, a random projection, or None for the raw vectors),
encodes the database, searches the queries and returns ``{k: recall}``.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from jax.sharding import Mesh

from spreading_jax import binary, lattice, search
from spreading_jax._validation import check_int

Transform = Callable[[np.ndarray], np.ndarray]
KS = (1, 10, 100)


def _ks(groundtruth, nb: int, ks: Sequence[int]) -> tuple[int, ...]:
  out = tuple(k for k in ks if k <= nb)
  if not out:
    raise ValueError(f"no k in {tuple(ks)} fits a database of {nb} vectors")
  return out


def _apply(transform: Transform | None, x) -> np.ndarray:
  return np.asarray(x if transform is None else transform(x), np.float32)


def encode_lattice(codec: lattice.ZnSphereCodec, y, chunk: int = 65536) -> np.ndarray:
  """Lattice codes of y: f32[n, d] -> u32[n, code_words], encoded chunk by chunk."""
  parts = [np.asarray(codec.encode(np.asarray(y[s:s + chunk], np.float32)))
           for s in range(0, y.shape[0], chunk)]
  return np.concatenate(parts, axis=0)


def evaluate_lattice(dataset, transform: Transform | None, codec: lattice.ZnSphereCodec, *,
                     ks: Sequence[int] = KS, symmetric: bool = False,
                     mesh: Mesh | None = None) -> dict[int, float]:
  """Catalyzer + Zn lattice: database encoded to lattice codes, asymmetric search (the
  paper's main protocol), or symmetric with ``symmetric=True``."""
  ks = _ks(dataset.groundtruth, dataset.nb, ks)
  yb, yq = _apply(transform, dataset.base), _apply(transform, dataset.query)
  codes = encode_lattice(codec, yb)
  _, ids = search.search_lattice(yq, codes, codec, max(ks), symmetric=symmetric, mesh=mesh)
  return search.recall_at(ids, dataset.groundtruth, ks)


def evaluate_sign(dataset, transform: Transform | None, *, ks: Sequence[int] = KS,
                  mesh: Mesh | None = None) -> dict[int, float]:
  """Catalyzer + sign bits: one bit per output dimension, symmetric Hamming search."""
  ks = _ks(dataset.groundtruth, dataset.nb, ks)
  cb = binary.sign_codes(_apply(transform, dataset.base))
  cq = binary.sign_codes(_apply(transform, dataset.query))
  _, ids = search.hamming_knn(cq, cb, max(ks), mesh=mesh)
  return search.recall_at(ids, dataset.groundtruth, ks)


def evaluate_exact(dataset, transform: Transform | None = None, *, ks: Sequence[int] = KS,
                   mesh: Mesh | None = None) -> dict[int, float]:
  """Exact L2 search on the (transformed) vectors: the ceiling of any quantizer on them."""
  ks = _ks(dataset.groundtruth, dataset.nb, ks)
  _, ids = search.knn(_apply(transform, dataset.query), _apply(transform, dataset.base),
                      max(ks), mesh=mesh)
  return search.recall_at(ids, dataset.groundtruth, ks)


def random_projection(d_in: int, d_out: int, seed: int = 0) -> Transform:
  """A random orthogonal projection to ``d_out`` dims followed by L2 normalization.

  The catalyzer-free baseline for a fixed quantizer: the same lattice applied to a
  projection that preserves angles on average but was not trained to spread the data.
  """
  d_in = check_int("d_in", d_in, minimum=1)
  d_out = check_int("d_out", d_out, minimum=1, maximum=d_in)
  rng = np.random.default_rng(seed)
  q, _ = np.linalg.qr(rng.standard_normal((d_in, d_out)))  # orthonormal columns
  q = q.astype(np.float32)

  def transform(x):
    y = np.asarray(x, np.float32) @ q
    return y / np.maximum(np.linalg.norm(y, axis=1, keepdims=True), 1e-12)

  return transform


def format_table(rows: Sequence[dict], ks: Sequence[int] = KS) -> str:
  """Markdown table of rows {"method", "bits", "recall": {k: r}} as percentages."""
  head = "| method | bits | " + " | ".join(f"R@{k}" for k in ks) + " |"
  lines = [head, "|---|---|" + "---|" * len(ks)]
  for r in rows:
    rec = r["recall"]
    cells = [f"{100 * rec[k]:.1f}" if k in rec else "" for k in ks]
    lines.append(f"| {r['method']} | {r.get('bits', '')} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# Paper experiments: each returns rows for ``format_table``; ``run_experiment`` trains,
# evaluates and writes <name>.json, <name>.md and PNG plots.

EXPERIMENTS = ("table1_lattice", "table2_binary", "crossval_lambda", "dout_sweep")
LAMBDAS = (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05)


def _faiss_row(rows, method, name, dataset, bits, transform=None):
  from spreading_jax import baselines  # pylint: disable=import-outside-toplevel
  try:
    rows.append({"method": method, "bits": bits,
                 "recall": baselines.evaluate_method(name, dataset, bits, transform)})
  except ImportError as e:
    rows.append({"method": f"{method} (skipped: {e})", "bits": bits, "recall": {}})


def _train(config, dataset, **changes):
  from spreading_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  return train_lib.train(config.replace(**changes), dataset)


def table1_lattice(dataset, config) -> tuple[list[dict], dict]:
  """64-bit table: PQ, OPQ, LSQ on raw vectors; catalyzer + OPQ / lattice / end-to-end."""
  rows = []
  for name in ("pq", "opq", "lsq"):
    _faiss_row(rows, name.upper(), name, dataset, config.bits)
  model = _train(config, dataset)
  codec = lattice.ZnSphereCodec(config.d_out, config.lattice_r2())
  _faiss_row(rows, "catalyzer+OPQ", "opq", dataset, config.bits, model.apply)
  rows.append({"method": "catalyzer+lattice", "bits": codec.code_bits,
               "recall": evaluate_lattice(dataset, model.apply, codec)})
  e2e = _train(config, dataset, end_to_end=True)
  rows.append({"method": "catalyzer+lattice end-to-end", "bits": codec.code_bits,
               "recall": evaluate_lattice(dataset, e2e.apply, codec)})
  return rows, {"catalyzer": model, "end-to-end": e2e}


def table2_binary(dataset, config, bits: Sequence[int] = (16, 32, 64, 128)):
  """Binary codes: LSH, ITQ and catalyzer + sign with d_out = bits."""
  rows, models = [], {}
  for b in bits:
    _faiss_row(rows, "LSH", "lsh", dataset, b)
    _faiss_row(rows, "ITQ", "itq", dataset, b)
    model = _train(config, dataset, d_out=b, r2=None, bits=b)
    rows.append({"method": "catalyzer+sign", "bits": b,
                 "recall": evaluate_sign(dataset, model.apply)})
    models[f"catalyzer_{b}"] = model
  return rows, models


def crossval_lambda(dataset, config, lambdas: Sequence[float] = LAMBDAS):
  """λ grid: the λ with the best validation lattice R@10 (last history record) is selected;
  every row reports test recall."""
  rows, best, models = [], None, {}
  codec = lattice.ZnSphereCodec(config.d_out, config.lattice_r2())
  for lam in lambdas:
    model = _train(config, dataset, lambda_koleo=lam)
    val = [h["lattice_R@10"] for h in model.history if "lattice_R@10" in h]
    score = val[-1] if val else float("nan")
    rows.append({"method": f"lambda={lam} (val R@10 {score:.3f})", "bits": codec.code_bits,
                 "recall": evaluate_lattice(dataset, model.apply, codec), "val": score,
                 "lambda": lam})
    models[f"lambda={lam}"] = model
    if val and (best is None or score > best["val"]):
      best = rows[-1]
  if best is not None:
    best["method"] += " <- selected"
    models["catalyzer"] = models[f"lambda={best['lambda']}"]
  return rows, models


def dout_sweep(dataset, config, d_outs: Sequence[int] = (16, 24, 32, 40)):
  """Fixed bit budget, varying d_out with the largest radius whose code fits."""
  rows, models = [], {}
  for d_out in d_outs:
    r2 = lattice.zn_r2_for_bits(d_out, config.bits)
    model = _train(config, dataset, d_out=d_out, r2=r2)
    codec = lattice.ZnSphereCodec(d_out, r2)
    rows.append({"method": f"d_out={d_out} r2={r2}", "bits": codec.code_bits,
                 "recall": evaluate_lattice(dataset, model.apply, codec)})
    models[f"catalyzer_{d_out}"] = model
  return rows, models


def _pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend (imported on first use)."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def _save_figure(plt, fig, path) -> None:
  """Writes ``fig`` as PNG to ``path`` atomically and frees it."""
  from spreading_jax._files import atomic_output  # pylint: disable=import-outside-toplevel
  with atomic_output(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110)
  plt.close(fig)


def nn_distance_histogram(dataset, transform: Transform, path: str) -> None:
  """PNG of nearest-neighbour distance histograms of the base before and after ``transform``
  (both L2-normalized): a catalyzer spreads points, moving the histogram right."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for label, x in (("input", _apply(None, dataset.base)),
                   ("catalyzer", _apply(transform, dataset.base))):
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    dist, _ = search.knn(x, x, 2)
    ax.hist(np.sqrt(np.maximum(np.asarray(dist)[:, 1], 0)), bins=50, alpha=0.6, label=label)
  ax.set_xlabel("distance to nearest neighbour (unit sphere)")
  ax.legend()
  fig.tight_layout()
  _save_figure(plt, fig, path)


def plot_training(histories: dict[str, list[dict]], path):
  """PNG of training curves: loss per epoch (left) and validation lattice R@10 / sign R@10
  (right), one line per named history (``TrainResult.history``). Returns ``path``."""
  plt = _pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
  for name, history in histories.items():
    ax1.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker=".",
             label=name)
    val = [h for h in history if "lattice_R@10" in h]
    if val:
      line, = ax2.plot([h["epoch"] for h in val], [h["lattice_R@10"] for h in val], marker="o",
                       label=f"{name} lattice R@10")
      ax2.plot([h["epoch"] for h in val], [h["sign_R@10"] for h in val], marker="x",
               linestyle="--", color=line.get_color(), label=f"{name} sign R@10")
  ax1.set_xlabel("epoch"), ax1.set_title("training loss (triplet + λ·KoLeo)")
  ax2.set_xlabel("epoch"), ax2.set_title("validation 1-recall@10")
  for ax in (ax1, ax2):
    if ax.lines:
      ax.legend(fontsize=7)
  fig.tight_layout()
  _save_figure(plt, fig, path)
  return path


def _lambda_plot(rows, ks, path) -> None:
  """crossval_lambda: test recall against λ (log axis, λ=0 drawn as a dashed level)."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for k in ks:
    pts = sorted((r["lambda"], r["recall"][k]) for r in rows if r["lambda"] > 0)
    line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"R@{k}")
    for r in rows:
      if r["lambda"] == 0:
        ax.axhline(r["recall"][k], linestyle="--", color=line.get_color(), linewidth=0.8)
  ax.set_xscale("log")
  ax.set_xlabel("λ (KoLeo weight); dashed: λ=0")
  ax.set_ylabel("test 1-recall (catalyzer + lattice)")
  ax.legend()
  fig.tight_layout()
  _save_figure(plt, fig, path)


def _recall_plot(rows, ks, path) -> None:
  plt = _pyplot()
  rows = [r for r in rows if r["recall"]]
  fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.5))
  names = [f"{r['method']} ({r['bits']}b)" for r in rows]
  for j, k in enumerate(ks):
    ax.barh(np.arange(len(rows)) + 0.25 * j, [r["recall"].get(k, 0) for r in rows], 0.25,
            label=f"R@{k}")
  ax.set_yticks(np.arange(len(rows)) + 0.25, names, fontsize=7)
  ax.set_xlabel("1-recall")
  ax.legend()
  fig.tight_layout()
  _save_figure(plt, fig, path)


_GRID_ARG = {"table2_binary": ("bits", int), "crossval_lambda": ("lambdas", float),
             "dout_sweep": ("d_outs", int)}


def run_experiment(name: str, argv: Sequence[str] | None = None) -> dict:
  """Parses experiment arguments, runs experiment ``name`` and writes its report files."""
  import argparse  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel
  import os  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  import time  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from spreading_jax import _files, datasets  # pylint: disable=import-outside-toplevel
  from spreading_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  if name not in EXPERIMENTS:
    raise ValueError(f"unknown experiment {name!r}; known: {EXPERIMENTS}")
  p = argparse.ArgumentParser(prog=name, description=globals()[name].__doc__)
  p.add_argument("--dataset", default="fashion-mnist",
                 help="dataset name (siftsmall, fashion-mnist, wordllama-256, deep1m, bigann1m) "
                 "or an ann-benchmarks .hdf5 path")
  p.add_argument("--root", default=None, help="data root (default: $SPREADING_DATA or "
                 "../shared/data)")
  p.add_argument("--epochs", type=int, default=160)
  p.add_argument("--hidden", default="1024,1024", help="comma-separated hidden widths")
  p.add_argument("--out", default=None, help="default experiments/results/<dataset>/")
  p.add_argument("--nb", type=int, default=None, help="subset: database size")
  p.add_argument("--nq", type=int, default=None, help="subset: number of queries")
  p.add_argument("--nt", type=int, default=None, help="subset: training size")
  p.add_argument("--val-queries", type=int, default=1000)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--bits", type=int, default=64, help="code budget (table1, dout_sweep)")
  p.add_argument("--d-out", type=int, default=24, help="catalyzer output dim (table1, crossval)")
  p.add_argument("--grid", default=None,
                 help="comma-separated sweep values (bits, lambdas or d_outs) instead of the "
                 "paper's")
  args = p.parse_args(argv)
  ds = datasets.load_dataset(args.dataset, args.root)
  if args.nb or args.nq or args.nt:
    ds = ds.subset(nb=args.nb, nq=args.nq, nt=args.nt)
  config = train_lib.TrainConfig(
      epochs=args.epochs, hidden=tuple(int(h) for h in args.hidden.split(",") if h),
      seed=args.seed, val_queries=args.val_queries, val_every=max(1, args.epochs // 5),
      verbose=False, bits=args.bits, d_out=args.d_out,
      r2=79 if (args.bits, args.d_out) == (64, 24) else None)
  out = args.out or os.path.join("experiments", "results", os.path.basename(str(args.dataset)))
  os.makedirs(out, exist_ok=True)
  start = time.time()
  grid = {}
  if args.grid and name in _GRID_ARG:
    arg, cast = _GRID_ARG[name]
    grid[arg] = tuple(cast(v) for v in args.grid.split(",") if v)
  rows, models = globals()[name](ds, config, **grid)
  wall = time.time() - start
  ks = tuple(k for k in KS if k <= ds.nb)
  table = format_table(rows, ks)
  _recall_plot(rows, ks, os.path.join(out, f"{name}.png"))
  if name == "crossval_lambda":
    _lambda_plot(rows, ks, os.path.join(out, f"{name}_lambda.png"))
  if models:
    model = models.get("catalyzer", next(iter(models.values())))
    nn_distance_histogram(ds, model.apply, os.path.join(out, f"{name}_nn_hist.png"))
    unique = {}  # "catalyzer" may alias another entry (crossval's selected λ)
    for n, m in models.items():
      if all(m is not other for other in unique.values()):
        unique[n] = m
    plot_training({n: m.history for n, m in unique.items()},
                  os.path.join(out, f"{name}_training.png"))
  try:
    import faiss  # pylint: disable=import-outside-toplevel
    faiss_version = faiss.__version__
  except ImportError:
    faiss_version = None
  report = {"experiment": name, "command": " ".join([sys.argv[0], *(argv or sys.argv[1:])]),
            "args": vars(args), "config": config.to_dict(), "seed": args.seed,
            "versions": {"jax": jax.__version__, "numpy": np.__version__, "faiss": faiss_version},
            "wall_time_s": wall, "sizes": {"nt": ds.nt, "nb": ds.nb, "nq": ds.nq},
            "rows": [{**r, "recall": {str(k): v for k, v in r["recall"].items()}} for r in rows]}
  with _files.atomic_output(os.path.join(out, f"{name}.json")) as tmp:
    with open(tmp, "w") as f:
      json.dump(report, f, indent=1, default=str)
  with _files.atomic_output(os.path.join(out, f"{name}.md")) as tmp:
    with open(tmp, "w") as f:
      f.write(f"# {name} on {args.dataset}\n\n`{report['command']}`\n\n{table}\n\n"
              f"wall time {wall:.0f} s, nt={ds.nt} nb={ds.nb} nq={ds.nq}\n")
  print(table)
  return report
