"""Does validation rank the candidates as the test does? The λ grid (0.001 ... 0.05 at
d_out=24, trained as one program) and the d_out grid (16 ... 64 at λ=0.05, each with the
largest r² that fits 64 bits), 10 epochs, each model trained once on the training vectors
less 1,000 held-out validation queries. Validation recall@10 against a small database
carved from the training vectors (min(10k, n/5): the previous default) and against every
training vector but the queries (the current default), beside test recall; the last two
rows give Spearman's rho of each with the test over each grid.

Command (one per dataset):
  python experiments/run.py experiments/configs/validation_ranking.py:fashion-mnist-mini
  python experiments/run.py experiments/configs/validation_ranking.py:siftsmall
  python experiments/run.py experiments/configs/validation_ranking.py:wordllama-256
  python experiments/run.py experiments/configs/validation_ranking.py:fashion-mnist

The real datasets are found through --set root=DIR or $SPREADING_DATA; fashion-mnist trains
on its first 20k images.

Expected runtime (2-core CPU shared with other jobs): siftsmall 33 min (measured: 2003 s),
fashion-mnist-mini 35 min (2108 s), wordllama-256 14 min (1459 s wall, of which about 10 min
paused while the test suite was timed), fashion-mnist 45 min (2702 s, sharing the 2 cores
with other experiments).

Recorded runs (R@1/R@10/R@100 in %, rows of experiments/results/<dataset>/
validation_ranking.json; the Spearman rows are in the same files and the README):
  siftsmall: d_out=24 r2=79 lambda=0.05 (val R@10 small database 0.882, large 0.910) = 46.0/91.0/100.0
  siftsmall: d_out=24 r2=79 lambda=0.005 (val R@10 small database 0.892, large 0.908) = 51.0/90.0/100.0
  fashion-mnist-mini: d_out=24 r2=79 lambda=0.005 (val R@10 small database 0.939, large 0.840) = 31.6/86.1/99.8
  fashion-mnist-mini: d_out=24 r2=79 lambda=0.01 (val R@10 small database 0.932, large 0.861) = 33.0/86.3/99.9
  wordllama-256: d_out=24 r2=79 lambda=0.05 (val R@10 small database 0.623, large 0.766) = 50.3/81.3/92.7
  wordllama-256: d_out=40 r2=24 lambda=0.05 (val R@10 small database 0.722, large 0.835) = 55.8/89.6/97.1
  fashion-mnist: d_out=24 r2=79 lambda=0.05 (val R@10 small database 0.938, large 0.871) = 30.5/80.1/98.6
"""
from spreading_jax.config import TrainConfig

SETTINGS = {"fashion-mnist": {"nt": 20000}}


def get_config(arg=None):
  dataset = arg or "fashion-mnist-mini"
  # d_out, r2 and λ follow each grid point.
  train = TrainConfig(d_out=24, lambda_koleo=0.05, bits=64, epochs=10, val_every=2,
                      verbose=False)
  return {"experiment": "validation_ranking", "dataset": dataset, "train": train,
          **SETTINGS.get(dataset, {})}
