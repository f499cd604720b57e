"""SIGINT/SIGTERM as one exception, deferred while a checkpoint is being committed.

The command line (``cli.main``) installs ``handling()``: SIGINT and SIGTERM raise
``Interrupted`` (a ``KeyboardInterrupt``) in the main thread, so ``finally`` blocks run
(the checkpoint manager is closed, temporary files are removed) and the command ends with
one line and exit status 128 + the signal (130, 143). Code that must not be interrupted
halfway (an orbax save and its background threads) runs inside ``deferred()``: a signal
that arrives meanwhile is raised when the block ends.
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Iterator

_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_state = {"depth": 0, "pending": None}


class Interrupted(KeyboardInterrupt):
  """SIGINT or SIGTERM arrived; ``signum`` says which."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def _handler(signum, frame) -> None:
  del frame
  if _state["depth"]:
    _state["pending"] = _state["pending"] or signum
    return
  raise Interrupted(signum)


@contextlib.contextmanager
def handling() -> Iterator[None]:
  """Turns SIGINT/SIGTERM into ``Interrupted`` while the block runs (main thread only;
  elsewhere a no-op). The previous handlers are restored afterwards."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  old = {s: signal.getsignal(s) for s in _SIGNALS}
  for s in _SIGNALS:
    signal.signal(s, _handler)
  try:
    yield
  finally:
    for s, h in old.items():
      signal.signal(s, h)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
  """Holds SIGINT/SIGTERM (under ``handling``) until the block ends, then raises
  ``Interrupted`` for the first one that arrived, unless the block raised already."""
  _state["depth"] += 1
  try:
    yield
  except BaseException:
    _state["depth"] -= 1
    if not _state["depth"]:
      _state["pending"] = None  # the block's own error ends the command
    raise
  _state["depth"] -= 1
  pending = _state["pending"]
  if not _state["depth"] and pending is not None:
    _state["pending"] = None
    raise Interrupted(pending)
