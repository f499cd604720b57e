"""Paper experiment `table1_lattice` (see spreading_jax.evaluate.table1_lattice).

Smoke run: python experiments/table1_lattice.py --dataset siftsmall --epochs 1 --hidden 64,64 --nb 2000 --nq 50
"""
import sys

from spreading_jax import evaluate


def main(argv=None):
  return evaluate.run_experiment("table1_lattice", argv)


if __name__ == "__main__":
  main(sys.argv[1:])
