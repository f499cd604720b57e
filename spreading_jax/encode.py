"""Batch encoding: raw vectors -> Zn lattice codes in one compiled program; the streaming
pipeline behind every batch path (``EncodeStream``: ``encode_file``, ``SpreadingIndex.add``
and ``encode``, the CLI), which overlaps reading, transfer, compute and write-back and
encodes every row in a fixed-shape block (codes independent of chunk, batch, device count
and resume point); and the resumable job that encodes a vectors file into a .npy of codes.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import queue
import re
import secrets
import socket
import threading
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from spreading_jax import _outputs, _signals, lattice, quantizers, sharding
from spreading_jax._files import atomic_output, preallocate
from spreading_jax._validation import check_int, check_vectors, is_concrete
from spreading_jax.catalyzer import Catalyzer
from spreading_jax.model import TrainResult
from spreading_jax.quantizers import make_codec
from spreading_jax.vecs_io import read_vectors


def make_encoder(params, batch_stats=None,
                 codec: lattice.ZnSphereCodec | quantizers.Quantizer | None = None,
                 input_scale: float = 1.0, hidden: tuple[int, ...] = (1024, 1024),
                 d_out: int = 24, check_finite: bool = True
                 ) -> Callable[[jax.Array], jax.Array]:
  """A jitted encoder: raw vectors f32[n, d_in] (or any real dtype) -> codes
  u32[n, codec.code_words] (or the codes of the given quantizer).

  Catalyzer forward, lattice quantization and ranking are one compiled program: the
  program of ``EncodeStream`` (``encode_file``, ``SpreadingIndex.add``). Applied to blocks
  of ``block_rows()`` rows it gives their codes byte for byte; on other shapes the float
  rounding of the forward pass may differ (a near-tie row can then get a neighbouring
  code), which is why batch jobs go through ``EncodeStream``.

  Args:
    params: catalyzer parameters, or a ``TrainResult`` (then the other arguments default
      to the model's batch statistics, input scale, architecture and lattice codec).
    batch_stats: BatchNorm statistics.
    codec: the ``ZnSphereCodec`` of dimension d_out, or a ``Quantizer`` on d_out whose
      encoder runs inside JAX (``encode_core``: "lattice", "sign").
    input_scale: inputs are divided by this before the catalyzer.
    hidden: hidden layer widths.
    d_out: output dimension.
    check_finite: raise on a row with NaN/Inf (or a value beyond float32). The test runs
      inside the compiled program (as in ``EncodeStream``) but reading its result back
      makes each call wait for its program to finish (one scalar device->host read per
      call); pass False only for inputs known to be finite, to keep consecutive calls
      dispatching asynchronously (a bad row then gets an unspecified code).

  The returned ``encode(x)`` takes x: [n, d_in] (numpy or jax, any real dtype; n = 0 gives
  empty codes) and raises ``ValueError`` before any compute when x is not 2-D, has
  another dimension than d_in, or has a bool or non-numeric dtype, and
  ``NonFiniteRowError`` (a ValueError) naming the first row and column holding NaN/Inf
  when ``check_finite``.

  Raises:
    ValueError: no batch statistics or codec, a codec of another dimension than d_out or
      one that encodes outside JAX, or params without the catalyzer's first layer.
  """
  if isinstance(params, TrainResult):
    model = params
    params, batch_stats, input_scale = model.params, model.batch_stats, model.input_scale
    module = model.module
    codec = codec or make_codec(model.config)
  else:  # the architecture given as arguments
    module = Catalyzer(d_out=d_out, hidden=tuple(hidden))
  if codec is None or batch_stats is None:
    raise ValueError("make_encoder needs batch_stats and codec (or a TrainResult)")
  _check_jax_encoder(codec, module.d_out, "make_encoder")
  d_in = _params_d_in(params)
  program = _block_program(module, codec.encode_core)
  variables = {"params": params, "batch_stats": batch_stats}
  scale = np.float32(input_scale)
  empty = []  # the codes of 0 rows, made on first use

  def encode(x):
    # Static checks only (shape and dtype: no pass over the values, no device sync).
    check_vectors("x", x, d=d_in, d_name="d_in", finite=False)
    if x.shape[0] == 0:  # the program's reductions need a row
      if not empty:
        spec = jax.ShapeDtypeStruct((1, d_in), np.float32)
        out = jax.eval_shape(program, variables, spec, scale)[0]
        empty.append(jnp.zeros((0,) + out.shape[1:], out.dtype))
      return empty[0]
    codes, bad = program(variables, x, scale)
    if check_finite and is_concrete(bad):
      bad = int(bad)  # the one device->host read: waits for this call's program
      if bad < x.shape[0]:
        raise NonFiniteRowError("x", bad, _first_bad_column(x[bad]))
    return codes

  return encode


def _params_d_in(params) -> int:
  """The input dimension of catalyzer parameters (the first Dense layer's fan-in)."""
  try:
    kernel = params["Dense_0"]["kernel"]
    return int(kernel.shape[0])
  except (KeyError, TypeError, AttributeError, IndexError):
    raise ValueError("params are not a Catalyzer's parameters (no Dense_0 kernel); pass "
                     "a TrainResult or its .params") from None


def _first_bad_column(row) -> int:
  """The first column of a row that is NaN/Inf in float32 (for error messages)."""
  values = np.asarray(row, np.float64)
  with np.errstate(over="ignore", invalid="ignore"):
    return int(np.flatnonzero(~np.isfinite(values.astype(np.float32)))[0])


# ---------------------------------------------------------------------------------------
# The streaming encoder: fixed-shape blocks, input check on the device, overlapped I/O.

def block_rows() -> int:
  """Rows per device of every compiled batch-encode program: 2048 on a CPU, 65536 on a
  GPU/TPU.

  Every vector is catalyzed and quantized in a block of exactly this many rows per device
  (the last block of an input is zero-padded), so its floats go through the same compiled
  program whatever the chunk, the batch, the number of devices or the resume point. XLA
  computes each row of a fixed-shape block bitwise the same at any position and with any
  neighbours (checked by tests/test_encode_stream.py); across shapes it does not (XLA:CPU
  rounded 1000-row and 20000-row batches differently in about a third of the rows, which
  moved near-tie rows to a neighbouring code). Codes do still depend on the backend, the
  jax/XLA version and XLA flags: the resume record of ``encode_file`` keys on them.
  """
  return 2048 if jax.default_backend() == "cpu" else 65536


# Dtypes sent to the device as they are (every value exact in float32, converted there);
# other inputs are converted to float32 on the host.
_TRAVEL_DTYPES = tuple(np.dtype(t) for t in (np.float32, np.uint8, np.int8, np.uint16,
                                                np.int16, np.float16))
# Chunks read and transferred ahead of the one being computed.
_PREFETCH = 2


def travel(rows) -> tuple[np.ndarray, tuple | None]:
  """Rows [m, d] as the contiguous host array that is sent to the device, and its layout.

  Rows of a memory-mapped .fvecs/.bvecs (each row's values follow a 4-byte header) go as
  the file's bytes, headers included (uint8 [m, 4 + d * itemsize], no host copy: the
  header is dropped and the bytes reinterpreted on the device); layout is then
  ``(gap, dtype, d)``. Otherwise float32 and 8/16-bit inputs go as they are (a contiguous
  memory map is not copied) and any other dtype is converted to float32 (values beyond
  its range become Inf, refused by the device-side check); layout is None.
  """
  rows = np.asarray(rows)
  raw = _row_bytes(rows)
  if raw is not None:
    return raw[0], (raw[1], rows.dtype.str, rows.shape[1])
  if rows.dtype in _TRAVEL_DTYPES:
    return np.ascontiguousarray(rows), None
  with np.errstate(over="ignore", invalid="ignore"):
    return np.ascontiguousarray(rows, np.float32), None


def _row_bytes(rows: np.ndarray) -> tuple[np.ndarray, int] | None:
  """(uint8 [m, stride] view, gap) of rows whose values sit ``gap`` bytes into each
  ``stride``-byte row of one contiguous buffer (a vecs memory map), or None."""
  if rows.ndim != 2 or rows.shape[0] == 0 or rows.dtype not in _TRAVEL_DTYPES \
      or not rows.dtype.isnative:
    return None
  stride, step = rows.strides
  width = rows.shape[1] * rows.dtype.itemsize
  if step != rows.dtype.itemsize or stride <= width:
    return None
  root = rows
  while isinstance(root.base, np.ndarray):
    root = root.base
  if not root.flags.c_contiguous:
    return None
  lo = root.__array_interface__["data"][0]
  hi = lo + root.nbytes
  start = rows.__array_interface__["data"][0] - (stride - width)
  if start < lo or start + rows.shape[0] * stride > hi:
    return None
  flat = root.reshape(-1).view(np.uint8)
  return flat[start - lo:start - lo + rows.shape[0] * stride].reshape(-1, stride), \
      stride - width


_PROGRAMS: dict = {}


def _block_program(module: Catalyzer, then: Callable | None) -> Callable:
  """The cached jitted block program (variables, x [B, d_in] any travel dtype, scale,
  layout=None) -> (then(catalyzer(x / scale)), first row of x holding NaN/Inf, or B when
  none). With a layout (``travel``), x holds whole file rows as bytes."""
  key = (module.d_out, tuple(module.hidden), then)
  if key not in _PROGRAMS:
    @functools.partial(jax.jit, static_argnames="layout")
    def run(variables, x, scale, layout=None):
      if layout is not None:
        gap, dtype, d = layout
        dtype = jnp.dtype(dtype)
        x = x[:, gap:gap + d * dtype.itemsize]
        x = jax.lax.bitcast_convert_type(
            x.reshape(x.shape[0], d, dtype.itemsize) if dtype.itemsize > 1 else x, dtype)
      xf = x.astype(jnp.float32)
      y = module.apply(variables, xf / scale, train=False)
      out = y if then is None else then(y)
      n = x.shape[0]
      if jnp.issubdtype(x.dtype, jnp.integer):
        return out, jnp.int32(n)
      ok = jnp.all(jnp.isfinite(xf), axis=1)
      return out, jnp.min(jnp.where(ok, n, jnp.arange(n, dtype=jnp.int32)))
    _PROGRAMS[key] = run
  return _PROGRAMS[key]


class NonFiniteRowError(ValueError):
  """An input row holds NaN or Inf (or a value beyond float32): ``row`` is its index in the
  array encoded, ``column`` the first bad column; the message names the input ``name`` and
  the row as ``row + offset`` (the array is a slice of a larger input)."""

  def __init__(self, name: str, row: int, column: int, offset: int = 0):
    super().__init__(f"{name} row {row + offset} contains NaN or Inf (or a value beyond "
                     f"float32), first at column {column}")
    self.row, self.column = row, column


class EncodeStream:
  """Streams rows [start, stop) of x through the catalyzer (and ``then``) in fixed-shape
  blocks, yielding ``(lo, hi, host results [hi - lo, ...])`` chunk by chunk, in order.

  A background thread reads chunk i+1 (a slice of a memory map: only those rows are
  read; .fvecs/.bvecs rows are sent as the file's bytes without a host copy), converts it
  only when its dtype does not travel as it is (``travel``) and transfers it, while
  chunk i computes (asynchronous dispatch) and chunk i-1's results come back; at most
  ``_PREFETCH`` chunks wait ahead, so memory stays bounded by a few chunks for any n.
  The NaN/Inf check runs inside the compiled program; a bad row raises
  ``NonFiniteRowError`` (naming its first bad row and column) when its chunk comes back,
  before that chunk is yielded.

  Each block holds ``block_rows()`` rows per device (``mesh``: split over its data axis),
  so results are byte-identical whatever ``chunk``, ``mesh``, ``start`` (see
  ``block_rows``). Use as a context manager, which stops the thread on any exit::

    with EncodeStream(model, x, then=codec.encode_core) as stream:
      for lo, hi, codes in stream:
        out[lo:hi] = codes

  Args:
    model: the trained catalyzer.
    x: [n, d_in] rows, numpy (or a memory map) of any real dtype.
    then: hashable traceable function of the catalyzed block compiled into the program
      (e.g. ``codec.encode_core``), or None for the catalyzed floats f32[., d_out].
    chunk: rows read, transferred and yielded at a time (rounded up to a whole number of
      blocks).
    mesh: optional 1-D mesh; each block is split over its data axis.
    start, stop: the rows to encode (default all).
    name: what error messages call x.
    row_offset: added to row numbers in error messages (x is a slice of a larger input).

  Raises:
    ValueError: (when constructed, before any compute) x is not a 2-D array of a real
      numeric dtype with the model's d_in columns, ``start``/``stop`` are not integers
      with 0 <= start <= stop <= n, or ``chunk`` < 1. ``NonFiniteRowError`` while
      iterating (see above).
  """

  def __init__(self, model: TrainResult, x, then: Callable | None = None,
               chunk: int = 65536, mesh: Mesh | None = None, start: int = 0,
               stop: int | None = None, name: str = "x", row_offset: int = 0):
    # Static checks only: the values are checked on the device, chunk by chunk.
    check_vectors(name, x, d=model.d_in, d_name="d_in", finite=False)
    n = x.shape[0]
    start = check_int("start", start)
    stop = n if stop is None else check_int("stop", stop)
    if not 0 <= start <= stop <= n:
      raise ValueError(f"rows [start, stop) = [{start}, {stop}) are not a range of the {n} "
                       f"rows of {name} (0 <= start <= stop <= {n})")
    self.x, self.name, self.row_offset = x, name, row_offset
    self.start, self.stop = start, stop
    self.step = block_rows() * sharding.mesh_size(mesh)
    self.chunk = sharding.round_up(check_int("chunk", chunk, minimum=1), self.step)
    self.program = _block_program(model.module, then)
    self.scale = np.float32(model.input_scale)
    if mesh is None:
      self.sharding, self.variables = None, model.variables
    else:
      self.sharding = NamedSharding(mesh, P(sharding.axis_name(mesh)))
      self.variables = jax.device_put(model.variables, NamedSharding(mesh, P()))
    self._queue: queue.Queue = queue.Queue(maxsize=_PREFETCH)
    self._stop = threading.Event()
    self._thread = None

  def __enter__(self):
    self._thread = threading.Thread(target=self._read, name="encode-reader", daemon=True)
    try:
      self._thread.start()
      return self
    except BaseException:  # e.g. a signal: the with block's __exit__ would not run
      self.__exit__()
      raise

  def __exit__(self, *exc):
    # The reader is joined even when SIGINT/SIGTERM arrives meanwhile (the signal is
    # raised once it has ended): a reader left inside jax while the interpreter exits
    # aborts the process ("terminate called ... FATAL: exception not rethrown").
    with _signals.deferred():
      self._stop.set()
      with contextlib.suppress(queue.Empty):
        while True:  # unblock a reader waiting on a full queue
          self._queue.get_nowait()
      self._thread.join()

  def _put(self, item) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.1)
        return True
      except queue.Full:
        continue
    return False

  def _read(self) -> None:
    try:
      for lo in range(self.start, self.stop, self.chunk):
        hi = min(self.stop, lo + self.chunk)
        rows, layout = travel(self.x[lo:hi])
        blocks = []
        for b in range(0, hi - lo, self.step):
          part = rows[b:b + self.step]
          if part.shape[0] < self.step:
            part = sharding.pad_rows(part, self.step)
          blocks.append((jax.device_put(part, self.sharding), layout))
        if not self._put((lo, hi, blocks)):
          return
      self._put(None)
    except BaseException as e:  # noqa: BLE001 (re-raised in the consumer's thread)
      self._put(e)

  def _get(self):
    while True:
      try:
        return self._queue.get(timeout=0.1)
      except queue.Empty:
        if not self._thread.is_alive() and self._queue.empty():
          raise RuntimeError("the encode reader thread stopped without a result") from None

  def __iter__(self):
    pending = None
    while True:
      item = self._get()
      if isinstance(item, BaseException):
        raise item
      if item is not None:
        lo, hi, blocks = item
        # Dispatched before the previous chunk is read back: the device never waits.
        item = (lo, hi, [self.program(self.variables, b, self.scale, layout=layout)
                         for b, layout in blocks])
      if pending is not None:
        yield self._finish(*pending)
      if item is None:
        return
      pending = item

  def _finish(self, lo: int, hi: int, results) -> tuple[int, int, np.ndarray]:
    """Results of rows [lo, hi) on the host, after their NaN/Inf check."""
    for k, (_, bad) in enumerate(results):
      bad = int(bad)
      if bad < min(self.step, hi - lo - k * self.step):
        row = lo + k * self.step + bad
        raise NonFiniteRowError(self.name, row, _first_bad_column(self.x[row]),
                                self.row_offset)
    parts = [np.asarray(out)[:hi - lo - k * self.step] for k, (out, _) in enumerate(results)]
    return lo, hi, parts[0] if len(parts) == 1 else np.concatenate(parts)


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


def encoder_fingerprint(mesh: Mesh | None = None) -> dict:
  """What codes depend on besides the model and the input: the block rows, the platform
  and device kind, the jax/jaxlib versions and XLA_FLAGS (the forced host device count
  left out). Not the chunk size, the number of devices or the resume point (see
  ``block_rows``)."""
  from importlib.metadata import version  # pylint: disable=import-outside-toplevel
  device = mesh.devices.flat[0] if mesh is not None else jax.devices()[0]
  flags = sorted(f for f in os.environ.get("XLA_FLAGS", "").split()
                 if not f.startswith("--xla_force_host_platform_device_count"))
  return {"block_rows": block_rows(), "platform": device.platform,
          "device_kind": device.device_kind, "jax": jax.__version__,
          "jaxlib": version("jaxlib"), "xla_flags": flags}


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


def _encoder_quantizer(model: TrainResult, quantizer) -> quantizers.Quantizer:
  """The quantizer ``encode_file`` writes codes of; ValueError unless it encodes in JAX."""
  q = (quantizer if isinstance(quantizer, quantizers.Quantizer)
       else quantizers.for_model(quantizer, model.config))
  _check_jax_encoder(q, model.config.d_out, "encode_file",
                     "; use SpreadingIndex.add for it")
  return q


def _check_jax_encoder(q, d_out: int, who: str, hint: str = "") -> None:
  """ValueError unless the codec/quantizer q works on d_out and encodes inside JAX."""
  if q.d != d_out:
    raise ValueError(f"the quantizer works on d={q.d} but the model's d_out={d_out}")
  if q.encode_core is None:
    raise ValueError(f"quantizer {q.name!r} encodes outside JAX: {who} needs one with an "
                     f"encode_core (lattice, sign){hint}")


def encode_file(model: TrainResult, input_path, output_path, chunk: int = 65536,
                mesh: Mesh | None = None, key: str | None = None,
                max_rows: int | None = None,
                row_range: tuple[int, int] | None = None,
                quantizer: str | quantizers.Quantizer = quantizers.LATTICE) -> bool:
  """Encodes a vectors file (fvecs/bvecs/npy/HDF5) to a .npy file of codes (u32 lattice
  codes by default).

  Codes go chunk by chunk into a hidden ``.NAME.<random>.partial`` file beside the output
  (a preallocated .npy memory map); after every chunk ``output_path + ".progress.json"``
  records the rows done, so an interrupted run resumes where it stopped. When all rows are
  done the partial file is renamed to ``output_path``.

  Rows stream through ``EncodeStream``: read, transfer, compute and write-back overlap,
  the NaN/Inf check runs on the device, integer inputs (bvecs, uint8 npy) travel as
  they are, and every row is encoded in a fixed-shape block, so the codes are byte for
  byte the same whatever ``chunk``, ``mesh``, ``max_rows`` or resume point (and equal to
  ``SpreadingIndex.add``'s).

  A resume continues only the same job: the progress file records a fingerprint of the
  model (its variables' sha256), of the input (size, shape, dtype and a content sha256)
  and of the encoder configuration (``encoder_fingerprint``); any difference raises
  ValueError instead of mixing two jobs' codes, and so does a corrupt progress file or a
  partial file that does not hold the rows it claims. ``output_path + ".lock"`` keeps a
  second concurrent encode to the same output out.

  Args:
    model: the trained catalyzer.
    input_path: vectors file (``vecs_io.read_vectors``).
    output_path: destination .npy file (never one of the inputs).
    chunk: rows read, transferred and written (and recorded as done) at a time, rounded
      up to whole blocks (``block_rows()`` per device); it does not change the codes.
    mesh: optional 1-D mesh; each block is split over its data axis.
    key: HDF5 dataset name.
    max_rows: stop after this many rows in this call (time-boxed jobs); run again to resume.
    row_range: encode only rows [start, stop) of the input (one process's slice of a
      multi-host job).
    quantizer: a name for ``quantizers.for_model`` ("lattice": the model's own lattice,
      "sign", ...) or a ``Quantizer`` on the model's d_out whose encoder runs inside JAX
      (``encode_core``; faiss quantizers do not).

  Returns:
    True when the output is complete, False when stopped early by ``max_rows``.

  Raises:
    ValueError: bad arguments, an input row with NaN/Inf (nothing is renamed into place),
      an output that is the input or a directory, a running encode to the same output, or
      a progress file of another model/input or a corrupt one.
  """
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
      raise ValueError(f"row_range={row_range} is not a range [lo, hi) of the "
                       f"{x.shape[0]} rows of {input_path} (0 <= lo <= hi <= {x.shape[0]})")
    x = x[lo:hi]
  check_vectors(input_path, x[:0], d=model.d_in, d_name="d")
  q = _encoder_quantizer(model, quantizer)
  n, width, dtype = int(x.shape[0]), q.code_width, np.dtype(q.code_dtype)
  # Never more rows a chunk than the input has (a huge --chunk would otherwise size its
  # buffers and padding by the request).
  chunk = min(chunk, max(n, 1))
  progress = _progress_path(output_path)
  out_dir = os.path.dirname(os.path.abspath(output_path))
  job = {"version": _PROGRESS_VERSION, "model": model_fingerprint(model),
         "input": fingerprint,
         "row_range": list(row_range or (0, n)), "n": n, "code_words": width,
         "encoder": encoder_fingerprint(mesh)}
  if q.meta() != quantizers.for_model(quantizers.LATTICE, model.config).meta():
    # Another code than the model's own lattice (whose r2 the model fingerprint holds).
    job["quantizer"] = q.meta()

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
        what = {"model": "another model", "input": "another input (content, shape or key)",
                "encoder": "another encoder configuration (block rows, platform, jax/jaxlib "
                           "version or XLA flags: codes may round differently)"}
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
        if out.shape != (n, width) or out.dtype != dtype or \
            not 0 <= hash_from <= done <= n or \
            _rows_sha256(out, hash_from, done) != state.get("rows_sha256"):
          raise ValueError(f"{partial} does not hold the {done} rows {progress} records; "
                           "delete both to restart")
      else:
        partial = None  # renamed into place just before a crash, or deleted: start over
    if partial is None:
      partial = _outputs.temp_name(output_path, ".partial")
      out = np.lib.format.open_memmap(partial, mode="w+", dtype=dtype, shape=(n, width))
      try:  # disk blocks reserved now: a full disk is ENOSPC here, not SIGBUS in a write
        preallocate(partial, report_as=output_path)
      except OSError:
        del out
        os.remove(partial)
        raise
      save_progress(os.path.basename(partial), 0, 0, out)
    _remove_leftovers(output_path, keep=partial)
    stop = n if max_rows is None else min(n, done + max_rows)
    bar = tqdm(total=n, initial=done, desc="encode", unit="vec")
    try:
      with EncodeStream(model, x, then=q.encode_core, chunk=chunk, mesh=mesh,
                        start=done, stop=stop, name=input_path,
                        row_offset=row_range[0] if row_range else 0) as stream:
        for lo, hi, codes in stream:
          out[lo:hi] = codes
          out.flush()
          save_progress(os.path.basename(partial), hi, lo, out)
          done = hi
          bar.update(hi - lo)
    except NonFiniteRowError as e:
      # This input can never complete: drop the job's files rather than leave a resume
      # point that would stop at the same row.
      bar.close()
      del out
      os.remove(progress)
      os.remove(partial)
      raise ValueError(f"{e}; nothing was written to the output") from None
    bar.close()
    del out
    if done < n:
      return False
    _outputs.check_regular_or_absent(output_path)  # not made a FIFO/device meanwhile
    os.replace(partial, output_path)
    os.remove(progress)
  return True
