"""Times one training epoch of the original PyTorch implementation, for a same-machine comparison.

The original code (facebookresearch/spreadingvectors, CC-BY-NC) is NOT part of this repository:
it is materialised into a temporary directory at benchmark time (``prepare_reference``) and
imported from there. Nothing of it is copied here.

What is timed: the original's own epoch function, ``train.triplet_optimize`` (imported, run
verbatim with ``epochs=1``). Its training pass (the loop over mini-batches: three forward
passes of the net in train mode for anchors/positives/negatives, triplet + KoLeo losses, SGD
with momentum) is what we time, using the original's own timer (``logs['times'][1]``).
The per-epoch hard-negative mining that ``triplet_optimize`` does before that loop is, by
default, replaced by the given negatives: the two names it uses for mining
(``train.forward_pass`` and ``train.get_nearestneighbors``) are temporarily rebound in the
imported module to return ``neg``. With ``mine_negatives=True`` the original mining runs too
(faiss HNSW if faiss is importable, else its exact torch fallback, which needs N % 500 == 0)
and its time is reported separately.

The network is built as in the original ``train.py`` (its ``__main__`` block, not importable):
Linear(d, dint)-BN-ReLU-Linear(dint, dint)-BN-ReLU-Linear(dint, dout)-Normalize, with the
original's ``lib.net.Normalize``.

Run it with a Python that has CPU torch (not the project's venv)::

    python3 -m venv TORCH_VENV && TORCH_VENV/bin/pip install torch==2.13.0 numpy
    TORCH_VENV/bin/python benchmarks/_torch_reference.py --threads 2 --n 50000

``--reference-dir`` takes an existing checkout; without it one is made in a temp dir from a
git clone given by ``--git-dir`` or $SPREADINGVECTORS_GIT_DIR (no default location: a clear
error when neither is set). ``--data file.npz`` (arrays x, pos, neg) times on the exact data the JAX
side uses; ``--json`` prints one JSON object.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types

import numpy as np

REPO = "facebookresearch/spreadingvectors"
GIT_DIR_ENV = "SPREADINGVECTORS_GIT_DIR"
HOW_TO = (f"`git clone --bare https://github.com/{REPO} <dir>` and pass --git-dir <dir> (or set "
          f"{GIT_DIR_ENV}=<dir>), or pass --reference-dir <an existing checkout>")


def _git_dir(git_dir: str | None = None) -> str | None:
  """The bare clone of the original repo: ``git_dir``, else $SPREADINGVECTORS_GIT_DIR, else
  None (there is no default location)."""
  return git_dir or os.environ.get(GIT_DIR_ENV) or None


def prepare_reference(tmpdir: str, git_dir: str | None = None) -> str:
  """Extracts HEAD of a git clone of the original repo into ``tmpdir``; returns the
  checkout path. The clone is ``git_dir`` or $SPREADINGVECTORS_GIT_DIR."""
  git_dir = _git_dir(git_dir)
  if git_dir is None:
    raise ValueError(f"no clone of {REPO} given: {HOW_TO}")
  if not os.path.isdir(git_dir):
    raise FileNotFoundError(f"no git repository at {git_dir}: {HOW_TO}")
  os.makedirs(tmpdir, exist_ok=True)
  archive = subprocess.run(["git", f"--git-dir={git_dir}", "archive", "HEAD"],
                           check=True, capture_output=True).stdout
  subprocess.run(["tar", "-x", "-C", tmpdir], input=archive, check=True)
  if not os.path.isfile(os.path.join(tmpdir, "train.py")):
    raise RuntimeError(f"{tmpdir} has no train.py after extracting {git_dir}")
  return tmpdir


def _reference_commit(reference_dir: str, git_dir: str | None = None) -> str | None:
  git_dir = _git_dir(git_dir)
  if git_dir is not None and os.path.isdir(git_dir):
    r = subprocess.run(["git", f"--git-dir={git_dir}", "rev-parse", "HEAD"],
                       capture_output=True, text=True)
    if r.returncode == 0:
      return r.stdout.strip()
  return None


def _import_reference(reference_dir: str):
  """Imports the original's ``train`` and ``lib.net`` modules from ``reference_dir``."""
  reference_dir = os.path.abspath(reference_dir)
  if not os.path.isfile(os.path.join(reference_dir, "train.py")):
    raise FileNotFoundError(f"{reference_dir} is not a checkout of {REPO} (no train.py)")
  for name in ("train", "lib", "lattices"):  # the original's top-level names
    mod = sys.modules.get(name)
    if mod is not None and not os.path.abspath(getattr(mod, "__file__", "") or "").startswith(
        reference_dir):
      raise RuntimeError(f"a module named {name!r} from elsewhere is already imported")
  if reference_dir not in sys.path:
    sys.path.insert(0, reference_dir)
  train = importlib.import_module("train")
  lib_net = importlib.import_module("lib.net")
  return train, lib_net


def _busy_cpu_s() -> float | None:
  """Busy CPU seconds of the whole machine so far (Linux /proc/stat), or None."""
  try:
    with open("/proc/stat") as f:
      v = [int(t) for t in f.readline().split()[1:]]
    return (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait
  except (OSError, ValueError, IndexError):
    return None


def _self_cpu_s() -> float:
  t = os.times()
  return t.user + t.system


def build_reference_net(lib_net, d_in: int, dint: int, dout: int):
  """The original's architecture (train.py ``__main__``), with its own Normalize module."""
  from torch import nn
  return nn.Sequential(
      nn.Linear(d_in, dint, bias=True), nn.BatchNorm1d(dint), nn.ReLU(),
      nn.Linear(dint, dint, bias=True), nn.BatchNorm1d(dint), nn.ReLU(),
      nn.Linear(dint, dout, bias=True), lib_net.Normalize())


@contextlib.contextmanager
def _step_clock(train, stamps: list):
  """Rebinds ``train.optim`` so the SGD that triplet_optimize builds stamps each step() end."""
  import torch
  saved = train.optim

  class StampedSGD(torch.optim.SGD):
    def step(self, closure=None):
      out = super().step(closure)
      stamps.append((time.perf_counter(), _busy_cpu_s(), _self_cpu_s()))
      return out

  train.optim = types.SimpleNamespace(SGD=StampedSGD)
  try:
    yield
  finally:
    train.optim = saved


@contextlib.contextmanager
def _given_negatives(train, neg_ref: list):
  """Rebinds the two names triplet_optimize mines negatives with, so that it uses neg_ref[0]."""
  saved = train.forward_pass, train.get_nearestneighbors
  train.forward_pass = lambda net, xt, bs=128, device=None: np.zeros((xt.shape[0], 1), np.float32)
  train.get_nearestneighbors = lambda xq, xb, k, device, needs_exact=True, verbose=False: (
      np.asarray(neg_ref[0]).reshape(-1, 1))
  try:
    yield
  finally:
    train.forward_pass, train.get_nearestneighbors = saved


def time_reference_epoch(reference_dir: str, x, pos, neg, threads: int = 2, repeats: int = 3,
                         *, dint: int = 1024, dout: int = 24, batch_size: int = 64,
                         lambda_uniform: float = 0.05, lr: float = 0.1, momentum: float = 0.9,
                         warmup_batches: int = 20, mine_negatives: bool = False,
                         rank_negative: int = 50, chunk_steps: int = 50,
                         seed: int = 1234) -> dict:
  """Median time of ``repeats`` training epochs of the original code on (x, pos, neg).

  x: (N, d) float32 inputs. pos: (N, kpos) int indices of each point's positives (the original
  draws one uniformly per point and epoch, as its ground-truth kNN including the point itself).
  neg: (N,) int index of each point's negative (ignored when ``mine_negatives``).
  Each timed epoch is one call of the original ``triplet_optimize`` with ``epochs=1`` (a fresh
  SGD optimizer each call, as at the start of original training; the net keeps training).

  Two measures: ``epoch_s`` = median over epochs of the original's own training-pass timer;
  ``ms_per_step`` / ``vectors_per_s`` = median over all fixed-length chunks of ``chunk_steps``
  consecutive steps (timestamps taken at the end of each optimizer.step()), which is robust to
  intermittent load from other processes. ``*_epoch`` variants derive from ``epoch_s``;
  ``*_quiet`` ones keep only chunks/epochs during which other processes used < 0.25 cores
  (from /proc/stat; with T threads on a machine with ~T cores, any other load distorts a lot).
  vectors/s counts anchors (training vectors) per second; each step forwards 3 x batch rows.
  """
  import torch
  torch.set_num_threads(int(threads))
  np.random.seed(seed)
  torch.manual_seed(seed)
  train, lib_net = _import_reference(reference_dir)

  x = np.ascontiguousarray(x, dtype=np.float32)
  pos = np.ascontiguousarray(pos, dtype=np.int64)
  neg = np.ascontiguousarray(neg, dtype=np.int64).reshape(-1)
  n, d = x.shape
  assert pos.shape[0] == n and neg.shape[0] == n, (x.shape, pos.shape, neg.shape)

  net = build_reference_net(lib_net, d, dint, dout)
  args = types.SimpleNamespace(
      lr_schedule=str(lr), epochs=1, quantizer_train="", device="cpu", momentum=momentum,
      batch_size=batch_size, lambda_uniform=lambda_uniform, rank_negative=rank_negative,
      val_freq=10 ** 9, lr=lr)

  neg_ref = [neg]
  quiet = contextlib.redirect_stdout(io.StringIO())

  # Warm-up: the same function on a prefix of `warmup_batches` batches (indices folded into it).
  nw = min(n, warmup_batches * batch_size)
  if nw > 0:
    neg_ref[0] = neg[:nw] % nw
    with quiet, _given_negatives(train, neg_ref):
      train.triplet_optimize(x[:nw], pos[:nw] % nw, net, args, None)

  mining_cm = contextlib.nullcontext() if mine_negatives else _given_negatives(train, neg_ref)
  neg_ref[0] = neg
  epochs, walls, mining, losses, chunks, others = [], [], [], [], [], []
  with mining_cm:
    for _ in range(repeats):
      stamps = []
      b0, s0 = _busy_cpu_s(), _self_cpu_s()
      t = time.perf_counter()
      with contextlib.redirect_stdout(io.StringIO()), _step_clock(train, stamps):
        logs = train.triplet_optimize(x, pos, net, args, None)
      walls.append(time.perf_counter() - t)
      b1 = _busy_cpu_s()
      if b0 is not None and b1 is not None:  # cores used by other processes meanwhile
        others.append(max(0.0, (b1 - b0) - (_self_cpu_s() - s0)) / walls[-1])
      # full-batch steps only (the last batch may be partial); stamps[0] ends step 1
      nfull = n // batch_size
      for c0 in range(0, nfull - chunk_steps, chunk_steps):
        (ta, ba, sa), (tb, bb, sb) = stamps[c0], stamps[c0 + chunk_steps]
        other = None if ba is None else max(0.0, (bb - ba) - (sb - sa)) / (tb - ta)
        chunks.append(((tb - ta) / chunk_steps, other))
      t_mine, t_train, _ = logs[-1]["times"]
      epochs.append(t_train)
      mining.append(t_mine)
      losses.append(logs[-1]["loss"])

  steps = -(-n // batch_size)
  t_epoch = statistics.median(epochs)
  quiet_max = 0.25  # a chunk is "quiet" if other processes used < this many cores meanwhile
  step_all = [c for c, _ in chunks]
  step_quiet = [c for c, o in chunks if o is not None and o < quiet_max]
  t_step = statistics.median(step_all) if step_all else t_epoch / steps
  epochs_quiet = [e for e, o in zip(epochs, others) if o < quiet_max]
  out = {
      "impl": "original PyTorch (train.triplet_optimize, imported)",
      "reference_commit": _reference_commit(reference_dir),
      "torch": torch.__version__, "threads": torch.get_num_threads(),
      "n": n, "d": d, "dint": dint, "dout": dout, "batch_size": batch_size, "steps": steps,
      "repeats": repeats, "warmup_batches": warmup_batches,
      "epoch_s": t_epoch, "epoch_s_all": epochs, "call_wall_s_all": walls,
      "chunk_steps": chunk_steps, "n_chunks": len(chunks),
      "ms_per_step": 1e3 * t_step, "vectors_per_s": batch_size / t_step,
      "ms_per_step_chunk_min": 1e3 * min(step_all) if step_all else None,
      "n_chunks_quiet": len(step_quiet),
      "ms_per_step_quiet": 1e3 * statistics.median(step_quiet) if step_quiet else None,
      "vectors_per_s_quiet": batch_size / statistics.median(step_quiet) if step_quiet else None,
      "epoch_s_quiet": statistics.median(epochs_quiet) if epochs_quiet else None,
      "ms_per_step_epoch": 1e3 * t_epoch / steps, "vectors_per_s_epoch": n / t_epoch,
      "mine_negatives": mine_negatives, "loss_last_epoch": losses[-1],
      "other_processes_cores_all": others or None, "quiet_max_other_cores": quiet_max,
  }
  if mine_negatives:
    out["mining_s"] = statistics.median(mining)
  return out


def make_data(n: int = 50_000, d: int = 96, kpos: int = 10, rank_negative: int = 50,
              seed: int = 0):
  """N random unit vectors; pos = exact kpos-NN (self included, as the original's ground truth);
  neg = the rank_negative-th exact NN (self counted), i.e. input-space stand-in negatives."""
  import torch
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d), dtype=np.float32)
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  xt = torch.from_numpy(x)
  k = max(kpos, rank_negative)
  idx = []
  with torch.no_grad():
    for i0 in range(0, n, 2048):
      dots = xt[i0:i0 + 2048] @ xt.T  # unit vectors: max dot = min L2 distance
      idx.append(dots.topk(k, dim=1, largest=True, sorted=True)[1])
  idx = torch.cat(idx).numpy()
  return x, idx[:, :kpos].copy(), idx[:, rank_negative - 1].copy()


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--reference-dir", default=None,
                 help="checkout of the original repo (default: extracted from --git-dir into a "
                      "temp dir)")
  p.add_argument("--git-dir", default=None,
                 help=f"git clone of {REPO} (default: ${GIT_DIR_ENV}; no default location)")
  p.add_argument("--n", type=int, default=50_000)
  p.add_argument("--d", type=int, default=96)
  p.add_argument("--dint", type=int, default=1024)
  p.add_argument("--dout", type=int, default=24)
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--threads", type=int, default=2)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--warmup-batches", type=int, default=20)
  p.add_argument("--chunk-steps", type=int, default=50)
  p.add_argument("--mine-negatives", action="store_true",
                 help="run the original per-epoch negative mining too (timed separately)")
  p.add_argument("--data", default=None, help=".npz with x, pos, neg (else random unit vectors)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--json", action="store_true", help="print one JSON object only")
  a = p.parse_args(argv)

  if a.data:
    z = np.load(a.data)
    x, pos, neg = z["x"], z["pos"], z["neg"]
  else:
    t = time.perf_counter()
    x, pos, neg = make_data(a.n, a.d, seed=a.seed)
    if not a.json:
      print(f"data: {x.shape} unit vectors, 10-NN positives ({time.perf_counter() - t:.1f} s)")

  with contextlib.ExitStack() as stack:
    ref = a.reference_dir
    if ref is None:
      if _git_dir(a.git_dir) is None:
        p.error(f"no clone of {REPO} given: {HOW_TO}")
      ref = prepare_reference(stack.enter_context(tempfile.TemporaryDirectory(prefix="sv_ref_")),
                              a.git_dir)
    res = time_reference_epoch(ref, x, pos, neg, a.threads, a.repeats, dint=a.dint,
                               dout=a.dout, batch_size=a.batch_size,
                               warmup_batches=a.warmup_batches, chunk_steps=a.chunk_steps,
                               mine_negatives=a.mine_negatives)
  if a.json:
    print(json.dumps(res))
  else:
    print(f"original torch {res['torch']}, threads={res['threads']}, N={res['n']}, "
          f"{res['d']}->{res['dint']}->{res['dint']}->{res['dout']}, batch {res['batch_size']}")
    print(f"  epoch (median of {res['repeats']}): {res['epoch_s']:.2f} s  "
          f"[{', '.join(f'{t:.2f}' for t in res['epoch_s_all'])}]")
    print(f"  median of {res['n_chunks']} chunks of {res['chunk_steps']} steps: "
          f"{res['vectors_per_s']:.0f} training vectors/s, {res['ms_per_step']:.2f} ms/step "
          f"(fastest chunk {res['ms_per_step_chunk_min']:.2f} ms/step)")
    print(f"  from median epoch: {res['vectors_per_s_epoch']:.0f} training vectors/s, "
          f"{res['ms_per_step_epoch']:.2f} ms/step")
    quiet_max = res["quiet_max_other_cores"]
    if res["ms_per_step_quiet"] is not None:
      print(f"  median of the {res['n_chunks_quiet']} chunks during which other processes used "
            f"< {quiet_max} cores: {res['vectors_per_s_quiet']:.0f} training vectors/s, "
            f"{res['ms_per_step_quiet']:.2f} ms/step")
    if res["epoch_s_quiet"] is not None:
      print(f"  median quiet epoch: {res['epoch_s_quiet']:.2f} s = "
            f"{res['n'] / res['epoch_s_quiet']:.0f} training vectors/s")
    if res["other_processes_cores_all"]:
      print("  CPU cores used by other processes during each epoch: "
            + ", ".join(f"{c:.2f}" for c in res["other_processes_cores_all"]))
    if "mining_s" in res:
      print(f"  negative mining (original): {res['mining_s']:.2f} s/epoch")
  return res


if __name__ == "__main__":
  main()
