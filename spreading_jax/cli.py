"""Command line: ``spreading-jax COMMAND`` or ``python -m spreading_jax COMMAND``.

User mistakes (missing file, bad dimension, incompatible model, unwritable output, corrupt
saved file) print one line on stderr and exit with status 2, without a traceback; outputs
are checked before any training or encoding starts. Anything else is a bug and keeps its
traceback. SIGINT and SIGTERM end a command with one line and exit status 130 / 143, after
its cleanup ran (a checkpoint being written is finished first).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path

COMMANDS = {}


def command(name: str, help: str):
  """Registers ``fn(args)`` as subcommand ``name``; ``fn.configure(parser)`` adds its flags."""
  def wrap(fn):
    COMMANDS[name] = (fn, help)
    return fn
  return wrap


class UserError(Exception):
  """An error caused by the user's input: reported as one line, exit status 2."""


# ---------------------------------------------------------------------------------------
# demo

def _configure_demo(p):
  p.add_argument("--dataset", default="fashion-mnist-mini",
                 help="dataset name or ann-benchmarks .hdf5 path (default: fashion-mnist-mini, "
                 "shipped with the package)")
  p.add_argument("--root", default=None, help="data directory searched first for datasets "
                 "on disk (then $SPREADING_DATA, then the cache)")
  p.add_argument("--epochs", type=int, default=10, help="training epochs (default: 10)")
  p.add_argument("--train-rows", type=int, default=None,
                 help="train on the first N training vectors only (a quick look; default: all)")
  p.add_argument("--base-rows", type=int, default=None,
                 help="index and search the first N database vectors only (default: all)")
  p.add_argument("--query-rows", type=int, default=None,
                 help="search with the first N queries only (default: all)")
  p.add_argument("--no-faiss", action="store_true",
                 help="leave out the OPQ baseline (faiss), the slowest row on a small run")
  p.add_argument("--lambda-koleo", type=float, default=0.05,
                 help="KoLeo weight (default 0.05, the original code's default)")
  p.add_argument("--out", default="experiments/results/demo",
                 help="where the table, JSON, plot and saved index go")
  p.add_argument("--seed", type=int, default=0,
                 help="seed of training and of the random projection baseline (default: 0)")


@command("demo", "train a catalyzer, build/save/reload an index, search, print a recall table")
def demo(args):
  from spreading_jax import datasets, evaluate, report, search
  from spreading_jax.index import SpreadingIndex
  from spreading_jax.train import TrainConfig, train

  t_start = time.perf_counter()
  ds = datasets.load_dataset(args.dataset, args.root).as_float32()
  if (args.train_rows, args.base_rows, args.query_rows) != (None, None, None):
    ds = ds.subset(nt=args.train_rows, nb=args.base_rows, nq=args.query_rows)
  print(f"dataset {ds.name}: train {ds.train.shape}, base {ds.base.shape}, "
        f"query {ds.query.shape} (models train on `train` only)", flush=True)
  # d_out and λ given: the paper's shape (``fit`` would screen for another one first when
  # they are unset, see selection.py).
  # 500 validation queries, or on a few hundred rows the most that the validation split
  # allows (it leaves at least half of the rows for training).
  config = TrainConfig(d_out=24, epochs=args.epochs, lambda_koleo=args.lambda_koleo,
                       seed=args.seed, val_every=max(1, args.epochs // 5),
                       val_queries=max(1, min(500, 3 * ds.nt // 8 - 1)))
  t = time.perf_counter()
  model = train(config, ds)
  seconds = {"train": time.perf_counter() - t}

  # The index as a user would ship it: build, save, reload, search.
  t = time.perf_counter()
  index = SpreadingIndex(model, "lattice", bits=64)
  index.add(ds.base)
  out = Path(args.out)
  index.save(out / "index")
  index = SpreadingIndex.load(out / "index")
  ks = evaluate.fitting_ks(ds.nb)
  _, ids = index.search(ds.query, max(ks))
  seconds["index"] = time.perf_counter() - t
  codec = index.quantizer.codec
  rows = [{"method": f"catalyzer + Zn lattice (SpreadingIndex, d={codec.d}, r2={codec.r2})",
           "bits": codec.code_bits, "recall": search.recall_at(ids, ds.groundtruth, ks)}]
  print(f"  {rows[0]['method']}: {rows[0]['recall']}", flush=True)

  def add(method, bits, fn):
    t = time.perf_counter()
    rows.append({"method": method, "bits": bits, "recall": fn()})
    seconds[method] = time.perf_counter() - t
    print(f"  {method}: {rows[-1]['recall']}", flush=True)

  rot = evaluate.random_projection(ds.d, codec.d, seed=args.seed)
  add(f"random projection + Zn lattice (d={codec.d}, r2={codec.r2})", codec.code_bits,
      lambda: evaluate.evaluate_lattice(ds, rot, codec))
  add(f"catalyzer + sign ({model.config.d_out} bits)", model.config.d_out,
      lambda: evaluate.evaluate_sign(ds, model.apply))
  if args.no_faiss:
    print("  faiss baseline skipped (--no-faiss)")
  else:
    try:
      from spreading_jax import baselines
      # 10k training rows: faiss' minimum for 256 centroids per sub-quantizer, and a
      # bounded cost (OPQ on 784-d inputs dominates the demo's evaluation time).
      add("OPQ8_64,PQ8 on raw vectors (faiss)", 64,
          lambda: baselines.evaluate_faiss(ds, "OPQ8_64,PQ8", max_train=10_000))
    except ImportError as e:
      print(f"  faiss baseline skipped (faiss is not installed: {e})")
  table = evaluate.format_table(rows)
  print()
  print(table)
  total = time.perf_counter() - t_start
  payload = {"dataset": ds.name, "config": config.to_dict(),
             "seconds": {k: round(v, 1) for k, v in dict(seconds, total=total).items()},
             "history": model.history, "rows": rows, "versions": report.environment(),
             "command": "python -m spreading_jax demo " + " ".join(sys.argv[2:])}
  report.write_report(out, "demo", payload, table)
  plot = report.plot_training({"catalyzer": model.history}, out / "training.png")
  print(f"\ntrain {seconds['train']:.0f} s, index build+save+load+search "
        f"{seconds['index']:.1f} s, total {total:.0f} s")
  print(f"wrote {out / 'demo.json'}, {out / 'demo.md'}, {plot} and the index {out / 'index'}")


demo.configure = _configure_demo


# ---------------------------------------------------------------------------------------
# train / eval / encode / build / search / info / bench

def _add_distributed_flags(p, what: str):
  p.add_argument("--distributed", action="store_true",
                 help=f"call jax.distributed.initialize() (multi-host: Cloud TPU pods, SLURM, "
                 f"or the flags below); {what}")
  p.add_argument("--coordinator", default=None,
                 help="with --distributed: coordinator host:port (default: auto-detected)")
  p.add_argument("--num-processes", type=int, default=None,
                 help="with --distributed: number of processes (default: auto-detected)")
  p.add_argument("--process-id", type=int, default=None,
                 help="with --distributed: this process's index (default: auto-detected)")
  p.add_argument("--distributed-timeout", type=float, default=None, metavar="SECONDS",
                 help=f"with --distributed: give up (one line, exit status 2) when not all "
                 f"processes have joined after this many seconds (default "
                 f"{DISTRIBUTED_TIMEOUT_S:g})")


# Seconds --distributed waits for all processes to join before giving up.
DISTRIBUTED_TIMEOUT_S = 300.0


def _init_distributed(args):
  """Starts the multi-process runtime for --distributed (no-op otherwise).

  jax waits for the missing peers and then aborts the process with a C++ stack trace; a
  watchdog thread turns the wait into one line on stderr and exit status 2 after
  ``--distributed-timeout`` seconds instead.
  """
  given = [f for f in ("coordinator", "num_processes", "process_id", "distributed_timeout")
           if getattr(args, f, None) is not None]
  if not getattr(args, "distributed", False):
    if given:
      raise UserError(f"--{given[0].replace('_', '-')} needs --distributed")
    return
  timeout = args.distributed_timeout
  timeout = DISTRIBUTED_TIMEOUT_S if timeout is None else timeout
  if not 0 < timeout < 1e7:
    raise UserError(f"--distributed-timeout={timeout:g} must be a positive number of seconds")
  import threading
  import jax

  def give_up():
    print(f"spreading-jax {args.command}: error: --distributed: not all "
          f"{args.num_processes or ''} processes joined within {timeout:g} s (coordinator "
          f"{args.coordinator or 'auto-detected'}); start the others or raise "
          f"--distributed-timeout", file=sys.stderr, flush=True)
    os._exit(2)  # the main thread is blocked inside jax's C++ client

  watchdog = threading.Timer(timeout, give_up)
  watchdog.daemon = True
  watchdog.start()
  try:
    # jax's own deadline comes later so that the watchdog's message is the one printed.
    jax.distributed.initialize(coordinator_address=args.coordinator,
                               num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=int(timeout) + 60)
  except (ValueError, RuntimeError) as e:
    raise UserError(f"jax.distributed.initialize() failed: {e}") from e
  finally:
    watchdog.cancel()


# Errors of a malformed (hand-edited) metadata file surface as these while loading.
_MALFORMED = (KeyError, TypeError, AttributeError, IndexError, OverflowError)


def _load_model(path):
  from spreading_jax.model import TrainResult
  try:
    return TrainResult.load(path)
  except _MALFORMED as e:
    raise UserError(f"{path}: malformed model metadata ({type(e).__name__}: {e})") from e


def _load_index(path):
  from spreading_jax.index import SpreadingIndex
  try:
    return SpreadingIndex.load(path)
  except _MALFORMED as e:
    raise UserError(f"{path}: malformed index metadata ({type(e).__name__}: {e})") from e
  except RuntimeError as e:
    if _faiss_message(e) is None:
      raise
    raise UserError(f"{path}: corrupt faiss index ({_faiss_message(e)})") from e


def _config_file(spec: str) -> tuple[str, str | None]:
  """``path.py:arg`` -> (path.py, arg); any other spec is a path, with arg None."""
  path, sep, arg = spec.rpartition(":")
  return (path, arg or None) if sep and path.endswith(".py") else (spec, None)


def load_config(spec: str | None, sets=(), keys=None) -> dict:
  """A config, the one format of ``train --config`` and ``experiments/run.py``: a dict whose
  "train" is a whole TrainConfig, beside the caller's other keys, with ``--set`` applied.

  Args:
    spec: ``path.py[:arg]``, a Python file whose ``get_config(arg)`` returns that dict
      (the configs in experiments/configs/), or a JSON file of TrainConfig fields (what a
      saved model records as its config); None: ``TrainConfig()``.
    sets: ``key=value`` strings, applied in order: a TrainConfig field (the value parsed by
      the field's type, ``config.replace_from_strings``) or one of ``keys``.
    keys: the other keys a config may hold, name -> (default, parser of a --set value), e.g.
      the runner's dataset and grid; None: other keys are returned unchecked, and ``--set``
      reaches TrainConfig fields only (the CLI, which uses "train").

  Raises:
    ValueError: one line naming a missing file, bad JSON, an unknown key or a bad value.
  """
  import importlib.util
  from spreading_jax.config import TrainConfig, replace_from_strings
  check_keys, keys = keys is not None, dict(keys or {})
  config, train = {k: default for k, (default, _) in keys.items()}, TrainConfig()
  if spec is not None:
    path, arg = _config_file(spec)
    if os.path.isdir(path):
      raise ValueError(f"--config {path} is a directory, a config file was expected")
    if not os.path.isfile(path):
      raise ValueError(f"config file {path} does not exist")
    if path.endswith(".py"):
      module_spec = importlib.util.spec_from_file_location("spreading_jax_config", path)
      module = importlib.util.module_from_spec(module_spec)
      module_spec.loader.exec_module(module)
      if not callable(getattr(module, "get_config", None)):
        raise ValueError(f"{path} defines no get_config(arg)")
      loaded = dict(module.get_config(arg))
      train = loaded.pop("train", train)
      if not isinstance(train, TrainConfig):
        raise ValueError(f"{path}: get_config()['train'] is a {type(train).__name__}, "
                         "a TrainConfig was expected")
      unknown = sorted(set(loaded) - set(keys))
      if unknown and check_keys:
        raise ValueError(f"{path}: unknown config keys {unknown}; known: "
                         f"{['train', *sorted(keys)]}")
      config.update(loaded)
    else:
      try:
        train = TrainConfig.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
      except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
      except (TypeError, ValueError, AttributeError) as e:
        raise ValueError(f"{path}: {e}") from e
  fields = list(TrainConfig.__dataclass_fields__)
  for item in sets:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep:
      raise ValueError(f"--set {item!r}: expected KEY=VALUE")
    if keys and key not in keys and key not in fields:
      raise ValueError(f"--set {item!r}: {key!r} is neither one of {sorted(keys)} nor a "
                       f"TrainConfig field ({', '.join(fields)})")
    if key in keys:
      try:
        config[key] = keys[key][1](text)
      except ValueError as e:
        raise ValueError(f"--set {key}={text!r}: {e}") from None
    else:
      try:
        train = replace_from_strings(train, {key: text})
      except ValueError as e:  # e names the field and the value
        raise ValueError(f"--set {e}") from None
  return {**config, "train": train}


def _configure_train(p):
  p.add_argument("dataset", help="dataset name (e.g. siftsmall), ann-benchmarks .hdf5 path, "
                 "or a .fvecs/.bvecs/.npy file of training vectors")
  p.add_argument("--root", default=None, help="data root (default: $SPREADING_DATA)")
  p.add_argument("--config", default=None, help="config file: a Python config "
                 "(experiments/configs/NAME.py[:ARG], its TrainConfig) or a JSON file of "
                 "TrainConfig fields")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="replace any TrainConfig field of the config (repeatable), e.g. --set "
                 "batch_size=128 --set bn_mode=joint; the flags below override both")
  p.add_argument("--epochs", type=int, default=None, help="override config epochs")
  p.add_argument("--lambda-koleo", type=float, default=None,
                 help="KoLeo weight; unset (here and in --config), it is screened over the "
                 "paper's grid before training (0.05 is kept unless another value beats it by "
                 "more than the validation noise)")
  p.add_argument("--d-out", type=int, default=None,
                 help="catalyzer output dimension; unset, it is screened (with the largest "
                 "lattice radius that fits --bits) before training: 24 is kept unless another "
                 "beats it by more than the validation noise")
  p.add_argument("--bits", type=int, default=None,
                 help="code budget in bits (default 64); the lattice radius is chosen to fit "
                 "(sets r2=None)")
  p.add_argument("--quantizer", default=None,
                 help="the code the model is for: a quantizer name (default lattice; sign fixes "
                 "d_out = bits)")
  p.add_argument("--checkpoint-dir", default=None, help="per-epoch checkpoints; resumes")
  p.add_argument("--log-dir", default=None,
                 help="write TensorBoard event files here: one step per epoch (loss, "
                 "triplet, KoLeo, violations, learning rate, validation recalls, mining and "
                 "SGD seconds) and the config as text; watch with tensorboard --logdir DIR")
  p.add_argument("--out", required=True,
                 help="model directory to write: new, empty, or a saved model (replaced); "
                 "checked before training starts")
  _add_distributed_flags(p, "each process reads its slice of the training vectors, the "
                         "mesh spans all processes' devices, process 0 writes the model")


@command("train", "train a catalyzer and save it to a model directory")
def train_cmd(args):
  from spreading_jax import datasets, sharding, vecs_io
  from spreading_jax import _outputs
  from spreading_jax.autoshape import fit
  from spreading_jax.train import rows_to_read
  config = load_config(args.config, args.set)["train"]
  overrides = {"epochs": args.epochs, "lambda_koleo": args.lambda_koleo, "d_out": args.d_out,
               "checkpoint_dir": args.checkpoint_dir, "quantizer": args.quantizer,
               "log_dir": args.log_dir}
  config = config.replace(**{k: v for k, v in overrides.items() if v is not None})
  if args.bits is not None:
    config = config.replace(bits=args.bits, r2=None)
  if config.d_out is None:
    # A quantizer with one shape at this budget fixes d_out (sign: one bit per dimension).
    from spreading_jax import quantizers
    shapes = quantizers.quantizer_class(config.quantizer).candidate_shapes(config.bits, ())
    if len(shapes) == 1:
      config = config.replace(d_out=shapes[0][0])
  # The output and the checkpoint directory are checked before any data is read, so a
  # mistake there never costs a training run.
  if config.checkpoint_dir is not None:
    # Also when neither exists yet: the model would be written over the checkpoints.
    _outputs.check_apart(config.checkpoint_dir, "--checkpoint-dir", args.out, "--out")
  _outputs.check_output_dir(args.out, "model",
                            inputs=[args.dataset, args.config and _config_file(args.config)[0],
                                    config.checkpoint_dir])
  if config.checkpoint_dir is not None:
    _outputs.check_checkpoint_dir(config.checkpoint_dir, inputs=[args.dataset, args.out])
  if config.log_dir is not None and os.path.exists(config.log_dir) \
      and not os.path.isdir(config.log_dir):
    raise UserError(f"--log-dir {config.log_dir} exists and is not a directory")
  _init_distributed(args)
  import jax
  if Path(args.dataset).suffix.lower() in vecs_io.VECTOR_SUFFIXES:
    xt = vecs_io.read_vectors(args.dataset)  # a user's file: all of it is training data
  else:
    xt = datasets.load_dataset(args.dataset, args.root).train
  # Only the rows training can use are read (a seeded sample when num_train caps a large
  # learn set); in a distributed job each process reads 1/P of them.
  xt = sharding.gather_process_slices(xt, rows_to_read(xt.shape[0], config))
  mesh = sharding.make_mesh() if jax.device_count() > 1 else None
  if mesh is not None and config.batch_size % jax.device_count():
    if jax.process_count() > 1:
      raise UserError(f"batch_size={config.batch_size} must be divisible by the "
                      f"{jax.device_count()} devices of a distributed job")
    mesh = None
  result = fit(config, xt, mesh=mesh)
  if jax.process_index() == 0:
    result.save(args.out)
    print(f"wrote {args.out}")


train_cmd.configure = _configure_train


def _configure_eval(p):
  p.add_argument("model", help="model directory (written by train)")
  p.add_argument("dataset", help="dataset name or .hdf5 path")
  p.add_argument("--root", default=None, help="data root (default: $SPREADING_DATA)")


@command("eval", "recall table of a model on a dataset (the quantizers training validates: "
         "lattice and sign codes)")
def eval_cmd(args):
  from spreading_jax import datasets, evaluate, quantizers
  model = _load_model(args.model)
  ds = datasets.load_dataset(args.dataset, args.root)
  if ds.base.shape[1] != model.d_in:
    raise UserError(f"dataset {args.dataset} has vectors of dimension d_in={ds.base.shape[1]}, "
                    f"but the model {args.model} takes d_in={model.d_in}")
  rows = [{"method": f"catalyzer + {q.describe()}", "bits": q.code_bits,
           "recall": evaluate.evaluate_quantizer(ds, model.apply, q)}
          for q in quantizers.validation_quantizers(model.config)]
  print(evaluate.format_table(rows))


eval_cmd.configure = _configure_eval


def _configure_encode(p):
  p.add_argument("model", help="model directory")
  p.add_argument("input", help="vectors file (.fvecs/.bvecs/.npy/.hdf5)")
  p.add_argument("output", help="codes .npy file (resumes if interrupted, only with the same "
                 "model and input; never one of the inputs)")
  p.add_argument("--key", default=None, help="HDF5 dataset name")
  p.add_argument("--chunk", type=int, default=65536, help="rows per batch (default 65536)")
  p.add_argument("--quantizer", default="lattice",
                 help="'lattice' (default: the model's own lattice, u32 words; 'zn' is read as "
                 "'lattice') or 'sign' (u8 bytes)")
  _add_distributed_flags(p, "process i of P encodes rows [i*n/P, (i+1)*n/P) into its own "
                         "part file")


@command("encode", "encode a vectors file to lattice codes (.npy, u32 words) or sign codes")
def encode_cmd(args):
  import jax
  from spreading_jax import sharding
  from spreading_jax import _outputs
  from spreading_jax.encode import encode_file
  _outputs.check_output_file(args.output, inputs=[args.model, args.input])
  _init_distributed(args)
  model = _load_model(args.model)
  mesh = sharding.local_mesh()  # each process encodes its own slice on its own devices
  output, row_range = args.output, None
  if args.distributed and jax.process_count() > 1:
    # Each process encodes its own contiguous slice into its own part file.
    from spreading_jax.vecs_io import read_vectors
    i, count = jax.process_index(), jax.process_count()
    row_range = sharding.process_rows(read_vectors(args.input, key=args.key).shape[0])
    output = f"{args.output[:-4] if args.output.endswith('.npy') else args.output}" \
             f".part{i:05d}-of-{count:05d}.npy"
  encode_file(model, args.input, output, chunk=args.chunk, mesh=mesh, key=args.key,
              row_range=row_range, quantizer=args.quantizer)
  print(f"wrote {output}")


encode_cmd.configure = _configure_encode


def _configure_build(p):
  p.add_argument("model", help="model directory")
  p.add_argument("input", help="database vectors file")
  p.add_argument("--out", required=True,
                 help="index directory to write: new, empty, or a saved index (replaced); "
                 "never a model or an input")
  p.add_argument("--quantizer", default="lattice",
                 help="'lattice' (default; 'zn' is read as 'lattice'), 'sign', or a faiss "
                 "index-factory string on the "
                 "catalyzed vectors, e.g. 'OPQ8_32,PQ8' (then --train is required)")
  p.add_argument("--bits", type=int, default=None,
                 help="code size (lattice: default the model's own lattice; sign: d_out; faiss: "
                 "the factory's)")
  p.add_argument("--train", default=None,
                 help="training vectors file for a faiss quantizer (never the queries)")
  p.add_argument("--key", default=None, help="HDF5 dataset name")


def _check_file_vectors(path, x, d_in: int, taker: str, finite: bool = True) -> None:
  """UserError naming the file ``path`` unless its vectors x suit ``taker`` (the model or
  index whose input dimension is d_in): 2-D, real, d_in columns, finite (scanned on the
  host; ``finite=False`` leaves it to the device-side check of the encode)."""
  from spreading_jax._validation import check_vectors
  if len(getattr(x, "shape", ())) == 2 and x.shape[1] != d_in:  # also a width of 0
    raise UserError(f"{path} has vectors of dimension d_in={x.shape[1]}, but {taker} takes "
                    f"d_in={d_in}")
  check_vectors(path, x, finite=finite)  # rank, dtype (and values), named by the file


@command("build", "build an index (model + codes) from a vectors file")
def build_cmd(args):
  from spreading_jax.vecs_io import read_vectors
  from spreading_jax import _outputs
  from spreading_jax.encode import NonFiniteRowError
  from spreading_jax.index import SpreadingIndex
  _outputs.check_output_dir(args.out, "index", inputs=[args.model, args.input, args.train])
  model = _load_model(args.model)
  taker = f"the model {args.model}"
  # The database is checked (shape, rows; values on the device) before any training. An
  # empty index is only a library object's state before its first add: saved, it could
  # never be searched nor added to from the command line.
  xb = read_vectors(args.input, key=args.key)
  _check_file_vectors(args.input, xb, model.d_in, taker, finite=False)
  if xb.shape[0] == 0:
    raise UserError(f"{args.input} has no rows: an index of no vectors cannot be searched")
  index = SpreadingIndex(model, args.quantizer, args.bits)
  if not index.is_trained:
    if args.train is None:
      raise UserError(f"quantizer {args.quantizer!r} must be trained: pass --train FILE")
    xt = read_vectors(args.train, key=args.key)
    _check_file_vectors(args.train, xt, model.d_in, taker)
    try:
      index.train(xt)
    except RuntimeError as e:
      if _faiss_message(e) is None:
        raise
      raise UserError(f"faiss could not train {args.quantizer!r} on {args.train}: "
                      f"{_faiss_message(e)}") from e
  try:
    index.add(xb)
  except NonFiniteRowError as e:  # found on the device; its message calls the input "x"
    raise UserError(f"{NonFiniteRowError(args.input, e.row, e.column)}; nothing was "
                    "written") from None
  index.save(args.out)
  print(index.info())


build_cmd.configure = _configure_build


def _configure_search(p):
  p.add_argument("index", help="index directory")
  p.add_argument("queries", help="query vectors file")
  p.add_argument("--k", type=int, default=10, help="neighbours per query (default 10)")
  p.add_argument("--out", required=True,
                 help="file prefix, e.g. results/run1: writes PREFIX_I.npy and PREFIX_D.npy "
                 "(never a directory, nor a name ending in /)")
  p.add_argument("--key", default=None, help="HDF5 dataset name of the queries")
  p.add_argument("--groundtruth", default=None, help="ivecs/npy ground truth: print recall")


@command("search", "search an index with a query file")
def search_cmd(args):
  import numpy as np
  from spreading_jax import evaluate, search
  from spreading_jax._files import atomic_output
  from spreading_jax.vecs_io import read_vectors
  from spreading_jax import _outputs
  inputs = [args.index, args.queries, args.groundtruth]
  if args.out.endswith(("/", os.sep)) or os.path.isdir(args.out):
    # A prefix naming a directory would put "_I.npy"/"_D.npy" (or DIR_I.npy beside it)
    # into a directory the command does not own.
    raise UserError(f"--out {args.out} is a directory; --out is a file prefix (writes "
                    f"PREFIX_I.npy and PREFIX_D.npy), e.g. --out "
                    f"{os.path.join(args.out, 'result')}")
  for suffix in ("I", "D"):
    _outputs.check_output_file(f"{args.out}_{suffix}.npy", inputs=inputs)
  index = _load_index(args.index)
  xq = read_vectors(args.queries, key=args.key)
  _check_file_vectors(args.queries, xq, index.d, f"the index {args.index}")
  if xq.shape[0] == 0:  # the library answers (0, k); on the command line it is a mistake
    raise UserError(f"{args.queries} has no rows: there is nothing to search")
  gt = None
  if args.groundtruth:  # read and checked before anything is written
    gt = read_vectors(args.groundtruth)
    if (gt.ndim != 2 or gt.shape[0] != xq.shape[0] or gt.shape[1] == 0
        or not np.issubdtype(gt.dtype, np.integer)):
      raise UserError(f"--groundtruth {args.groundtruth} has shape {gt.shape} dtype "
                      f"{gt.dtype}; expected integer ids, one row per query "
                      f"({xq.shape[0]} rows)")
    if not (0 <= int(gt[:, 0].min()) and int(gt[:, 0].max()) < index.ntotal):
      row = int(np.argmax((gt[:, 0] < 0) | (gt[:, 0] >= index.ntotal)))
      raise UserError(f"--groundtruth {args.groundtruth} row {row} gives id {gt[row, 0]} as "
                      f"the true neighbour, outside the index's {index.ntotal} vectors")
  D, I = index.search(xq, args.k)
  recall = None
  if gt is not None:
    ks = evaluate.fitting_ks(args.k)
    recall = " ".join(f"R@{r}={v:.4f}" for r, v in search.recall_at(I, gt, ks).items())
  for suffix, arr in (("I", I), ("D", D)):
    with atomic_output(f"{args.out}_{suffix}.npy") as tmp:
      with open(tmp, "wb") as f:
        np.save(f, arr)
  if recall is not None:
    print(recall)
  print(f"wrote {args.out}_I.npy and {args.out}_D.npy")


search_cmd.configure = _configure_search


def _configure_info(p):
  p.add_argument("path", help="index or model directory")


@command("info", "describe an index or a model directory")
def info_cmd(args):
  from spreading_jax import _outputs
  if os.path.isfile(os.path.join(args.path, _outputs.KINDS["index"][0])):
    print(_load_index(args.path).info())
  else:
    m = _load_model(args.path)
    print(f"catalyzer d_in={m.d_in} d_out={m.config.d_out} hidden={list(m.config.hidden)} "
          f"r2={m.config.r2} bits={m.config.bits} lambda={m.config.lambda_koleo} "
          f"quantizer={m.config.quantizer} epochs_trained={len(m.history)}")
    if m.selection:
      from spreading_jax.selection import Selection
      try:  # a hand-edited record is reported in one line, the model itself is fine
        sel = Selection.from_dict(m.selection)
        text = sel.format_table()
      except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
        raise UserError(f"{args.path}/model.json: the selection record is malformed "
                        f"({type(e).__name__}: {e})") from e
      how = (f"{len(sel.table)} runs of {sel.screen_epochs} epochs on {sel.screen_rows} "
             f"training vectors, {sel.val_queries} validation queries against {sel.val_base}"
             if sel.table else "nothing screened")
      print(f"shape chosen in {sel.cost_s:.0f}s ({how}):\n{text}")


info_cmd.configure = _configure_info


def _configure_bench(p):
  p.add_argument("name", help="benchmark name: benchmarks/bench_NAME.py")
  p.add_argument("rest", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")


@command("bench", "run benchmarks/bench_NAME.py (in a clone of the repository)")
def bench_cmd(args):
  import runpy
  root = Path(__file__).resolve().parent.parent / "benchmarks"
  if not root.is_dir():
    raise UserError("the benchmarks are not part of the installed package: run spreading-jax "
                    "bench from a clone of the repository")
  script = root / f"bench_{args.name}.py"
  if not script.is_file():
    names = sorted(p.stem[6:] for p in root.glob("bench_*.py"))
    raise UserError(f"no benchmark {args.name!r}; available: {', '.join(names)}")
  old = sys.argv
  sys.argv = [str(script)] + list(args.rest)
  try:
    runpy.run_path(str(script), run_name="__main__")
  finally:
    sys.argv = old


bench_cmd.configure = _configure_bench


# ---------------------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
  """argparse with usage errors as one line on stderr (exit status 2), like the others."""

  def error(self, message):
    print(f"{self.prog}: error: {message} (see --help)", file=sys.stderr)
    sys.exit(2)


def _faiss_message(e: BaseException) -> str | None:
  """The user-facing part of a faiss C++ exception's message, None if not from faiss."""
  import re
  text = str(e)
  m = re.match(r"\s*Error in .*? at \S*faiss\S*:\d+: (.*)", text, re.S)
  if m is None:
    return None
  text = m.group(1)
  text = re.sub(r"^Error: '.*?' failed: ", "", text, flags=re.S)
  return text.strip()


def user_error_message(e: BaseException) -> str | None:
  """The one-line message for an error the user can fix, or None for a bug (which keeps
  its traceback). This is the CLI's one translation layer from exceptions to messages."""
  if isinstance(e, (UserError, ValueError, ImportError)):
    text = str(e)
  elif isinstance(e, OSError):  # missing/unreadable/unwritable files, full disk
    text = f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e)
  elif isinstance(e, RuntimeError) and _faiss_message(e) is not None:
    text = f"faiss: {_faiss_message(e)}"
  else:
    return None
  return " ".join(text.split()) or type(e).__name__


# The top-level --help text (plain text: argparse prints it as it is).
DESCRIPTION = ("Spreading vectors for similarity search: train a catalyzer, build, save and "
               "search indexes of its lattice or sign codes. Run as spreading-jax COMMAND or "
               "python -m spreading_jax COMMAND; spreading-jax COMMAND --help lists the "
               "command's flags. A mistake in the input prints one line on stderr and exits "
               "with status 2.")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog="spreading-jax", description=DESCRIPTION)
  parser.add_argument("-v", "--verbose", action="store_true",
                      help="debug logging, and the traceback of a user error")
  sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                              help="one of the commands below")
  for name, (fn, help) in COMMANDS.items():
    p = sub.add_parser(name, help=help, description=fn.__doc__ or help)
    getattr(fn, "configure", lambda p: None)(p)
  return parser


def main(argv=None) -> int:
  parser = build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # --help (0) or a usage error (2, one line from _Parser.error)
    return e.code if isinstance(e.code, int) else 2
  logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                      format="%(levelname)s %(name)s: %(message)s")
  fn, _ = COMMANDS[args.command]
  from spreading_jax import _signals
  try:
    with _signals.handling():  # SIGINT/SIGTERM: finally blocks run, then one line
      fn(args)
  except KeyboardInterrupt as e:
    signum = getattr(e, "signum", signal.SIGINT)
    what = "terminated (SIGTERM)" if signum == signal.SIGTERM else "interrupted"
    print(f"spreading-jax {args.command}: {what}", file=sys.stderr, flush=True)
    return 128 + signum
  except Exception as e:  # pylint: disable=broad-except
    message = user_error_message(e)
    if message is None or args.verbose:
      raise
    print(f"spreading-jax {args.command}: error: {message}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
