"""TrainConfig: the hyper-parameters of the catalyzer's training recipe.

Kept apart from the training loop so that a saved model (``model.py``) can describe how it
was trained without importing optax or orbax.
"""
from __future__ import annotations

import dataclasses
import math

from spreading_jax import quantizers
from spreading_jax.mining import METHODS as MINING_METHODS

# Named recipe conventions and their accepted values (see TrainConfig's docstring).
BN_MODES = ("separate", "joint")
INITS = ("torch", "flax")
INPUT_SCALINGS = ("none", "mean_norm")


def parse_lr_schedule(value) -> tuple[float, ...]:
  """A learning-rate schedule as a tuple of floats, from a tuple/list or "0.1,0.1,0.05"."""
  try:
    if isinstance(value, str):
      values = tuple(float(v) for v in value.split(",") if v.strip())
    else:
      values = tuple(float(v) for v in value)
  except (TypeError, ValueError):
    values = ()
  if not values or any(not math.isfinite(v) or v < 0 for v in values):
    raise ValueError(f"lr_schedule={value!r} must be non-negative numbers, e.g. "
                     "(0.1, 0.1, 0.05, 0.01) or '0.1,0.1,0.05,0.01'")
  return values


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyper-parameters; the defaults are the paper's 64-bit lattice recipe, with the
  conventions of the original PyTorch code where the paper is silent, except that the
  output dimension and λ are left unset: ``spreading_jax.fit`` keeps the paper's d_out=24
  and λ=0.05 unless a screened candidate beats them by more than the validation noise
  (``selection.py``); ``train.train`` needs them set.

  Attributes:
    d_out: output dimension of the catalyzer; None (default): ``fit`` chooses it, with r²,
      at the code budget (the paper uses 24, with r²=79, at 64 bits).
    hidden: hidden layer widths.
    epochs: number of epochs (160 in the paper; ~90% of the accuracy after 10).
    batch_size: global batch size (split across devices when a mesh is given).
    lr_schedule: learning rates, each held for an equal block of epochs (the original
      repeats each value epochs/len times); a tuple or a comma-separated string.
    momentum: SGD momentum, in [0, 1).
    lambda_koleo: weight λ of the KoLeo regularizer; None (default): ``fit`` screens the
      paper's grid 0.001 ... 0.05 and keeps the original's default 0.05 unless beaten.
    rank_positive: positives are drawn uniformly among this many exact input-space
      neighbours.
    rank_negative: the negative is the rank_negative-th output-space neighbour.
    neighbors_include_self: count each vector as its own first neighbour in both lists,
      as the original does: a positive is then the anchor itself with probability
      1/rank_positive, and the negative is the (rank_negative - 1)-th *other* vector.
      False excludes self from both lists.
    bn_mode: "separate" (original): anchors, positives and negatives go through the
      network as three train-mode passes, each with its own batch statistics, and the
      running statistics are updated three times per step. "joint": one pass over the
      concatenated 3·batch rows.
    init: "torch" (original): weights and biases of every Dense layer uniform in
      ±1/sqrt(fan_in), PyTorch's nn.Linear default. "flax": flax's defaults (LeCun normal
      weights, about 1.7x larger, zero biases).
    drop_remainder: False (original) trains on the final partial batch of each epoch
      too; True drops it so that every step has the same shape.
    input_scaling: "none" (original) feeds the vectors as they are; "mean_norm" divides
      them by the mean norm of the training vectors (the factor is stored with the model).
    mining: how each epoch's negatives are found: "exact" searches every output among all
      of them; "graph" refines last epoch's approximate neighbour lists (NN-descent) until
      an exactly measured sample shows ``mining_recall`` of the rank_negative nearest
      neighbours, and searches exactly when it does not (``mining.NegativeMiner``);
      "auto" (default) is the original code's choice: exact on a GPU/TPU, approximate on a
      CPU (the original uses HNSW there), exact below 100k training vectors.
    mining_recall: the recall target of "graph" mining.
    end_to_end: pass positives and negatives through the lattice quantizer
      (straight-through) and mine negatives among quantized outputs.
    r2: squared radius of the Zn lattice used for validation and end-to-end training;
      None (default) picks the largest one whose code fits ``bits``.
    bits: the code budget in bits.
    quantizer: the code the model is for, a registered quantizer name
      (``quantizers.names()``): "lattice" (Zn, asymmetric search; "zn" is read as
      "lattice") or "sign" (one bit per output dimension): it ranks validation (the best
      epoch and, when d_out/λ are chosen, the candidates) by that code's recall@10
      (``{quantizer}_R@10``); sign codes fix d_out = bits.
    val_every: validate every this many epochs (and after the last one); 0 disables.
    val_queries: validation queries held out of the training vectors (they never train).
    val_base: validation database: None (default) searches the validation queries among
      every other training vector, as large a database as the data allows (a small one
      saturates and ranks models differently from the test); an integer uses a seeded
      sample of that many of them.
    num_train: cap on the number of training vectors (None: all that remain).
    seed: seed of initialization, shuffling, positive draws and the validation split, in
      [0, 2**32).
    checkpoint_dir: directory for per-epoch checkpoints and history.jsonl; a run finds
      its last checkpoint there and resumes from it.
    log_dir: directory for TensorBoard event files, one step per epoch (the numbers of
      the history records) and the config as text; written by process 0 only. Where a
      run logs is not part of the model: a saved model's config has log_dir None.
    verbose: progress bar and one log line per epoch.
  """
  d_out: int | None = None
  hidden: tuple[int, ...] = (1024, 1024)
  epochs: int = 160
  batch_size: int = 64
  lr_schedule: tuple[float, ...] = (0.1, 0.1, 0.05, 0.01)
  momentum: float = 0.9
  lambda_koleo: float | None = None
  rank_positive: int = 10
  rank_negative: int = 50
  neighbors_include_self: bool = True
  bn_mode: str = "separate"
  init: str = "torch"
  drop_remainder: bool = False
  input_scaling: str = "none"
  mining: str = "auto"
  mining_recall: float = 0.8
  end_to_end: bool = False
  r2: int | None = None
  bits: int = 64
  quantizer: str = "lattice"
  val_every: int = 10
  val_queries: int = 1000
  val_base: int | None = None
  num_train: int | None = None
  seed: int = 0
  checkpoint_dir: str | None = None
  log_dir: str | None = None
  verbose: bool = True

  def __post_init__(self):
    # Normalised once so that a config compares and serialises the same however it was
    # written ("0.1,0.05" from a CLI or JSON file, or a tuple).
    object.__setattr__(self, "lr_schedule", parse_lr_schedule(self.lr_schedule))
    if isinstance(self.hidden, (str, bytes)) or not hasattr(self.hidden, "__iter__"):
      raise ValueError(f"hidden={self.hidden!r} must be a sequence of layer widths")
    object.__setattr__(self, "hidden", tuple(self.hidden))
    _check_field_types(self)
    object.__setattr__(self, "quantizer", quantizers.canonical_name(self.quantizer))
    for name, allowed in (("bn_mode", BN_MODES), ("init", INITS),
                          ("input_scaling", INPUT_SCALINGS), ("quantizer", quantizers.names()),
                          ("mining", MINING_METHODS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name}={getattr(self, name)!r} must be one of {allowed}")
    if not 0.0 < self.mining_recall <= 1.0:
      raise ValueError(f"mining_recall={self.mining_recall} must be in (0, 1]")

  def replace(self, **changes) -> "TrainConfig":
    return dataclasses.replace(self, **changes)

  @property
  def shape_is_set(self) -> bool:
    """True when d_out and λ are given (nothing is left for ``selection.py`` to choose)."""
    return self.d_out is not None and self.lambda_koleo is not None

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["hidden"] = list(self.hidden)
    d["lr_schedule"] = list(self.lr_schedule)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "TrainConfig":
    if not isinstance(d, dict):
      raise ValueError(f"a TrainConfig is described by a JSON object, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
    d = dict(d)
    if "hidden" in d:
      try:
        d["hidden"] = tuple(int(h) for h in d["hidden"])
      except (TypeError, ValueError) as e:
        raise ValueError(f"hidden={d['hidden']!r} must be a list of integers") from e
    return cls(**d)


def _check_field_types(config: TrainConfig) -> None:
  """Every field has its annotated type (a JSON config with "epochs": "10" or
  "end_to_end": 1 is a clear error here, not a crash deep in training)."""
  for f in dataclasses.fields(config):
    value, kinds = getattr(config, f.name), str(f.type).replace(" ", "").split("|")
    if value is None:
      ok = "None" in kinds
    elif "bool" in kinds:
      ok = isinstance(value, bool)
    elif "int" in kinds:
      ok = isinstance(value, int) and not isinstance(value, bool)
    elif "float" in kinds:
      ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif "str" in kinds:
      ok = isinstance(value, str)
    elif kinds[0].startswith("tuple[int"):
      ok = all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value)
    else:
      ok = True  # lr_schedule: parsed and checked by parse_lr_schedule
    if not ok:
      raise ValueError(f"config field {f.name}={value!r} has the wrong type (expected "
                       f"{f.type})")


def replace_from_strings(config: TrainConfig, changes: dict[str, str]) -> TrainConfig:
  """``config`` with fields replaced by values written as text (``--set field=value``), each
  parsed by its field's type: "true"/"false" for bools, "none" for a field that may be
  None, comma-separated numbers for ``hidden`` and ``lr_schedule``.

  Raises:
    ValueError: one line naming an unknown field or a value its field cannot hold.

  Example:
    >>> c = replace_from_strings(TrainConfig(), {"batch_size": "128", "hidden": "256,256",
    ...                                          "end_to_end": "true", "r2": "none"})
    >>> c.batch_size, c.hidden, c.end_to_end, c.r2
    (128, (256, 256), True, None)
  """
  fields = {f.name: str(f.type).replace(" ", "").split("|")
            for f in dataclasses.fields(TrainConfig)}
  parsed = {}
  for name, text in changes.items():
    if name not in fields:
      raise ValueError(f"{name!r} is not a TrainConfig field; the fields are "
                       f"{', '.join(fields)}")
    kinds = fields[name]
    try:
      parsed[name] = _parse_text(text, kinds)
    except ValueError as e:
      expected = " or ".join(_TYPE_WORDS.get(k, k) for k in kinds)
      why = f" ({e})" if str(e) else ""
      raise ValueError(f"{name}={text!r}: expected {expected}{why}") from None
  return config.replace(**parsed)


_TYPE_WORDS = {"tuple[int,...]": "comma-separated integers",
               "tuple[float,...]": "comma-separated numbers"}


def _parse_text(text: str, kinds: list[str]):
  """The value of ``text`` for a field of annotated type ``kinds`` (e.g. ["int", "None"])."""
  text = text.strip()
  if "None" in kinds and text.lower() in ("none", "null"):
    return None
  if "bool" in kinds:
    if text.lower() not in ("true", "false"):
      raise ValueError("write true or false")
    return text.lower() == "true"
  try:
    if "int" in kinds:
      return int(text)
    if "float" in kinds:
      value = float(text)
    elif kinds[0].startswith("tuple[int"):
      return tuple(int(v) for v in text.split(","))
    else:
      return text  # str, and lr_schedule (parsed and checked by parse_lr_schedule)
  except ValueError:
    raise ValueError("") from None  # the caller names the expected type
  if not math.isfinite(value):
    raise ValueError("not a finite number")
  return value
