"""Builds spreading_jax/_shipped/fashion-mnist-mini.npz.xz, the dataset shipped in the package.

    python experiments/make_fashion_mnist_mini.py --root DATA_ROOT

DATA_ROOT/fashion-mnist/ holds the upstream train-images-idx3-ubyte.gz and
t10k-images-idx3-ubyte.gz (https://github.com/zalandoresearch/fashion-mnist, MIT). Rows
are drawn with a fixed seed: train = 20,000 and base = 10,000 disjoint training images,
query = 1,000 test images (so queries never overlap train or base); groundtruth = the
exact 100 nearest base rows of each query in L2 (``groundtruth.exact_groundtruth``, float64
re-rank, ties to the lower id). The output is an uncompressed .npz (uint8 pixels, int32
groundtruth, uint16 source row ids) compressed with xz. Run once: the shipped file must
not change (tests and the training-fidelity check use its first rows), and
``datasets.py`` pins its sha256.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import lzma
import sys
from pathlib import Path

import numpy as np

from spreading_jax import datasets, groundtruth
from spreading_jax.vecs_io import read_idx_gz

SEED = 0
N_TRAIN, N_BASE, N_QUERY, K = 20_000, 10_000, 1_000, 100
OUT = (Path(__file__).resolve().parents[1] / "spreading_jax" / "_shipped"
       / "fashion-mnist-mini.npz.xz")


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", default=None, help="data root holding fashion-mnist/ "
                 "(default: $SPREADING_DATA)")
  p.add_argument("--out", default=str(OUT))
  args = p.parse_args(argv)
  roots = datasets.data_roots(args.root)
  src = next((r / "fashion-mnist" for r in roots if (r / "fashion-mnist").is_dir()), None)
  if src is None:
    raise SystemExit(f"no fashion-mnist/ under {roots}")
  train_images = read_idx_gz(src / "train-images-idx3-ubyte.gz", 0x00000803)
  test_images = read_idx_gz(src / "t10k-images-idx3-ubyte.gz", 0x00000803)
  for name, x in (("train", train_images), ("t10k", test_images)):
    print(f"{name}-images: {x.shape} uint8, decompressed sha256 "
          f"{hashlib.sha256(x.tobytes()).hexdigest()}")
  rng = np.random.default_rng(SEED)
  perm = rng.permutation(train_images.shape[0])
  train_ids, base_ids = perm[:N_TRAIN], perm[N_TRAIN:N_TRAIN + N_BASE]
  query_ids = rng.permutation(test_images.shape[0])[:N_QUERY]
  train, base, query = train_images[train_ids], train_images[base_ids], test_images[query_ids]
  gt = groundtruth.exact_groundtruth(query.astype(np.float32), base.astype(np.float32), K, "l2")
  arrays = {"train": train, "base": base, "query": query, "groundtruth": gt.astype(np.int32),
            "train_ids": train_ids.astype(np.uint16), "base_ids": base_ids.astype(np.uint16),
            "query_ids": query_ids.astype(np.uint16)}
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  blob = lzma.compress(buf.getvalue(), preset=9 | lzma.PRESET_EXTREME)
  Path(args.out).write_bytes(blob)
  print(f"wrote {args.out}: {len(blob):,} bytes, sha256 {hashlib.sha256(blob).hexdigest()}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
