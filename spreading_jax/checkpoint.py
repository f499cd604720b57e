"""Per-epoch checkpoints of a training run (orbax), keyed to its config and its data.

A checkpoint directory holds ``config.json`` (the run's config, input dimension and a
fingerprint of the training and validation vectors), ``checkpoints/`` (orbax: the training
state and the best-so-far parameters, committed atomically together), ``history.jsonl``
and a human-readable ``best.json``. A run pointed at a directory made by a different
config or different data refuses to resume instead of mixing the two.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import numpy as np

from spreading_jax import _files, _signals
from spreading_jax.config import TrainConfig

# Config fields that do not change what is computed, so a resumed run may differ in them.
_NOT_KEYED = ("verbose", "checkpoint_dir", "log_dir")


def fingerprint(*arrays: np.ndarray) -> str:
  """sha256 over the shapes, dtypes and bytes of the arrays (the data a run trains on)."""
  h = hashlib.sha256()
  for a in arrays:
    a = np.ascontiguousarray(a)
    h.update(f"{a.shape}{a.dtype.str}".encode())
    h.update(memoryview(a).cast("B"))
  return h.hexdigest()


def _write_json_atomic(path: str, obj, jsonl: bool = False) -> None:
  with _files.atomic_output(path) as tmp:
    with open(tmp, "w") as f:
      if jsonl:
        f.writelines(json.dumps(r) + "\n" for r in obj)
      else:
        json.dump(obj, f, indent=2)


def _best_meta(best: dict) -> dict:
  """The best-so-far bookkeeping as arrays, saved inside the checkpoint so that it commits
  atomically with the parameters it describes."""
  return {"metric": np.asarray(best["metric"], np.float64),
          "epoch": np.asarray(best.get("epoch") or 0, np.int32),
          "has_best": np.asarray(best["params"] is not None)}


class Checkpointer:
  """Saves and restores one training run in ``directory``.

  Args:
    directory: the run's directory (created if missing).
    config: the run's config; every field but ``verbose``/``checkpoint_dir``/``log_dir``
      must match the one recorded there.
    d_in: input dimension.
    data_sha256: ``fingerprint`` of the training (and validation) vectors.
  """

  def __init__(self, directory: str, config: TrainConfig, d_in: int, data_sha256: str):
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    self.directory = os.fspath(directory)
    if os.path.exists(self.directory) and not os.path.isdir(self.directory):
      raise ValueError(f"checkpoint_dir {self.directory} exists and is not a directory")
    self._check_key(config, d_in, data_sha256)
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    self._manager = ocp.CheckpointManager(
        os.path.abspath(os.path.join(self.directory, "checkpoints")), options=options)

  def _check_key(self, config: TrainConfig, d_in: int, data_sha256: str) -> None:
    path = os.path.join(self.directory, "config.json")
    want = dict(config.to_dict(), d_in=d_in, data_sha256=data_sha256)
    for name in _NOT_KEYED:
      want.pop(name)
    if os.path.exists(path):
      try:
        with open(path) as f:
          have = json.load(f)
      except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is unreadable ({e}); use another checkpoint_dir") from e
      if not isinstance(have, dict):
        raise ValueError(f"{path} is not a run description; use another checkpoint_dir")
      diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
      if diff == ["data_sha256"]:
        raise ValueError(f"checkpoint_dir {self.directory} holds a run on different training "
                         "data; use another directory or the same data")
      if diff:
        raise ValueError(f"checkpoint_dir {self.directory} holds a run with a different config "
                         f"({', '.join(diff)}); use another directory or the same config")
    else:
      os.makedirs(self.directory, exist_ok=True)
      _write_json_atomic(path, want)

  def latest_epoch(self) -> int:
    """Number of epochs completed by the saved run (0 when there is none)."""
    step = self._manager.latest_step()
    return 0 if step is None else step + 1

  def save(self, epochs_done: int, state: dict, best: dict, history: list) -> None:
    """Commits the state after ``epochs_done`` epochs (state: a pytree of arrays)."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    has_best = best["params"] is not None
    tree = {"state": state,
            "best_params": best["params"] if has_best else state["params"],
            "best_batch_stats": best["batch_stats"] if has_best else state["batch_stats"],
            "best_meta": _best_meta(best)}
    # The history goes first: a crash before the checkpoint commits leaves a history one
    # epoch ahead, which resuming trims to the checkpoint's epoch. The best-so-far record
    # lives inside the checkpoint; best.json is a human-readable copy, never read back.
    # A SIGINT/SIGTERM (cli) waits until the checkpoint is committed: interrupting orbax's
    # save threads halfway gave dozens of tracebacks and once a segmentation fault.
    with _signals.deferred():
      _write_json_atomic(os.path.join(self.directory, "history.jsonl"), history, jsonl=True)
      self._manager.save(epochs_done - 1, args=ocp.args.StandardSave(tree))
      self._manager.wait_until_finished()
      _write_json_atomic(os.path.join(self.directory, "best.json"),
                         {"metric": best["metric"], "epoch": best.get("epoch"),
                          "has_best": has_best, "checkpoint_epoch": epochs_done})

  def restore(self, state: dict, best: dict) -> tuple[dict, dict, list, int]:
    """The latest checkpoint: (state, best, history, epochs done); ``state`` and ``best``
    are templates (and are returned unchanged when there is no checkpoint)."""
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    step = self._manager.latest_step()
    if step is None:
      return state, best, [], 0
    template = {"state": state, "best_params": state["params"],
                "best_batch_stats": state["batch_stats"], "best_meta": _best_meta(best)}
    tree = self._manager.restore(step, args=ocp.args.StandardRestore(template))
    meta = tree["best_meta"]
    history_path = os.path.join(self.directory, "history.jsonl")
    history: list[Any] = []
    if os.path.exists(history_path):
      with open(history_path) as f:
        history = [json.loads(line) for line in f if line.strip()]
    history = [r for r in history if r["epoch"] <= step + 1]
    if bool(meta["has_best"]):
      best = {"metric": float(meta["metric"]), "params": tree["best_params"],
              "batch_stats": tree["best_batch_stats"], "epoch": int(meta["epoch"])}
    return tree["state"], best, history, step + 1

  def close(self) -> None:
    """Waits for a pending save and closes the manager (a signal waits until it is closed)."""
    with _signals.deferred():
      self._manager.wait_until_finished()
      self._manager.close()
