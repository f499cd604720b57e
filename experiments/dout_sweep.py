"""Paper experiment `dout_sweep` (see spreading_jax.evaluate.dout_sweep).

Smoke run: python experiments/dout_sweep.py --dataset siftsmall --epochs 1 --hidden 64,64 --nb 2000 --nq 50
"""
import sys

from spreading_jax import evaluate


def main(argv=None):
  return evaluate.run_experiment("dout_sweep", argv)


if __name__ == "__main__":
  main(sys.argv[1:])
