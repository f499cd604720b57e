"""Comparisons that allow exactly what float rounding can change, and nothing more.

Two compiled programs that compute the same vectors (another batch shape, a fused encoder,
a device mesh, another CPU or XLA optimization level) may round them differently in the
last bits. A code computed from such vectors is then the same except where a vector lies
within that rounding of a decision boundary of the quantizer.
"""
import numpy as np

# Catalyzed vectors have unit norm; float32 rounding differences between programs are
# ~1e-6 at most (a few ulps through three layers). A boundary tie is a difference in the
# scores of the two decoded codes below 2x that: allow 1e-4, 50x more, still far below
# the gap between a right and a wrong code (~1e-2 for a 24-d sphere of 64-bit codes).
TIE_TOLERANCE = 1e-4


def assert_codes_equal_up_to_ties(got, want, y, quantizer, tol=TIE_TOLERANCE,
                                  max_fraction=1e-3):
  """Codes ``got`` and ``want`` of the same vectors ``y`` f32[n, d] are equal, except for
  rows where ``y`` scores both decoded codes (unit-norm reconstructions) within ``tol``:
  a tie that float rounding breaks either way. At most ``max_fraction`` of the rows (and
  at least 2) may differ so."""
  got, want = np.asarray(got), np.asarray(want)
  assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
  rows = np.flatnonzero(np.any(got.reshape(len(got), -1) != want.reshape(len(want), -1), 1))
  if rows.size == 0:
    return
  y = np.asarray(y, np.float64)[rows]
  a = np.asarray(quantizer.decode(got[rows]), np.float64)
  b = np.asarray(quantizer.decode(want[rows]), np.float64)
  gap = np.abs(np.sum(y * a, 1) - np.sum(y * b, 1))
  assert rows.size <= max(2, max_fraction * len(got)) and np.all(gap <= tol), (
      f"{rows.size} of {len(got)} codes differ (rows {rows[:10].tolist()}), by score gaps "
      f"{gap[:10].tolist()}: more than float rounding at a decision boundary can explain")
