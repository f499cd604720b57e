"""Choosing what a config leaves unset (d_out with its r², λ) by validation that predicts the
test, never worse than the paper's shape.

The paper fixes d_out=24, r²=79 for 64-bit codes (tuned on Deep1M) and cross-validates λ
(the original's default is 0.05). That shape is the *incumbent*: ``select_shape`` screens
other candidates with short runs on the training vectors and a candidate replaces the
incumbent only when its validation gain is larger than the validation noise.

- Validation: held-out queries sampled from the training vectors, searched against every
  other training vector (exact groundtruth among them), not a small carve-out: a small
  database saturates and ranks shapes differently from a large test database. The
  screening runs train on a sample of the remaining rows.
- Search: one coordinate at a time, the output dimension at λ=0.05 (each d_out with the
  largest r² whose code fits), then λ over the paper's grid at the chosen dimension; the
  λ grid trains as one program (``train.train_many``).
- Noise: a paired bootstrap over the validation queries of the difference in per-query
  recall@10 between a candidate and the incumbent; the candidate wins when the lower
  ``alpha / m`` quantile of that difference is above 0 (one-sided, Bonferroni over the m
  candidates compared).
- Budget: the screening costs at most half of the final run's row-epochs; when that cannot
  pay for screening runs of at least ``MIN_SCREEN_EPOCHS`` epochs on ``min_screen_rows``
  vectors for both stages, the d_out stage alone is screened, else the λ stage alone, and
  when even that does not fit, the incumbent is kept and the record says why
  (``plan_screening``).

``spreading_jax.fit`` (``autoshape.py``, above this module) calls it, then trains the choice.
"""
from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Sequence

import numpy as np

from spreading_jax import quantizers
from spreading_jax._validation import check_int, check_vectors
from spreading_jax.config import TrainConfig
from spreading_jax.train import check_config, train_many

logger = logging.getLogger("spreading_jax")

# The paper's cross-validation grid for λ (section 4.2).
PAPER_LAMBDAS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05)
# Output dimensions of the hand sweeps (experiments' d_out grid; the paper's table has 16,
# 24, 32, 40).
D_OUT_GRID = (16, 24, 32, 40, 48, 64)
# Output dimensions screened for lattice codes: the grid from the paper's 24 up. d_out=16
# never beat 24 in the sweeps (test R@10 at 10 epochs, 16 vs 24: fashion-mnist 77.2 vs 80.1,
# fashion-mnist-mini 85.9 vs 85.9, siftsmall 82 vs 91, wordllama-256 71.8 vs 81.3), and
# the budget its run took buys longer screens of the rest: 19k rows x 10 epochs (auto_shape's
# runs after their validation split) screen five dimensions at 4 epochs x 4,750 rows, where
# six did not fit (3,958 rows a run).
D_OUT_CANDIDATES = (24, 32, 40, 48, 64)
# The paper's shape: d_out=24 (with the largest r² that fits the budget), and λ=0.05, the
# original code's default.
PAPER_D_OUT = 24
PAPER_LAMBDA = 0.05
# Smallest screening run worth ranking: shorter runs or fewer rows rank noise (2 epochs on
# 5k rows chose d_out=48 on fashion-mnist, 7.7 points below the paper's shape; 4 epochs on
# 4k rows kept d_out=24 there and on fashion-mnist-mini, and found d_out=48 on
# wordllama-256, 89.4 against 81.3 test R@10 at 10 epochs).
MIN_SCREEN_EPOCHS = 4
MIN_SCREEN_ROWS = 4000
# Screening runs: at most this many epochs and rows each, and validation queries.
MAX_SCREEN_EPOCHS = 8
MAX_SCREEN_ROWS = 50_000
SCREEN_QUERIES = 1000
# One-sided level of the test "candidate beats incumbent" (split over the candidates).
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 4000


@dataclasses.dataclass
class Selection:
  """The chosen shape and how it was chosen.

  Attributes:
    d_out, r2, lambda_koleo: the chosen values (r2 None for sign codes).
    metric: the validation recall that ranked the candidates (e.g. "lattice_R@10").
    incumbent: the paper's shape {"d_out", "r2", "lambda_koleo"} that a candidate must beat.
    table: one row per screened candidate: d_out, r2, lambda_koleo, the validation recalls,
      ``gain`` (validation recall@10 minus the incumbent's; the reference's in the λ stage,
      see ``reason``), ``gain_low`` (its bootstrap lower bound) and the seconds it took.
    reason: why the chosen shape won (or why nothing was screened).
    screen_epochs, screen_rows: length and training-set size of each screening run.
    val_queries, val_base: validation queries and database size of the screening.
    budget_row_epochs: the cap (half of the final run's row-epochs).
    cost_s: wall time of the whole selection.
    row_epochs: training vectors x epochs spent screening.
  """
  d_out: int
  r2: int | None
  lambda_koleo: float
  metric: str
  incumbent: dict
  table: list[dict]
  reason: str
  screen_epochs: int
  screen_rows: int
  val_queries: int
  val_base: int
  budget_row_epochs: int
  cost_s: float
  row_epochs: int

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict) -> "Selection":
    """A Selection from ``to_dict`` output (records of older versions lack some fields)."""
    if not isinstance(d, dict):
      raise ValueError(f"a selection record is a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    defaults = {"incumbent": {}, "reason": "", "val_queries": 0, "val_base": 0,
                "budget_row_epochs": 0, "table": []}
    missing = [k for k in fields if k not in d and k not in defaults]
    if missing:
      raise ValueError(f"selection record lacks {missing}")
    return cls(**{k: d.get(k, defaults.get(k)) for k in fields})

  def format_table(self) -> str:
    """The screening table as aligned text, the chosen row marked with *."""
    head = self.metric.split("_R@")[0] + "_R@"
    keys = [k for k in (self.table[0] if self.table else {}) if k.startswith(head)]
    lines = ["  d_out    r2   lambda  " + "  ".join(f"{k:>14}" for k in keys)
             + "    gain  gain_low      s"]
    for row in self.table:
      if not isinstance(row, dict):
        continue
      mark = "*" if (row.get("d_out"), row.get("r2"), row.get("lambda_koleo")) == (
          self.d_out, self.r2, self.lambda_koleo) else " "
      r2 = "-" if row.get("r2") is None else str(row.get("r2"))
      gain = "".join(f"{row[k]:>+{w}.3f}" if isinstance(row.get(k), (int, float)) else " " * w
                     for k, w in (("gain", 8), ("gain_low", 10)))
      lines.append(f"{mark} {row.get('d_out', '?'):>5} {r2:>5} {row.get('lambda_koleo', 0):>8g}  "
                   + "  ".join(f"{row.get(k, float('nan')):>14.3f}" for k in keys)
                   + f"{gain}  {row.get('seconds', 0):>5.0f}")
    lines.append(f"-> d_out={self.d_out} r2={self.r2} lambda={self.lambda_koleo:g}: {self.reason}")
    return "\n".join(lines)


def candidate_shapes(bits: int, quantizer: str = "lattice",
                     d_outs: Sequence[int] = D_OUT_CANDIDATES) -> list[tuple[int, int | None]]:
  """(d_out, r2) pairs a ``bits``-bit code of ``quantizer`` can hold
  (``Quantizer.candidate_shapes``): for lattice codes each d_out with the largest r² whose
  code fits (dimensions where none fits are skipped); for sign codes the single shape
  d_out = bits.

  Examples:
    >>> candidate_shapes(64, d_outs=(24, 32, 40))
    [(24, 79), (32, 36), (40, 24)]
  """
  bits = check_int("bits", bits, minimum=1)
  if quantizers.canonical_name(quantizer) not in quantizers.names():
    raise ValueError(f"quantizer={quantizer!r} must be one of {quantizers.names()}")
  out = quantizers.quantizer_class(quantizer).candidate_shapes(bits, d_outs)
  if not out:
    raise ValueError(f"no output dimension among {tuple(d_outs)} has a {quantizer} code of "
                     f"{bits} bits")
  return out


def incumbent_shape(bits: int, quantizer: str = "lattice") -> tuple[int, int | None]:
  """The paper's shape at a code budget: d_out=24 with the largest r² that fits ``bits``
  (the fitting dimension nearest 24 where none does), or d_out = bits for sign codes.

  Examples:
    >>> incumbent_shape(64)
    (24, 79)
    >>> incumbent_shape(64, "sign")
    (64, None)
  """
  shapes = candidate_shapes(bits, quantizer, sorted({PAPER_D_OUT, *D_OUT_CANDIDATES}))
  return min(shapes, key=lambda s: (abs(s[0] - PAPER_D_OUT), s[0]))


def min_screen_rows(n: int) -> int:
  """Fewest training rows a screening run may use on an n-row training set."""
  return min(MIN_SCREEN_ROWS, n // 2)


def plan_screening(n: int, epochs: int, n_dims: int, n_lambdas: int) -> dict:
  """How to screen for a final run of ``epochs`` epochs on n training vectors.

  The budget is half the final run's row-epochs. Each run is as many epochs as fit, from
  ``min(8, epochs)`` down to ``MIN_SCREEN_EPOCHS``, on as many rows as the budget then
  allows (at most 50,000 and the n rows less the validation queries, at least
  ``min_screen_rows(n)``). Stages that do not fit are dropped in this order: both stages,
  then the d_out stage alone (λ kept at 0.05), then the λ stage alone; when none fits the
  incumbent is kept. d_out goes before λ because it moved test recall more: on
  wordllama-256 at 10 epochs d_out=40 read 89.6 R@10 against 81.3 for the paper's 24, while
  λ=0.05 was within the noise of the best λ on every dataset measured (README).

  Returns:
    {"stages": subset of ("d_out", "lambda"), "epochs", "rows", "queries", "budget",
    "reason"} (``reason`` says why stages were dropped; empty when none was).

  Examples:
    >>> plan_screening(20_000, 160, 5, 6)["stages"]
    ('d_out', 'lambda')
    >>> {k: v for k, v in plan_screening(19_000, 10, 5, 6).items() if k != "reason"}
    {'stages': ('d_out',), 'epochs': 4, 'rows': 4750, 'queries': 1000, 'budget': 95000}
    >>> plan_screening(20_000, 2, 5, 6)["stages"]
    ()
  """
  n = check_int("n", n, minimum=1)
  epochs = check_int("epochs", epochs, minimum=1)
  budget = epochs * n // 2
  queries = min(SCREEN_QUERIES, max(n // 10, 1))
  e_max = min(MAX_SCREEN_EPOCHS, epochs)
  options = []
  if n_dims > 1:
    if n_lambdas > 1:
      options.append((("d_out", "lambda"), n_dims + n_lambdas - 1))
    options.append((("d_out",), n_dims))
  if n_lambdas > 1:
    options.append((("lambda",), n_lambdas))
  dropped = []
  for stages, runs in options:
    for e in range(e_max, MIN_SCREEN_EPOCHS - 1, -1):  # the longest runs that fit
      rows = min(MAX_SCREEN_ROWS, n - queries, budget // max(runs * e, 1))
      if rows >= min_screen_rows(n) and rows >= 2:
        reason = "" if not dropped else (
            f"screening {' and '.join(stages)} only: {' and '.join(dropped[0])} did not fit "
            f"the budget ({budget} row-epochs, half of the final run) at "
            f"{MIN_SCREEN_EPOCHS}+ epochs x {min_screen_rows(n)}+ rows a run")
        return {"stages": stages, "epochs": e, "rows": int(rows), "queries": int(queries),
                "budget": int(budget), "reason": reason}
    dropped.append(stages)
  return {"stages": (), "epochs": e_max, "rows": 0, "queries": int(queries),
          "budget": int(budget),
          "reason": (f"no screening: {epochs} epochs on {n} vectors leave {budget} row-epochs "
                     f"(half of the final run), too few for runs of {MIN_SCREEN_EPOCHS}+ epochs "
                     f"on {min_screen_rows(n)}+ vectors; shorter runs would rank noise")
          if options else "nothing to choose"}


def paired_gain(hits, reference, *, alpha: float = ALPHA, resamples: int = BOOTSTRAP_RESAMPLES,
                seed: int = 0) -> tuple[float, float]:
  """Validation gain of a model over a reference on the same queries, and its lower bound.

  Args:
    hits, reference: bool[nq] per-query hits (true neighbour in the top k) of the two
      models on the same validation queries.
    alpha: one-sided level: the bound is the alpha quantile of the paired bootstrap.
    resamples: bootstrap resamples of the queries.
    seed: seed of the resampling.

  Returns:
    (mean gain, lower bound): recall(hits) - recall(reference), and the alpha quantile of
    that difference over query sets resampled with replacement (the pairing removes the
    variance that the two models share: queries both find or both miss).

  Examples:
    >>> a = np.array([True] * 60 + [False] * 40); b = np.array([True] * 50 + [False] * 50)
    >>> gain, low = paired_gain(a, b)
    >>> round(gain, 2), bool(0 < low < gain)
    (0.1, True)
  """
  if np.ndim(hits) != 1 or np.shape(hits) != np.shape(reference) or np.size(hits) == 0:
    raise ValueError(f"hits must be two bool[nq] arrays of one length, got {np.shape(hits)} "
                     f"and {np.shape(reference)}")
  d = np.asarray(hits, np.float64) - np.asarray(reference, np.float64)
  rng = np.random.default_rng(seed)
  means = np.empty(resamples)
  for i in range(0, resamples, 256):  # query sets drawn with replacement, 256 at a time
    idx = rng.integers(0, d.size, size=(min(256, resamples - i), d.size))
    means[i:i + idx.shape[0]] = d[idx].mean(axis=1)
  return float(d.mean()), float(np.quantile(means, alpha))


def _screen_config(config: TrainConfig, epochs: int) -> TrainConfig:
  return config.replace(epochs=epochs, val_every=epochs, num_train=None, checkpoint_dir=None,
                        log_dir=None, verbose=False)


def select_shape(config: TrainConfig, train_vectors, *, d_outs: Sequence[int] | None = None,
                 lambdas: Sequence[float] | None = None, screen_epochs: int | None = None,
                 screen_rows: int | None = None, mesh=None) -> Selection:
  """Chooses d_out (with its largest fitting r²) and λ: the paper's shape unless a screened
  candidate beats it by more than the validation noise.

  Only what ``config`` leaves unset (None) is chosen: d_out when ``config.d_out`` is None
  (then r² too), λ when ``config.lambda_koleo`` is None. The code budget is
  ``config.bits`` of ``config.quantizer`` (ranked by its validation recall@10,
  ``{quantizer}_R@10``; "lattice": Zn codes, "sign": d_out = bits).

  Args:
    config: the recipe to screen with (its other fields are kept).
    train_vectors: f32[n, d_in] training vectors, or a Dataset (only ``.train`` is read).
    d_outs: output dimensions to screen (lattice codes; default ``D_OUT_CANDIDATES``).
    lambdas: λ values to screen (default ``PAPER_LAMBDAS``).
    screen_epochs, screen_rows: force the length and training-set size of each screening
      run (defaults: ``plan_screening``, which may also decide not to screen).
    mesh: optional mesh the screening runs train on.

  Returns:
    a ``Selection``. Deterministic for ``config.seed``; ties go to the earlier candidate.
  """
  t0 = time.perf_counter()
  x = getattr(train_vectors, "train", train_vectors)
  check_vectors("training vectors", x, min_rows=2)
  check_config(config)
  n = int(x.shape[0])
  quantizer = config.quantizer
  metric = quantizers.metric_key(quantizer, 10)
  d_outs = D_OUT_CANDIDATES if d_outs is None else tuple(d_outs)
  inc_d, inc_r2 = incumbent_shape(config.bits, quantizer)
  if config.d_out is not None:
    if config.r2 is None:  # the quantizer's r2 (if it has one) for this d_out and budget
      shapes = [(config.d_out, quantizers.quantizer_class(quantizer).shape_param(
          config.d_out, config.bits))]
    else:
      shapes = [(config.d_out, config.r2)]
  elif config.r2 is not None:
    raise ValueError(f"r2={config.r2} without d_out: give both, or neither (then each "
                     "screened d_out gets the largest r2 that fits bits)")
  else:
    shapes = candidate_shapes(config.bits, quantizer, d_outs)
    if (inc_d, inc_r2) not in shapes:
      shapes = [(inc_d, inc_r2)] + shapes
  if config.lambda_koleo is None:
    lams = list(dict.fromkeys(float(v) for v in (PAPER_LAMBDAS if lambdas is None else lambdas)))
    if PAPER_LAMBDA not in lams:
      lams.append(PAPER_LAMBDA)
    lam0 = PAPER_LAMBDA
  else:
    lams = [float(config.lambda_koleo)]
    lam0 = lams[0]
  incumbent = shapes[0] if len(shapes) == 1 else (inc_d, inc_r2)
  plan = plan_screening(n, check_int("epochs", config.epochs, minimum=1), len(shapes), len(lams))
  if screen_epochs is not None or screen_rows is not None:
    plan.update(stages=tuple(s for s, k in (("d_out", len(shapes)), ("lambda", len(lams)))
                             if k > 1), reason="")
    plan["epochs"] = check_int("screen_epochs", screen_epochs or plan["epochs"], minimum=1)
    rows = screen_rows if screen_rows is not None else max(plan["rows"], min_screen_rows(n))
    plan["rows"] = check_int("screen_rows", rows, minimum=2, maximum=n - plan["queries"])
  epochs, rows, nq = plan["epochs"], plan["rows"], plan["queries"]

  def record(d_out, r2, lam, table, reason, base=0) -> Selection:
    return Selection(int(d_out), r2, float(lam), metric,
                     {"d_out": incumbent[0], "r2": incumbent[1], "lambda_koleo": lam0}, table,
                     reason, epochs, rows, nq, base, plan["budget"],
                     round(time.perf_counter() - t0, 2), len(table) * epochs * rows)

  if not plan["stages"]:
    return record(incumbent[0], incumbent[1], lam0, [], plan["reason"] or "nothing to choose")

  # The screening split: queries held out of the training rows, searched against all others.
  perm = np.random.default_rng(config.seed + 7).permutation(n)
  q_idx, rest = np.sort(perm[:nq]), perm[nq:]
  validation = (np.asarray(x[q_idx], np.float32), np.asarray(x[np.sort(rest)], np.float32))
  sample = np.asarray(x[np.sort(rest[:rows])], np.float32)
  base = _screen_config(config, epochs)
  table: list[dict] = []
  hits: dict[tuple, np.ndarray] = {}
  m = max(len(shapes) - 1, 0) * ("d_out" in plan["stages"]) + max(len(lams) - 1, 0) * (
      "lambda" in plan["stages"])
  level = ALPHA / max(m, 1)

  def screen(candidates: list[tuple[int, int | None, float]]) -> None:
    """Trains the candidates (those of one d_out as one program) and adds their rows."""
    t = time.perf_counter()
    configs = [base.replace(d_out=d, r2=r2, lambda_koleo=lam) for d, r2, lam in candidates]
    results = train_many(configs, sample, mesh=mesh, validation=validation)
    seconds = (time.perf_counter() - t) / len(candidates)
    for (d, r2, lam), result in zip(candidates, results):
      best = max((h for h in result.history if metric in h), key=lambda h: h[metric])
      row: dict[str, Any] = {"d_out": d, "r2": r2, "lambda_koleo": lam}
      row.update({k: v for k, v in best.items() if "_R@" in k})
      row["seconds"] = round(seconds, 2)
      hits[(d, r2, lam)] = result.validation_hits[metric]
      table.append(row)
      logger.info("screen d_out=%d r2=%s lambda=%g: %s %.3f", d, r2, lam, metric, row[metric])

  def challenge(cands: list[tuple], ref: tuple) -> tuple | None:
    """The best of ``cands`` by validation when its gain over ``ref`` is above the noise,
    else None; every candidate's row gets its gain and lower bound."""
    rows = {(r["d_out"], r["r2"], r["lambda_koleo"]): r for r in table}
    bounds = {}
    for c in cands:
      if c != ref:
        gain, bounds[c] = paired_gain(hits[c], hits[ref], alpha=level, seed=config.seed)
        rows[c].update(gain=round(gain, 4), gain_low=round(bounds[c], 4))
    best = cands[int(np.argmax([rows[c][metric] for c in cands]))]
    return best if bounds.get(best, 0.0) > 0 else None

  inc = (incumbent[0], incumbent[1], lam0)
  chosen, reason = inc, "the paper's shape: no candidate beat it by more than the noise"
  if "d_out" in plan["stages"]:
    cands = [(d, r2, lam0) for d, r2 in shapes]
    for c in cands:
      screen([c])
    best = challenge(cands, inc)
    if best is not None:
      chosen = best
      reason = f"d_out={best[0]} beat the paper's shape by more than the noise"
  if "lambda" in plan["stages"]:
    d, r2 = chosen[:2]
    ref = (d, r2, lam0)
    todo = [(d, r2, lam) for lam in lams if (d, r2, lam) not in hits]
    if todo:
      screen(todo)
    best = challenge([(d, r2, lam) for lam in lams], ref)
    if best is not None:
      chosen = best
      reason = (f"lambda={best[2]:g} beat lambda={lam0:g} at d_out={d} by more than the "
                "noise" + (f"; {reason}" if ref != inc else ""))
  if plan["reason"]:
    reason += f" ({plan['reason']})"
  return record(chosen[0], chosen[1], chosen[2], table, reason, int(validation[1].shape[0]))

