"""Table 1 (64-bit codes): PQ, OPQ, LSQ on the raw vectors; catalyzer + OPQ, catalyzer + Zn
lattice (r²=79, asymmetric search) and the lattice trained end to end; 10 epochs.

Command:
  python experiments/run.py experiments/configs/table1_lattice.py:fashion-mnist
  python experiments/run.py experiments/configs/table1_lattice.py:siftsmall

Expected runtime (2-core CPU): fashion-mnist 20 min, siftsmall 8 min.

Recorded runs (R@1/R@10/R@100 in %, rows of experiments/results/<dataset>/table1_lattice.json;
made with experiments/table1_lattice.py, the script this config replaced, with the same settings
and the library of that day (the training code has changed since); wall time 1184 s and 502 s):
  fashion-mnist: LSQ = 28.7/79.5/99.4
  fashion-mnist: catalyzer+OPQ = 33.1/82.6/98.9
  fashion-mnist: catalyzer+lattice = 34.8/84.2/99.0
  siftsmall: LSQ = 59.0/94.0/100.0
  siftsmall: catalyzer+lattice = 52.0/81.0/100.0
  siftsmall: catalyzer+lattice end-to-end = 57.0/86.0/100.0
"""
from spreading_jax.config import TrainConfig


def get_config(arg=None):
  train = TrainConfig(d_out=24, lambda_koleo=0.05, epochs=10, val_every=2, verbose=False)
  return {"experiment": "table1_lattice", "dataset": arg or "fashion-mnist", "train": train}
