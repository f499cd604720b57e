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

Recorded runs: see experiments/results/<dataset>/validation_ranking.{json,md} and the
README section "Fitting the shape to the data".
"""

SETTINGS = {"fashion-mnist": {"nt": 20000}}


def get_config(arg=None):
  dataset = arg or "fashion-mnist-mini"
  return {"experiment": "validation_ranking", "dataset": dataset, "epochs": 10, "bits": 64,
          **SETTINGS.get(dataset, {})}
