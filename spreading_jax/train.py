"""The paper's training recipe: triplet + KoLeo loss, SGD with a block lr schedule, as a jitted
optax loop whose every epoch is one compiled program, data parallel over a device mesh.

Per epoch (Sablayrolles et al. 2019, section 4):
  1. negatives: the ``rank_negative``-th nearest neighbour of every catalyzed training
     vector among the catalyzed (end-to-end: quantized) training vectors;
  2. one ``lax.scan`` over shuffled batches: the positive of each anchor is drawn among
     its ``rank_positive`` exact input-space neighbours (computed once), then one SGD step
     on triplet + λ·KoLeo;
  3. every ``val_every`` epochs, 1-recall@1/10/100 of catalyzer + Zn lattice (and + sign
     bits) on a validation split carved from the training vectors; the best model by
     lattice recall@10 is kept.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import time
from typing import Any, Callable, NamedTuple, Sequence

import flax
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P
from tqdm.auto import tqdm

from spreading_jax import binary, data, lattice, search, sharding
from spreading_jax._validation import check_int, check_vectors
from spreading_jax.catalyzer import Catalyzer, l2_normalize
from spreading_jax.losses import koleo, triplet_rank

logger = logging.getLogger("spreading_jax")

FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Hyper-parameters; the defaults are the paper's 64-bit lattice recipe.

  Attributes:
    d_out: output dimension of the catalyzer (24 in the paper's 64-bit setting).
    hidden: hidden layer widths.
    epochs: number of epochs (160 in the paper; ~90% of the accuracy after 10).
    batch_size: global batch size (split across devices when a mesh is given).
    lr_schedule: comma-separated learning rates, each held for an equal share of epochs.
    momentum: SGD momentum.
    lambda_koleo: weight λ of the KoLeo regularizer (paper grid 0.001 ... 0.05).
    rank_positive: positives are drawn among this many exact input-space neighbours.
    rank_negative: the negative is this-th output-space neighbour (self excluded).
    end_to_end: pass positives and negatives through the lattice quantizer
      (straight-through) and mine negatives among quantized outputs.
    r2: squared radius of the Zn lattice used for validation and end-to-end training;
      None picks the largest one whose code fits ``bits``.
    bits: code size used when ``r2`` is None.
    val_every: validate every this many epochs (and after the last one); 0 disables.
    val_queries: validation queries carved from the training vectors.
    val_base: validation database size carved from the training vectors (None: up to
      10,000 and at most a fifth of the training set).
    num_train: cap on the number of training vectors (None: all that remain).
    seed: seed of initialization, shuffling, positive draws and the validation split.
    checkpoint_dir: directory for per-epoch checkpoints and history.jsonl; a run finds
      its last checkpoint there and resumes from it.
    verbose: progress bar and one log line per epoch.
  """
  d_out: int = 24
  hidden: tuple[int, ...] = (1024, 1024)
  epochs: int = 160
  batch_size: int = 64
  lr_schedule: str = "0.1,0.1,0.05,0.01"
  momentum: float = 0.9
  lambda_koleo: float = 0.05
  rank_positive: int = 10
  rank_negative: int = 50
  end_to_end: bool = False
  r2: int | None = 79
  bits: int = 64
  val_every: int = 10
  val_queries: int = 1000
  val_base: int | None = None
  num_train: int | None = None
  seed: int = 0
  checkpoint_dir: str | None = None
  verbose: bool = True

  def replace(self, **changes) -> "TrainConfig":
    return dataclasses.replace(self, **changes)

  def lr_values(self) -> list[float]:
    try:
      values = [float(v) for v in str(self.lr_schedule).split(",") if v.strip()]
    except ValueError:
      values = []
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
      raise ValueError(f"lr_schedule={self.lr_schedule!r} must be comma-separated non-negative "
                       "numbers, e.g. '0.1,0.1,0.05,0.01'")
    return values

  def lattice_r2(self) -> int:
    """The lattice squared radius, from ``r2`` or from ``bits``."""
    if self.r2 is not None:
      return check_int("r2", self.r2, minimum=1)
    bits = check_int("bits", self.bits, minimum=1)
    try:
      return lattice.zn_r2_for_bits(self.d_out, bits)
    except ValueError as e:
      raise ValueError(f"d_out={self.d_out} is too large for a {bits}-bit lattice code: {e}") from e

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d["hidden"] = list(self.hidden)
    return d

  @classmethod
  def from_dict(cls, d: dict) -> "TrainConfig":
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
      raise ValueError(f"unknown TrainConfig fields: {sorted(unknown)}")
    d = dict(d)
    if "hidden" in d:
      d["hidden"] = tuple(int(h) for h in d["hidden"])
    return cls(**d)


def lr_for_epoch(config: TrainConfig, epoch: int) -> float:
  """Block schedule: value j of the list is used for epochs [j*E/L, (j+1)*E/L)."""
  values = config.lr_values()
  return values[min(len(values) - 1, epoch * len(values) // config.epochs)]


# ---------------------------------------------------------------------------------------
# The trained model.

@dataclasses.dataclass
class TrainResult:
  """A trained catalyzer: parameters, BatchNorm statistics, the input scale and the history.

  ``apply(x)`` maps raw vectors (numpy or jax, any batch size, any real dtype) to
  catalyzed unit vectors with a jitted forward pass run in fixed-size chunks.
  """
  params: Any
  batch_stats: Any
  config: TrainConfig
  d_in: int
  input_scale: float
  history: list[dict] = dataclasses.field(default_factory=list)

  @property
  def module(self) -> Catalyzer:
    return Catalyzer(d_out=self.config.d_out, hidden=tuple(self.config.hidden))

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}

  def apply(self, x, batch_size: int = 16384) -> np.ndarray:
    """Catalyzes x: [n, d_in] -> f32[n, d_out] (unit rows), in chunks of ``batch_size``."""
    check_vectors("x", x, d=self.d_in, d_name="d_in")
    batch_size = check_int("batch_size", batch_size, minimum=1)
    fwd = _forward_fn(self.module)
    n = x.shape[0]
    out = np.empty((n, self.config.d_out), np.float32)
    chunk = min(batch_size, sharding.round_up(max(n, 1), 8))
    for start in range(0, n, chunk):
      xb = np.asarray(x[start:start + chunk], np.float32)
      m = xb.shape[0]
      y = fwd(self.variables, jnp.asarray(sharding.pad_rows(xb, chunk)), self.input_scale)
      out[start:start + m] = np.asarray(y[:m])
    return out

  def save(self, path: str | os.PathLike) -> None:
    """Writes the model to the directory ``path`` atomically (params + JSON metadata)."""
    blob = flax.serialization.to_bytes(self.variables)
    meta = {"format_version": FORMAT_VERSION, "kind": "spreading_jax.catalyzer",
            "config": self.config.to_dict(), "d_in": self.d_in,
            "input_scale": self.input_scale, "variables_bytes": len(blob),
            "variables_sha256": _sha256(blob)}
    with data.atomic_output_dir(path) as tmp:
      with open(os.path.join(tmp, "variables.msgpack"), "wb") as f:
        f.write(blob)
      with open(os.path.join(tmp, "model.json"), "w") as f:
        json.dump(meta, f, indent=2)
      with open(os.path.join(tmp, "history.json"), "w") as f:
        json.dump(self.history, f)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "TrainResult":
    """Reads a model written by ``save``; raises ValueError if it is incomplete or corrupt."""
    path = os.fspath(path)
    meta_path = os.path.join(path, "model.json")
    var_path = os.path.join(path, "variables.msgpack")
    if not os.path.isfile(meta_path) or not os.path.isfile(var_path):
      raise ValueError(f"{path} is not a saved catalyzer (model.json/variables.msgpack missing)")
    try:
      with open(meta_path) as f:
        meta = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{meta_path} is corrupt: {e}") from e
    if meta.get("kind") != "spreading_jax.catalyzer":
      raise ValueError(f"{meta_path} does not describe a catalyzer")
    if meta.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{path} has format version {meta.get('format_version')}, "
                       f"this library reads version {FORMAT_VERSION}")
    with open(var_path, "rb") as f:
      blob = f.read()
    if len(blob) != meta["variables_bytes"] or _sha256(blob) != meta["variables_sha256"]:
      raise ValueError(f"{var_path} is truncated or corrupt (size/checksum mismatch)")
    config = TrainConfig.from_dict(meta["config"])
    module = Catalyzer(d_out=config.d_out, hidden=tuple(config.hidden))
    template = module.init(jax.random.PRNGKey(0), jnp.zeros((1, meta["d_in"])), train=False)
    variables = flax.serialization.from_bytes(template, blob)
    history = []
    hist_path = os.path.join(path, "history.json")
    if os.path.isfile(hist_path):
      with open(hist_path) as f:
        history = json.load(f)
    return cls(variables["params"], variables["batch_stats"], config, int(meta["d_in"]),
               float(meta["input_scale"]), history)


def _sha256(blob: bytes) -> str:
  import hashlib
  return hashlib.sha256(blob).hexdigest()


_FORWARD_CACHE: dict = {}


def _forward_fn(module: Catalyzer) -> Callable:
  """A cached jitted eval-mode forward pass for ``module``."""
  key = (module.d_out, tuple(module.hidden))
  if key not in _FORWARD_CACHE:
    @jax.jit
    def fwd(variables, x, scale):
      return module.apply(variables, x / scale, train=False)
    _FORWARD_CACHE[key] = fwd
  return _FORWARD_CACHE[key]


# ---------------------------------------------------------------------------------------
# Training state and the compiled epoch.

class TrainState(NamedTuple):
  params: Any
  batch_stats: Any
  opt_state: Any


def make_optimizer(config: TrainConfig, steps_per_epoch: int):
  """SGD with momentum and the block learning-rate schedule, indexed by the step count.

  Returns (optax transformation, schedule(step) -> lr).
  """
  values = jnp.asarray(config.lr_values(), jnp.float32)
  n_values, epochs = len(config.lr_values()), config.epochs

  def schedule(count):
    epoch = count // steps_per_epoch
    return values[jnp.minimum(n_values - 1, (epoch * n_values) // epochs)]

  return optax.sgd(learning_rate=schedule, momentum=config.momentum), schedule


def _loss_and_grads(module: Catalyzer, config: TrainConfig, codec, global_batch: int,
                    axis: str | None):
  """Returns f(params, batch_stats, x f32[b, 3, d_in]) -> (grads, batch_stats, metrics).

  x holds (anchor, positive, negative) rows; b is the local batch. The loss is written
  as this device's share of the global mean, so that the gradients summed over devices
  (which shard_map's transpose of a replicated input does) equal the global gradient.
  """
  def local_loss(params, batch_stats, x):
    b = x.shape[0]
    flat = jnp.concatenate([x[:, 0], x[:, 1], x[:, 2]], axis=0)
    y, updates = module.apply({"params": params, "batch_stats": batch_stats}, flat, train=True,
                              mutable=["batch_stats"])
    a, p, n = y[:b], y[b:2 * b], y[2 * b:]
    if config.end_to_end:
      p, n = codec.quantize_ste(p), codec.quantize_ste(n)
    t, violations = triplet_rank(a, p, n)
    k = koleo(a, axis_name=axis)
    loss = (jnp.sum(t) + config.lambda_koleo * jnp.sum(k)) / global_batch
    return loss, (updates["batch_stats"], jnp.sum(t), jnp.sum(k), violations)

  def fn(params, batch_stats, x):
    grads, (batch_stats, t_sum, k_sum, violations) = jax.grad(local_loss, has_aux=True)(
        params, batch_stats, x)
    if axis is not None:
      t_sum, k_sum, violations = jax.lax.psum((t_sum, k_sum, violations), axis)
    metrics = {"triplet": t_sum / global_batch, "koleo": k_sum / global_batch,
               "violations": violations}
    return grads, batch_stats, metrics

  return fn


def make_epoch_fn(module_def: Callable[[str | None], Catalyzer], config: TrainConfig, codec,
                  tx: optax.GradientTransformation, schedule: Callable, steps_per_epoch: int,
                  mesh: Mesh | None = None) -> Callable:
  """Builds the jitted epoch: ``epoch(state, xt, positives, negatives, key, epoch_index)
  -> (state, metrics)``.

  The whole epoch is one ``lax.scan`` over batches of a device-resident permutation; the
  batch is split across the mesh's data axis with ``shard_map`` (BatchNorm statistics and
  KoLeo neighbours over the global batch), and the optax update is applied to the
  replicated parameters. metrics: per-step arrays (loss, triplet, koleo, violations, lr).
  """
  bs = config.batch_size
  if mesh is None:
    grad_fn = _loss_and_grads(module_def(None), config, codec, bs, None)
  else:
    axis = sharding.axis_name(mesh)
    grad_fn = jax.shard_map(
        _loss_and_grads(module_def(axis), config, codec, bs, axis), mesh=mesh,
        in_specs=(P(), P(), P(axis)), out_specs=(P(), P(), P()))

  def step(state: TrainState, inputs, xt, positives, negatives, epoch_key, epoch_index):
    idx, i = inputs
    key = jax.random.fold_in(epoch_key, i)
    pick = jax.random.randint(key, (bs,), 0, positives.shape[1])
    pos = positives[idx, pick]
    neg = negatives[idx]
    x = jnp.stack([xt[idx], xt[pos], xt[neg]], axis=1)  # f32[bs, 3, d_in]
    grads, batch_stats, metrics = grad_fn(state.params, state.batch_stats, x)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    lr = schedule(epoch_index * steps_per_epoch + i)
    metrics = dict(metrics, lr=lr,
                   loss=metrics["triplet"] + config.lambda_koleo * metrics["koleo"])
    return TrainState(params, batch_stats, opt_state), metrics

  @functools.partial(jax.jit, donate_argnums=(0,))
  def epoch(state, xt, positives, negatives, epoch_key, epoch_index):
    n = xt.shape[0]
    perm = jax.random.permutation(epoch_key, n)[:steps_per_epoch * bs]
    batches = perm.reshape(steps_per_epoch, bs).astype(jnp.int32)
    body = lambda s, inp: step(s, inp, xt, positives, negatives, epoch_key, epoch_index)
    return jax.lax.scan(body, state, (batches, jnp.arange(steps_per_epoch)))

  return epoch


# ---------------------------------------------------------------------------------------
# Neighbours: positives once, negatives every epoch.

def drop_self(ids: np.ndarray, k: int) -> np.ndarray:
  """Removes each row's own id from its neighbour list. ids: i32[n, k+1] -> i32[n, k].

  Row i of ``ids`` lists neighbours of vector i, usually starting with i itself; with
  duplicate vectors i may sit later (or be absent, then the last column is dropped).
  """
  ids = np.asarray(ids)
  n = ids.shape[0]
  is_self = ids == np.arange(n)[:, None]
  # Stable sort puts every non-self column first, in order.
  order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(ids, order, axis=1).astype(np.int32)


def exact_positives(xt, rank_positive: int, mesh: Mesh | None = None) -> np.ndarray:
  """The ``rank_positive`` exact input-space neighbours of every training vector (self excluded)."""
  _, ids = search.knn(xt, xt, rank_positive + 1, mesh=mesh)
  return drop_self(ids, rank_positive)


def mine_negatives(yt, rank_negative: int, mesh: Mesh | None = None) -> np.ndarray:
  """The ``rank_negative``-th neighbour (self excluded) of every row of yt among yt. -> i32[n]."""
  _, ids = search.knn(yt, yt, rank_negative + 1, metric="ip", mesh=mesh)
  return drop_self(ids, rank_negative)[:, rank_negative - 1]


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
  ``split_train_validation`` then splits the sample.
  """
  if config.num_train is None:
    return None
  need = check_int("num_train", config.num_train, minimum=1)
  if config.val_every > 0:
    need += config.val_queries + (config.val_base if config.val_base is not None else 10_000)
    need *= 2  # the validation split may take at most half of the rows it is given
  if need >= n:
    return None
  return data.sample_indices(n, need, config.seed + 1)


def split_train_validation(x, config: TrainConfig, mesh: Mesh | None = None):
  """Carves validation queries and database from the training vectors (seeded, disjoint).

  Returns (train rows f32[nt, d], ValidationSplit or None).
  """
  n = x.shape[0]
  rng = np.random.default_rng(config.seed)
  perm = rng.permutation(n)
  if config.val_every <= 0:
    train_idx, val = perm, None
  else:
    nq = check_int("val_queries", config.val_queries, minimum=1)
    nb = config.val_base
    if nb is None:
      nb = min(10_000, (n - nq) // 5)
    nb = check_int("val_base", nb, minimum=1)
    if nq + nb >= n // 2:
      raise ValueError(f"validation split (val_queries={nq} + val_base={nb}) would leave less than "
                       f"half of the {n} training vectors; lower val_queries/val_base or set "
                       "val_every=0")
    q_idx, b_idx, train_idx = np.sort(perm[:nq]), np.sort(perm[nq:nq + nb]), perm[nq + nb:]
    query = np.asarray(x[q_idx], np.float32)
    base = np.asarray(x[b_idx], np.float32)
    _, gt = search.knn(query, base, min(100, nb), mesh=mesh)
    val = ValidationSplit(query, base, np.asarray(gt))
  if config.num_train is not None:
    train_idx = train_idx[:check_int("num_train", config.num_train, minimum=1)]
  return np.asarray(x[np.sort(train_idx)], np.float32), val


def validate(result: TrainResult, val: ValidationSplit, codec, mesh: Mesh | None = None) -> dict:
  """1-recall@{1,10,100} of catalyzer + Zn lattice (asymmetric) and + sign bits (Hamming)."""
  k = val.groundtruth.shape[1]
  ks = tuple(x for x in (1, 10, 100) if x <= k)
  yq, yb = result.apply(val.query), result.apply(val.base)
  points = l2_normalize(codec.quantize(yb))
  _, ids = search.knn(yq, points, k, metric="ip", mesh=mesh)
  out = {f"lattice_R@{r}": v for r, v in search.recall_at(ids, val.groundtruth, ks).items()}
  _, ids = search.hamming_knn(binary.sign_codes(yq), binary.sign_codes(yb), k, mesh=mesh)
  out.update({f"sign_R@{r}": v for r, v in search.recall_at(ids, val.groundtruth, ks).items()})
  return out


# ---------------------------------------------------------------------------------------
# Checkpoints.

def _checkpoint_manager(directory: str):
  import orbax.checkpoint as ocp
  options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
  return ocp.CheckpointManager(os.path.abspath(os.path.join(directory, "checkpoints")),
                               options=options)


def _write_json_atomic(path: str, obj, jsonl: bool = False) -> None:
  with data.atomic_output(path) as tmp:
    with open(tmp, "w") as f:
      if jsonl:
        f.writelines(json.dumps(r) + "\n" for r in obj)
      else:
        json.dump(obj, f, indent=2)


def _check_resume_config(directory: str, config: TrainConfig, d_in: int) -> None:
  path = os.path.join(directory, "config.json")
  want = dict(config.to_dict(), d_in=d_in)
  want.pop("verbose"); want.pop("checkpoint_dir")
  if os.path.exists(path):
    with open(path) as f:
      have = json.load(f)
    diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
    if diff:
      raise ValueError(f"checkpoint_dir {directory} holds a run with a different config "
                       f"({', '.join(diff)}); use another directory or the same config")
  else:
    os.makedirs(directory, exist_ok=True)
    _write_json_atomic(path, want)


# ---------------------------------------------------------------------------------------
# The training loop.

def _check_inputs(config: TrainConfig, x, ndev: int) -> None:
  check_vectors("dataset.train", x, min_rows=1)
  check_int("d_out", config.d_out, minimum=1)
  check_int("epochs", config.epochs, minimum=1)
  check_int("batch_size", config.batch_size, minimum=2)
  check_int("rank_positive", config.rank_positive, minimum=1)
  check_int("rank_negative", config.rank_negative, minimum=1)
  check_int("val_every", config.val_every, minimum=0)
  if not config.hidden or any(int(h) < 1 for h in config.hidden):
    raise ValueError(f"hidden={config.hidden} must be a non-empty tuple of positive widths")
  if not math.isfinite(config.lambda_koleo) or config.lambda_koleo < 0:
    raise ValueError(f"lambda_koleo={config.lambda_koleo} must be a finite number >= 0")
  config.lr_values()
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


def make_codec(config: TrainConfig):
  """The Zn sphere codec of ``config`` (raises if d_out does not fit the requested bits)."""
  r2 = config.lattice_r2()
  codec = lattice.ZnSphereCodec(config.d_out, r2)
  if config.r2 is not None and codec.code_bits > config.bits:
    raise ValueError(f"d_out={config.d_out} with r2={r2} needs {codec.code_bits}-bit codes, more "
                     f"than bits={config.bits}; set r2=None to use the largest radius that fits "
                     "or lower d_out")
  return codec


def train(config: TrainConfig, dataset, mesh: Mesh | None = None,
          callback: Callable[[dict], Any] | None = None) -> TrainResult:
  """Trains a catalyzer on ``dataset.train`` with the paper's recipe.

  Args:
    config: hyper-parameters (see ``TrainConfig``).
    dataset: a ``data.Dataset`` (only ``train`` is used: queries never train), or any
      object with a ``train`` array, or the array itself.
    mesh: optional 1-D mesh; the batch is split over its data axis (results match one
      device up to float rounding).
    callback: called with each epoch's history record after its checkpoint is written
      (logging, early stopping by raising).

  Returns:
    TrainResult with the best parameters by validation lattice recall@10 (the last ones
    when validation is off) and the per-epoch history.

  Example (a config in ``experiments/configs`` holds the paper's settings)::

    result = train(TrainConfig(epochs=10), load_dataset("wordllama-256"))
    y = result.apply(xq)
  """
  x_all = getattr(dataset, "train", dataset)
  ndev = sharding.mesh_size(mesh)
  _check_inputs(config, x_all, ndev)
  codec = make_codec(config)
  d_in = int(x_all.shape[1])
  if config.checkpoint_dir:
    _check_resume_config(config.checkpoint_dir, config, d_in)

  xt, val = split_train_validation(x_all, config, mesh)
  nt = xt.shape[0]
  _check_train_size(config, nt)
  steps = nt // config.batch_size
  scale = float(np.mean(np.linalg.norm(xt, axis=1))) or 1.0
  xt_dev = jnp.asarray(xt / np.float32(scale))
  if mesh is not None:
    xt_dev = sharding.replicate(xt_dev, mesh)

  t0 = time.perf_counter()
  positives = jnp.asarray(exact_positives(xt_dev, config.rank_positive, mesh))
  logger.info("exact positives for %d vectors in %.1fs", nt, time.perf_counter() - t0)

  def module_def(axis):
    return Catalyzer(d_out=config.d_out, hidden=tuple(config.hidden), axis_name=axis)

  init_key, key = jax.random.split(jax.random.PRNGKey(config.seed))
  variables = module_def(None).init(init_key, jnp.zeros((2, d_in)), train=False)
  tx, schedule = make_optimizer(config, steps)
  state = TrainState(variables["params"], variables["batch_stats"],
                     tx.init(variables["params"]))
  epoch_fn = make_epoch_fn(module_def, config, codec, tx, schedule, steps, mesh)

  result = TrainResult(state.params, state.batch_stats, config, d_in, scale, [])
  best = {"metric": -1.0, "params": None, "batch_stats": None}
  start = 0
  manager = _checkpoint_manager(config.checkpoint_dir) if config.checkpoint_dir else None
  if manager is not None and manager.latest_step() is not None:
    state, best, result.history, start = _restore(manager, state, best)
    logger.info("resumed from %s at epoch %d", config.checkpoint_dir, start)

  bar = tqdm(range(start, config.epochs), desc="train", unit="epoch",
             disable=not config.verbose, initial=start, total=config.epochs)
  try:
    for epoch in bar:
      t_epoch = time.perf_counter()
      result.params, result.batch_stats = state.params, state.batch_stats
      yt = _catalyze_device(result, xt_dev)
      if config.end_to_end:
        yt = l2_normalize(codec.quantize(yt))
      t_mine = time.perf_counter()
      negatives = jnp.asarray(mine_negatives(yt, config.rank_negative, mesh))
      t_mine = time.perf_counter() - t_mine
      state, metrics = epoch_fn(state, xt_dev, positives, negatives,
                                jax.random.fold_in(key, epoch), jnp.int32(epoch))
      metrics = jax.device_get(metrics)
      record = {"epoch": epoch + 1, "lr": float(metrics["lr"][-1]),
                "loss": float(np.mean(metrics["loss"])),
                "triplet": float(np.mean(metrics["triplet"])),
                "koleo": float(np.mean(metrics["koleo"])),
                "violations": int(np.sum(metrics["violations"])),
                "mining_s": round(t_mine, 3)}
      if not np.isfinite(record["loss"]):
        raise FloatingPointError(f"loss became {record['loss']} at epoch {epoch + 1}; lower the "
                                 "learning rate or check the data")
      result.params, result.batch_stats = state.params, state.batch_stats
      if val is not None and ((epoch + 1) % config.val_every == 0 or epoch + 1 == config.epochs):
        record.update(validate(result, val, codec, mesh))
        if record.get("lattice_R@10", -1.0) > best["metric"]:
          # A copy: the next epoch donates (and may overwrite) the state's buffers.
          params, stats = jax.tree_util.tree_map(jnp.copy, (state.params, state.batch_stats))
          best = {"metric": record["lattice_R@10"], "params": params, "batch_stats": stats,
                  "epoch": epoch + 1}
      record["time_s"] = round(time.perf_counter() - t_epoch, 3)
      result.history.append(record)
      _log_epoch(record, config, bar)
      if manager is not None:
        _save(manager, epoch, state, best, result.history, config.checkpoint_dir)
      if callback is not None:
        callback(record)
  finally:
    bar.close()
    if manager is not None:
      manager.wait_until_finished()
      manager.close()
  if best["params"] is not None:
    result.params, result.batch_stats = best["params"], best["batch_stats"]
  return result


def _catalyze_device(result: TrainResult, x_scaled: jax.Array, chunk: int = 16384) -> jax.Array:
  """Eval-mode forward of already-scaled device-resident vectors, in fixed-size chunks."""
  fwd = _forward_fn(result.module)
  n = x_scaled.shape[0]
  chunk = min(chunk, sharding.round_up(n, 8))
  outs = []
  for start in range(0, n, chunk):
    xb = x_scaled[start:start + chunk]
    m = xb.shape[0]
    outs.append(fwd(result.variables, sharding.pad_rows(xb, chunk), 1.0)[:m])
  return jnp.concatenate(outs, axis=0)


def _log_epoch(record: dict, config: TrainConfig, bar) -> None:
  line = (f"epoch {record['epoch']}/{config.epochs} lr {record['lr']:.3g} loss {record['loss']:.4f}"
          f" = triplet {record['triplet']:.4f} + {config.lambda_koleo:g}*koleo "
          f"{record['koleo']:.4f} | violating triplets {record['violations']} | "
          f"{record['time_s']:.1f}s")
  if "lattice_R@10" in record:
    recalls = "/".join(f"{record[k]:.3f}" for k in record if k.startswith("lattice_R@"))
    line += f" | val lattice R@1/10/100 {recalls}"
  logger.info(line)
  if config.verbose:
    bar.write(line)


def _best_meta(best: dict) -> dict:
  """The best-so-far bookkeeping as arrays, saved inside the checkpoint so that it commits
  atomically with the parameters it describes."""
  return {"metric": np.asarray(best["metric"], np.float64),
          "epoch": np.asarray(best.get("epoch") or 0, np.int32),
          "has_best": np.asarray(best["params"] is not None)}


def _save(manager, epoch: int, state: TrainState, best: dict, history: list, directory: str):
  import orbax.checkpoint as ocp
  has_best = best["params"] is not None
  tree = {"state": state._asdict(),
          "best_params": best["params"] if has_best else state.params,
          "best_batch_stats": best["batch_stats"] if has_best else state.batch_stats,
          "best_meta": _best_meta(best)}
  # The history goes first: a crash before the checkpoint commits leaves a history one
  # epoch ahead, which resuming trims to the checkpoint's epoch. The best-so-far record
  # lives inside the checkpoint; best.json is a human-readable copy, never read back.
  _write_json_atomic(os.path.join(directory, "history.jsonl"), history, jsonl=True)
  manager.save(epoch, args=ocp.args.StandardSave(tree))
  manager.wait_until_finished()
  _write_json_atomic(os.path.join(directory, "best.json"),
                     {"metric": best["metric"], "epoch": best.get("epoch"), "has_best": has_best,
                      "checkpoint_epoch": epoch + 1})


def _restore(manager, state: TrainState, best: dict):
  import orbax.checkpoint as ocp
  step = manager.latest_step()
  directory = os.path.dirname(os.fspath(manager.directory))
  template = {"state": state._asdict(), "best_params": state.params,
              "best_batch_stats": state.batch_stats, "best_meta": _best_meta(best)}
  tree = manager.restore(step, args=ocp.args.StandardRestore(template))
  restored = TrainState(**tree["state"])
  meta = tree["best_meta"]
  history_path = os.path.join(directory, "history.jsonl")
  history = []
  if os.path.exists(history_path):
    with open(history_path) as f:
      history = [json.loads(line) for line in f if line.strip()]
  history = [r for r in history if r["epoch"] <= step + 1]
  if bool(meta["has_best"]):
    best = {"metric": float(meta["metric"]), "params": tree["best_params"],
            "batch_stats": tree["best_batch_stats"], "epoch": int(meta["epoch"])}
  return restored, best, history, step + 1
