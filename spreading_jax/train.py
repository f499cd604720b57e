"""The paper's training recipe as an optax loop: ``train_step`` (one SGD step on triplet +
λ·KoLeo), an epoch compiled as one ``lax.scan`` of it, per-epoch hard-negative mining,
validation and checkpointing; data parallel over a device mesh.

Per epoch (Sablayrolles et al. 2019, section 4; the original code where the paper is silent):
  1. negatives: the ``rank_negative``-th output-space neighbour of every catalyzed training
     vector (among the quantized outputs in end-to-end mode), see ``mining.py``;
  2. one ``lax.scan`` of ``train_step`` over shuffled batches, then the final partial batch;
     each anchor's positive is drawn among its ``rank_positive`` exact input-space
     neighbours (computed once);
  3. every ``val_every`` epochs, 1-recall@1/10/100 of catalyzer + each quantizer of
     ``quantizers.validation_quantizers`` (the Zn lattice and the sign bits, and
     ``config.quantizer``) on a validation split carved from the training vectors
     (``evaluate.quantizer_recalls``); the best model by ``{config.quantizer}_R@10`` is
     kept.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import time
from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P
from tqdm.auto import tqdm

from spreading_jax import (_outputs, _tensorboard, evaluate, lattice, mining, quantizers,
                           sampling, search, sharding)
from spreading_jax._validation import check_int, check_vectors
from spreading_jax.catalyzer import Catalyzer, l2_normalize
from spreading_jax.checkpoint import Checkpointer, fingerprint
from spreading_jax.config import TrainConfig
from spreading_jax.losses import spreading_loss
from spreading_jax.model import TrainResult
from spreading_jax.quantizers import make_codec

__all__ = ["Batch", "Recipe", "TrainConfig", "TrainResult", "TrainState", "make_codec",
           "make_epoch_fn", "make_optimizer", "make_train_state", "split_indices", "train",
           "train_many", "train_step", "validate"]

logger = logging.getLogger("spreading_jax")


# ---------------------------------------------------------------------------------------
# The optimizer.

def make_optimizer(config: TrainConfig, steps_per_epoch: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """SGD with momentum and the block learning-rate schedule, indexed by the step count.

  Value j of ``config.lr_schedule`` (L values) holds for epochs [ceil(j·E/L), ceil((j+1)·E/L))
  of the E epochs: the original repeats each value E/L times (and requires L | E).

  Returns:
    (optax transformation, schedule(step) -> lr). Equal settings give the same objects, so
    a compiled epoch is reused by the next run with the same shapes.
  """
  return _sgd(config.lr_schedule, float(config.momentum),
              check_int("epochs", config.epochs, minimum=1),
              check_int("steps_per_epoch", steps_per_epoch, minimum=1))


@functools.lru_cache(maxsize=64)
def _sgd(values: tuple[float, ...], momentum: float, epochs: int, steps_per_epoch: int):
  n = len(values)
  boundaries = [math.ceil(j * epochs / n) * steps_per_epoch for j in range(1, n)]
  schedule = optax.join_schedules([optax.constant_schedule(v) for v in values], boundaries)
  return optax.sgd(learning_rate=schedule, momentum=momentum), schedule


# ---------------------------------------------------------------------------------------
# The training step.

@dataclasses.dataclass(frozen=True)
class Recipe:
  """What ``train_step`` needs besides arrays (static under ``jit``).

  Attributes:
    module: the catalyzer (its ``axis_name`` is set from ``mesh`` inside the step).
    bn_mode: "separate" (three train-mode passes) or "joint" (one concatenated pass).
    codec: the Zn codec that quantizes positives and negatives (straight-through) in
      end-to-end training, or None.
    mesh: a 1-D mesh to split the batch over (global-batch BatchNorm and KoLeo), or None.
  """
  module: Catalyzer
  bn_mode: str = "separate"
  codec: lattice.ZnSphereCodec | None = None
  mesh: Mesh | None = None


class TrainState(flax.struct.PyTreeNode):
  """Arrays that change during training, the KoLeo weight, and the static optimizer and
  recipe.

  ``lambda_koleo`` is an f32[] array rather than part of the static recipe so that models
  differing only in λ are one compiled program (``train_many`` stacks their states on a
  leading model axis).
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any
  lambda_koleo: jax.Array
  tx: optax.GradientTransformation = flax.struct.field(pytree_node=False)
  schedule: Callable = flax.struct.field(pytree_node=False)
  recipe: Recipe = flax.struct.field(pytree_node=False)

  def arrays(self) -> dict:
    """The checkpointed part of the state."""
    return {"step": self.step, "params": self.params, "batch_stats": self.batch_stats,
            "opt_state": self.opt_state}


class Batch(NamedTuple):
  """One batch of input vectors: anchor f32[b, d_in], positives f32[b, k, d_in] (the
  anchor's k positive candidates, one of which the step draws), negative f32[b, d_in]."""
  anchor: jax.Array
  positives: jax.Array
  negative: jax.Array


def make_train_state(config: TrainConfig, d_in: int, steps_per_epoch: int, key: jax.Array,
                     mesh: Mesh | None = None) -> TrainState:
  """A freshly initialised TrainState for ``config`` on d_in-dimensional inputs (d_out and
  lambda_koleo must be set: ``train`` chooses them when they are not)."""
  if not config.shape_is_set:
    raise ValueError(f"make_train_state needs d_out and lambda_koleo (got d_out={config.d_out}, "
                     f"lambda_koleo={config.lambda_koleo}); train() chooses unset ones")
  module = Catalyzer.from_config(config)
  variables = module.init(key, jnp.zeros((2, d_in)), train=False)
  tx, schedule = make_optimizer(config, steps_per_epoch)
  recipe = Recipe(module, config.bn_mode, make_codec(config) if config.end_to_end else None,
                  mesh)
  return TrainState(jnp.zeros((), jnp.int32), variables["params"], variables["batch_stats"],
                    tx.init(variables["params"]), jnp.asarray(config.lambda_koleo, jnp.float32),
                    tx, schedule, recipe)


def _catalyze_triplet(recipe: Recipe, axis: str | None, lambda_koleo, params, batch_stats, anchor,
                      positive, negative):
  """Train-mode forward of the three roles and the spreading loss.

  Returns (loss, (new batch_stats, parts)); with ``axis`` the arrays are this device's
  shard of the batch and every returned value is global.
  """
  module = recipe.module.clone(axis_name=axis)
  if recipe.bn_mode == "separate":
    # The original forwards anchors, positives and negatives as three train-mode calls:
    # three sets of batch statistics, running statistics updated three times per step.
    stats, outs = batch_stats, []
    for x in (anchor, positive, negative):
      y, updates = module.apply({"params": params, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
      stats = updates["batch_stats"]
      outs.append(y)
    ya, yp, yn = outs
  else:
    b = anchor.shape[0]
    y, updates = module.apply({"params": params, "batch_stats": batch_stats},
                              jnp.concatenate([anchor, positive, negative]), train=True,
                              mutable=["batch_stats"])
    stats = updates["batch_stats"]
    ya, yp, yn = y[:b], y[b:2 * b], y[2 * b:]
  if recipe.codec is not None:
    yp, yn = recipe.codec.quantize_ste(yp), recipe.codec.quantize_ste(yn)
  loss, parts = spreading_loss(ya, yp, yn, lambda_koleo, axis_name=axis)
  return loss, (stats, parts)


def _loss_fn(recipe: Recipe) -> Callable:
  """f(lambda_koleo, params, batch_stats, anchor, positive, negative) -> (loss, (batch_stats,
  parts)), split over the mesh's data axis when the recipe has one."""
  if recipe.mesh is None:
    return functools.partial(_catalyze_triplet, recipe, None)
  axis = sharding.axis_name(recipe.mesh)
  return jax.shard_map(functools.partial(_catalyze_triplet, recipe, axis), mesh=recipe.mesh,
                       in_specs=(P(), P(), P(), P(axis), P(axis), P(axis)),
                       out_specs=(P(), (P(), P())))


def train_step(state: TrainState, batch: Batch, rng: jax.Array) -> tuple[TrainState, dict]:
  """One SGD step on the spreading loss. Pure; jit it (the epoch scans it).

  Args:
    state: the training state (``make_train_state``).
    batch: anchors, their positive candidates and their negatives (input vectors).
    rng: this step's key; it draws each anchor's positive uniformly among its candidates.

  Returns:
    (new state, metrics): metrics is a flat dict of scalars: loss, triplet, koleo (global
    batch means), violations (count of triplets ranked the wrong way) and lr.
  """
  recipe = state.recipe
  b, k = batch.positives.shape[:2]
  pick = jax.random.randint(rng, (b,), 0, k)
  positive = jnp.take_along_axis(batch.positives, pick[:, None, None], axis=1)[:, 0]
  (loss, (batch_stats, parts)), grads = jax.value_and_grad(
      lambda p: _loss_fn(recipe)(state.lambda_koleo, p, state.batch_stats, batch.anchor,
                                 positive, batch.negative),
      has_aux=True)(state.params)
  updates, opt_state = state.tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {"loss": loss, "triplet": parts["triplet"], "koleo": parts["koleo"],
             "violations": parts["violations"],
             "lr": jnp.asarray(state.schedule(state.step), jnp.float32)}
  return state.replace(step=state.step + 1, params=params, batch_stats=batch_stats,
                       opt_state=opt_state), metrics


# ---------------------------------------------------------------------------------------
# The compiled epoch.

def _gather(xt, positives, negatives, idx) -> Batch:
  return Batch(xt[idx], xt[positives[idx]], xt[negatives[idx]])


@functools.lru_cache(maxsize=64)
def make_epoch_fn(num_train: int, batch_size: int, drop_remainder: bool = False,
                  models: bool = False) -> Callable:
  """Builds the jitted epoch ``epoch(state, xt, positives, negatives, key) -> (state,
  metrics)`` over ``num_train`` training vectors.

  The full batches of a permutation of the training set are one ``lax.scan`` of
  ``train_step``; the final partial batch (if it has at least 2 rows and not
  ``drop_remainder``) is one more step, unsharded, as the original trains on it too.
  metrics: per-step arrays. The state is donated. Cached: runs with the same shapes and an
  equal recipe reuse one compiled program.

  With ``models=True`` the epoch is vmapped over a leading model axis of ``state``,
  ``negatives`` and ``key`` (K models of one shape, e.g. a λ grid or several seeds, as one
  program); ``xt`` and ``positives`` are shared. Each model draws its own permutation and
  positives from its own key, so a model whose key equals a single run's takes the same
  batches as that run.
  """
  steps, train_rest = _epoch_split(num_train, batch_size, drop_remainder)

  def epoch(state, xt, positives, negatives, key):
    perm_key, step_key = jax.random.split(key)
    perm = jax.random.permutation(perm_key, num_train).astype(jnp.int32)
    batches = perm[:steps * batch_size].reshape(steps, batch_size)

    def body(state, inputs):
      idx, i = inputs
      return train_step(state, _gather(xt, positives, negatives, idx),
                        jax.random.fold_in(step_key, i))

    state, metrics = jax.lax.scan(body, state, (batches, jnp.arange(steps)))
    if train_rest:
      # A batch that need not divide over the mesh: one step on the whole of it.
      recipe = state.recipe
      state, last = train_step(state.replace(recipe=dataclasses.replace(recipe, mesh=None)),
                               _gather(xt, positives, negatives, perm[steps * batch_size:]),
                               jax.random.fold_in(step_key, steps))
      state = state.replace(recipe=recipe)
      metrics = jax.tree_util.tree_map(lambda m, x: jnp.concatenate([m, x[None]]), metrics, last)
    return state, metrics

  if models:
    epoch = jax.vmap(epoch, in_axes=(0, None, None, 0, 0))
  return jax.jit(epoch, donate_argnums=(0,))


def steps_per_epoch(config: TrainConfig, num_train: int) -> int:
  """Optimizer steps in one epoch over ``num_train`` vectors (the partial batch counts)."""
  steps, train_rest = _epoch_split(num_train, config.batch_size, config.drop_remainder)
  return steps + int(train_rest)


def _epoch_split(num_train: int, batch_size: int, drop_remainder: bool) -> tuple[int, bool]:
  """(full batches, whether the partial batch is a step): BatchNorm and KoLeo need 2 rows."""
  steps, rest = divmod(num_train, batch_size)
  return steps, rest >= 2 and not drop_remainder


# ---------------------------------------------------------------------------------------
# Validation.

class ValidationSplit(NamedTuple):
  query: np.ndarray        # f32[nq, d_in]
  base: np.ndarray         # f32[nb, d_in]
  groundtruth: np.ndarray  # i32[nq, k] exact input-space neighbours of query in base


def rows_to_read(n: int, config: TrainConfig) -> np.ndarray | None:
  """Rows of an n-row learn set that training can use when ``num_train`` caps it: a seeded
  sample of num_train + validation rows (sorted), or None when every row may be used.

  For learn sets far larger than the recipe needs (Deep1B's learn file has 350M rows for
  500k training vectors), reading this sample first avoids touching the whole file;
  ``split_train_validation`` then splits the sample (the validation database is every row
  of it but the validation queries).
  """
  if config.num_train is None:
    return None
  need = check_int("num_train", config.num_train, minimum=1)
  if config.val_every > 0:
    need += config.val_queries
    need *= 2  # the validation queries may take at most half of the rows they are given
  if need >= n:
    return None
  return sampling.sample_indices(n, need, config.seed + 1)


def validation_split(query, base, mesh: Mesh | None = None) -> ValidationSplit:
  """A validation split from given query and database vectors (exact 100-NN groundtruth)."""
  query = np.asarray(check_vectors("validation query", query, min_rows=1), np.float32)
  base = np.asarray(check_vectors("validation base", base, d=query.shape[1], min_rows=1),
                    np.float32)
  _, gt = search.knn(query, base, min(100, base.shape[0]), mesh=mesh)
  return ValidationSplit(query, base, np.asarray(gt))


def split_indices(n: int, config: TrainConfig) -> tuple[np.ndarray, np.ndarray | None,
                                                         np.ndarray | None]:
  """Rows of an n-row training set: (train, validation queries, validation database), each
  sorted; the last two None when validation is off.

  The ``val_queries`` validation queries are a seeded sample that never trains. The
  validation database is every other row (``val_base=None``, the default), or a seeded
  sample of ``val_base`` of them: as large as the data allows, so that validation recall
  ranks models as recall against a large test database does (a small carved-out database
  saturates and prefers other shapes and λ than the test does). Training uses every row
  but the queries (the first ``num_train`` of a seeded order when capped).
  """
  perm = np.random.default_rng(config.seed).permutation(n)
  q_idx = b_idx = None
  if config.val_every > 0:
    nq = check_int("val_queries", config.val_queries, minimum=1)
    if nq >= n // 2:
      raise ValueError(f"val_queries={nq} would leave less than half of the {n} training "
                       "vectors; lower val_queries or set val_every=0")
    q_idx, perm = np.sort(perm[:nq]), perm[nq:]
    b_idx = np.sort(perm)
    if config.val_base is not None:
      nb = check_int("val_base", config.val_base, minimum=1, maximum=perm.size)
      b_idx = np.sort(perm[:nb])
  if config.num_train is not None:
    perm = perm[:check_int("num_train", config.num_train, minimum=1)]
  return np.sort(perm), q_idx, b_idx


def split_train_validation(x, config: TrainConfig, mesh: Mesh | None = None):
  """The training rows and the validation split of ``split_indices`` (exact groundtruth).

  Returns (train rows f32[nt, d], ValidationSplit or None).
  """
  train_idx, q_idx, b_idx = split_indices(x.shape[0], config)
  val = None if q_idx is None else validation_split(x[q_idx], x[b_idx], mesh)
  return np.asarray(x[train_idx], np.float32), val


def validate(result: TrainResult, val: ValidationSplit, validators, mesh: Mesh | None = None,
             hits: dict | None = None) -> dict:
  """1-recall@{1,10,100} of catalyzer + each quantizer of ``validators`` (see
  ``validation_recalls``)."""
  return validation_recalls(result.apply(val.query), result.apply(val.base), val, validators,
                            mesh, hits)


def validation_recalls(yq, yb, val: ValidationSplit, validators, mesh: Mesh | None = None,
                       hits: dict | None = None) -> dict:
  """The recalls of ``validate`` from catalyzed queries yq f32[nq, d_out] and database yb:
  ``evaluate.quantizer_recalls`` of each quantizer, keys ``{name}_R@k``.

  Args:
    validators: the quantizers (``quantizers.validation_quantizers(config)``), or a Zn
      codec, which stands for that lattice and the sign bits (the default validation).
    hits: when given, receives bool[nq] per metric: whether each query's true nearest
      neighbour is in its top k (the recall is their mean; paired comparisons of two
      models on the same queries use them, see ``selection.paired_gain``).
  """
  if isinstance(validators, lattice.ZnSphereCodec):
    validators = [quantizers.ZnQuantizer(validators), quantizers.SignQuantizer(yq.shape[1])]
  out = {}
  for q in validators:
    out.update(evaluate.quantizer_recalls(q, yq, yb, val.groundtruth, mesh=mesh, hits=hits))
  return out


# ---------------------------------------------------------------------------------------
# The training loop.

def _check_inputs(config: TrainConfig, x, ndev: int) -> None:
  check_vectors("dataset.train", x, min_rows=1)
  check_config(config, ndev)


def check_config(config: TrainConfig, ndev: int = 1) -> None:
  """Raises ValueError naming the first field of ``config`` that cannot train (before any
  compute): non-positive sizes, a shape that does not fit its bits, momentum outside
  [0, 1), a negative or non-finite λ, a seed outside [0, 2**32), a batch that ``ndev``
  devices cannot split. Fields left None (d_out, λ: chosen by ``fit``) are not checked."""
  if config.d_out is not None:
    check_int("d_out", config.d_out, minimum=1)
    make_codec(config)  # d_out/r2/bits that do not fit fail here, before any compute
  check_int("epochs", config.epochs, minimum=1)
  check_int("batch_size", config.batch_size, minimum=2)
  check_int("rank_positive", config.rank_positive, minimum=1)
  check_int("rank_negative", config.rank_negative, minimum=1)
  check_int("val_every", config.val_every, minimum=0)
  # jax.random.PRNGKey keeps the low 32 bits without x64: a larger seed would silently
  # repeat another seed's run (PRNGKey(2**32) == PRNGKey(0)).
  check_int("seed", config.seed, minimum=0, maximum=2**32 - 1)
  if not (math.isfinite(config.momentum) and 0.0 <= config.momentum < 1.0):
    raise ValueError(f"momentum={config.momentum} must be a number in [0, 1) (SGD with heavy-ball "
                     "momentum diverges at 1 and above)")
  if not config.hidden or any(int(h) < 1 for h in config.hidden):
    raise ValueError(f"hidden={config.hidden} must be a non-empty tuple of positive widths")
  if config.lambda_koleo is not None and (not math.isfinite(config.lambda_koleo)
                                          or config.lambda_koleo < 0):
    raise ValueError(f"lambda_koleo={config.lambda_koleo} must be a finite number >= 0")
  if config.batch_size % ndev:
    raise ValueError(f"batch_size={config.batch_size} must be divisible by the {ndev} devices "
                     "of the mesh")


def _check_train_size(config: TrainConfig, nt: int) -> None:
  need = max(config.rank_negative, config.rank_positive) + 1
  if nt < need:
    raise ValueError(f"only {nt} training vectors: rank_negative={config.rank_negative} and "
                     f"rank_positive={config.rank_positive} need at least {need}")
  if config.batch_size > nt:
    raise ValueError(f"batch_size={config.batch_size} is larger than the {nt} training vectors")




def train(config: TrainConfig, dataset, mesh: Mesh | None = None,
          callback: Callable[[dict], Any] | None = None,
          validation: tuple[Any, Any] | None = None) -> TrainResult:
  """Trains a catalyzer on ``dataset.train`` with the paper's recipe.

  ``config`` must give ``d_out`` and ``lambda_koleo``; ``spreading_jax.fit`` (above this
  module) chooses the ones a config leaves unset and then calls this.

  Args:
    config: hyper-parameters (see ``TrainConfig``).
    dataset: a ``datasets.Dataset`` (only ``train`` is used: queries never train), or any
      object with a ``train`` array, or the array itself.
    mesh: optional 1-D mesh; the batch is split over its data axis (results match one
      device up to float rounding).
    callback: called with each epoch's history record after its checkpoint is written
      (logging, early stopping by raising).
    validation: optional (query, base) vectors to validate on; then every training
      vector trains and none is held out (the vectors must not be queries of the final
      evaluation).

  Returns:
    TrainResult with the best parameters by validation recall@10 of ``config.quantizer``
    (the last ones when validation is off) and the per-epoch history.

  Example::

    ds = load_dataset("fashion-mnist-mini")
    result = train(TrainConfig(d_out=24, lambda_koleo=0.05, epochs=10), ds)
    y = result.apply(ds.query)
  """
  if not config.shape_is_set:
    raise ValueError(f"train() needs d_out and lambda_koleo (got d_out={config.d_out}, "
                     f"lambda_koleo={config.lambda_koleo}): set them, or call "
                     "spreading_jax.fit(config, data), which chooses unset ones by validation")
  return _train_group([config], dataset, mesh, callback, validation)[0]


# Fields that may differ between the models of one program: λ is an array of the state and
# the seed only sets keys (when the seeds give the same training rows and validation split);
# a group of several models refuses to checkpoint.
_MODEL_AXIS_FIELDS = ("lambda_koleo", "seed", "verbose", "checkpoint_dir", "log_dir")


def train_many(configs, dataset, mesh: Mesh | None = None,
               callback: Callable[[dict], Any] | None = None,
               validation: tuple[Any, Any] | None = None) -> list[TrainResult]:
  """Trains several catalyzers, those of one shape as one compiled program.

  Configs that differ only in ``lambda_koleo`` and ``seed`` (and whose seeds give the same
  training rows and validation split: always so with ``validation`` given or validation
  off and no ``num_train`` cap) train together: their parameters, optimizer states,
  BatchNorm statistics and λ are stacked on a leading model axis and every epoch is one
  vmapped program; each model mines its own negatives and validates on its own. The
  input-space positives are shared. Other configs form groups of their own, trained one
  after the other.

  Args:
    configs: TrainConfigs with d_out and lambda_koleo set; none may checkpoint when a group
      has more than one model (train them one by one to checkpoint), and no two may share
      a log_dir.
    dataset, mesh, validation: as for ``train``.
    callback: called with each model's epoch record (with a "model" key, its index in
      ``configs``) after every epoch.

  Returns:
    one TrainResult per config, in order; each equals ``train(config, ...)`` up to float
    rounding (the batches, positives and negatives are its own).
  """
  configs = list(configs)
  if not configs or not all(isinstance(c, TrainConfig) for c in configs):
    raise ValueError("train_many needs a non-empty sequence of TrainConfig")
  for c in configs:
    if not c.shape_is_set:
      raise ValueError(f"train_many needs d_out and lambda_koleo in every config (got "
                       f"d_out={c.d_out}, lambda_koleo={c.lambda_koleo})")
  log_dirs = [c.log_dir for c in configs if c.log_dir is not None]
  for i, log_dir in enumerate(log_dirs):
    if any(_outputs.same_path(log_dir, other) for other in log_dirs[:i]):
      raise ValueError(f"train_many: several configs log to {log_dir}; give each model its "
                       "own log_dir (one directory's events are read as one run's curves)")
  n = int(getattr(dataset, "train", dataset).shape[0])
  groups: dict[Any, list[int]] = {}
  for i, c in enumerate(configs):
    key = {k: v for k, v in c.to_dict().items() if k not in _MODEL_AXIS_FIELDS}
    rows = c.replace(val_every=0) if validation is not None else c
    split = fingerprint(*[a for a in split_indices(n, rows) if a is not None])
    groups.setdefault((json.dumps(key, sort_keys=True), split), []).append(i)
  results: list[TrainResult | None] = [None] * len(configs)
  for members in groups.values():
    if len(members) > 1 and any(configs[i].checkpoint_dir for i in members):
      raise ValueError("train_many does not checkpoint models trained as one program; "
                       "train them one by one with train() to checkpoint")

    def each(record, members=members):
      if callback is not None:
        callback({**record, "model": members[record.pop("model", 0)]})

    trained = _train_group([configs[i] for i in members], dataset, mesh,
                           None if callback is None else each, validation)
    for i, r in zip(members, trained):
      results[i] = r
  return results


def _model_view(tree, i: int | None):
  """Model i of a tree stacked on a leading model axis (the tree itself for one model)."""
  return tree if i is None else jax.tree_util.tree_map(lambda a: a[i], tree)


def _train_group(configs: list[TrainConfig], dataset, mesh, callback, validation
                 ) -> list[TrainResult]:
  """The training loop for models that share a shape and data (``train_many``'s groups)."""
  config = configs[0]
  multi = len(configs) > 1
  x_all = getattr(dataset, "train", dataset)
  ndev = sharding.mesh_size(mesh)
  for c in configs:
    _check_inputs(c, x_all, ndev)
  d_in = int(x_all.shape[1])
  if validation is None:
    xt, val = split_train_validation(x_all, config, mesh)
  else:
    xt, val = split_train_validation(x_all, config.replace(val_every=0), mesh)
    val = validation_split(*validation, mesh) if config.val_every > 0 else None
    if val is not None and val.query.shape[1] != d_in:
      raise ValueError(f"validation vectors have d={val.query.shape[1]} but the training "
                       f"vectors have d={d_in}")
  nt = xt.shape[0]
  _check_train_size(config, nt)
  codec = make_codec(config)
  validators = quantizers.validation_quantizers(config)
  metric = quantizers.metric_key(config.quantizer, 10)
  scale = 1.0
  if config.input_scaling == "mean_norm":
    scale = float(np.mean(np.linalg.norm(xt, axis=1))) or 1.0
  checkpointer = None
  if config.checkpoint_dir and not multi:
    arrays = (xt,) if val is None else (xt, val.query, val.base)
    checkpointer = Checkpointer(config.checkpoint_dir, config, d_in, fingerprint(*arrays))
  xt_dev = jnp.asarray(xt / np.float32(scale))
  if mesh is not None:
    xt_dev = sharding.replicate(xt_dev, mesh)

  method = mining.mining_method(config.mining, nt)
  miners = [mining.NegativeMiner(c.rank_negative, include_self=c.neighbors_include_self,
                                 method=method, recall_target=c.mining_recall, seed=c.seed,
                                 mesh=mesh) for c in configs]
  t0 = time.perf_counter()
  k_input = config.rank_positive + (0 if config.neighbors_include_self else 1)
  if method == "graph":  # the input-space lists also seed the first epoch's mining
    k_input = max(k_input, miners[0].width(nt))
  neighbors = mining.input_neighbors(xt_dev, k_input, mesh=mesh)
  positives = jnp.asarray(mining.positives_from(neighbors, config.rank_positive,
                                                include_self=config.neighbors_include_self))
  if method == "graph":
    for miner in miners:
      miner.start(neighbors[:, :miner.width(nt)])
  logger.info("exact positives for %d vectors in %.1fs", nt, time.perf_counter() - t0)

  keys, states = [], []
  for c in configs:
    init_key, key = jax.random.split(jax.random.PRNGKey(c.seed))
    keys.append(key)
    states.append(make_train_state(c, d_in, steps_per_epoch(c, nt), init_key, mesh))
  state = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *states) if multi else states[0]
  del states
  epoch_fn = make_epoch_fn(nt, config.batch_size, config.drop_remainder, models=multi)
  views = list(range(len(configs))) if multi else [None]

  bests = [{"metric": -1.0, "params": None, "batch_stats": None} for _ in configs]
  start, history = 0, []
  if checkpointer is not None:
    arrays, bests[0], history, start = checkpointer.restore(state.arrays(), bests[0])
    if mesh is not None and start:  # orbax commits restored arrays to one device
      arrays = sharding.replicate(arrays, mesh)
    state = state.replace(**arrays)
    if start:
      logger.info("resumed from %s at epoch %d", config.checkpoint_dir, start)
  # From the restored state: a run whose checkpoint already holds every epoch trains
  # nothing and returns these.
  results = [TrainResult(_model_view(state.params, i), _model_view(state.batch_stats, i), c,
                         d_in, scale, []) for c, i in zip(configs, views)]
  results[0].history = history

  # One writer per model (a no-op without log_dir).
  writers = [_tensorboard.EpochWriter(c, first_epoch=start + 1) for c in configs]
  bar = tqdm(range(start, config.epochs), desc="train", unit="epoch",
             disable=not config.verbose, initial=start, total=config.epochs)
  try:
    for epoch in bar:
      t_epoch = time.perf_counter()
      negatives, mining_s = [], []
      for result, miner, i in zip(results, miners, views):
        result.params, result.batch_stats = (_model_view(state.params, i),
                                             _model_view(state.batch_stats, i))
        yt = result.apply_device(xt_dev)
        t_mine = time.perf_counter()
        negatives.append(jnp.asarray(miner(
            yt, l2_normalize(codec.quantize(yt)) if config.end_to_end else yt)))
        mining_s.append(time.perf_counter() - t_mine)
      epoch_keys = [jax.random.fold_in(key, epoch) for key in keys]
      t_sgd = time.perf_counter()
      state, metrics = epoch_fn(state, xt_dev, positives,
                                jnp.stack(negatives) if multi else negatives[0],
                                jnp.stack(epoch_keys) if multi else epoch_keys[0])
      metrics = jax.device_get(metrics)
      t_sgd = (time.perf_counter() - t_sgd) / len(configs)  # the models' shared program
      records = []
      for c, result, miner, best, i, t_mine in zip(configs, results, miners, bests, views,
                                                   mining_s):
        m = _model_view(metrics, i)
        record = {"epoch": epoch + 1, "lr": float(m["lr"][-1]), "loss": float(np.mean(m["loss"])),
                  "triplet": float(np.mean(m["triplet"])), "koleo": float(np.mean(m["koleo"])),
                  "violations": int(np.sum(m["violations"])), "mining_s": round(t_mine, 3),
                  "sgd_s": round(t_sgd, 3)}
        if method == "graph":
          record.update(mining_recall=miner.last["recall"], mining_exact=miner.last["exact"],
                        mining_column=miner.last["column"])
        if not np.isfinite(record["loss"]):
          which = f" (lambda_koleo={c.lambda_koleo}, seed={c.seed})" if multi else ""
          raise FloatingPointError(f"loss became {record['loss']} at epoch {epoch + 1}{which}; "
                                   "lower the learning rate or check the data")
        result.params, result.batch_stats = (_model_view(state.params, i),
                                             _model_view(state.batch_stats, i))
        if val is not None and ((epoch + 1) % config.val_every == 0
                                or epoch + 1 == config.epochs):
          hits: dict = {}
          record.update(validate(result, val, validators, mesh, hits=hits))
          if record.get(metric, -1.0) > best["metric"]:
            # A copy: the next epoch donates (and may overwrite) the state's buffers.
            params, stats = jax.tree_util.tree_map(jnp.copy, (result.params, result.batch_stats))
            best.update(metric=record[metric], params=params, batch_stats=stats,
                        epoch=epoch + 1, hits=hits)
        records.append(record)
      for c, result, record, i in zip(configs, results, records, views):
        record["time_s"] = round(time.perf_counter() - t_epoch, 3)
        result.history.append(record)
        _log_epoch(record, c, bar, i)
      if checkpointer is not None:
        checkpointer.save(epoch + 1, state.arrays(), bests[0], results[0].history)
      for writer, record in zip(writers, records):
        writer(record)
      if callback is not None:
        for record, i in zip(records, views):
          callback(record if i is None else {**record, "model": i})
  finally:
    bar.close()
    for writer in writers:
      writer.close()
    if checkpointer is not None:
      checkpointer.close()
  for result, best in zip(results, bests):
    if best["params"] is not None:
      result.params, result.batch_stats = best["params"], best["batch_stats"]
      result.validation_hits = best.get("hits")
  return results


def _log_epoch(record: dict, config: TrainConfig, bar, model: int | None = None) -> None:
  line = "" if model is None else f"model {model} (lambda {config.lambda_koleo:g}) "
  line += (f"epoch {record['epoch']}/{config.epochs} lr {record['lr']:.3g} "
           f"loss {record['loss']:.4f} = triplet {record['triplet']:.4f} + "
           f"{config.lambda_koleo:g}*koleo {record['koleo']:.4f} | violating triplets "
           f"{record['violations']} | {record['time_s']:.1f}s")
  if "mining_recall" in record:
    how = "exact" if record["mining_exact"] else f"graph, recall {record['mining_recall']:.2f}"
    line += f" (mining {record['mining_s']:.1f}s, {how})"
  head = quantizers.metric_key(config.quantizer, "")
  if head + "10" in record:
    recalls = "/".join(f"{record[k]:.3f}" for k in record if k.startswith(head))
    line += f" | val {config.quantizer} R@1/10/100 {recalls}"
  logger.info(line)
  if config.verbose:
    bar.write(line)


