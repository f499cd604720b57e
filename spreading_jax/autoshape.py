"""``fit``: choose what a config leaves unset, then train. The one place above both
``selection.py`` (which screens candidates with ``train.train_many``) and ``train.py``
(which trains a given shape), so neither imports the other's caller.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Callable

import numpy as np

from spreading_jax import _files
from spreading_jax._validation import check_vectors
from spreading_jax.checkpoint import fingerprint
from spreading_jax.config import TrainConfig
from spreading_jax.model import TrainResult
from spreading_jax.selection import Selection, select_shape
from spreading_jax.train import check_config, split_indices, train

logger = logging.getLogger("spreading_jax")

SELECTION_FILE = "selection.json"


def fit(config: TrainConfig, dataset, mesh=None, callback: Callable[[dict], Any] | None = None,
        validation: tuple[Any, Any] | None = None) -> TrainResult:
  """Trains a catalyzer, first choosing d_out, r² and λ where ``config`` leaves them unset.

  A config that gives ``d_out`` and ``lambda_koleo`` trains exactly that (``train``).
  Otherwise ``selection.select_shape`` screens candidates on the training rows only (the
  final run's validation queries and any ``validation`` vectors stay unseen) and keeps the
  paper's shape unless a candidate beats it by more than the validation noise; the choice,
  its evidence and cost are printed (``config.verbose``), logged and stored in
  ``TrainResult.selection`` (saved with the model). With ``config.checkpoint_dir`` the
  choice is also saved there, so a resumed run does not screen again.

  Args: as ``train.train``.

  Returns:
    the TrainResult of the final run, with ``selection`` set when something was chosen.

  Example::

    ds = load_dataset("fashion-mnist-mini")
    result = fit(TrainConfig(epochs=10), ds)     # the paper's shape unless beaten
    print(result.config.d_out, result.config.lambda_koleo, result.selection["reason"])
  """
  if config.shape_is_set:
    return train(config, dataset, mesh, callback, validation)
  x_all = check_vectors("dataset.train", getattr(dataset, "train", dataset), min_rows=1)
  check_config(config)
  rows = split_indices(int(x_all.shape[0]),
                       config.replace(val_every=0) if validation is not None else config)[0]
  xt = np.asarray(x_all[rows], np.float32)
  saved, key = None, None
  if config.checkpoint_dir:
    key = fingerprint(np.frombuffer(json.dumps(
        dict(config.to_dict(), checkpoint_dir=None, verbose=None), sort_keys=True).encode(),
        np.uint8), xt)
    saved = _read_selection(config.checkpoint_dir, key)
  if saved is None:
    chosen = select_shape(config, xt, mesh=mesh)
    if config.checkpoint_dir:
      _write_selection(config.checkpoint_dir, key, chosen)
  else:
    chosen = saved
    logger.info("shape chosen earlier, read from %s", config.checkpoint_dir)
  logger.info("chose d_out=%d r2=%s lambda=%g by %s in %.0fs:\n%s", chosen.d_out, chosen.r2,
              chosen.lambda_koleo, chosen.metric, chosen.cost_s, chosen.format_table())
  if config.verbose:
    how = (f"{len(chosen.table)} screening runs of {chosen.screen_epochs} epochs on "
           f"{chosen.screen_rows} vectors, {chosen.val_queries} validation queries against "
           f"{chosen.val_base}" if chosen.table else "nothing screened")
    print(f"shape chosen ({chosen.cost_s:.0f}s, {how}{'; read back' if saved else ''}):\n"
          + chosen.format_table(), flush=True)
  result = train(config.replace(d_out=chosen.d_out, r2=chosen.r2,
                                lambda_koleo=chosen.lambda_koleo),
                 dataset, mesh, callback, validation)
  result.selection = chosen.to_dict()
  return result


def _read_selection(directory: str, key: str) -> Selection | None:
  path = os.path.join(directory, SELECTION_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      saved = json.load(f)
    if not isinstance(saved, dict) or saved.get("key") != key:
      raise ValueError(f"{path} was written for another config or other data; use another "
                       "checkpoint_dir")
    return Selection.from_dict(saved["selection"])
  except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(f"{path} is unreadable ({e}); use another checkpoint_dir") from e


def _write_selection(directory: str, key: str, chosen: Selection) -> None:
  os.makedirs(directory, exist_ok=True)
  with _files.atomic_output(os.path.join(directory, SELECTION_FILE)) as tmp:
    with open(tmp, "w") as f:
      json.dump({"key": key, "selection": chosen.to_dict()}, f, indent=1)
