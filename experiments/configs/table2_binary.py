"""Table 2 (binary codes): LSH, ITQ and catalyzer + sign bits with d_out = bits, at
16/32/64/128 bits; 10 epochs.

Command:
  python experiments/run.py experiments/configs/table2_binary.py:fashion-mnist
  python experiments/run.py experiments/configs/table2_binary.py:siftsmall

Expected runtime (2-core CPU): fashion-mnist 24 min, siftsmall 2 min.

Recorded runs (R@1/R@10/R@100 in %, rows of experiments/results/<dataset>/table2_binary.json;
made with experiments/table2_binary.py, the script this config replaced, with the same settings
and the library of that day (the training code has changed since); wall time 1415 s and 128 s):
  fashion-mnist: ITQ 64b = 7.9/29.8/68.6
  fashion-mnist: catalyzer+sign 64b = 18.2/56.7/89.2
  fashion-mnist: catalyzer+sign 128b = 28.4/71.9/95.2
  siftsmall: ITQ 64b = 26.0/52.0/88.0
  siftsmall: catalyzer+sign 64b = 31.0/65.0/84.0
"""
from spreading_jax.config import TrainConfig


def get_config(arg=None):
  # d_out and bits follow each grid value (sign codes: d_out = bits).
  train = TrainConfig(d_out=24, lambda_koleo=0.05, epochs=10, val_every=2, verbose=False)
  return {"experiment": "table2_binary", "dataset": arg or "fashion-mnist",
          "grid": (16, 32, 64, 128), "train": train}
