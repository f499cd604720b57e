"""Does the catalyzer help the fixed 64-bit lattice, and does KoLeo help the catalyzer?
The Zn lattice (d=24, r²=79) on a random orthogonal projection of the input to 24 dims,
then on the paper's catalyzer (d_in→1024→1024→24) trained with λ=0.01 and with λ=0;
10 epochs. Test recall: the dataset's real queries against its database.

Command:
  python experiments/run.py experiments/configs/lattice_ablation.py:fashion-mnist
  python experiments/run.py experiments/configs/lattice_ablation.py:siftsmall

Expected runtime (2-core CPU): fashion-mnist 16 min, siftsmall 4 min.

Recorded runs (R@1/R@10/R@100 in %, rows of experiments/results/<dataset>/lattice_ablation.json;
made with experiments/lattice_ablation.py, the script this config replaced, with the same settings
and the library of that day (the training code has changed since); wall time 965 s and 250 s):
  fashion-mnist: random projection + Zn lattice = 8.5/30.5/66.3
  fashion-mnist: catalyzer (λ=0.01) + Zn lattice = 32.8/83.8/99.3
  fashion-mnist: catalyzer (λ=0) + Zn lattice = 0.8/4.6/22.2
  siftsmall: random projection + Zn lattice = 30.0/65.0/93.0
  siftsmall: catalyzer (λ=0.01) + Zn lattice = 48.0/81.0/100.0
"""
from spreading_jax.config import TrainConfig


def get_config(arg=None):
  train = TrainConfig(d_out=24, lambda_koleo=0.05, epochs=10, val_every=2, verbose=True)
  return {"experiment": "lattice_ablation", "dataset": arg or "siftsmall", "grid": (0.01, 0.0),
          "train": train}
