"""Paper experiment `crossval_lambda` (see spreading_jax.evaluate.crossval_lambda).

Smoke run: python experiments/crossval_lambda.py --dataset siftsmall --epochs 1 --hidden 64,64 --nb 2000 --nq 50
"""
import sys

from spreading_jax import evaluate


def main(argv=None):
  return evaluate.run_experiment("crossval_lambda", argv)


if __name__ == "__main__":
  main(sys.argv[1:])
