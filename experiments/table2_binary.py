"""Paper experiment `table2_binary` (see spreading_jax.evaluate.table2_binary).

Smoke run: python experiments/table2_binary.py --dataset siftsmall --epochs 1 --hidden 64,64 --nb 2000 --nq 50
"""
import sys

from spreading_jax import evaluate


def main(argv=None):
  return evaluate.run_experiment("table2_binary", argv)


if __name__ == "__main__":
  main(sys.argv[1:])
