"""The spherical Zn lattice quantizer {c in Z^d : ‖c‖² = r²} with exact integer codes.

``ZnSphereCodec(d, r2)`` maps vectors to the lattice point of largest cosine and points to
their rank in [0, N), N = the number of points on the sphere, stored as little-endian
uint32 words (no ``jax_enable_x64``; TPU friendly). Any (d, r²) with N < 2^256 works,
within the table-size limits given in ``ZnSphereCodec``.

Code assignment (our own scheme). With N(k, s) = the number of points of Z^k of squared
norm s, s_p = the squared norm left for the coordinates p.. and z_p = the number of
non-zero coordinates before p,

    code = sum_p 2^z_p (C[p, s_p, |c_p|] + [c_p < 0]),
    C[p, s, a] = sum_{b < a} w(b) N(d-p-1, s - b²),  w(0) = 1, w(b > 0) = 2,

i.e. points are ordered by their magnitudes lexicographically (coordinate 0 first, small
magnitudes first) and, within a magnitude pattern, by their signs read as a binary
number (the sign of the k-th non-zero coordinate is bit k). Encoding is d table lookups
and a multi-word Horner sum. Decoding walks the coordinates: the magnitude is the number
of thresholds C[p, s, a] (a >= 1, one gathered table row) <= the rank left, the
threshold is subtracted, and for a non-zero value the low bit of what is left is its
sign and is shifted out. Only comparisons, subtractions and shifts: no multiplication or
division of big integers, a fixed number of vectorized steps per row. The last few
coordinates are read from one lookup table of all the short vectors, indexed by
(remaining norm, remaining rank).

Quantization follows the atom search of faiss' ZnSphereCodec (faiss/impl/lattice_Zn.cpp,
the paper's reference implementation): the best point is a signed permutation of an
*atom* (a non-increasing non-negative vector of squared norm r²); it is found by sorting
|x| (ranks by pairwise comparisons) and scoring every atom against the sorted values with
one matmul; the argmax uses max/sign arithmetic so that XLA:CPU fuses it with the matmul.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from spreading_jax import sharding
from spreading_jax._validation import check_int, check_vectors, is_concrete

MAX_BITS = 256
# Largest decode/encode tables (uint32 entries) a codec may build; they become constants
# of the compiled kernels.
_MAX_TABLE_ENTRIES = 1 << 22
# Largest number of atoms (rows of the scoring matmul) and of tail-table entries.
_MAX_ATOMS = 1 << 17
_MAX_TAIL_ENTRIES = 1 << 19
# Rows per chunk of the kernels' loop over large batches (see _in_chunks).
_CHUNK = 16384
# Chunks decoded side by side in that loop.
_STREAMS = 2
# Most atom scores (rows x atoms) computed at once by quantize/encode.
_MAX_SCORES = 1 << 23
_HIGHEST = jax.lax.Precision.HIGHEST
# Up to this many coordinates the encode/decode walks are unrolled (fastest); longer ones
# run as loops so that compilation time does not grow with d.
_UNROLL = 32


# ---------------------------------------------------------------------------------------
# Counting points.

@functools.lru_cache(maxsize=64)
def _counts(d: int, r2: int) -> tuple[tuple[int, ...], ...]:
  """N[k][s] for k = 0..d and s = 0..r2: the number of points of Z^k of squared norm s.

  Dynamic programming over the coordinates with exact Python ints.
  """
  squares = [(v * v, 1 if v == 0 else 2) for v in range(math.isqrt(r2) + 1)]
  rows = [(1,) + (0,) * r2]
  for _ in range(d):
    prev, cur = rows[-1], [0] * (r2 + 1)
    for s, count in enumerate(prev):
      if count:
        for sq, mult in squares:
          if s + sq > r2:
            break
          cur[s + sq] += count * mult
    rows.append(tuple(cur))
  return tuple(rows)


def num_points(d: int, r2: int) -> int:
  """Number of points of Z^d with squared norm r2 (exact).

  Example:
    >>> num_points(24, 79)
    17319684851070915840
  """
  d = check_int("d", d, minimum=1)
  r2 = check_int("r2", r2, minimum=0)
  return _counts(d, r2)[d][r2]


def zn_r2_for_bits(d: int, bits: int) -> int:
  """The largest r² whose spherical Zn code in dimension d fits in ``bits`` bits.

  That is the largest r2 with N(d, r2) <= 2^bits. For d >= 5, N(d, r2) grows like
  r2^(d/2-1) up to bounded fluctuations, so the scan stops once N exceeds 2^(bits+16);
  in d <= 4 it does not grow (e.g. N(4, 2^k) = 24) and no largest r2 exists.

  Reproduces the paper's table: d=24 -> 3/10/79 for 16/32/64 bits, d=32 -> 3/8/36,
  d=40 -> 2/7/24.

  Example:
    >>> [zn_r2_for_bits(24, b) for b in (16, 32, 64)]
    [3, 10, 79]
  """
  d = check_int("d", d, minimum=1)
  bits = check_int("bits", bits, minimum=1, maximum=MAX_BITS)
  if d < 5:
    raise ValueError(f"zn_r2_for_bits needs d >= 5, got d={d}: in d <= 4 the number of "
                     "points does not grow with r2, so there is no largest radius")
  limit, stop = 1 << bits, 1 << (bits + 16)
  r2_max = 64
  while True:
    counts = _counts(d, r2_max)[d]
    above = [r for r in range(1, r2_max + 1) if counts[r] > stop]
    if above:
      fits = [r for r in range(1, above[0]) if 0 < counts[r] <= limit]
      if not fits:
        raise ValueError(f"no sphere of Z^{d} fits in {bits} bits: the smallest (r2=1) has "
                         f"{counts[1]} points")
      return fits[-1]
    if r2_max >= 1 << 14:
      raise ValueError(f"d={d}, bits={bits}: the radius would exceed r2={r2_max}, beyond "
                       "what ZnSphereCodec supports")
    r2_max *= 2


def _atoms(d: int, r2: int) -> list[tuple[int, ...]]:
  """All non-increasing non-negative integer d-vectors of squared norm r2, in
  decreasing lexicographic order."""
  out = []

  def rec(prefix, remaining, cap):
    if remaining == 0:
      out.append(tuple(prefix) + (0,) * (d - len(prefix)))
      return
    slots = d - len(prefix)
    for v in range(min(cap, math.isqrt(remaining)), 0, -1):
      if v * v * slots < remaining:
        break  # even `slots` copies of v fall short of the radius
      if len(out) > _MAX_ATOMS:
        return
      rec(prefix + [v], remaining - v * v, v)

  rec([], r2, math.isqrt(r2))
  return out


def _to_words(values, words: int) -> np.ndarray:
  """Python ints -> u32[len(values), words], little-endian words."""
  values = list(values)
  out = np.zeros((len(values), words), np.uint32)
  for w in range(words):
    out[:, w] = np.array([(v >> (32 * w)) & 0xFFFFFFFF for v in values], np.uint64)
  return out


def _words_for(value: int) -> int:
  """uint32 words needed to hold every integer in [0, value)."""
  return max(1, -(-max(value - 1, 0).bit_length() // 32))


# ---------------------------------------------------------------------------------------
# The codec.

class ZnSphereCodec:
  """Quantizer and exact codec for the points of Z^d of squared norm ``r2``.

  Codecs compare and hash by (d, r2, tail), so they can be static arguments of
  ``jax.jit`` or be closed over by jitted functions (the tables become constants).
  ``quantize``, ``encode``, ``decode`` and ``decode_points`` validate concrete inputs and
  run them through a cached jit (one compilation per input size above 16384 rows, per
  power of two below); they also accept tracers, in which case they check shapes only
  and run the traceable ``*_core`` kernel directly. The ``*_core`` methods are the pure
  kernels (no checks, any batch size, usable under ``jit``, ``vmap`` and ``shard_map``);
  above 16384 rows they loop over chunks inside the compiled program (bounded memory,
  intermediates in cache). ``jitted(name)`` gives the cached ``jax.jit`` of one.

  Limits: N < 2^256; the rank tables (about d * r2 * (2 sqrt(r2) + 1) * (words + 1)
  uint32) at most 2^22 entries and at most 2^17 atoms (the search scores every atom).
  E.g. d=24 works up to r2 ~ 400 (~95 bits), d=128 up to N < 2^256. Large atom counts
  make quantization slower: the eager API then uses smaller chunks.

  Attributes:
    d, r2: dimension and squared radius.
    num_points: number of lattice points on the sphere (exact int).
    code_bits: ceil(log2(num_points)) (at least 1).
    code_words: uint32 words per code, ceil(code_bits / 32).
    num_atoms: number of atoms (signed-permutation classes of points).

  Example:
    >>> codec = ZnSphereCodec(24, 79)
    >>> codec.code_bits, codec.code_words
    (64, 2)
    >>> x = np.random.default_rng(0).standard_normal((5, 24)).astype(np.float32)
    >>> codes = codec.encode(x)              # u32[5, 2]
    >>> y = codec.decode(codes)              # f32[5, 24], unit norm
    >>> bool(jnp.all(codec.encode(y) == codes))
    True
  """

  def __init__(self, d: int, r2: int, *, tail: int | None = None):
    """Builds the tables of the sphere of squared radius ``r2`` in dimension ``d``.

    Args:
      d: dimension, >= 1.
      r2: squared radius, >= 1; the sphere must hold at least one and fewer than 2^256
        points.
      tail: how many trailing coordinates the decoder reads from one lookup table
        (default: the most whose table has at most 2^19 entries); 0 decodes every
        coordinate by comparisons. Codes do not depend on it.
    """
    self.d = check_int("d", d, minimum=1)
    self.r2 = check_int("r2", r2, minimum=1)
    self._max_tail = None if tail is None else check_int("tail", tail, minimum=0, maximum=self.d)
    radius = math.isqrt(self.r2)
    # Table size with one-word codes: a lower bound, checked before counting the points.
    entries = self.d * (self.r2 + 1) * (2 * radius + 1) * 2
    if entries > _MAX_TABLE_ENTRIES:
      raise ValueError(f"d={d}, r2={r2}: the code tables would hold more than "
                       f"{_MAX_TABLE_ENTRIES} entries; use a smaller r2")
    n = num_points(self.d, self.r2)
    if n == 0:
      raise ValueError(f"r2={r2} is not a sum of {d} squares: the sphere has no lattice point")
    if n >= 1 << MAX_BITS:
      raise ValueError(f"d={d}, r2={r2} has {n} points: codes would need {(n - 1).bit_length()} "
                       f"bits; at most {MAX_BITS} are supported (num_points < 2^{MAX_BITS})")
    words = _words_for(n)
    entries = self.d * (self.r2 + 1) * (2 * radius + 1) * (words + 1)
    if entries > _MAX_TABLE_ENTRIES:
      raise ValueError(f"d={d}, r2={r2}: the code tables would hold {entries} entries (more "
                       f"than {_MAX_TABLE_ENTRIES}); use a smaller r2")
    self.num_points = n
    self.code_bits = max(1, (n - 1).bit_length())
    self.code_words = words
    self._build_tables()

  # Codecs are compared by value so jitted functions can take them as static arguments.
  def __eq__(self, other):
    return isinstance(other, ZnSphereCodec) and self._key() == other._key()

  def __hash__(self):
    return hash(("ZnSphereCodec",) + self._key())

  def _key(self):
    return (self.d, self.r2, self._max_tail)

  def __reduce__(self):
    return (_rebuild, self._key())

  def __repr__(self):
    return (f"ZnSphereCodec(d={self.d}, r2={self.r2}, num_points={self.num_points}, "
            f"code_bits={self.code_bits}, atoms={self.num_atoms})")

  def jitted(self, name: str):
    """``jax.jit`` of a kernel, cached: name is one of "quantize", "encode", "decode",
    "decode_points", "rank" (e.g. ``codec.jitted("decode")(codes)``; no input checks)."""
    if name not in ("quantize", "encode", "decode", "decode_points", "rank"):
      raise ValueError(f"name={name!r} is not one of quantize, encode, decode, decode_points, "
                       "rank")
    return _jitted(self, f"{name}_core")

  # -- tables ------------------------------------------------------------------------------

  def _build_tables(self):
    d, r2 = self.d, self.r2
    counts = _counts(d, r2)
    radius = math.isqrt(r2)
    words = self.code_words

    # Atoms, for the search. Sorted values of each atom, as floats (exact integers).
    atoms = _atoms(d, r2)
    if len(atoms) > _MAX_ATOMS:
      raise ValueError(f"d={d}, r2={r2} has more than {_MAX_ATOMS} atoms; use a smaller r2")
    self.num_atoms = len(atoms)
    self._atoms = np.asarray(atoms, np.float32).reshape(len(atoms), d)      # f32[A, d]
    # Rows per chunk of the search: its atom scores are [chunk, num_atoms].
    self._search_chunk = max(64, min(_CHUNK, 1 << (_MAX_SCORES // len(atoms)).bit_length() - 1))

    # C[p, s, a] = sum over magnitudes b < a of w(b) N(d-p-1, s - b^2), w(0) = 1, w(b) = 2:
    # how many points of Z^(d-p) of squared norm s (signs included) have a first
    # coordinate of magnitude < a (see the module docstring).
    cum = []
    for p in range(d):
      rest = counts[d - p - 1]
      for s in range(r2 + 1):
        acc = 0
        for mag in range(radius + 1):
          cum.append(acc)
          if mag * mag <= s:
            acc += rest[s - mag * mag] * (2 if mag else 1)
    table = _to_words(cum, words).reshape(d, r2 + 1, radius + 1, words)
    # Words at step p: enough for every rank that can remain there (< N(d-p, s), and never
    # more than the code itself).
    self._step_words = [min(words, _words_for(max(counts[d - p]))) for p in range(d)]
    # Encoding reads E = C[p, s, |v|] + [v < 0] by signed choice j = 2|v| - [v > 0] - 1
    # (v != 0; a zero coordinate adds nothing).
    enc = [cum[i + (j + 2) // 2] + (j % 2) for i in range(0, len(cum), radius + 1)
           for j in range(2 * radius)]
    # u32[rows + 1, W]: all words of an entry are read with one index; the last row is the
    # zero choice.
    self._enc_table = np.concatenate([_to_words(enc, words), np.zeros((1, words), np.uint32)])
    # Decoding: starts[w][p, s, a-1] = word w of C[p, s, a] (a = 1..R), one row per (p, s);
    # taken[p, s, a] = the words of C[p, s, a].
    self._dec_starts = [np.ascontiguousarray(table[:, :, 1:, w]).reshape(-1, radius)
                        for w in range(words)]
    self._dec_taken = table.reshape(-1, words)

    # Tail table: for every squared norm s <= r2, the points of Z^L of that norm listed by
    # their rank (as a suffix of the code); the last L coordinates are read there with one
    # lookup. Coordinates packed in b-bit two's complement fields of a uint32.
    self._tail_bits = radius.bit_length() + 1
    self._tail = 0
    longest = min(32 // self._tail_bits, d)
    if self._max_tail is not None:
      longest = min(longest, self._max_tail)
    for tail in range(longest, 0, -1):
      if sum(counts[tail]) <= _MAX_TAIL_ENTRIES and max(counts[tail]) < 1 << 31:
        self._tail = tail
        break
    if self._tail:
      self._tail_offsets, self._tail_points = self._build_tail(self._tail, table[d - self._tail:])

  def _build_tail(self, tail: int, table: np.ndarray):
    """(offsets i32[r2 + 1], packed u32[sum_s N(tail, s)]) of the tail table.

    ``table`` holds C for the last ``tail`` positions (single-word ranks there).
    """
    r2, bits, radius = self.r2, self._tail_bits, math.isqrt(self.r2)
    vals = np.arange(-radius, radius + 1, dtype=np.int64)
    points = np.zeros((1, 0), np.int64)
    for _ in range(tail):
      norms = np.sum(points * points, axis=1)
      rows, cols = np.nonzero(norms[:, None] + vals[None, :] ** 2 <= r2)
      points = np.concatenate([points[rows], vals[cols, None]], axis=1)
    norms = np.sum(points * points, axis=1)
    # Rank of each point among the points of its norm: the code recurrence of rank_core.
    rank = np.zeros(len(points), np.int64)
    c = table[..., 0].astype(np.int64)                        # [tail, r2 + 1, radius + 1]
    for q in reversed(range(tail)):
      v = points[:, q]
      left = norms - np.sum(points[:, :q] ** 2, axis=1)
      rank = c[q, left, np.abs(v)] + (v < 0) + (rank << (v != 0))
    offsets = np.concatenate([[0], np.cumsum(np.bincount(norms, minlength=r2 + 1))[:-1]])
    order = np.lexsort((rank, norms))
    fields = (points[order] & ((1 << bits) - 1)) << (bits * np.arange(tail))[None, :]
    return offsets.astype(np.int32), np.sum(fields, axis=1).astype(np.uint32)

  # -- quantization ------------------------------------------------------------------------

  def _search(self, x):
    """Best atom and where its values go. x: f32[n, d] -> (atom i32[n], rank i32[n, d]).

    rank[i] is the position of |x_i| in the decreasing order of |x| (ties: lower index
    first). Pairing the sorted |x| with an atom's sorted values maximizes the dot product
    for that atom (rearrangement inequality) and all atoms have norm r, so the best atom
    by dot product is the point of largest cosine; equal scores pick the first atom in
    decreasing lexicographic order (found with max and sign arithmetic, which XLA:CPU fuses
    with the matmul, instead of a slow argmax).
    """
    d, num = self.d, self.num_atoms
    ax = jnp.abs(x)
    # rank_i = #{j : |x_j| > |x_i|, or |x_j| = |x_i| and j < i}. Integer compares and sums:
    # XLA:CPU vectorizes these; the float matmul below goes to its fused GEMM.
    a_i, a_j = ax[:, :, None], ax[:, None, :]
    lower = jnp.asarray(np.tri(d, d, -1, dtype=bool))[None]               # [1, i, j]: j < i
    rank = jnp.sum((a_j > a_i) | ((a_j == a_i) & lower), axis=2, dtype=jnp.int32)
    # xs[n, k] = the |x_i| of rank k (exactly one), selected on the float bits.
    hit = rank[:, None, :] == jnp.arange(d, dtype=jnp.int32)[None, :, None]
    bits = jax.lax.bitcast_convert_type(ax, jnp.int32)[:, None, :]
    xs = jax.lax.bitcast_convert_type(jnp.sum(jnp.where(hit, bits, 0), axis=2), jnp.float32)
    scores = jnp.dot(xs, jnp.asarray(self._atoms.T), precision=_HIGHEST)     # f32[n, A]
    best = jnp.max(scores, axis=1, keepdims=True)
    # First atom reaching the max: the largest of (A - a) over the maxima.
    weight = jnp.asarray(np.arange(num, 0, -1, dtype=np.float32))[None, :]
    first = jnp.max(weight * (1.0 + jnp.sign(scores - best)), axis=1)
    atom = jnp.clip(num - first.astype(jnp.int32), 0, num - 1)
    return atom, jnp.clip(rank, 0, d - 1)

  def quantize_core(self, x):
    """Traceable quantize (no input checks): f32[n, d] -> f32[n, d] integer lattice points."""
    return _in_chunks(self._quantize, jnp.asarray(x, jnp.float32), self._search_chunk)

  def _quantize(self, x):
    x = _rescaled_rows(x)
    atom, rank = self._search(x)
    vals = jnp.asarray(self._atoms.reshape(-1))[atom[:, None] * self.d + rank]
    return jnp.where(x < 0, -vals, vals)

  def quantize(self, x) -> jax.Array:
    """Nearest lattice point by cosine (not normalized).

    Ties: equal |x_i| are ordered by index (the lower index gets the larger atom value),
    and equal scores pick the first atom in decreasing lexicographic order; a zero row
    maps to the first atom placed on the leading coordinates with positive signs (e.g.
    (1, 1, 1, 0, ...) for r2=3). NaN/Inf rows raise on concrete input; inside ``jit``
    they cannot be checked and give unspecified points. The point does not depend on a
    row's scale, for any finite magnitude (subnormal rows included): a row whose largest
    |x_i| lies outside [2^-64, 2^64) is first multiplied by a power of two (exact) that
    brings it into that range.

    Args:
      x: f32[n, d] vectors (need not be normalized).

    Returns:
      f32[n, d] integer-valued points with squared norm r2.
    """
    x = self._check_x(x)
    if not is_concrete(x):
      return self.quantize_core(x)
    return _map_rows(self, "quantize_core", x, self.d, jnp.float32)

  def quantize_ste(self, y: jax.Array) -> jax.Array:
    """Straight-through quantization for end-to-end training.

    Forward: the normalized nearest lattice point; backward: the identity
    (``y + stop_gradient(q - y)``). Traceable; shapes are checked, values are not.

    Args:
      y: f32[n, d].

    Returns:
      f32[n, d] unit-norm lattice points whose gradient passes straight to ``y``.
    """
    self._check_x(y, finite=False)
    y = jnp.asarray(y, jnp.float32)
    q = self.quantize_core(jax.lax.stop_gradient(y)) * (1.0 / math.sqrt(self.r2))
    return y + jax.lax.stop_gradient(q - y)

  # -- encoding ----------------------------------------------------------------------------

  def rank_core(self, points):
    """Traceable rank of lattice points: f32/i32[n, d] -> u32[n, code_words].

    ``points`` must be points of this sphere (integer coordinates, squared norm r2).
    """
    return _in_chunks(self._rank, jnp.asarray(points), _CHUNK)

  def _rank(self, points):
    """Evaluates code = E_0 + 2^[c_0 != 0] (E_1 + 2^[c_1 != 0] (E_2 + ...)) from the last
    coordinate, with E_p = C[p, s_p, |c_p|] + [c_p < 0] read from the tables."""
    d, r2, radius = self.d, self.r2, math.isqrt(self.r2)
    c = jnp.asarray(points).astype(jnp.float32)
    # Norm left before each coordinate, as a (fused) matmul with a strict triangle.
    before = jnp.asarray(np.triu(np.ones((d, d), np.float32), 1))           # [q, p]: q < p
    left = r2 - jnp.dot(c * c, before, precision=_HIGHEST).astype(jnp.int32)
    ci = c.astype(jnp.int32)
    j = 2 * jnp.abs(ci) - (ci > 0).astype(jnp.int32)                       # signed choice
    pos = jnp.arange(d, dtype=jnp.int32)[None, :]
    index = ((pos * (r2 + 1) + jnp.clip(left, 0, r2)) * (2 * radius)
             + jnp.clip(j - 1, 0, 2 * radius - 1))
    index = jnp.where(j > 0, index, self._enc_table.shape[0] - 1)
    table = jnp.asarray(self._enc_table)[index]                                  # u32[n, d, W]
    entries = [table[..., w] for w in range(self.code_words)]
    # For a zero coordinate E_p = C[p, s_p, 0] = 0 and the shift is 0.
    nonzero = (ci != 0).astype(jnp.uint32)
    acc = [jnp.zeros_like(entries[0][:, 0]) for _ in range(self.code_words)]

    def step(p, acc):
      # The partial code fits in the words of step p; the higher words are still zero.
      words = len(acc)
      col = lambda a: jax.lax.dynamic_index_in_dim(a, p, axis=1, keepdims=False)
      head = _shl1_words(acc, col(nonzero))
      return _add_words(head, [col(e) for e in entries[:words]])

    if d <= _UNROLL:
      for p in reversed(range(d)):
        words = self._step_words[p]
        acc = step(p, acc[:words]) + acc[words:]
    else:
      for start, stop, words in reversed(_runs(self._step_words)):
        body = lambda i, acc, stop=stop: tuple(step(stop - 1 - i, list(acc)))
        acc = list(jax.lax.fori_loop(0, stop - start, body, tuple(acc[:words]))) + acc[words:]
    return jnp.stack(acc, axis=1)

  def encode_core(self, x):
    """Traceable encode (no input checks): f32[n, d] -> u32[n, code_words]."""
    return _in_chunks(lambda x: self._rank(self._quantize(x)), jnp.asarray(x, jnp.float32),
                      self._search_chunk)

  def encode(self, x) -> jax.Array:
    """Quantizes and ranks: the code of the nearest lattice point (``quantize``: the
    code ignores each row's scale; a zero row gets the code of the point ``quantize``
    documents for it).

    Args:
      x: f32[n, d] vectors.

    Returns:
      u32[n, code_words] codes in [0, num_points), little-endian words (word 0 is the
      least significant).
    """
    x = self._check_x(x)
    if not is_concrete(x):
      return self.encode_core(x)
    return _map_rows(self, "encode_core", x, self.code_words, jnp.uint32)

  # -- decoding ----------------------------------------------------------------------------

  def decode_points_core(self, codes):
    """Traceable decode to integer coordinates: u32[n, code_words] -> f32[n, d].

    Codes >= num_points give unspecified points (no error inside traced code).
    """
    return _in_chunks(self._decode_points, jnp.asarray(codes), _CHUNK, _STREAMS)

  def _decode_points(self, codes):
    """Walks the coordinates (see the module docstring): at each, a gathered row of
    thresholds gives the magnitude, the threshold is subtracted and the low bit gives the
    sign; the last ``tail`` coordinates come from one table lookup."""
    d, r2 = self.d, self.r2
    codes = jnp.asarray(codes)
    head = d - self._tail
    rank = [codes[:, w] for w in range(self.code_words)]
    left = jnp.full(codes.shape[:1], r2, jnp.int32)
    # Values are packed into b-bit fields of uint32 words as they come (``per`` a word)
    # and unpacked at the end in the output layout: writing each coordinate as a column of
    # [n, d] would cost a transpose that is slower than the walk's steps.
    bits = self._tail_bits
    per, mask = 32 // bits, (1 << bits) - 1
    words = []
    if head <= _UNROLL:
      for p in range(head):
        rank, left, v = self._decode_step(p, rank[:self._step_words[p]], left)
        field = (v.astype(jnp.uint32) & mask) << (bits * (p % per))
        if p % per == 0:
          words.append(field)
        else:
          words[-1] = words[-1] | field
    else:
      # Long walks run as loops (one per run of steps with the same word count), which
      # keeps compilation time flat in d.
      packed = jnp.zeros((-(-head // per),) + left.shape, jnp.uint32)
      rank, left, v = self._decode_step(0, rank[:self._step_words[0]], left)
      packed = packed.at[0].set(v.astype(jnp.uint32) & mask)
      for start, stop, n_words in _runs(self._step_words[1:head], offset=1):
        def body(p, state):
          rank, left, packed = state
          rank, left, v = self._decode_step(p, rank, left)
          field = (v.astype(jnp.uint32) & mask) << (bits * (p % per)).astype(jnp.uint32)
          slot = jax.lax.dynamic_index_in_dim(packed, p // per, keepdims=False) | field
          return rank, left, jax.lax.dynamic_update_index_in_dim(packed, slot, p // per, 0)
        rank, left, packed = jax.lax.fori_loop(start, stop, body,
                                               (rank[:n_words], left, packed))
      words = [packed[i] for i in range(packed.shape[0])]
    if self._tail:
      index = jnp.asarray(self._tail_offsets)[jnp.clip(left, 0, r2)] + rank[0].astype(jnp.int32)
      words.append(jnp.asarray(self._tail_points)[jnp.clip(index, 0, len(self._tail_points) - 1)])
    # Column j of the output is field j % per of word j // per (the tail: its own word).
    source = [p // per for p in range(head)] + [len(words) - 1] * self._tail
    shift = [bits * (p % per) for p in range(head)] + [bits * k for k in range(self._tail)]
    fields = jnp.take(jnp.stack(words, axis=1), jnp.asarray(source, np.int32), axis=1)
    fields = ((fields >> jnp.asarray(shift, np.uint32)[None, :]) & mask).astype(jnp.int32)
    return (fields - ((fields >> (bits - 1)) << bits)).astype(jnp.float32)  # sign-extend

  def _decode_step(self, p, rank, left):
    """One coordinate of the walk: (rank words, norm left) -> (rank words, norm left, value).

    ``p`` is a Python int or a traced scalar; ``rank`` has the words of step p.
    """
    r2, radius, words = self.r2, math.isqrt(self.r2), len(rank)
    # Magnitude: how many thresholds C[p, s, a], a >= 1, are <= the rank. At p = 0 the
    # norm left is r2 for every row, so the thresholds are constants.
    if isinstance(p, int) and p == 0:
      row = jnp.full_like(left, r2)
      starts = [jnp.asarray(self._dec_starts[w][r2])[None, :] for w in range(words)]
    else:
      row = p * (r2 + 1) + left
      starts = [jnp.asarray(self._dec_starts[w])[row] for w in range(words)]    # u32[n, R]
    mag = _count_le(starts, [r[:, None] for r in rank])
    taken = jnp.asarray(self._dec_taken)[row * (radius + 1) + mag]                # u32[n, W]
    rank = _sub_words(rank, [taken[:, w] for w in range(words)])
    # A non-zero coordinate: the low bit of what is left is its sign.
    nonzero = mag > 0
    negative = nonzero & ((rank[0] & 1) == 1)
    rank = _shr1_words(rank, nonzero.astype(jnp.uint32))
    return rank, left - mag * mag, jnp.where(negative, -mag, mag)

  def decode_core(self, codes):
    """Traceable decode: u32[n, code_words] -> f32[n, d] unit-norm points."""
    scale = 1.0 / math.sqrt(self.r2)
    return _in_chunks(lambda c: self._decode_points(c) * scale, jnp.asarray(codes), _CHUNK,
                      _STREAMS)

  def decode_points(self, codes) -> jax.Array:
    """Integer lattice coordinates of codes.

    Args:
      codes: u32[n, code_words] codes from ``encode``.

    Returns:
      f32[n, d] integer-valued points with squared norm r2.
    """
    codes = self.check_codes(codes)
    if not is_concrete(codes):
      return self.decode_points_core(codes)
    return _map_rows(self, "decode_points_core", codes, self.d, jnp.float32)

  def decode(self, codes) -> jax.Array:
    """Unit-norm points of codes.

    Traceable: inside ``jit`` (e.g. a search scan) the shape and dtype are still checked,
    but the range check (code < num_points) needs concrete codes.

    Args:
      codes: u32[n, code_words] codes from ``encode``.

    Returns:
      f32[n, d] points of the sphere scaled to unit norm.
    """
    codes = self.check_codes(codes)
    if not is_concrete(codes):
      return self.decode_core(codes)
    return _map_rows(self, "decode_core", codes, self.d, jnp.float32)

  # -- checks ------------------------------------------------------------------------------

  def _check_x(self, x, finite: bool = True):
    shape = getattr(x, "shape", None)
    if shape is not None and len(shape) == 2 and shape[1] != self.d:
      raise ValueError(f"x has d={shape[1]} but the codec has d={self.d}")
    check_vectors("x", x, d=self.d, finite=finite)
    return x

  def check_codes(self, codes, check_range: bool = True):
    """Validates a code array and returns it unchanged.

    Raises ValueError unless ``codes`` is a 2-D uint32 array with ``code_words`` columns
    and (on concrete input, when ``check_range``) every code is < num_points.
    """
    shape = getattr(codes, "shape", None)
    dtype = getattr(codes, "dtype", None)
    if shape is None or dtype is None:
      raise ValueError(f"codes must be a uint32 array, got {type(codes).__name__}")
    if len(shape) != 2:
      raise ValueError(f"codes must be 2-D (n, {self.code_words}), got shape {tuple(shape)}")
    if np.dtype(dtype) != np.uint32:
      raise ValueError(f"codes must have dtype uint32, got {np.dtype(dtype)}")
    if shape[1] != self.code_words:
      raise ValueError(f"codes have {shape[1]} words but this codec ({self.code_bits} bits) "
                       f"uses {self.code_words}")
    if check_range and is_concrete(codes) and shape[0]:
      c = np.asarray(codes)
      less = np.zeros(shape[0], bool)
      equal = np.ones(shape[0], bool)
      for w in reversed(range(self.code_words)):  # big-integer compare, top word first
        limit = np.uint32((self.num_points >> (32 * w)) & 0xFFFFFFFF)
        less |= equal & (c[:, w] < limit)
        equal &= c[:, w] == limit
      bad = np.flatnonzero(~less)
      if bad.size:
        raise ValueError(f"code at row {bad[0]} is >= num_points={self.num_points}: not a code "
                         f"of ZnSphereCodec(d={self.d}, r2={self.r2})")
    return codes


def _runs(words_per_step, offset: int = 0):
  """[(start, stop, words)] runs of equal values in a list, positions shifted by offset."""
  runs = []
  for i, w in enumerate(words_per_step):
    if runs and runs[-1][2] == w:
      runs[-1][1] = i + offset + 1
    else:
      runs.append([i + offset, i + offset + 1, w])
  return [tuple(r) for r in runs]


def _less_equal_words(a, b):
  """a <= b for little-endian uint32 word lists (broadcasting)."""
  le = a[0] <= b[0]
  for x, y in zip(a[1:], b[1:]):
    le = (x < y) | ((x == y) & le)
  return le


def _count_le(thresholds, value):
  """Number of thresholds <= value: word lists of [n, k] thresholds and [n, 1] values."""
  return jnp.sum(_less_equal_words(thresholds, value), axis=1, dtype=jnp.int32)


def _add_words(a, b):
  """a + b for little-endian uint32 word lists (the sum must fit)."""
  out, carry = [], None
  for x, y in zip(a, b):
    total = x + y
    if carry is None:
      out.append(total)
      carry = (total < x).astype(jnp.uint32)
    else:
      with_carry = total + carry
      out.append(with_carry)
      carry = ((total < x) | (with_carry < total)).astype(jnp.uint32)
  return out


def _shl1_words(a, bit):
  """a << bit for a word list and bit in {0, 1} (per row; the result must fit)."""
  out = [a[0] << bit]
  for lo, hi in zip(a[:-1], a[1:]):
    out.append((hi << bit) | ((lo >> 31) & bit))
  return out


def _shr1_words(a, bit):
  """a >> bit for a word list and bit in {0, 1} (per row)."""
  out = []
  for lo, hi in zip(a[:-1], a[1:]):
    out.append((lo >> bit) | ((hi & bit) << 31))
  out.append(a[-1] >> bit)
  return out


def _sub_words(a, b):
  """a - b for little-endian uint32 word lists with a >= b."""
  out, borrow = [], None
  for x, y in zip(a, b):
    diff = x - y
    if borrow is None:
      out.append(diff)
      borrow = (x < y).astype(jnp.uint32)
    else:
      out.append(diff - borrow)
      borrow = ((x < y) | ((x == y) & (borrow > 0))).astype(jnp.uint32)
  return out


def _rebuild(d, r2, tail):
  return ZnSphereCodec(d, r2, tail=tail)


def zn_codec(d: int, bits: int | None = None, r2: int | None = None) -> ZnSphereCodec:
  """The Zn sphere codec of ``d`` dims for a bit budget: the one place a codec is chosen.

  Args:
    d: dimension (a catalyzer's d_out).
    bits: code budget. Without ``r2`` the sphere is the largest radius whose codes fit it
      (``zn_r2_for_bits``); with ``r2`` the sphere's codes must fit it.
    r2: squared radius of the sphere, or None to pick it from ``bits``.

  Returns:
    A ``ZnSphereCodec``, shared between callers (its tables are built once per process).

  Raises:
    ValueError: ``d``, ``bits`` or ``r2`` is not a positive int (or None for bits and r2),
      neither ``bits`` nor ``r2`` is given, the sphere ``r2`` needs more than ``bits``
      bits, or no radius of ``d`` dims fits ``bits``.

  Example:
    >>> zn_codec(24, 64).r2, zn_codec(24, r2=79).code_bits, zn_codec(8, 64, r2=10).r2
    (79, 64, 10)
  """
  # Checked before the cache, which needs hashable arguments (a list would fail there).
  d = check_int("d", d, minimum=1)
  bits = None if bits is None else check_int("bits", bits, minimum=1)
  r2 = None if r2 is None else check_int("r2", r2, minimum=1)
  return _zn_codec(d, bits, r2)


@functools.lru_cache(maxsize=64)
def _zn_codec(d: int, bits: int | None, r2: int | None) -> ZnSphereCodec:
  """``zn_codec`` of checked ints, cached."""
  if r2 is None:
    if bits is None:
      raise ValueError("zn_codec needs bits or r2 (or both)")
    bits = check_int("bits", bits, minimum=1)
    try:
      r2 = zn_r2_for_bits(d, bits)
    except ValueError as e:
      raise ValueError(f"d={d} does not fit a {bits}-bit lattice code: {e}") from e
  codec = ZnSphereCodec(d, check_int("r2", r2, minimum=1))
  if bits is not None and codec.code_bits > check_int("bits", bits, minimum=1):
    raise ValueError(f"d={d} with r2={r2} needs {codec.code_bits}-bit codes, more than "
                     f"bits={bits}; use r2=None for the largest radius that fits or a lower d")
  return codec


def quantize_ste(y: jax.Array, r2: int) -> jax.Array:
  """Straight-through Zn quantization of f32[n, d] rows on the sphere of squared radius r2.

  Forward: the nearest unit-norm lattice point; gradient: the identity. See
  ``ZnSphereCodec.quantize_ste``.
  """
  shape = getattr(y, "shape", None)
  if shape is None or len(shape) != 2:
    raise ValueError(f"y must be 2-D (n, d), got shape {shape}")
  return zn_codec(int(shape[1]), r2=r2).quantize_ste(y)


# Largest-magnitude coordinates that the atom search takes as they are: 2^-64 <= max |x_i|
# < 2^64. Its products and sums (atom values below 2^8, d below 2^10 terms) then stay normal
# float32 numbers, far from underflow (flushed to zero on CPUs and GPUs) and overflow.
_SCALE_EXP = 64


def _rescaled_rows(x):
  """f32[n, d] rows whose largest |x_i| lies outside [2^-64, 2^64) multiplied by a power of
  two that brings it into that range; other rows (and zero rows) unchanged, bit for bit.

  Exact (only exponents move) except for coordinates that end below float32's normal range
  relative to their row's maximum (2^-126 of it or less), which become 0: as the search
  would read them anyway, since XLA flushes subnormals. Computed on the float bits with
  integer arithmetic, so that subnormal rows (max |x_i| < 2^-126, which float arithmetic
  flushes to zero) are scaled too. NaN/Inf rows stay unspecified.
  """
  bits = jax.lax.bitcast_convert_type(x, jnp.int32)
  mag = bits & 0x7FFFFFFF
  top = jnp.max(mag, axis=1, keepdims=True)  # bits of max |x_i|: ordered like the values
  field = top >> 23
  # Exponent e of max |x_i| = 2^e * [1, 2): subnormals are m 2^-149, e = floor(log2 m) - 149.
  e = jnp.where(field > 0, field - 127,
                31 - jax.lax.clz(jnp.maximum(top, 1)) - 149)
  shift = jnp.clip(e, -_SCALE_EXP, _SCALE_EXP - 1) - e
  shift = jnp.where(top > 0, shift, 0)  # a zero row stays zero

  def rescale(x):
    # |x_i| = sig 2^p (sig < 2^24, an exact float32) -> (sig 2^-24) 2^(p + 24 + shift); the
    # power of two is built from its bits (0.0 below the normal range: such values flush).
    ex = mag >> 23
    sig = jnp.where(ex > 0, (mag & 0x7FFFFF) | 0x800000, mag)
    p = jnp.where(ex > 0, ex - 150, -149) + 24 + shift
    pow2 = jax.lax.bitcast_convert_type(jnp.clip(p + 127, 0, 254) << 23, jnp.float32)
    scaled = sig.astype(jnp.float32) * jnp.float32(2.0 ** -24) * pow2
    scaled = jnp.where(bits < 0, -scaled, scaled)
    return jnp.where(shift == 0, x, scaled)

  # Ordinary batches (no row to move) skip the element-wise work.
  return jax.lax.cond(jnp.any(shift != 0), rescale, lambda x: x, x)


def _in_chunks(fn, x, chunk: int, streams: int = 1):
  """fn applied to the rows of x, by a loop over chunks of ``chunk`` rows when x is larger.

  Chunks bound the memory of the intermediates and keep them in cache. Each iteration
  handles ``streams`` chunks from different parts of the input: independent computations
  that XLA:CPU runs concurrently (coarse-grained parallelism, for the decoder whose many
  small fused ops scale badly over threads; the search's matmul is multithreaded
  already). The rows need not be a multiple of ``chunk``: chunk starts are
  clamped to n - chunk, so the last chunk overlaps the previous one (its rows are computed
  twice) instead of padding the input and slicing (copying) the output.
  """
  n = x.shape[0]
  if n <= chunk:
    return fn(x)
  chunks = -(-n // chunk)
  streams = min(streams, chunks)
  steps = -(-chunks // streams)
  shape = jax.eval_shape(fn, jax.ShapeDtypeStruct((chunk,) + x.shape[1:], x.dtype))

  def body(i, out):
    for stream in range(streams):
      start = jnp.minimum((stream * steps + i) * chunk, n - chunk)
      part = jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=0)
      out = jax.lax.dynamic_update_slice_in_dim(out, fn(part), start, axis=0)
    return out

  out = jnp.zeros((n,) + shape.shape[1:], shape.dtype)
  return jax.lax.fori_loop(0, steps, body, out)


@functools.lru_cache(maxsize=None)
def _jitted(codec: ZnSphereCodec, name: str):
  return jax.jit(getattr(codec, name))


def _map_rows(codec: ZnSphereCodec, name: str, x, out_cols: int, out_dtype):
  """Runs ``codec.<name>`` on concrete rows through a cached jit.

  Up to one chunk, rows are padded to a power of two (at least 64) so that few shapes
  are compiled; larger inputs compile once per number of rows.
  """
  n = x.shape[0]
  if n == 0:
    return jnp.zeros((0, out_cols), out_dtype)
  if n >= _CHUNK:
    return _jitted(codec, name)(x)
  size = sharding.round_up_pow2(n, 64)
  if size != n:
    widths = ((0, size - n), (0, 0))
    x = np.pad(x, widths) if isinstance(x, np.ndarray) else jnp.pad(jnp.asarray(x), widths)
  out = _jitted(codec, name)(x)
  return out if size == n else out[:n]
