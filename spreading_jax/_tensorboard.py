"""TensorBoard event files of a training run: one step per epoch (``TrainConfig.log_dir``).

The writer is tensorboardX: a pure-python package of about 90 kB (numpy, packaging and
protobuf, which orbax already needs). TensorBoard's own ``SummaryWriter`` comes with torch
or TensorFlow, and clu's metric writers write TensorBoard files through TensorFlow; the
``tensorboard`` package itself (the viewer, tens of MB with grpcio) is needed only to look.
"""
from __future__ import annotations

import json
import os
import re
import time

from spreading_jax.config import TrainConfig


def tag(key: str) -> str:
  """The TensorBoard tag of a history record key: grouped as train/, validation/, mining/
  and seconds/ panels (``lattice_R@10`` -> ``validation/lattice_R_10``: a tag has no "@",
  ``sgd_s`` -> ``seconds/sgd``).

  Example:
    >>> tag("loss"), tag("sign_R@1"), tag("mining_recall"), tag("time_s")
    ('train/loss', 'validation/sign_R_1', 'mining/recall', 'seconds/epoch')
  """
  if key.endswith("_s"):
    return "seconds/" + ("epoch" if key == "time_s" else key[:-2])
  if "_R@" in key:
    return "validation/" + key.replace("@", "_")
  if key.startswith("mining_"):
    return "mining/" + key[len("mining_"):]
  return "train/" + key


class EpochWriter:
  """Writes each epoch's history record (``train``'s callback records) to ``log_dir``.

  Every number of a record but ``epoch`` becomes one scalar at step = the record's epoch
  (booleans as 0/1); the config is written once as text (tag ``config``). Only process 0
  of a multi-process job writes (the records are the same on every process); elsewhere,
  and without ``log_dir``, the writer does nothing and imports nothing.

  A resumed run (``first_epoch`` > 1) asks TensorBoard to hide the events an interrupted
  run wrote for epochs from ``first_epoch`` on (tensorboardX's ``purge_step``), so the
  curves show each epoch once. TensorBoard reads a directory's event files in the order of
  their names, which carry the creation time to the second and the host; a writer that
  finds an event file of this second (or a later one: another host's clock) in ``log_dir``
  waits for the next second before it creates its own, so that its file neither replaces
  that one (same name) nor is read before it (the purge would then hide nothing).

  Args:
    config: the run's config (``log_dir`` None: the writer is a no-op).
    first_epoch: the epoch the run starts at (1, or the resumed epoch + 1).
  """

  def __init__(self, config: TrainConfig, first_epoch: int = 1):
    self._writer = None
    if config.log_dir is None:
      return
    import jax  # pylint: disable=import-outside-toplevel
    if jax.process_index() != 0:
      return
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError(f"log_dir={config.log_dir!r} needs tensorboardX (pip install "
                        f"tensorboardX): {e}") from e
    if os.path.exists(config.log_dir) and not os.path.isdir(config.log_dir):
      raise ValueError(f"log_dir {config.log_dir} exists and is not a directory")
    _wait_for_a_later_second(config.log_dir)
    self._writer = SummaryWriter(config.log_dir,
                                 purge_step=first_epoch if first_epoch > 1 else None)
    # Four leading spaces: TensorBoard renders text as Markdown, this keeps it verbatim.
    text = json.dumps(config.to_dict(), indent=1, sort_keys=True)
    self._writer.add_text("config", "\n".join("    " + line for line in text.splitlines()),
                          first_epoch)
    self._writer.flush()

  @property
  def active(self) -> bool:
    """True when this writer writes (log_dir given, process 0)."""
    return self._writer is not None

  def __call__(self, record: dict) -> None:
    """Writes one epoch's record and flushes it (someone may be watching)."""
    if self._writer is None:
      return
    step = int(record["epoch"])
    for key, value in record.items():
      if key != "epoch" and isinstance(value, (bool, int, float)):
        self._writer.add_scalar(tag(key), float(value), step)
    self._writer.flush()

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


# tensorboardX names a file events.out.tfevents.<10-digit unix second>.<host><suffix>.
_EVENT_FILE = re.compile(r"events\.out\.tfevents\.(\d{10})\.")


def _wait_for_a_later_second(log_dir: str, max_wait_s: float = 5.0) -> None:
  """Sleeps until the clock's second is past that of every event file in ``log_dir``
  (at most ``max_wait_s``: a file stamped further ahead, from a host whose clock runs
  fast, is left to sort by host name)."""
  try:
    names = os.listdir(log_dir)
  except FileNotFoundError:
    return
  stamps = [int(m.group(1)) for m in map(_EVENT_FILE.match, names) if m]
  if not stamps:
    return
  latest = max(stamps)
  deadline = time.time() + max_wait_s
  while int(time.time()) <= latest and time.time() < deadline:
    time.sleep(max(0.001, min(latest + 1 - time.time(), deadline - time.time())))
