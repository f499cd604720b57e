"""The library's default shape (``spreading_jax.fit`` on ``TrainConfig()`` with d_out and λ
unset: the paper's shape unless a screened candidate beats it by more than the validation
noise) beside the paper's shape (d_out=24, r²=79, λ=0.05) and faiss, at 64 bits, 10 epochs:
catalyzer + Zn lattice vs OPQ8_64,PQ8 and LSQ; catalyzer + sign bits vs LSH and ITQ. Each
default row records the selection's reason and cost.

Command (one per dataset):
  python experiments/run.py experiments/configs/auto_shape.py:fashion-mnist-mini
  python experiments/run.py experiments/configs/auto_shape.py:siftsmall
  python experiments/run.py experiments/configs/auto_shape.py:wordllama-256
  python experiments/run.py experiments/configs/auto_shape.py:fashion-mnist

The real datasets are found through --set root=DIR or $SPREADING_DATA; fashion-mnist trains
on its first 20k images (as crossval_lambda does).

Expected runtime (2-core CPU, nothing else running): fashion-mnist-mini and wordllama-256
about 3.5 min each (measured: 189 s and 212 s wall, of which the d_out screening about 50 s),
siftsmall about 5 min (an earlier run: 821 s wall, about 9 min of it paused), fashion-mnist
about 10 min (555 s; its 10k queries x 60k database evaluations and LSQ dominate).

Recorded runs (R@1/R@10/R@100 in %, rows of experiments/results/<dataset>/auto_shape.json).
With 19k training rows (20k less the final run's validation queries) x 10 epochs the budget
screens d_out alone, 4-epoch runs on 4,750 rows; siftsmall's 9k rows screen nothing:
  siftsmall: catalyzer + lattice, default (chosen: d_out=24 lambda=0.05) = 53.0/88.0/99.0
  siftsmall: OPQ8_64,PQ8 64b = 53.0/90.0/100.0
  siftsmall: catalyzer + sign, default (chosen: d_out=64 lambda=0.05) = 37.0/62.0/84.0
  siftsmall: ITQ 64b = 21.0/57.0/92.0
  fashion-mnist-mini: catalyzer + lattice, default (chosen: d_out=24 lambda=0.05) = 35.9/87.0/99.4
  fashion-mnist-mini: OPQ8_64,PQ8 64b = 32.7/89.0/100.0
  wordllama-256: catalyzer + lattice, default (chosen: d_out=40 lambda=0.05) = 55.8/89.6/97.1
  wordllama-256: catalyzer + lattice, the paper's shape = 52.7/82.9/93.3
  wordllama-256: OPQ8_64,PQ8 64b = 55.5/88.9/97.1
  wordllama-256: LSQ 64b = 53.0/92.6/98.5
  fashion-mnist: catalyzer + lattice, default (chosen: d_out=24 lambda=0.05) = 30.6/80.5/98.7
  fashion-mnist: OPQ8_64,PQ8 64b = 24.8/74.4/99.0
  fashion-mnist: LSQ 64b = 29.5/79.6/99.4
  fashion-mnist: catalyzer + sign, default (chosen: d_out=64 lambda=0.05) = 17.4/54.7/89.4
  fashion-mnist: ITQ 64b = 7.5/30.0/67.7
"""
from spreading_jax.config import TrainConfig

SETTINGS = {"fashion-mnist": {"nt": 20000}}


def get_config(arg=None):
  dataset = arg or "fashion-mnist-mini"
  # d_out and λ unset: ``fit`` chooses them (the library's default).
  train = TrainConfig(d_out=None, lambda_koleo=None, bits=64, epochs=10, val_every=2,
                      verbose=False)
  return {"experiment": "auto_shape", "dataset": dataset, "train": train,
          **SETTINGS.get(dataset, {})}
