"""KoLeo weight λ by cross-validation: catalyzer + Zn lattice (64 bits) for each λ of the
grid; the λ with the best validation R@10 (carved from the training vectors) is selected,
every row reports test recall. fashion-mnist: 10 epochs on 20k training images; siftsmall:
5 epochs.

Command:
  python experiments/run.py experiments/configs/crossval_lambda.py:fashion-mnist
  python experiments/run.py experiments/configs/crossval_lambda.py:siftsmall

Expected runtime (2-core CPU): fashion-mnist 12 min, siftsmall 2 min.

Recorded runs (R@1/R@10/R@100 in %, rows of experiments/results/<dataset>/crossval_lambda.json;
made with experiments/crossval_lambda.py, the script this config replaced, with the same settings
and the library of that day (the training code has changed since); wall time 725 s and 94 s):
  fashion-mnist: lambda=0.0 (val R@10 0.361) = 3.1/16.4/56.8
  fashion-mnist: lambda=0.005 (val R@10 0.928) <- selected = 25.8/74.0/98.2
  siftsmall: lambda=0.0 (val R@10 0.536) = 22.0/51.0/82.0
  siftsmall: lambda=0.02 (val R@10 0.872) <- selected = 49.0/85.0/100.0
"""
from spreading_jax.config import TrainConfig

SETTINGS = {"fashion-mnist": {"epochs": 10, "nt": 20000}, "siftsmall": {"epochs": 5}}


def get_config(arg=None):
  dataset = arg or "fashion-mnist"
  settings = {"epochs": 160, "nt": None, **SETTINGS.get(dataset, {})}
  epochs = settings["epochs"]
  train = TrainConfig(d_out=24, lambda_koleo=0.05, epochs=epochs, val_every=max(1, epochs // 5),
                      verbose=False)
  return {"experiment": "crossval_lambda", "dataset": dataset, "nt": settings["nt"],
          "grid": (0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05), "train": train}
