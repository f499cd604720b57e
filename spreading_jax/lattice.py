"""The spherical Zn lattice quantizer {c in Z^d : ‖c‖² = r²} with exact integer codes.

``ZnSphereCodec(d, r2)`` maps vectors to the lattice point of largest cosine and points to
their rank in [0, N), N = the number of points on the sphere, stored as little-endian
uint32 words (no ``jax_enable_x64``; TPU friendly). Any (d, r²) with N < 2^256 works.

Code assignment (our own scheme): the code of a point is its rank in the lexicographic
order of its coordinates, each coordinate ordered 0, +1, -1, +2, -2, ... With
N(k, s) = the number of points of Z^k of squared norm s, the rank is a sum of table
entries, ``code = sum_p T[p, s_p, j(c_p)]``, where s_p is the squared norm left for the
coordinates p.. and T[p, s, j] counts the completions of the choices that precede choice
j. Encoding is d table lookups and a multi-word sum; decoding walks the coordinates and at
each picks the last threshold <= the remaining rank: comparisons and subtractions only, no
multiplication or division of big integers. The last few coordinates are read from one
lookup table of all the short vectors, indexed by (remaining norm, remaining rank).

Quantization follows the atom decomposition of faiss' ZnSphereCodec (Douze, Sablayrolles,
Jégou 2018, "Link and code", arXiv 1804.09996): the best point is a signed permutation of
an *atom* (a non-increasing non-negative vector of squared norm r²); it is found by sorting
|x| and scoring every atom against the sorted values. The kernels are written with float
arithmetic (sign/min/max, sums, one matmul) so that XLA:CPU fuses them into a few
vectorized loops, and work on any backend.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

from spreading_jax._validation import check_int, check_vectors, is_concrete

MAX_BITS = 256
# Largest decode/encode tables (uint32 entries) a codec may build.
_MAX_TABLE_ENTRIES = 1 << 24
# Largest number of atoms (rows of the scoring matmul) and of tail-table entries.
_MAX_ATOMS = 1 << 17
_MAX_TAIL_ENTRIES = 1 << 16
# Rows per compiled call of the eager wrappers; chunks keep intermediates in cache and
# bound memory for any n.
_CHUNK = 8192
_HIGHEST = jax.lax.Precision.HIGHEST


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


def _choice_values(radius: int) -> list[int]:
  """The per-coordinate order of the code: j -> value is 0, +1, -1, +2, -2, ..."""
  return [0] + [sign * a for a in range(1, radius + 1) for sign in (1, -1)]


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

  Codecs compare and hash by (d, r2), so they can be static arguments of ``jax.jit`` or be
  closed over by jitted functions (the tables become constants). ``quantize``, ``encode``,
  ``decode`` and ``decode_points`` validate concrete inputs, process them in fixed-size
  chunks (one compilation, bounded memory) and also accept tracers, in which case they
  check shapes only and run the traceable ``*_core`` kernel directly; the ``*_core``
  methods are the pure kernels (no checks, any batch size, usable under ``jit``, ``vmap``
  and ``shard_map``).

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

  def __init__(self, d: int, r2: int):
    self.d = check_int("d", d, minimum=1)
    self.r2 = check_int("r2", r2, minimum=1)
    n = num_points(self.d, self.r2)
    if n == 0:
      raise ValueError(f"r2={r2} is not a sum of {d} squares: the sphere has no lattice point")
    if n >= 1 << MAX_BITS:
      raise ValueError(f"d={d}, r2={r2} has {n} points: codes would need {(n - 1).bit_length()} "
                       f"bits; at most {MAX_BITS} are supported (num_points < 2^{MAX_BITS})")
    radius = math.isqrt(self.r2)
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
    return isinstance(other, ZnSphereCodec) and (self.d, self.r2) == (other.d, other.r2)

  def __hash__(self):
    return hash(("ZnSphereCodec", self.d, self.r2))

  def __reduce__(self):
    return (ZnSphereCodec, (self.d, self.r2))

  def __repr__(self):
    return (f"ZnSphereCodec(d={self.d}, r2={self.r2}, num_points={self.num_points}, "
            f"code_bits={self.code_bits}, atoms={self.num_atoms})")

  # -- tables ------------------------------------------------------------------------------

  def _build_tables(self):
    d, r2 = self.d, self.r2
    counts = _counts(d, r2)
    radius = math.isqrt(r2)
    values = _choice_values(radius)
    nv = len(values)

    # Atoms, for the search. Sorted values of each atom, as floats (exact integers).
    atoms = _atoms(d, r2)
    if len(atoms) > _MAX_ATOMS:
      raise ValueError(f"d={d}, r2={r2} has more than {_MAX_ATOMS} atoms; use a smaller r2")
    self.num_atoms = len(atoms)
    self._atoms = np.asarray(atoms, np.float32).reshape(len(atoms), d)      # f32[A, d]

    # Rank tables. T[p, s, j] = sum over choices i < j of N(d-p-1, s - v_i^2): the number
    # of points whose coordinate p comes before choice j, given the norm s left for p...
    # Words at step p: enough for every rank that can remain there, max_s N(d-p, s).
    self._step_words = [_words_for(max(counts[d - p]) + 1) for p in range(d)]
    words = self.code_words
    cum = []
    for p in range(d):
      rest = counts[d - p - 1]
      for s in range(r2 + 1):
        acc = 0
        for v in values:
          cum.append(acc)
          if v * v <= s:
            acc += rest[s - v * v]
    table = _to_words(cum, words).reshape(d, r2 + 1, nv, words)
    self._enc_words = [np.ascontiguousarray(table[..., w]).reshape(-1) for w in range(words)]
    # Decoding: per word, the thresholds of one (p, s) are a contiguous row.
    # T[p, s, 0] = 0 is left out: the choice is the number of the other thresholds <= the
    # rank, and rows of 2R entries vectorize well.
    self._dec_rows = [np.ascontiguousarray(table[:, :, 1:, w]).reshape(d * (r2 + 1), nv - 1)
                      for w in range(words)]
    self._dec_flat = np.ascontiguousarray(table.reshape(-1, words))
    self._first = table[0, r2, 1:]                                      # u32[nv - 1, words]
    self._values = np.asarray(values, np.int32)

    # Tail table: every point of Z^L with squared norm s <= r2, in code order, grouped by
    # s; the last L coordinates are read there with one lookup. Coordinates packed as int8.
    self._tail = 0
    for tail in range(min(4, d), 0, -1):
      total = sum(counts[tail])
      if radius <= 127 and total <= _MAX_TAIL_ENTRIES and max(counts[tail]) < 1 << 31:
        self._tail = tail
        break
    if self._tail:
      self._tail_offsets, self._tail_points = self._build_tail(self._tail, values)

  def _build_tail(self, tail: int, values: list[int]):
    r2 = self.r2
    by_norm = [[] for _ in range(r2 + 1)]

    def rec(prefix, norm):
      if len(prefix) == tail:
        by_norm[norm].append(prefix)
        return
      for v in values:  # code order, so each list comes out sorted
        if norm + v * v <= r2:
          rec(prefix + [v], norm + v * v)

    rec([], 0)
    offsets = np.cumsum([0] + [len(b) for b in by_norm[:-1]]).astype(np.int32)
    packed = [sum((v & 0xFF) << (8 * k) for k, v in enumerate(pt)) for b in by_norm for pt in b]
    return offsets, np.asarray(packed, np.uint32)

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
    x = jnp.asarray(x, jnp.float32)
    atom, rank = self._search(x)
    vals = jnp.asarray(self._atoms.reshape(-1))[atom[:, None] * self.d + rank]
    return jnp.where(x < 0, -vals, vals)

  def quantize(self, x) -> jax.Array:
    """Nearest lattice point by cosine (not normalized).

    Ties: equal |x_i| are ordered by index (the lower index gets the larger atom value),
    and equal scores pick the first atom in decreasing lexicographic order; a zero row
    maps to the first atom placed on the leading coordinates with positive signs (e.g.
    (1, 1, 1, 0, ...) for r2=3). NaN/Inf rows raise on concrete input; inside ``jit``
    they cannot be checked and give unspecified points.

    Args:
      x: f32[n, d] vectors (need not be normalized).

    Returns:
      f32[n, d] integer-valued points with squared norm r2.
    """
    x = self._check_x(x)
    if not is_concrete(x):
      return self.quantize_core(x)
    return _map_chunks(_jitted(self, "quantize_core"), x, self.d, jnp.float32)

  def quantize_normalized(self, x) -> jax.Array:
    """``quantize(x) / sqrt(r2)``: the nearest unit-norm codeword. f32[n, d] -> f32[n, d]."""
    return self.quantize(x) * (1.0 / math.sqrt(self.r2))

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
    d, r2, nv = self.d, self.r2, len(self._values)
    c = jnp.asarray(points).astype(jnp.float32)
    # Norm left before each coordinate, as a (fused) matmul with a strict triangle.
    before = jnp.asarray(np.triu(np.ones((d, d), np.float32), 1))           # [q, p]: q < p
    left = r2 - jnp.dot(c * c, before, precision=_HIGHEST).astype(jnp.int32)
    ci = c.astype(jnp.int32)
    j = 2 * jnp.abs(ci) - (ci > 0).astype(jnp.int32)
    pos = jnp.arange(d, dtype=jnp.int32)[None, :]
    index = (pos * (r2 + 1) + jnp.clip(left, 0, r2)) * nv + jnp.clip(j, 0, nv - 1)  # [n, d]
    # Sum the entries as 16-bit halves (d < 2^16 terms cannot overflow a uint32), then
    # carry. Word w of T[p] is zero once the ranks left at p fit in w words: skip it.
    halves = []
    for w in range(self.code_words):
      cols = sum(1 for p in range(d) if self._step_words[p] > w)
      entries = jnp.asarray(self._enc_words[w])[index[:, :cols]]             # u32[n, cols]
      halves += [jnp.sum(entries & 0xFFFF, axis=1), jnp.sum(entries >> 16, axis=1)]
    words, carry = [], jnp.zeros_like(halves[0])
    for w in range(self.code_words):
      lo = halves[2 * w] + carry
      hi = halves[2 * w + 1] + (lo >> 16)
      words.append((lo & 0xFFFF) | (hi << 16))
      carry = hi >> 16
    return jnp.stack(words, axis=1)

  def encode_core(self, x):
    """Traceable encode (no input checks): f32[n, d] -> u32[n, code_words]."""
    return self.rank_core(self.quantize_core(x))

  def encode(self, x) -> jax.Array:
    """Quantizes and ranks: the code of the nearest lattice point.

    Args:
      x: f32[n, d] vectors.

    Returns:
      u32[n, code_words] codes in [0, num_points), little-endian words (word 0 is the
      least significant).
    """
    x = self._check_x(x)
    if not is_concrete(x):
      return self.encode_core(x)
    return _map_chunks(_jitted(self, "encode_core"), x, self.code_words, jnp.uint32)

  # -- decoding ----------------------------------------------------------------------------

  def decode_points_core(self, codes):
    """Traceable decode to integer coordinates: u32[n, code_words] -> f32[n, d].

    Walks the coordinates: at each, the value is the last choice whose threshold
    T[p, s, j] is <= the remaining rank (a multi-word comparison against one gathered
    table row), then the threshold is subtracted. Codes >= num_points give unspecified
    points (no error inside traced code).
    """
    d, r2, nv = self.d, self.r2, len(self._values)
    codes = jnp.asarray(codes)
    values = jnp.asarray(self._values)
    head = d - self._tail
    rank = [codes[:, w] for w in range(self.code_words)]
    left = jnp.full(codes.shape[:1], r2, jnp.int32)
    out = []
    for p in range(head):
      words = self._step_words[p]
      rank = rank[:words]
      if p == 0:  # the norm left is r2 for every row: the thresholds are constants
        thr = [jnp.asarray(self._first[:, w])[None, :] for w in range(words)]
        row = jnp.full_like(left, r2)
      else:
        row = p * (r2 + 1) + left
        thr = [jnp.asarray(self._dec_rows[w])[row] for w in range(words)]     # u32[n, nv]
      ge = rank[0][:, None] >= thr[0]
      for w in range(1, words):
        ge = (rank[w][:, None] > thr[w]) | ((rank[w][:, None] == thr[w]) & ge)
      choice = jnp.minimum(jnp.sum(ge, axis=1, dtype=jnp.int32), nv - 1)
      taken = jnp.asarray(self._dec_flat)[row * nv + choice]                 # u32[n, W]
      rank = _sub_words(rank, [taken[:, w] for w in range(words)])
      v = values[choice]
      left = left - v * v
      out.append(v)
    if self._tail:
      index = jnp.asarray(self._tail_offsets)[jnp.clip(left, 0, r2)] + rank[0].astype(jnp.int32)
      packed = jnp.asarray(self._tail_points)[jnp.clip(index, 0, len(self._tail_points) - 1)]
      for k in range(self._tail):
        byte = ((packed >> (8 * k)) & 0xFF).astype(jnp.int32)
        out.append(byte - ((byte & 0x80) << 1))      # sign-extend the int8
    return jnp.stack(out, axis=1).astype(jnp.float32)

  def decode_core(self, codes):
    """Traceable decode: u32[n, code_words] -> f32[n, d] unit-norm points."""
    return self.decode_points_core(codes) * (1.0 / math.sqrt(self.r2))

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
    return _map_chunks(_jitted(self, "decode_points_core"), codes, self.d, jnp.float32)

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
    return _map_chunks(_jitted(self, "decode_core"), codes, self.d, jnp.float32)

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


@functools.lru_cache(maxsize=None)
def get_codec(d: int, r2: int) -> ZnSphereCodec:
  """A shared ``ZnSphereCodec(d, r2)`` (tables are built once per process)."""
  return ZnSphereCodec(d, r2)


def quantize_ste(y: jax.Array, r2: int) -> jax.Array:
  """Straight-through Zn quantization of f32[n, d] rows on the sphere of squared radius r2.

  Forward: the nearest unit-norm lattice point; gradient: the identity. See
  ``ZnSphereCodec.quantize_ste``.
  """
  shape = getattr(y, "shape", None)
  if shape is None or len(shape) != 2:
    raise ValueError(f"y must be 2-D (n, d), got shape {shape}")
  return get_codec(int(shape[1]), check_int("r2", r2, minimum=1)).quantize_ste(y)


@functools.lru_cache(maxsize=None)
def _jitted(codec: ZnSphereCodec, name: str):
  return jax.jit(getattr(codec, name))


def _map_chunks(fn, x, out_cols: int, out_dtype):
  """Applies a row-wise jitted fn to fixed-size chunks and concatenates the results.

  Small inputs are padded to a power of two (at least 64 rows), so a handful of shapes
  are ever compiled; chunks are dispatched asynchronously.
  """
  n = x.shape[0]
  if n == 0:
    return jnp.zeros((0, out_cols), out_dtype)
  size = min(_CHUNK, max(64, 1 << (n - 1).bit_length()))
  outs = []
  for start in range(0, n, size):
    part = x[start:start + size]
    m = part.shape[0]
    if m < size:
      part = np.pad(np.asarray(part), ((0, size - m), (0, 0)))
    outs.append(fn(part)[:m] if m < size else fn(part))
  return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=0)
