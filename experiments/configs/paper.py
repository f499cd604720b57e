"""The paper's 64-bit recipe as a whole TrainConfig, for ``spreading-jax train``: a
catalyzer d_in→1024→1024→24 with KoLeo weight λ=0.05, the Zn lattice of r²=79 at 64 bits,
160 epochs of SGD (batch 64, momentum 0.9, learning rate 0.1/0.1/0.05/0.01 in equal
blocks of epochs) on at most 500k training vectors, positives among the 10 nearest input
neighbours, the 50th output neighbour as negative; validation every 10 epochs on 1,000
held-out training vectors. It is no experiment of experiments/run.py (each of those holds
its own TrainConfig); any field can be replaced with ``--set``:

  spreading-jax train siftsmall --config experiments/configs/paper.py --set epochs=10 --out model
"""
from spreading_jax.config import TrainConfig


def get_config(arg=None):
  del arg
  return {"train": TrainConfig(
      d_out=24, hidden=(1024, 1024), epochs=160, batch_size=64,
      lr_schedule=(0.1, 0.1, 0.05, 0.01), momentum=0.9, lambda_koleo=0.05, rank_positive=10,
      rank_negative=50, end_to_end=False, r2=79, bits=64, val_every=10, val_queries=1000,
      val_base=None, num_train=500_000, seed=0)}
