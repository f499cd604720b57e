"""Batch encoding: raw vectors -> Zn lattice codes in one compiled program, and a resumable
streaming job that encodes a vectors file chunk by chunk into a .npy file of codes.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import socket
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from spreading_jax import lattice, sharding
from spreading_jax._validation import check_int, check_vectors
from spreading_jax.catalyzer import Catalyzer
from spreading_jax.config import make_codec
from spreading_jax.model import TrainResult


def make_encoder(params, batch_stats=None, codec: lattice.ZnSphereCodec | None = None,
                 input_scale: float = 1.0, hidden: tuple[int, ...] = (1024, 1024),
                 d_out: int = 24) -> Callable[[jax.Array], jax.Array]:
  """A jitted encoder: raw vectors f32[n, d_in] -> codes u32[n, codec.code_words].

  Catalyzer forward, lattice quantization and ranking are one compiled program.

  Args:
    params: catalyzer parameters, or a ``TrainResult`` (then the other arguments default
      to the model's batch statistics, input scale, architecture and lattice codec).
    batch_stats: BatchNorm statistics.
    codec: the ``ZnSphereCodec`` of dimension d_out.
    input_scale: inputs are divided by this before the catalyzer.
    hidden: hidden layer widths.
    d_out: output dimension.
  """
  if isinstance(params, TrainResult):
    model = params
    params, batch_stats = model.params, model.batch_stats
    input_scale, hidden, d_out = model.input_scale, tuple(model.config.hidden), model.config.d_out
    codec = codec or make_codec(model.config)
  if codec is None or batch_stats is None:
    raise ValueError("make_encoder needs batch_stats and codec (or a TrainResult)")
  if codec.d != d_out:
    raise ValueError(f"codec has d={codec.d} but d_out={d_out}")
  module = Catalyzer(d_out=d_out, hidden=tuple(hidden))
  variables = {"params": params, "batch_stats": batch_stats}
  scale = float(input_scale)

  @jax.jit
  def encode(x):
    y = module.apply(variables, x.astype(jnp.float32) / scale, train=False)
    return codec.encode_core(y)

  return encode


def _progress_path(output_path: str) -> str:
  return output_path + ".progress.json"


# Inputs up to this size are hashed whole for the resume fingerprint; bigger ones by their
# size, shape and the first and last _FINGERPRINT_BLOCK bytes.
_FULL_HASH_BYTES = 64 << 20
_FINGERPRINT_BLOCK = 1 << 20
_PROGRESS_VERSION = 2


def model_fingerprint(model: TrainResult) -> str:
  """sha256 of a model's variables, architecture, input scale and lattice."""
  import flax.serialization
  h = hashlib.sha256(flax.serialization.to_bytes(model.variables))
  h.update(json.dumps([model.d_in, float(model.input_scale), list(model.config.hidden),
                       model.config.d_out, make_codec(model.config).r2]).encode())
  return h.hexdigest()


def input_fingerprint(path: str, x, key: str | None) -> dict:
  """Size, shape, dtype, HDF5 key and a sha256 of a vectors file's content (all of it up
  to 64 MiB, else its first and last MiB)."""
  size = os.path.getsize(path)
  h = hashlib.sha256()
  with open(path, "rb") as f:
    if size <= _FULL_HASH_BYTES:
      for block in iter(lambda: f.read(_FINGERPRINT_BLOCK), b""):
        h.update(block)
    else:
      h.update(f.read(_FINGERPRINT_BLOCK))
      f.seek(size - _FINGERPRINT_BLOCK)
      h.update(f.read(_FINGERPRINT_BLOCK))
  return {"size": size, "sha256": h.hexdigest(), "shape": [int(v) for v in x.shape],
          "dtype": str(x.dtype), "key": key}


def _rows_sha256(out, lo: int, hi: int) -> str:
  return hashlib.sha256(np.ascontiguousarray(out[lo:hi]).tobytes()).hexdigest()


class OutputLock:
  """An exclusive lock file ``path`` (O_CREAT|O_EXCL) holding "pid host".

  A lock left by a process that no longer runs on this host (kill -9, power loss of a
  local run) is stale and is taken over; a live one raises ValueError naming its pid.
  """

  def __init__(self, path: str):
    self.path = path
    self.token = f"{os.getpid()} {socket.gethostname()} {secrets.token_hex(4)}\n"

  def __enter__(self):
    for _ in range(3):
      try:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
      except FileExistsError:
        self._break_if_stale()
        continue
      with os.fdopen(fd, "w") as f:
        f.write(self.token)
      return self
    raise ValueError(f"could not take the lock {self.path}; retry")

  def _break_if_stale(self) -> None:
    try:
      with open(self.path) as f:
        held = f.read()
    except FileNotFoundError:
      return  # released meanwhile
    fields = held.split()
    pid = int(fields[0]) if fields and fields[0].isdigit() else None
    host = fields[1] if len(fields) > 1 else None
    if pid is None or host != socket.gethostname() or _pid_alive(pid):
      owner = f"pid {pid} on {host}" if pid is not None else "an unknown process"
      raise ValueError(f"another encode ({owner}) is writing this output (lock {self.path}); "
                       "wait for it, or delete the lock if that process is gone")
    # Stale: move it aside under a unique name; if what we moved is not the stale lock we
    # read (another process took it over meanwhile), put it back and report it busy.
    aside = f"{self.path}.{secrets.token_hex(4)}.stale"
    try:
      os.rename(self.path, aside)
    except FileNotFoundError:
      return
    with open(aside) as f:
      moved = f.read()
    if moved != held:
      os.rename(aside, self.path)
      raise ValueError(f"another encode is writing this output (lock {self.path})")
    os.unlink(aside)

  def __exit__(self, *exc):
    with contextlib.suppress(OSError):
      with open(self.path) as f:
        if f.read() == self.token:
          os.unlink(self.path)


def _pid_alive(pid: int) -> bool:
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _remove_leftovers(output_path: str, keep: str) -> None:
  """Deletes what killed runs to ``output_path`` left (partial files no progress record
  points to, temporary progress files). Called with the output's lock held, so no live
  writer owns them."""
  out_dir, name = os.path.split(os.path.abspath(output_path))
  progress_name = os.path.basename(_progress_path(output_path))
  # Exactly the names temp_name/atomic_output make: ".NAME.<8 hex>SUFFIX".
  pattern = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{8}}\.partial|"
                       rf"\.{re.escape(progress_name)}\.[0-9a-f]{{8}}\.tmp\.json")
  for entry in os.listdir(out_dir):
    full = os.path.join(out_dir, entry)
    if pattern.fullmatch(entry) and full != keep and os.path.isfile(full):
      with contextlib.suppress(OSError):
        os.remove(full)


def _read_progress(progress: str) -> dict:
  """The progress record, or ValueError saying it is corrupt and how to restart."""
  try:
    with open(progress, encoding="utf-8") as f:
      state = json.load(f)
    if not isinstance(state, dict):
      raise ValueError("not a JSON object")
    if state.get("version") != _PROGRESS_VERSION:
      raise ValueError(f"version {state.get('version')!r}, expected {_PROGRESS_VERSION}")
    for name in ("rows_done", "hash_from"):
      if isinstance(state.get(name), bool) or not isinstance(state.get(name), int):
        raise ValueError(f"{name}={state.get(name)!r} is not an integer")
    partial = state.get("partial")
    if not isinstance(partial, str) or os.path.basename(partial) != partial or \
        not partial.endswith(".partial"):
      raise ValueError(f"partial={partial!r} is not a file name")
    return state
  except (OSError, ValueError) as e:
    raise ValueError(f"{progress} is corrupt ({e}); delete it and the .partial file beside "
                     "it to restart the encode") from e


def encode_file(model: TrainResult, input_path, output_path, chunk: int = 65536,
                mesh: Mesh | None = None, key: str | None = None,
                max_rows: int | None = None,
                row_range: tuple[int, int] | None = None) -> bool:
  """Encodes a vectors file (fvecs/bvecs/npy/HDF5) to a .npy file of u32 lattice codes.

  Codes go chunk by chunk into a hidden ``.NAME.<random>.partial`` file beside the output
  (a preallocated .npy memory map); after every chunk ``output_path + ".progress.json"``
  records the rows done, so an interrupted run resumes where it stopped. When all rows are
  done the partial file is renamed to ``output_path``.

  A resume continues only the same job: the progress file records a fingerprint of the
  model (its variables' sha256) and of the input (size, shape, dtype and a content
  sha256); any difference raises ValueError instead of mixing two jobs' codes, and so
  does a corrupt progress file or a partial file that does not hold the rows it claims.
  ``output_path + ".lock"`` keeps a second concurrent encode to the same output out.

  Args:
    model: the trained catalyzer.
    input_path: vectors file (``vecs_io.read_vectors``).
    output_path: destination .npy file (never one of the inputs).
    chunk: rows per compiled batch.
    mesh: optional 1-D mesh; each batch is split over its data axis.
    key: HDF5 dataset name.
    max_rows: stop after this many rows in this call (time-boxed jobs); run again to resume.
    row_range: encode only rows [start, stop) of the input (one process's slice of a
      multi-host job).

  Returns:
    True when the output is complete, False when stopped early by ``max_rows``.

  Raises:
    ValueError: bad arguments, an input row with NaN/Inf (nothing is renamed into place),
      an output that is the input or a directory, a running encode to the same output, or
      a progress file of another model/input or a corrupt one.
  """
  from spreading_jax import _outputs
  from spreading_jax._files import atomic_output, preallocate
  from spreading_jax.vecs_io import read_vectors
  output_path, input_path = os.fspath(output_path), os.fspath(input_path)
  chunk = check_int("chunk", chunk, minimum=1)
  if max_rows is not None:
    max_rows = check_int("max_rows", max_rows, minimum=1)
  _outputs.check_output_file(output_path, inputs=[input_path])
  x = read_vectors(input_path, key=key)
  fingerprint = input_fingerprint(input_path, x, key)
  if row_range is not None:
    lo, hi = (int(v) for v in row_range)
    if not 0 <= lo <= hi <= x.shape[0]:
      raise ValueError(f"row_range={row_range} is outside [0, {x.shape[0]}]")
    x = x[lo:hi]
  check_vectors(input_path, x[:0], d=model.d_in, d_name="d")
  codec = make_codec(model.config)
  n, width = int(x.shape[0]), codec.code_words
  ndev = sharding.mesh_size(mesh)
  # A chunk is padded to its full size: never more rows than the input has (a huge
  # --chunk would otherwise allocate its padding).
  chunk = sharding.round_up(min(chunk, max(n, 1)), ndev)
  progress = _progress_path(output_path)
  out_dir = os.path.dirname(os.path.abspath(output_path))
  job = {"version": _PROGRESS_VERSION, "model": model_fingerprint(model),
         "input": fingerprint,
         "row_range": list(row_range or (0, n)), "n": n, "code_words": width}

  def save_progress(partial_name: str, done: int, hash_from: int, out) -> None:
    state = dict(job, partial=partial_name, rows_done=done, hash_from=hash_from,
                 rows_sha256=_rows_sha256(out, hash_from, done))
    with atomic_output(progress) as tmp:
      with open(tmp, "w") as f:
        json.dump(state, f)

  os.makedirs(out_dir, exist_ok=True)
  with OutputLock(output_path + ".lock"):
    done, hash_from, out, partial = 0, 0, None, None
    if os.path.exists(progress):
      state = _read_progress(progress)
      differs = [k for k in job if state.get(k) != job[k]]
      if differs:
        what = {"model": "another model", "input": "another input (content, shape or key)"}
        raise ValueError(f"{progress} records an interrupted encode of "
                         f"{' and '.join(what.get(k, k) for k in differs)}; refusing to mix "
                         f"them: delete it and {state['partial']} to restart")
      partial = os.path.join(out_dir, state["partial"])
      if os.path.exists(partial):
        try:
          out = np.lib.format.open_memmap(partial, mode="r+")
        except (OSError, ValueError) as e:
          raise ValueError(f"{partial} is corrupt ({e}); delete it and {progress} to "
                           "restart") from e
        done, hash_from = state["rows_done"], state["hash_from"]
        if out.shape != (n, width) or out.dtype != np.uint32 or \
            not 0 <= hash_from <= done <= n or \
            _rows_sha256(out, hash_from, done) != state.get("rows_sha256"):
          raise ValueError(f"{partial} does not hold the {done} rows {progress} records; "
                           "delete both to restart")
      else:
        partial = None  # renamed into place just before a crash, or deleted: start over
    if partial is None:
      partial = _outputs.temp_name(output_path, ".partial")
      out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint32, shape=(n, width))
      try:  # disk blocks reserved now: a full disk is ENOSPC here, not SIGBUS in a write
        preallocate(partial, report_as=output_path)
      except OSError:
        del out
        os.remove(partial)
        raise
      save_progress(os.path.basename(partial), 0, 0, out)
    _remove_leftovers(output_path, keep=partial)
    encoder = make_encoder(model)
    stop = n if max_rows is None else min(n, done + max_rows)
    data_sharding = NamedSharding(mesh, P(sharding.axis_name(mesh))) if mesh is not None else None
    bar = tqdm(total=n, initial=done, desc="encode", unit="vec")
    while done < stop:
      xb = np.asarray(x[done:min(stop, done + chunk)], np.float32)
      m = xb.shape[0]
      if not np.isfinite(xb).all():
        # This input can never complete: drop the job's files rather than leave a resume
        # point that would stop at the same row.
        row = done + int(np.argwhere(~np.isfinite(xb))[0][0])
        del out
        os.remove(progress)
        os.remove(partial)
        raise ValueError(f"{input_path} row {row + (row_range[0] if row_range else 0)} "
                         "contains NaN or Inf (or a value beyond float32); nothing was "
                         "written to the output")
      xb = jnp.asarray(sharding.pad_rows(xb, chunk))
      if data_sharding is not None:
        xb = jax.device_put(xb, data_sharding)
      out[done:done + m] = np.asarray(encoder(xb))[:m]
      out.flush()
      save_progress(os.path.basename(partial), done + m, done, out)
      done += m
      bar.update(m)
    bar.close()
    del out
    if done < n:
      return False
    _outputs.check_regular_or_absent(output_path)  # not made a FIFO/device meanwhile
    os.replace(partial, output_path)
    os.remove(progress)
  return True
