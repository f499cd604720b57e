"""Fitting the catalyzer's shape to the data: d_out, r² and λ chosen by validation recall.

The paper fixes d_out=24, r²=79 for 64-bit codes (tuned on Deep1M) and cross-validates λ
only. On data of another intrinsic dimension another shape wins, so ``select_shape``
screens candidates at a code budget with short runs on a sample of the *training*
vectors (validation split carved from them; queries are never read), one coordinate at a
time: first the output dimension (each with the largest lattice radius whose code fits),
then λ over the paper's grid at the chosen dimension. ``train`` calls it when a config
leaves ``d_out`` or ``lambda_koleo`` unset.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Sequence

import numpy as np

from spreading_jax import datasets, lattice
from spreading_jax._validation import check_int, check_vectors
from spreading_jax.config import TrainConfig

logger = logging.getLogger("spreading_jax")

# The paper's cross-validation grid for λ (section 4.2).
PAPER_LAMBDAS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
# Output dimensions screened for lattice codes (the paper's table has 16, 24, 32, 40).
D_OUT_CANDIDATES = (16, 24, 32, 40, 48, 64)
# λ used while screening d_out when λ is to be chosen too: the original's default.
SCREEN_LAMBDA = 0.05


@dataclasses.dataclass
class Selection:
  """The chosen shape and how it was chosen.

  Attributes:
    d_out, r2, lambda_koleo: the chosen values (r2 None for sign codes).
    metric: the validation recall that ranked the candidates (e.g. "lattice_R@10").
    table: one row per screened candidate: d_out, r2, lambda_koleo, the validation
      recalls and the seconds it took.
    screen_epochs, screen_rows: length and training-set size of each screening run.
    cost_s: wall time of the whole selection.
    row_epochs: training vectors x epochs spent screening (compare with the final run's
      epochs x training vectors).
  """
  d_out: int
  r2: int | None
  lambda_koleo: float
  metric: str
  table: list[dict]
  screen_epochs: int
  screen_rows: int
  cost_s: float
  row_epochs: int

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  def format_table(self) -> str:
    """The screening table as aligned text, the chosen row marked with *."""
    keys = [k for k in self.table[0] if k.startswith(self.metric.split("_R@")[0] + "_R@")]
    lines = ["  d_out    r2   lambda  " + "  ".join(f"{k:>14}" for k in keys) + "      s"]
    for row in self.table:
      mark = "*" if (row["d_out"], row["r2"], row["lambda_koleo"]) == (
          self.d_out, self.r2, self.lambda_koleo) else " "
      r2 = "-" if row["r2"] is None else str(row["r2"])
      lines.append(f"{mark} {row['d_out']:>5} {r2:>5} {row['lambda_koleo']:>8g}  "
                   + "  ".join(f"{row[k]:>14.3f}" for k in keys) + f"  {row['seconds']:>5.0f}")
    return "\n".join(lines)


def candidate_shapes(bits: int, quantizer: str = "lattice",
                     d_outs: Sequence[int] = D_OUT_CANDIDATES) -> list[tuple[int, int | None]]:
  """(d_out, r2) pairs a ``bits``-bit code can hold: for lattice codes each d_out with the
  largest r² whose code fits (dimensions where none fits are skipped); for sign codes the
  single shape d_out = bits.

  Examples:
    >>> candidate_shapes(64, d_outs=(24, 32, 40))
    [(24, 79), (32, 36), (40, 24)]
  """
  bits = check_int("bits", bits, minimum=1)
  if quantizer == "sign":
    return [(bits, None)]
  if quantizer != "lattice":
    raise ValueError(f"quantizer={quantizer!r} must be 'lattice' or 'sign'")
  out = []
  for d in d_outs:
    try:
      out.append((int(d), lattice.zn_r2_for_bits(int(d), bits)))
    except ValueError:
      continue  # no sphere of Z^d fits this budget
  if not out:
    raise ValueError(f"no output dimension among {tuple(d_outs)} has a Zn code of {bits} bits")
  return out


def screening_size(n: int, epochs: int = 160) -> tuple[int, int]:
  """(epochs, rows) of each screening run for a final run of ``epochs`` epochs on n
  training vectors: min(8, epochs) epochs on a quarter of the rows (half of them, and at
  most 2,000, on small sets), never more than 50,000.

  With 6 output dimensions and the 6 values of λ (11 runs of 8 epochs), that is at most
  88 x n/2 = 44n row-epochs, and 22n from 8,000 vectors on: under half (80n) of the
  paper's 160-epoch run on the same n vectors."""
  rows = min(50_000, max(n // 4, min(n // 2, 2000)))
  return min(8, epochs), max(rows, 1)


def _screen_config(config: TrainConfig, rows: int, epochs: int) -> TrainConfig:
  nq = max(50, min(config.val_queries, rows // 10))
  nb = max(100, min(10_000, rows // 5))
  return config.replace(epochs=epochs, val_every=epochs, val_queries=nq, val_base=nb,
                        num_train=None, checkpoint_dir=None, log_dir=None, verbose=False)


def select_shape(config: TrainConfig, train_vectors, *, d_outs: Sequence[int] | None = None,
                 lambdas: Sequence[float] | None = None, screen_epochs: int | None = None,
                 screen_rows: int | None = None, mesh=None) -> Selection:
  """Chooses d_out (with its largest fitting r²) and λ by validation recall.

  Only what ``config`` leaves unset (None) is chosen: d_out when ``config.d_out`` is None
  (then r² too), λ when ``config.lambda_koleo`` is None. The code budget is
  ``config.bits`` of ``config.quantizer`` ("lattice": Zn codes, ranked by validation
  lattice recall@10; "sign": d_out = bits, ranked by sign recall@10).

  Args:
    config: the recipe to screen with (its other fields are kept).
    train_vectors: f32[n, d_in] training vectors, or a Dataset (only ``.train`` is read).
    d_outs: output dimensions to screen (lattice codes; default ``D_OUT_CANDIDATES``).
    lambdas: λ values to screen (default ``PAPER_LAMBDAS``).
    screen_epochs, screen_rows: length and sample size of each screening run (defaults:
      ``screening_size``).
    mesh: optional mesh the screening runs train on.

  Returns:
    a ``Selection``. Deterministic for ``config.seed``; ties go to the earlier candidate.
  """
  x = getattr(train_vectors, "train", train_vectors)
  check_vectors("training vectors", x, min_rows=2)
  n = int(x.shape[0])
  epochs, rows = screening_size(n, config.epochs)
  epochs = check_int("screen_epochs", screen_epochs if screen_epochs is not None else epochs,
                     minimum=1)
  rows = check_int("screen_rows", screen_rows if screen_rows is not None else rows, minimum=2,
                   maximum=n)
  sample = np.asarray(datasets.sample_rows(x, rows, config.seed + 7) if rows < n else x)
  d_outs = D_OUT_CANDIDATES if d_outs is None else tuple(d_outs)
  lambdas = PAPER_LAMBDAS if lambdas is None else tuple(lambdas)
  quantizer = config.quantizer
  metric = f"{quantizer}_R@10"
  shapes = candidate_shapes(config.bits, quantizer, d_outs)
  if config.d_out is not None:
    if config.r2 is None and quantizer == "lattice":
      shapes = [(config.d_out, lattice.zn_r2_for_bits(config.d_out, config.bits))]
    else:
      shapes = [(config.d_out, config.r2)]
  elif config.r2 is not None:
    raise ValueError(f"r2={config.r2} without d_out: give both, or neither (then each "
                     "screened d_out gets the largest r2 that fits bits)")
  lams = [float(v) for v in lambdas] if config.lambda_koleo is None else [config.lambda_koleo]
  base = _screen_config(config, rows, epochs)
  table: list[dict] = []
  t0 = time.perf_counter()

  def run(d_out: int, r2: int | None, lam: float) -> float:
    from spreading_jax.train import train  # pylint: disable=import-outside-toplevel
    t = time.perf_counter()
    cfg = base.replace(d_out=d_out, r2=r2, lambda_koleo=lam)
    result = train(cfg, sample, mesh=mesh)
    validated = [h for h in result.history if metric in h]
    best = max(validated, key=lambda h: h[metric])
    row: dict[str, Any] = {"d_out": d_out, "r2": r2, "lambda_koleo": lam}
    row.update({k: v for k, v in best.items() if "_R@" in k})
    row["seconds"] = round(time.perf_counter() - t, 2)
    table.append(row)
    logger.info("screen d_out=%d r2=%s lambda=%g: %s %.3f (%.0fs)", d_out, r2, lam, metric,
                row[metric], row["seconds"])
    return row[metric]

  # Coordinate search: the dimension at a fixed λ, then λ at the chosen dimension.
  lam0 = lams[0] if len(lams) == 1 else SCREEN_LAMBDA
  scores = [run(d, r2, lam0) for d, r2 in shapes]
  d_out, r2 = shapes[int(np.argmax(scores))]
  best_score, lam = max(scores), lam0
  for v in lams:
    if v == lam0:
      continue
    s = run(d_out, r2, v)
    if s > best_score:
      best_score, lam = s, v
  return Selection(d_out, r2, lam, metric, table, epochs, rows,
                   round(time.perf_counter() - t0, 2), len(table) * epochs * rows)
