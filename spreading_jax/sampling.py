"""Reproducible row samples of (possibly memory-mapped) arrays."""
from __future__ import annotations

import numpy as np


def sample_indices(total: int, n: int, seed: int) -> np.ndarray:
  """``n`` distinct row indices of ``range(total)`` drawn with ``seed``, sorted (so that a
  memory map is read front to back). Requires n <= total.

  Example:
    >>> idx = sample_indices(10, 3, seed=0)
    >>> len(idx), bool(np.all(np.diff(idx) > 0)), bool(np.all(sample_indices(10, 3, 0) == idx))
    (3, True, True)
  """
  return np.sort(np.random.default_rng(seed).choice(total, n, replace=False))


def sample_rows(x, n: int, seed: int):
  """At most ``n`` rows of ``x`` drawn with ``seed`` (``x`` itself when it has no more)."""
  if x.shape[0] <= n:
    return x
  return x[sample_indices(x.shape[0], n, seed)]
