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
from typing import Any, Callable

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from spreading_jax import _files, lattice, sharding
from spreading_jax._validation import check_int, check_vectors
from spreading_jax.catalyzer import Catalyzer
from spreading_jax.config import TrainConfig, make_codec

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

  @property
  def module(self) -> Catalyzer:
    return Catalyzer(d_out=self.config.d_out, hidden=tuple(self.config.hidden))

  @property
  def variables(self) -> dict:
    return {"params": self.params, "batch_stats": self.batch_stats}

  def apply(self, x, batch_size: int | None = None, then: Callable | None = None
            ) -> np.ndarray:
    """Catalyzes x: [n, d_in] -> f32[n, d_out] (unit rows), in chunks of ``batch_size``.

    Args:
      x: raw vectors, numpy (or a memory map) or jax, any real dtype.
      batch_size: rows per compiled chunk (default ``default_batch_size()``: 16384 on a
        CPU, 65536 on a GPU/TPU).
      then: optional hashable traceable function of the catalyzed chunk, compiled into
        the same program (e.g. ``codec.encode_core``: codes come back instead of floats).

    Returns:
      numpy rows of the forward pass, or of ``then`` applied to it.
    """
    check_vectors("x", x, d=self.d_in, d_name="d_in")
    batch_size = check_int("batch_size",
                           default_batch_size() if batch_size is None else batch_size, minimum=1)
    out = None
    # A few chunks in flight: the next chunks' transfers and compute overlap this one's
    # read-back (reading each chunk back before dispatching the next left an accelerator
    # idle), and device memory stays bounded for any n.
    pending = collections.deque()
    for start, y in self._forward_chunks(x, self.input_scale, batch_size, then):
      if out is None:
        out = np.empty((x.shape[0],) + y.shape[1:], y.dtype)
      pending.append((start, y))
      if len(pending) > _IN_FLIGHT:
        _copy_rows(out, *pending.popleft())
    while pending:
      _copy_rows(out, *pending.popleft())
    if out is None:  # no rows
      shape = jax.eval_shape(lambda v, x: _forward_fn(self.module, then)(v, x, 1.0),
                             self.variables, jax.ShapeDtypeStruct((1, self.d_in), jnp.float32))
      out = np.empty((0,) + shape.shape[1:], shape.dtype)
    return out

  def apply_device(self, x_scaled: jax.Array, batch_size: int | None = None) -> jax.Array:
    """Eval-mode forward of already-scaled vectors that stay on the device -> f32[n, d_out]."""
    batch_size = default_batch_size() if batch_size is None else batch_size
    return jnp.concatenate([y for _, y in self._forward_chunks(x_scaled, 1.0, batch_size)])

  def _forward_chunks(self, x, scale: float, batch_size: int, then: Callable | None = None):
    """Yields (start row, device array [m, ...]) over fixed-size chunks of x (one compiled
    shape; the last chunk is padded and its padding dropped). Fewer rows than a batch are
    padded to a power of two (at least 8), so that calls with varying row counts (query
    batches) share a few compiled shapes instead of compiling one per size."""
    fwd = _forward_fn(self.module, then)
    n = x.shape[0]
    chunk = min(batch_size, sharding.round_up_pow2(n, 8))
    for start in range(0, n, chunk):
      xb = x[start:start + chunk]
      m = xb.shape[0]
      xb = sharding.pad_rows(jnp.asarray(xb, jnp.float32), chunk)
      yield start, fwd(self.variables, xb, scale)[:m]

  def codec(self) -> lattice.ZnSphereCodec:
    """The Zn lattice codec the model was trained and validated with."""
    return make_codec(self.config)

  def save(self, path: str | os.PathLike) -> None:
    """Writes the model to the directory ``path`` atomically (params + JSON metadata)."""
    blob = flax.serialization.to_bytes(self.variables)
    meta = {"format_version": FORMAT_VERSION, "kind": "spreading_jax.catalyzer",
            # Where the run wrote its TensorBoard events is not part of the model.
            "config": self.config.replace(log_dir=None).to_dict(), "d_in": self.d_in,
            "input_scale": self.input_scale, "selection": self.selection,
            "variables_bytes": len(blob),
            "variables_sha256": _files.sha256_bytes(blob)}
    with _files.atomic_output_dir(path) as tmp:
      with open(os.path.join(tmp, "variables.msgpack"), "wb") as f:
        f.write(blob)
      with open(os.path.join(tmp, "model.json"), "w") as f:
        json.dump(meta, f, indent=2)
      with open(os.path.join(tmp, "history.json"), "w") as f:
        json.dump(self.history, f)

  @classmethod
  def load(cls, path: str | os.PathLike) -> "TrainResult":
    """Reads a model written by ``save``; raises ValueError if it is incomplete, corrupt or
    its metadata was edited into something this library did not write."""
    path = os.fspath(path)
    meta_path = os.path.join(path, "model.json")
    var_path = os.path.join(path, "variables.msgpack")
    if not os.path.isfile(meta_path) or not os.path.isfile(var_path):
      raise ValueError(f"{path} is not a saved catalyzer (model.json/variables.msgpack missing)")
    meta = _read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("kind") != "spreading_jax.catalyzer":
      raise ValueError(f"{meta_path} does not describe a catalyzer")
    if meta.get("format_version") != FORMAT_VERSION:
      raise ValueError(f"{path} has format version {meta.get('format_version')!r}, "
                       f"this library reads version {FORMAT_VERSION}")
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
    if not isinstance(size, int) or isinstance(size, bool) or not isinstance(digest, str):
      raise ValueError(f"{meta_path}: malformed model metadata (variables_bytes={size!r}, "
                       f"variables_sha256={digest!r})")
    with open(var_path, "rb") as f:
      blob = f.read()
    if (len(blob) != meta.get("variables_bytes")
        or _files.sha256_bytes(blob) != meta.get("variables_sha256")):
      raise ValueError(f"{var_path} is truncated or corrupt (size/checksum mismatch)")
    try:
      config = TrainConfig.from_dict(meta.get("config"))
    except TypeError as e:
      raise ValueError(f"{meta_path}: config is not a TrainConfig ({e})") from e
    if config.d_out is None:
      raise ValueError(f"{meta_path}: config.d_out is missing")
    module = Catalyzer(d_out=config.d_out, hidden=tuple(config.hidden))
    template = module.init(jax.random.PRNGKey(0), jnp.zeros((1, d_in)), train=False)
    try:
      variables = flax.serialization.from_bytes(template, blob)
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f"{var_path} does not match the architecture in {meta_path} "
                       f"(d_in={d_in}, hidden={list(config.hidden)}, d_out={config.d_out})"
                       ) from e
    history = []
    hist_path = os.path.join(path, "history.json")
    if os.path.isfile(hist_path):
      history = _read_json(hist_path)
      if not isinstance(history, list):
        raise ValueError(f"{hist_path} must hold a list of epoch records")
    return cls(variables["params"], variables["batch_stats"], config, d_in, float(scale),
               history, selection)


def _read_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is corrupt: {e}") from e


# Chunks dispatched ahead of the one being read back by ``TrainResult.apply``.
_IN_FLIGHT = 3


def default_batch_size() -> int:
  """Rows per forward chunk: 16384 on a CPU (the activations stay in cache-friendly
  sizes), 65536 on a GPU/TPU (fewer, larger launches)."""
  return 16384 if jax.default_backend() == "cpu" else 65536


def _copy_rows(out: np.ndarray, start: int, y: jax.Array) -> None:
  out[start:start + y.shape[0]] = np.asarray(y)


_FORWARD_CACHE: dict = {}


def _forward_fn(module: Catalyzer, then: Callable | None = None) -> Callable:
  """A cached jitted eval-mode forward pass for ``module``, followed by ``then``."""
  key = (module.d_out, tuple(module.hidden), then)
  if key not in _FORWARD_CACHE:
    @jax.jit
    def fwd(variables, x, scale):
      y = module.apply(variables, x / scale, train=False)
      return y if then is None else then(y)
    _FORWARD_CACHE[key] = fwd
  return _FORWARD_CACHE[key]
