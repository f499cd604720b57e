"""Exact Hamming kNN over packed sign codes (``binary.sign_codes``), on the top-k engine.

Distances are xor + popcount on 32-bit words, kept as integers through the chunk maxima of
the engine every search shares (``topk.topk_search``).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from spreading_jax import binary, topk
from spreading_jax._validation import check_mesh
from spreading_jax.topk import Tiles


@jax.jit
def _pack_words(codes):
  """u8[n, B] -> u32[n, ceil(B / 4)] (zero bytes pad the last word: they are equal in
  every code, so they never add to a distance)."""
  n, nbytes = codes.shape
  codes = jnp.pad(codes, ((0, 0), (0, -nbytes % 4)))
  # The word count is explicit: reshape cannot infer a -1 axis from zero rows.
  return jax.lax.bitcast_convert_type(codes.reshape(n, -(-nbytes // 4), 4), jnp.uint32)


def hamming_score(xq, xb):
  """-Hamming distance, u32[qb, W] x u32[bb, W] -> i32[qb, bb]: xor and popcount word by
  word, which XLA vectorizes (AVX-512 VPOPCNTDQ on recent x86)."""
  dist = jnp.zeros((xq.shape[0], xb.shape[0]), jnp.int32)
  for w in range(xq.shape[1]):
    dist = dist + jax.lax.population_count(xq[:, None, w] ^ xb[None, :, w]).astype(jnp.int32)
  return -dist


def hamming_knn(query_codes, base_codes, k: int, *, mesh: Mesh | None = None,
                query_block: int | None = None, base_block: int | None = None,
                recall_target: float | None = None, tiles: Tiles | None = None):
  """Exact Hamming kNN on packed bit codes.

  query_codes: u8[nq, B], base_codes: u8[nb, B] -> (D i32[nq, k] ascending, I i32[nq, k]).
  Ties are broken by lower index. Sharded over ``mesh`` like ``search.knn``; ``query_block``,
  ``base_block``, ``recall_target`` and ``tiles`` as in ``topk.topk_search``.

  Raises:
    ValueError: codes that are not 2-D uint8, query and base codes of different widths, k
      not an int in [1, nb].
    TypeError: ``mesh`` is not a ``jax.sharding.Mesh`` or None.

  Example:
    >>> codes = binary.sign_codes(jnp.array([[1., 1.], [1., -1.], [-1., -1.]]))
    >>> D, I = hamming_knn(codes[2:], codes, 3)
    >>> D.tolist(), I.tolist()
    ([[0, 1, 2]], [[2, 1, 0]])
  """
  mesh = check_mesh(mesh)
  binary.check_codes("base_codes", base_codes)
  binary.check_codes("query_codes", query_codes)
  if query_codes.shape[1] != base_codes.shape[1]:
    raise ValueError(f"query_codes have {query_codes.shape[1]} bytes per code but base_codes "
                     f"have {base_codes.shape[1]}: codes of different lengths")
  k = topk.check_k(k, base_codes.shape[0])
  q, b = _pack_words(jnp.asarray(query_codes)), _pack_words(jnp.asarray(base_codes))
  s, i = topk.topk_search(hamming_score, q, (b,), k, mesh=mesh, query_block=query_block,
                          base_block=base_block, recall_target=recall_target, tiles=tiles)
  return (-s).astype(jnp.int32), i
