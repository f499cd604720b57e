"""Fixed 64-bit budget, catalyzer output dimension d_out in 16/24/32/40 with the largest
lattice radius whose codes fit (r² = 515/79/36/24). fashion-mnist: 10 epochs on 20k
training images; siftsmall: 5 epochs.

Command:
  python experiments/run.py experiments/configs/dout_sweep.py:fashion-mnist
  python experiments/run.py experiments/configs/dout_sweep.py:siftsmall

Expected runtime (2-core CPU): fashion-mnist 5 min, siftsmall 1.5 min.

Recorded runs (R@1/R@10/R@100 in %, rows of experiments/results/<dataset>/dout_sweep.json;
made with experiments/dout_sweep.py, the script this config replaced, with the same settings
and the library of that day (the training code has changed since); wall time 292 s and 73 s):
  fashion-mnist: d_out=16 r2=515 = 27.8/76.4/97.6
  fashion-mnist: d_out=24 r2=79 = 30.0/78.4/98.2
  fashion-mnist: d_out=40 r2=24 = 26.6/73.6/97.4
  siftsmall: d_out=24 r2=79 = 44.0/78.0/100.0
"""
from spreading_jax.config import TrainConfig

SETTINGS = {"fashion-mnist": {"epochs": 10, "nt": 20000}, "siftsmall": {"epochs": 5}}


def get_config(arg=None):
  dataset = arg or "fashion-mnist"
  settings = {"epochs": 160, "nt": None, **SETTINGS.get(dataset, {})}
  epochs = settings["epochs"]
  train = TrainConfig(d_out=24, lambda_koleo=0.05, epochs=epochs, val_every=max(1, epochs // 5),
                      verbose=False)
  return {"experiment": "dout_sweep", "dataset": dataset, "nt": settings["nt"],
          "grid": (16, 24, 32, 40), "train": train}
