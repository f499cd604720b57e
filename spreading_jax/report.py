"""Reports of runs: one JSON + Markdown writer, the run's environment, and PNG plots.

Every experiment, the demo and the CLI write their results through ``write_report`` so that
each table has its JSON (command, config, versions, device, wall time) next to it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np

from spreading_jax import search
from spreading_jax.datasets import Dataset


def environment(machine: bool = False) -> dict:
  """Versions and device of this process: {"jax", "numpy", "faiss" (or None), "device"};
  with ``machine`` (what timings are measured on, the benchmarks' JSON) also "backend",
  "devices", "cpu_count", "machine", "processor", "date" and "load_average_at_end"."""
  try:
    import faiss  # pylint: disable=import-outside-toplevel
    faiss_version = faiss.__version__
  except ImportError:
    faiss_version = None
  env = {"jax": jax.__version__, "numpy": np.__version__, "faiss": faiss_version,
         "device": jax.devices()[0].device_kind}
  if machine:
    import platform  # pylint: disable=import-outside-toplevel
    import time  # pylint: disable=import-outside-toplevel
    env.update(backend=jax.default_backend(), devices=[d.device_kind for d in jax.devices()],
               cpu_count=os.cpu_count(), machine=platform.machine(), processor=_cpu_model(),
               date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
               # 1/5/15-minute load when the result is written: other jobs on the cores
               # distort rates
               load_average_at_end=os.getloadavg())
  return env


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  import platform  # pylint: disable=import-outside-toplevel
  return platform.processor()


# Flags whose absolute-path value gets another placeholder than the flag's own name.
_PLACEHOLDERS = {"--root": "DATA_ROOT"}


def portable_command(command: str, repo: str | os.PathLike | None = None) -> str:
  """``command`` as a user would type it on another machine, for a results file: a path
  inside the repository ``repo`` (default: the one this package runs from) becomes relative
  to it, and any other absolute path, which names this machine, becomes a placeholder named
  after its flag (``--torch-python /x/bin/python`` -> ``--torch-python TORCH_PYTHON``,
  ``--root`` -> ``DATA_ROOT``, a positional path -> ``PATH``); an interpreter path becomes
  its name.

  Example:
    >>> portable_command("/opt/py/bin/python /src/b.py --root /data --out=/scratch/o -k 3 x.npy",
    ...                  repo="/src")
    'python b.py --root DATA_ROOT --out=OUT -k 3 x.npy'
  """
  import shlex  # pylint: disable=import-outside-toplevel
  repo = os.path.abspath(repo if repo is not None else Path(__file__).resolve().parents[1])
  words, flag = [], None

  def portable(word: str, flag: str | None, first: bool) -> str:
    if not os.path.isabs(word):
      return word
    path = os.path.normpath(word)
    if first and os.path.basename(path).startswith("python"):
      return os.path.basename(path)
    if path.startswith(repo + os.sep):
      return os.path.relpath(path, repo)
    if flag is None:
      return "PATH"
    return _PLACEHOLDERS.get(flag, flag.lstrip("-").replace("-", "_").upper())

  for i, word in enumerate(shlex.split(command)):
    if word.startswith("--") and "=" in word:
      name, value = word.split("=", 1)
      words.append(f"{name}={portable(value, name, False)}")
      flag = None
    else:
      words.append(portable(word, flag, i == 0))
      flag = word if word.startswith("-") and len(word) > 1 else None
  return shlex.join(words)


def write_report(out: str | os.PathLike, name: str, payload: dict, markdown: str
                 ) -> tuple[Path, Path]:
  """Writes ``out/name.json`` (``payload``) and ``out/name.md`` (``markdown``) atomically.

  A ``command`` in ``payload`` is recorded as ``portable_command`` writes it.

  Args:
    out: directory, created if missing.
    name: file stem.
    payload: JSON-able dict (values JSON cannot encode are written as ``str``).
    markdown: the human-readable report.

  Returns:
    The two paths written.

  Example:
    >>> import tempfile
    >>> paths = write_report(tempfile.mkdtemp(), "run", {"recall": {1: 0.5}}, "R@1 50%")
    >>> [p.name for p in paths], json.loads(paths[0].read_text())
    (['run.json', 'run.md'], {'recall': {'1': 0.5}})
  """
  from spreading_jax._files import atomic_output  # pylint: disable=import-outside-toplevel
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  paths = out / f"{name}.json", out / f"{name}.md"
  if isinstance(payload.get("command"), str):
    payload = dict(payload, command=portable_command(payload["command"]))
  text = json.dumps(payload, indent=1, default=str)
  for path, content in zip(paths, (text, markdown.rstrip("\n") + "\n")):
    with atomic_output(path) as tmp:
      Path(tmp).write_text(content, encoding="utf-8")
  return paths


# ---------------------------------------------------------------------------------------
# Plots (matplotlib on the non-interactive Agg backend, imported on first use).

def _pyplot():
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def save_figure(fig, path: str | os.PathLike) -> Path:
  """Writes a matplotlib figure as PNG to ``path`` atomically and frees it."""
  from spreading_jax._files import atomic_output  # pylint: disable=import-outside-toplevel
  with atomic_output(path) as tmp:
    fig.savefig(tmp, format="png", dpi=110)
  _pyplot().close(fig)
  return Path(path)


def nn_distance_histogram(dataset: Dataset, transform: Callable[[np.ndarray], np.ndarray],
                          path: str | os.PathLike) -> Path:
  """PNG of nearest-neighbour distance histograms of the base before and after ``transform``
  (both L2-normalized): a catalyzer spreads points, moving the histogram right."""
  fig, ax = _pyplot().subplots(figsize=(5, 3.5))
  base = np.asarray(dataset.base, np.float32)
  for label, x in (("input", base), ("catalyzer", np.asarray(transform(base), np.float32))):
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    dist, _ = search.knn(x, x, 2)
    ax.hist(np.sqrt(np.maximum(np.asarray(dist)[:, 1], 0)), bins=50, alpha=0.6, label=label)
  ax.set_xlabel("distance to nearest neighbour (unit sphere)")
  ax.legend()
  fig.tight_layout()
  return save_figure(fig, path)


def plot_training(histories: dict[str, list[dict]], path: str | os.PathLike) -> Path:
  """PNG of training curves: loss per epoch (left) and the validation R@10 of every
  quantizer the history holds (``{name}_R@10``: lattice, sign, ...; right), one colour per
  named history (``TrainResult.history``). Returns ``path``."""
  fig, (ax1, ax2) = _pyplot().subplots(1, 2, figsize=(10, 4))
  for name, history in histories.items():
    ax1.plot([h["epoch"] for h in history], [h["loss"] for h in history], marker=".",
             label=name)
    keys = list(dict.fromkeys(k for h in history for k in h if k.endswith("_R@10")))
    color = None
    for j, key in enumerate(keys):  # the first quantizer solid, the others dashed
      val = [h for h in history if key in h]
      line, = ax2.plot([h["epoch"] for h in val], [h[key] for h in val],
                       marker="o" if j == 0 else "x", linestyle="-" if j == 0 else "--",
                       color=color, label=f"{name} {key[:-len('_R@10')]} R@10")
      color = line.get_color()
  ax1.set_xlabel("epoch")
  ax1.set_title("training loss (triplet + λ·KoLeo)")
  ax2.set_xlabel("epoch")
  ax2.set_title("validation 1-recall@10")
  for ax in (ax1, ax2):
    if ax.lines:
      ax.legend(fontsize=7)
  fig.tight_layout()
  return save_figure(fig, path)


def recall_bars(rows: Sequence[dict], ks: Sequence[int], path: str | os.PathLike) -> Path:
  """PNG of horizontal recall bars, one group per row {"method", "bits", "recall"}."""
  rows = [r for r in rows if r["recall"]]
  fig, ax = _pyplot().subplots(figsize=(7, 0.4 * len(rows) + 1.5))
  names = [f"{r['method']} ({r['bits']}b)" for r in rows]
  for j, k in enumerate(ks):
    ax.barh(np.arange(len(rows)) + 0.25 * j, [r["recall"].get(k, 0) for r in rows], 0.25,
            label=f"R@{k}")
  ax.set_yticks(np.arange(len(rows)) + 0.25, names, fontsize=7)
  ax.set_xlabel("1-recall")
  ax.legend()
  fig.tight_layout()
  return save_figure(fig, path)


def recall_curve(points: dict[str, Sequence[tuple[float, float]]], path: str | os.PathLike, *,
                 xlabel: str, ylabel: str, levels: dict[str, float] | None = None,
                 logx: bool = False) -> Path:
  """PNG of recall against a swept parameter: one line per name of (x, recall) points,
  and a dashed horizontal level per name in ``levels`` (e.g. λ=0 on a log axis)."""
  fig, ax = _pyplot().subplots(figsize=(6, 4))
  for name, pts in points.items():
    pts = sorted(pts)
    line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    if levels and name in levels:
      ax.axhline(levels[name], linestyle="--", color=line.get_color(), linewidth=0.8)
  if logx:
    ax.set_xscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.legend()
  fig.tight_layout()
  return save_figure(fig, path)
