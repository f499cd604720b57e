"""Batch encoding: raw vectors -> Zn lattice codes in one compiled program, and a resumable
streaming job that encodes a vectors file chunk by chunk into a .npy file of codes.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm.auto import tqdm

from spreading_jax import lattice, sharding
from spreading_jax._validation import check_int
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


def encode_file(model: TrainResult, input_path, output_path, chunk: int = 65536,
                mesh: Mesh | None = None, key: str | None = None,
                max_rows: int | None = None,
                row_range: tuple[int, int] | None = None) -> bool:
  """Encodes a vectors file (fvecs/bvecs/npy/HDF5) to a .npy file of u32 lattice codes.

  Codes go chunk by chunk into ``output_path + ".partial"`` (a preallocated .npy memory
  map); after every chunk ``output_path + ".progress.json"`` records the rows done, so an
  interrupted run resumes where it stopped. When all rows are done the partial file is
  renamed to ``output_path``.

  Args:
    model: the trained catalyzer.
    input_path: vectors file (``vecs_io.read_vectors``).
    output_path: destination .npy file.
    chunk: rows per compiled batch.
    mesh: optional 1-D mesh; each batch is split over its data axis.
    key: HDF5 dataset name.
    max_rows: stop after this many rows in this call (time-boxed jobs); run again to resume.
    row_range: encode only rows [start, stop) of the input (one process's slice of a
      multi-host job).

  Returns:
    True when the output is complete, False when stopped early by ``max_rows``.
  """
  from spreading_jax.vecs_io import read_vectors
  output_path, input_path = os.fspath(output_path), os.fspath(input_path)
  chunk = check_int("chunk", chunk, minimum=1)
  x = read_vectors(input_path, key=key)
  if row_range is not None:
    lo, hi = (int(v) for v in row_range)
    if not 0 <= lo <= hi <= x.shape[0]:
      raise ValueError(f"row_range={row_range} is outside [0, {x.shape[0]}]")
    x = x[lo:hi]
  if x.shape[1] != model.d_in:
    raise ValueError(f"{input_path} has d={x.shape[1]} but the model expects d_in={model.d_in}")
  codec = make_codec(model.config)
  n, width = int(x.shape[0]), codec.code_words
  ndev = sharding.mesh_size(mesh)
  chunk = sharding.round_up(chunk, ndev)
  partial, progress = output_path + ".partial", _progress_path(output_path)
  job = {"input": os.path.abspath(input_path), "row_range": list(row_range or (0, n)), "n": n,
         "code_words": width, "r2": codec.r2,
         "input_scale": model.input_scale}
  done = 0
  if os.path.exists(progress) and os.path.exists(partial):
    with open(progress) as f:
      state = json.load(f)
    if {k: state.get(k) for k in job} != job:
      raise ValueError(f"{progress} belongs to another job; delete it and {partial} to restart")
    done = int(state["rows_done"])
    out = np.lib.format.open_memmap(partial, mode="r+")
  else:
    out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint32, shape=(n, width))
  encoder = make_encoder(model)
  stop = n if max_rows is None else min(n, done + check_int("max_rows", max_rows, minimum=1))
  data_sharding = NamedSharding(mesh, P(sharding.axis_name(mesh))) if mesh is not None else None
  bar = tqdm(total=n, initial=done, desc="encode", unit="vec")
  while done < stop:
    xb = np.asarray(x[done:min(stop, done + chunk)], np.float32)
    m = xb.shape[0]
    xb = jnp.asarray(sharding.pad_rows(xb, chunk))
    if data_sharding is not None:
      xb = jax.device_put(xb, data_sharding)
    out[done:done + m] = np.asarray(encoder(xb))[:m]
    out.flush()
    done += m
    tmp = progress + ".tmp"
    with open(tmp, "w") as f:
      json.dump(dict(job, rows_done=done), f)
    os.replace(tmp, progress)
    bar.update(m)
  bar.close()
  del out
  if done < n:
    return False
  os.replace(partial, output_path)
  os.remove(progress)
  return True
