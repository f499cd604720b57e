"""The trained catalyzer: parameters, BatchNorm statistics and input scale, with a jitted
forward pass, its lattice codec, and atomic save/load.

Inference (``index.py``, ``encode.py``) needs only this module: it imports neither optax
nor orbax.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import time
from typing import Any, Callable

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from spreading_jax import _files, _outputs, lattice, sharding
from spreading_jax._validation import check_int, check_vectors
from spreading_jax.catalyzer import Catalyzer
from spreading_jax.config import TrainConfig
from spreading_jax.quantizers import make_codec

FORMAT_VERSION = 1


@dataclasses.dataclass
class TrainResult:
  """A trained catalyzer: parameters, BatchNorm statistics, the input scale, the history and
  (when the shape was chosen by validation) the screening record.

  ``apply(x)`` maps raw vectors (numpy or jax, any batch size, any real dtype) to
  catalyzed unit vectors with a jitted forward pass run in fixed-size chunks.
  """
  params: Any
  batch_stats: Any
  config: TrainConfig
  d_in: int
  input_scale: float
  history: list[dict] = dataclasses.field(default_factory=list)
  selection: dict | None = None
  # Per-query hits (bool[nq] per "<quantizer>_R@k") of the best epoch's validation, for
  # paired comparisons of models on the same queries (selection.py); not saved.
  validation_hits: dict | None = dataclasses.field(default=None, repr=False, compare=False)

  @property
  def module(self) -> Catalyzer:
    return Catalyzer.from_config(self.config)

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}

  def apply(self, x, batch_size: int | None = None) -> np.ndarray:
    """Catalyzes x: [n, d_in] -> f32[n, d_out] (unit rows), in chunks of ``batch_size``.

    Codes straight from raw vectors (catalyzer and encoder in one program) come from the
    one fused encode path, ``encode.EncodeStream`` (``encode.make_encoder``,
    ``SpreadingIndex.encode``/``add``, ``encode_file``).

    Args:
      x: raw vectors, numpy (or a memory map) or jax, any real dtype.
      batch_size: rows per compiled chunk (default ``default_batch_size()``: 16384 on a
        CPU, 65536 on a GPU/TPU).

    Returns:
      numpy rows f32[n, d_out] of the forward pass.
    """
    check_vectors("x", x, d=self.d_in, d_name="d_in")
    batch_size = check_int("batch_size",
                           default_batch_size() if batch_size is None else batch_size, minimum=1)
    out = None
    # A few chunks in flight: the next chunks' transfers and compute overlap this one's
    # read-back (reading each chunk back before dispatching the next left an accelerator
    # idle), and device memory stays bounded for any n.
    pending, finite = collections.deque(), []
    for start, (y, ok) in self._forward_chunks(x, self.input_scale, batch_size, check=True):
      if out is None:
        out = np.empty((x.shape[0],) + y.shape[1:], y.dtype)
      pending.append((start, y))
      finite.append(ok)
      if len(pending) > _IN_FLIGHT:
        _copy_rows(out, *pending.popleft())
    while pending:
      _copy_rows(out, *pending.popleft())
    if finite:
      ok = np.concatenate([np.asarray(f) for f in finite])
      if not ok.all():  # finite inputs (checked) whose catalyzed rows overflowed float32
        row = int(np.argmin(ok))
        top = float(np.max(np.abs(np.asarray(x[row], np.float64))))
        raise ValueError(f"x row {row} (values up to {top:.3g}) overflows the catalyzer's "
                         f"float32 forward pass (input_scale={self.input_scale:g}): its "
                         "output is not a finite unit vector; such inputs cannot be encoded")
    if out is None:  # no rows
      out = np.empty((0, self.config.d_out), np.float32)
    return out

  def apply_device(self, x_scaled: jax.Array, batch_size: int | None = None) -> jax.Array:
    """Eval-mode forward of already-scaled vectors that stay on the device -> f32[n, d_out]."""
    batch_size = default_batch_size() if batch_size is None else batch_size
    return jnp.concatenate([y for _, y in self._forward_chunks(x_scaled, 1.0, batch_size)])

  def _forward_chunks(self, x, scale: float, batch_size: int, check: bool = False):
    """Yields (start row, device array f32[m, d_out]) over fixed-size chunks of x (one
    compiled shape; the last chunk is padded and its padding dropped). Fewer rows than a
    batch are padded to a power of two (at least 8), so that calls with varying row counts
    (query batches) share a few compiled shapes instead of compiling one per size. With
    ``check`` the array is a pair (output, bool[m]: the catalyzed row is finite)."""
    fwd = _forward_fn(self.module, check)
    n = x.shape[0]
    chunk = min(batch_size, sharding.round_up_pow2(n, 8))
    for start in range(0, n, chunk):
      xb = x[start:start + chunk]
      m = xb.shape[0]
      xb = sharding.pad_rows(jnp.asarray(xb, jnp.float32), chunk)
      y = fwd(self.variables, xb, scale)
      yield start, ((y[0][:m], y[1][:m]) if check else y[:m])

  def codec(self) -> lattice.ZnSphereCodec:
    """The Zn lattice codec the model was trained and validated with."""
    return make_codec(self.config)

  def save(self, path: str | os.PathLike) -> None:
    """Writes the model to the directory ``path`` atomically (params + JSON metadata)."""
    blob = flax.serialization.to_bytes(self.variables)
    meta = {"format_version": FORMAT_VERSION, "kind": _KIND,
            # Where the run wrote its TensorBoard events is not part of the model.
            "config": self.config.replace(log_dir=None).to_dict(), "d_in": self.d_in,
            "input_scale": self.input_scale, "selection": self.selection,
            "variables_bytes": len(blob),
            "variables_sha256": _files.sha256_bytes(blob)}
    with _files.atomic_output_dir(path) as tmp:
      with open(os.path.join(tmp, _VARIABLES), "wb") as f:
        f.write(blob)
      with open(os.path.join(tmp, _META_FILE), "w") as f:
        json.dump(meta, f, indent=2)
      with open(os.path.join(tmp, _HISTORY), "w") as f:
        json.dump(self.history, f)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "TrainResult":
    """Reads a model written by ``save``; raises ValueError if it is incomplete, corrupt or
    its metadata was edited into something this library did not write. Every file is
    read once, from one save (``_files.SavedDir``): a concurrent save over ``path`` makes
    the load return the old or the new model, or raise ``ChangedWhileReading``."""
    path = os.fspath(path)
    for attempt in range(_LOAD_TRIES):
      try:
        _files.check_saved_dir(path, _META_FILE, f"{path} is not a saved catalyzer "
                               "(model.json/variables.msgpack missing)")
        with _files.SavedDir(path, "model") as saved:
          if not saved.is_file(_VARIABLES):
            if saved.replaced():
              raise saved.changed()
            raise ValueError(f"{path} is not a saved catalyzer (model.json/variables.msgpack "
                             "missing)")
          return cls._from_saved(saved)
      except _files.ChangedWhileReading:
        if attempt + 1 == _LOAD_TRIES:
          raise
        time.sleep(0.01 * (attempt + 1))
    raise AssertionError("unreachable")

  @classmethod
  def _from_saved(cls, saved: _files.SavedDir, prefix: str = "",
                  sums: dict | None = None) -> "TrainResult":
    """The model in the files ``prefix + name`` of ``saved`` (``sums``: sha256 digests
    the files' bytes must have, from an index's index.json)."""
    sums = sums or {}
    meta_path, var_path = saved.full(prefix + _META_FILE), saved.full(prefix + _VARIABLES)

    def read(name: str, **kwargs) -> bytearray:
      return saved.read(prefix + name, sha256=sums.get(prefix + name), **kwargs)

    meta = _parse_json(meta_path, read(_META_FILE, max_size=_MAX_JSON_BYTES))
    if not isinstance(meta, dict) or meta.get("kind") != _KIND:
      raise ValueError(f"{meta_path} does not describe a catalyzer")
    _files.check_format_version(saved.full(prefix) if prefix else saved.path, "model",
                                meta.get("format_version"), FORMAT_VERSION)
    d_in, scale = meta.get("d_in"), meta.get("input_scale")
    if not isinstance(d_in, int) or isinstance(d_in, bool) or d_in < 1:
      raise ValueError(f"{meta_path}: d_in={d_in!r} must be a positive integer")
    if (not isinstance(scale, (int, float)) or isinstance(scale, bool)
        or not np.isfinite(scale) or scale <= 0):
      raise ValueError(f"{meta_path}: input_scale={scale!r} must be a positive number")
    selection = meta.get("selection")
    if selection is not None and not isinstance(selection, dict):
      raise ValueError(f"{meta_path}: selection must be an object or null")
    size, digest = meta.get("variables_bytes"), meta.get("variables_sha256")
    if (not isinstance(size, int) or isinstance(size, bool) or size < 0
        or not isinstance(digest, str)):
      raise ValueError(f"{meta_path}: malformed model metadata (variables_bytes={size!r}, "
                       f"variables_sha256={digest!r})")
    try:
      config = TrainConfig.from_dict(meta.get("config"))
    except TypeError as e:
      raise ValueError(f"{meta_path}: config is not a TrainConfig ({e})") from e
    if not isinstance(config.d_out, int) or config.d_out < 1:
      raise ValueError(f"{meta_path}: config.d_out={config.d_out!r} must be a positive "
                       "integer")
    with np.errstate(over="ignore", under="ignore"):
      scale32 = np.float32(scale)
    if not _F32.tiny <= scale32 <= _F32.max:  # the forward pass divides in float32
      raise ValueError(f"{meta_path}: input_scale={scale!r} is {float(scale32):g} in float32 "
                       f"(outside [{_F32.tiny:.3g}, {_F32.max:.3g}]); it was edited")
    arch = (f"the architecture in {meta_path} (d_in={d_in}, hidden={list(config.hidden)}, "
            f"d_out={config.d_out})")
    # Sizes are compared before anything is allocated: model.json's variables_bytes with
    # what its architecture takes, then the file's real size with variables_bytes.
    if len(config.hidden) > _MAX_LAYERS:
      raise ValueError(f"{meta_path}: {len(config.hidden)} hidden layers; at most "
                       f"{_MAX_LAYERS} are supported")
    need, leaves = _variables_size(d_in, tuple(config.hidden), config.d_out)
    if not need <= size <= need + _MSGPACK_OVERHEAD * (leaves + 8):
      raise ValueError(f"{meta_path}: variables_bytes={size} does not fit {arch}, whose "
                       f"variables take {need} bytes")
    blob = saved.read(prefix + _VARIABLES, size=size, why=f" (variables_bytes in {meta_path})")
    if _files.sha256_bytes(blob) != digest or sums.get(prefix + _VARIABLES, digest) != digest:
      if saved.replaced():
        raise saved.changed()
      raise ValueError(f"{var_path} is truncated or corrupt (size/checksum mismatch)")
    module = Catalyzer.from_config(config)
    template = jax.eval_shape(
        lambda: module.init(jax.random.PRNGKey(0), jnp.zeros((1, d_in)), train=False))
    try:
      state = flax.serialization.msgpack_restore(bytes(blob))
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{var_path} is not a msgpack of variables ({e})") from e
    want = jax.tree_util.tree_map(lambda t: (tuple(t.shape), np.dtype(t.dtype).str), template)
    have = jax.tree_util.tree_map(
        lambda a: (tuple(np.shape(a)), np.dtype(getattr(a, "dtype", object)).str), state)
    if have != want:  # model.json edited (d_in, hidden, d_out) or the weights replaced
      raise ValueError(f"{var_path} does not match {arch}")
    variables = flax.serialization.from_state_dict(template, state)
    history = []
    if not saved.is_file(prefix + _HISTORY) and saved.replaced():
      raise saved.changed()  # deleted by the save that replaced the directory
    if saved.is_file(prefix + _HISTORY) or prefix + _HISTORY in sums:
      history = _parse_json(saved.full(prefix + _HISTORY),
                            read(_HISTORY, max_size=_MAX_JSON_BYTES))
      if not isinstance(history, list):
        raise ValueError(f"{saved.full(prefix + _HISTORY)} must hold a list of epoch records")
    return cls(variables["params"], variables["batch_stats"], config, d_in, float(scale),
               history, selection)


# The metadata file and kind tag of a saved model (``_outputs.KINDS``), and its other files.
_META_FILE, _KIND = _outputs.KINDS["model"]
_VARIABLES, _HISTORY = "variables.msgpack", "history.json"
# Loads retried when a concurrent save replaced the model while it was being read.
_LOAD_TRIES = 5
# Hidden layers a saved model may declare, and msgpack bytes per array beyond its data
# (about 30 measured; the bound leaves room for longer names).
_MAX_LAYERS = 64
_F32 = np.finfo(np.float32)
_MSGPACK_OVERHEAD = 128


def _variables_size(d_in: int, hidden: tuple[int, ...], d_out: int) -> tuple[int, int]:
  """(bytes of float32 data, number of arrays) of a ``Catalyzer``'s variables, computed
  from the widths alone (nothing is allocated): per hidden layer a Dense kernel and bias
  and BatchNorm's scale, bias, mean and variance; then the output Dense."""
  floats, fan_in = 0, d_in
  for width in hidden:
    floats += fan_in * width + width + 4 * width
    fan_in = width
  floats += fan_in * d_out + d_out
  return 4 * floats, 6 * len(hidden) + 2
# model.json, history.json (and an index's index.json) larger than this are not ours.
_MAX_JSON_BYTES = 64 << 20


def _parse_json(path: str, blob):
  """The JSON value of ``blob`` (the bytes of ``path``); ValueError when it is not JSON."""
  try:
    return json.loads(bytes(blob).decode("utf-8"))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is corrupt: {e}") from e
  except RecursionError as e:
    raise ValueError(f"{path} is corrupt: its JSON is nested too deeply") from e


# Chunks dispatched ahead of the one being read back by ``TrainResult.apply``.
_IN_FLIGHT = 3


def default_batch_size() -> int:
  """Rows per forward chunk: 16384 on a CPU (the activations stay in cache-friendly
  sizes), 65536 on a GPU/TPU (fewer, larger launches)."""
  return 16384 if jax.default_backend() == "cpu" else 65536


def _copy_rows(out: np.ndarray, start: int, y: jax.Array) -> None:
  out[start:start + y.shape[0]] = np.asarray(y)


_FORWARD_CACHE: dict = {}


def _forward_fn(module: Catalyzer, check: bool = False) -> Callable:
  """A cached jitted eval-mode forward pass for ``module``; with ``check`` it also returns
  bool[n]: each catalyzed row is a (finite) unit vector."""
  key = (module.d_out, tuple(module.hidden), check)
  if key not in _FORWARD_CACHE:
    @jax.jit
    def fwd(variables, x, scale):
      y = module.apply(variables, x / scale, train=False)
      # Rows are unit vectors; an overflow inside gives NaN or, through the normalisation
      # of an infinite norm, a zero row.
      return (y, jnp.sum(y * y, axis=1) > 0.5) if check else y
    _FORWARD_CACHE[key] = fwd
  return _FORWARD_CACHE[key]
