"""Recipe conventions pinned against independent numpy implementations, not against the
model under test (test_recipe.py builds its reference loss from the catalyzer, so it
inherits any BatchNorm setting, and its tolerance is on the parameters, where a small
weight decay hides).

Bugs these tests were checked against (each made on purpose once, one at a time):
BatchNorm running-statistics momentum 0.1 in flax terms (0.9 in PyTorch's) and epsilon
1e-3 (test_batchnorm_follows_pytorch_conventions); validation sign recall with the query
bits in another order than the database's (test_validation_sign_recall_is_the_sign_
quantizers); the epoch key not folded with the epoch number, i.e. the same shuffle and
positive draws every epoch (test_each_epoch_draws_new_randomness_reproducibly); weight
decay 1e-4 added to the optimizer (test_optimizer_is_plain_sgd_with_momentum).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spreading_jax import search
from spreading_jax import train as T
from spreading_jax.catalyzer import Catalyzer
from spreading_jax.quantizers import SignQuantizer

# float32 results of the same arithmetic compiled differently (other CPU, XLA -O0/-O3,
# thread count) differ by a few ulps per operation; these tests compare against float64
# numpy with room for ~1000 ulps, far below what each bug changes (stated per test).
RTOL, ATOL = 1e-4, 1e-5
# The catalyzer's unit-norm outputs: flax's BatchNorm takes the batch variance as
# E[x^2] - E[x]^2 in float32, which cancels when |mean| >> sd (here the first layer's bias
# ~0.2 against a batch sd ~0.005: mean^2/var ~1600, so the variance is good to
# ~1600 x 6e-8 ~ 1e-4 relative; measured 6e-5 on the outputs): 20x that.
OUT_ATOL = 1e-3


def _np_batchnorm_train(x, scale, bias, mean, var, momentum=0.1, eps=1e-5):
  """torch.nn.BatchNorm1d in train mode (PyTorch's conventions, written from its docs):
  normalizes with the batch mean and the biased batch variance; running statistics move by
  ``momentum`` (PyTorch's sense: new = (1 - momentum) * old + momentum * batch).

  PyTorch keeps the unbiased batch variance in its running variance; the catalyzer keeps the
  biased one (a deliberate, documented deviation: README, "Deliberate deviations"), so the
  running variance here is updated with the biased one too.
  """
  mu, v = x.mean(0), x.var(0)
  y = (x - mu) / np.sqrt(v + eps) * scale + bias
  return y, (1 - momentum) * mean + momentum * mu, (1 - momentum) * var + momentum * v


def _np_batchnorm_eval(x, scale, bias, mean, var, eps=1e-5):
  """torch.nn.BatchNorm1d in eval mode: normalizes with the running statistics."""
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _np_catalyzer(params, stats, x, train):
  """The catalyzer's forward in float64 numpy: Dense-BN-ReLU per hidden layer, Dense, L2
  normalization. Returns (y, new running statistics)."""
  x = np.asarray(x, np.float64)
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  s = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), stats)
  new = {}
  layers = sorted(k for k in p if k.startswith("Dense_"))
  for i, name in enumerate(layers):
    x = x @ p[name]["kernel"] + p[name]["bias"]
    if i == len(layers) - 1:
      break
    bn, st = p[f"BatchNorm_{i}"], s[f"BatchNorm_{i}"]
    if train:
      x, mean, var = _np_batchnorm_train(x, bn["scale"], bn["bias"], st["mean"], st["var"])
      new[f"BatchNorm_{i}"] = {"mean": mean, "var": var}
    else:
      x = _np_batchnorm_eval(x, bn["scale"], bn["bias"], st["mean"], st["var"])
    x = np.maximum(x, 0)
  return x / np.linalg.norm(x, axis=1, keepdims=True), new


def test_batchnorm_follows_pytorch_conventions():
  """Train-mode forward, running-statistics update and eval-mode forward of the catalyzer
  against a numpy BatchNorm with PyTorch's momentum (0.1 of the batch) and epsilon (1e-5).

  The inputs are scaled so the first layer's batch variances are ~3e-5: there epsilon 1e-3
  moves the outputs by ~0.3 (tolerance 1e-3), and momentum 0.1 in flax terms moves the
  running statistics by 0.2-0.8 (tolerance 1e-4 relative).
  """
  module = Catalyzer(d_out=8, hidden=(32, 16))
  rng = np.random.default_rng(0)
  x = (0.01 * rng.standard_normal((64, 20))).astype(np.float32)
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((2, 20)), train=False)
  params = variables["params"]
  # Non-trivial affine parameters and running statistics: scale != 1, bias != 0.
  params = jax.tree_util.tree_map_with_path(
      lambda path, a: a * 1.5 + 0.1 if "BatchNorm" in jax.tree_util.keystr(path) else a, params)
  stats = jax.tree_util.tree_map(lambda a: a + 0.05, variables["batch_stats"])
  first = np.asarray(x, np.float64) @ np.asarray(params["Dense_0"]["kernel"], np.float64)
  assert np.median(first.var(0)) < 1e-3  # the regime where epsilon matters

  y, upd = jax.jit(lambda p, s, x: module.apply({"params": p, "batch_stats": s}, x, train=True,
                                                 mutable=["batch_stats"]))(params, stats, x)
  want_y, want_stats = _np_catalyzer(params, stats, x, train=True)
  np.testing.assert_allclose(y, want_y, rtol=0, atol=OUT_ATOL)
  for name, st in want_stats.items():
    for field in ("mean", "var"):
      np.testing.assert_allclose(upd["batch_stats"][name][field], st[field], rtol=RTOL,
                                 atol=ATOL, err_msg=f"{name} running {field}")

  # Eval mode normalizes with the running statistics just updated.
  x2 = (0.01 * rng.standard_normal((16, 20)) + 0.002).astype(np.float32)
  y2 = jax.jit(lambda p, s, x: module.apply({"params": p, "batch_stats": s}, x, train=False))(
      params, upd["batch_stats"], x2)
  want_y2, _ = _np_catalyzer(params, upd["batch_stats"], x2, train=False)
  np.testing.assert_allclose(y2, want_y2, rtol=0, atol=OUT_ATOL)


def test_validation_sign_recall_is_the_sign_quantizers():
  """The ``sign_R@k`` that training validates with equals the recall of ``SignQuantizer``
  (encode the database, search the queries) on the same catalyzed vectors: a bit order of
  the queries' codes that differs from the database's (e.g. queries' dimensions reversed)
  drops sign_R@10 from ~0.5 to ~0.1 here."""
  rng = np.random.default_rng(1)
  d, nq, nb = 24, 200, 2000
  centers = rng.standard_normal((40, d))
  yb = centers[rng.integers(0, 40, nb)] + 0.5 * rng.standard_normal((nb, d))
  yq = centers[rng.integers(0, 40, nq)] + 0.5 * rng.standard_normal((nq, d))
  yb = (yb / np.linalg.norm(yb, axis=1, keepdims=True)).astype(np.float32)
  yq = (yq / np.linalg.norm(yq, axis=1, keepdims=True)).astype(np.float32)
  val = T.validation_split(yq, yb)
  codec = T.make_codec(T.TrainConfig(d_out=d, r2=79, bits=64))
  got = T.validation_recalls(yq, yb, val, codec)

  quantizer = SignQuantizer(d)
  _, ids = quantizer.search(yq, quantizer.encode(yb), val.groundtruth.shape[1])
  want = search.recall_at(ids, val.groundtruth, (1, 10, 100))
  assert {k: got[f"sign_R@{k}"] for k in want} == want
  assert want[10] > 0.3  # a recall where a wrong bit order would show


def _spy_epochs(monkeypatch) -> list:
  """Records the key each epoch of ``train`` gets and the per-step losses it returns, in a
  list that the caller empties between runs."""
  calls = []
  make = T.make_epoch_fn

  def make_spy(*args, **kwargs):
    epoch = make(*args, **kwargs)

    def spy(state, xt, positives, negatives, key):
      state, metrics = epoch(state, xt, positives, negatives, key)
      calls.append((np.array(key), np.asarray(metrics["triplet"]).copy()))
      return state, metrics
    return spy

  monkeypatch.setattr(T, "make_epoch_fn", make_spy)
  return calls


def test_each_epoch_draws_new_randomness_reproducibly(monkeypatch, mini):
  """Each epoch of ``train`` gets its own key (new shuffle and positive draws), the same
  ones again for the same seed and others for another seed; and the epoch function's key
  drives the batches: at learning rate 0 (parameters fixed) two keys give different per-step
  losses. Red when the epoch key is not folded with the epoch number."""
  x = np.asarray(mini.train[:256], np.float32)
  config = T.TrainConfig(d_out=8, r2=10, bits=32, hidden=(16, 16), epochs=3, batch_size=32,
                         lambda_koleo=0.05, lr_schedule=(0.0,), val_every=0, verbose=False)
  calls, runs = _spy_epochs(monkeypatch), {}
  for seed in (0, 0, 1):
    calls.clear()
    T.train(config.replace(seed=seed), x)
    runs.setdefault(seed, []).append(list(calls))
  keys = [c[0] for c in runs[0][0]]
  assert len(keys) == 3
  assert all(not np.array_equal(keys[i], keys[j]) for i in range(3) for j in range(i))
  for a, b in zip(runs[0][0], runs[0][1]):  # reproducible: same keys, same losses
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
  assert all(not np.array_equal(a[0], b[0]) for a, b in zip(runs[0][0], runs[1][0]))
  # The epoch function's key drives its batches: the same state and inputs at lr 0 give
  # other per-step losses under another key.
  state = T.make_train_state(config, x.shape[1], T.steps_per_epoch(config, 256),
                             jax.random.PRNGKey(0))
  epoch = T.make_epoch_fn(256, 32)
  xt = jnp.asarray(x)
  pos = jnp.asarray((np.arange(256)[:, None] + 7 * np.arange(4)[None]) % 256)
  neg = jnp.asarray((np.arange(256) + 100) % 256)
  copy = lambda s: jax.tree_util.tree_map(jnp.copy, s)  # noqa: E731 (the state is donated)
  _, m1 = epoch(copy(state), xt, pos, neg, jnp.asarray(keys[0]))
  _, m2 = epoch(copy(state), xt, pos, neg, jnp.asarray(keys[1]))
  assert not np.array_equal(np.asarray(m1["triplet"]), np.asarray(m2["triplet"]))


def _np_sgd_momentum(grads, lrs, momentum):
  """The updates of SGD with momentum as PyTorch's torch.optim.SGD (dampening 0, no
  Nesterov, no weight decay), written from its docs: buf = momentum * buf + g (buf = g at
  the first step), update = -lr * buf."""
  buf, out = None, []
  for g, lr in zip(grads, lrs):
    g = np.asarray(g, np.float64)
    buf = g if buf is None else momentum * buf + g
    out.append(-lr * buf)
  return out


def test_optimizer_is_plain_sgd_with_momentum():
  """``make_optimizer``'s updates against numpy SGD with momentum 0.9 over the lr schedule's
  blocks, on parameters ~1.5 and gradients ~1e-3: weight decay 1e-4 would add 1.5e-4 to
  every gradient, ~15% of it (the tolerance is 1e-5 relative: float32 rounding of a few
  multiply-adds); momentum ignored or a shifted schedule are off by far more."""
  config = T.TrainConfig(epochs=4, lr_schedule=(0.1, 0.05), momentum=0.9)
  tx, schedule = T.make_optimizer(config, steps_per_epoch=2)
  rng = np.random.default_rng(2)
  params = jnp.asarray((1 + rng.random(50)).astype(np.float32))
  grads = [(1e-3 * rng.standard_normal(50)).astype(np.float32) for _ in range(8)]
  lrs = [0.1] * 4 + [0.05] * 4  # epochs 1-2 at 0.1, epochs 3-4 at 0.05 (2 steps each)
  assert [float(schedule(i)) for i in range(8)] == pytest.approx(lrs)
  want = _np_sgd_momentum(grads, lrs, 0.9)
  state, update = tx.init(params), jax.jit(tx.update)
  for i, g in enumerate(grads):
    upd, state = update(jnp.asarray(g), state, params)
    params = params + upd
    np.testing.assert_allclose(upd, want[i], rtol=1e-5, atol=1e-10, err_msg=f"step {i + 1}")
