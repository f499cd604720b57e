"""Top-k search of float queries against Zn lattice codes (``lattice.ZnSphereCodec``), on
the top-k engine: each segment of codes is decoded once and scored like float vectors."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from spreading_jax import topk
from spreading_jax._validation import check_mesh, check_vectors
from spreading_jax.lattice import ZnSphereCodec
from spreading_jax.topk import Tiles


@functools.lru_cache(maxsize=None)
def _decode_fn(codec):
  """One decode function per codec (hashable, so the compiled search is reused)."""
  def prepare(codes):
    return (codec.decode(codes),)
  return prepare


def search_lattice(xq, codes, codec, k: int, *, symmetric: bool = False,
                   mesh: Mesh | None = None, query_block: int | None = None,
                   base_block: int | None = None, super_block: int | None = None,
                   tiles: Tiles | None = None):
  """Top-k search of float queries against a database of Zn lattice codes.

  Asymmetric (the paper's lattice search): the score is the inner product between the
  query and the decoded unit-norm lattice point, so for unit queries the ranking is the L2
  ranking. Symmetric: the query is quantized first, for comparison.

  Args:
    xq: f32[nq, d] queries (already mapped by the catalyzer).
    codes: u32[nb, codec.code_words] codes from ``codec.encode``.
    codec: a ``lattice.ZnSphereCodec`` of dimension d.
    k: number of results, 1 <= k <= nb.
    symmetric: quantize the queries too.
    mesh: optional mesh; the codes are sharded over its data axis.
    query_block, base_block, super_block: tile sizes (see ``topk.topk_search``); codes are
      decoded one segment (up to 128 MB of decoded floats) at a time, once per call.
    tiles: size limits (default: ``topk.default_tiles()``, by backend).

  Returns:
    (scores f32[nq, k] descending inner products, ids i32[nq, k]); ties to the lower id.

  Raises:
    TypeError: ``codec`` is not a ``ZnSphereCodec``, ``mesh`` not a ``jax.sharding.Mesh``
      or None.
    ValueError: xq not 2-D of dimension codec.d or with NaN/Inf values, codes not the
      codec's, k not an int in [1, nb].
  """
  if not isinstance(codec, ZnSphereCodec):
    raise TypeError(f"codec must be a lattice.ZnSphereCodec (e.g. lattice.zn_codec(d, bits)), "
                    f"got {type(codec).__name__}")
  mesh = check_mesh(mesh)
  check_vectors("xq", xq, d=codec.d)
  codec.check_codes(codes)
  k = topk.check_k(k, codes.shape[0])
  xq = jnp.asarray(xq if isinstance(xq, jax.Array) else np.asarray(xq), jnp.float32)
  if symmetric:
    xq = codec.decode(codec.encode(xq))
  # Decoding costs more than scoring: each segment of codes is decoded once and then
  # scored against every query block like a float database.
  return topk.topk_search(topk.ip_score, xq, (jnp.asarray(codes),), k, mesh=mesh,
                          query_block=query_block, base_block=base_block,
                          prepare_fn=_decode_fn(codec), super_block=super_block,
                          tiles=tiles)
