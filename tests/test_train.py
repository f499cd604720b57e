"""The training recipe: a real smoke run, determinism, data parallelism, resume, bad input."""
import json

import jax
import numpy as np
import pytest

from spreading_jax import sharding
from spreading_jax import train as T

# A shrunk recipe: the real loop, small network, three epochs validated at 2 and 3.
SMALL = T.TrainConfig(d_out=8, r2=10, bits=32, hidden=(64, 64), epochs=3, batch_size=32,
                      lambda_koleo=0.05,
                      val_every=2, val_queries=50, val_base=400, verbose=False)


@pytest.fixture(scope="module")
def small_train(mini):
  # The shipped fashion-mnist-mini's training images (784-d, float32 pixels 0..255); SMALL
  # validates on 450 of them and trains on 1,024 (32 full batches: no partial-batch step to
  # compile; the 650 rows of test_one_and_four_devices and test_recipe keep partial ones).
  return np.asarray(mini.train[:1474])


@pytest.fixture(scope="module")
def small_run(small_train):
  """One uninterrupted SMALL run: the smoke test's first run and the model the save/load
  test saves (its compiled epoch is reused by the resume test's runs)."""
  return T.train(SMALL, small_train)


def params_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                  jax.tree_util.tree_leaves(b)))


def test_smoke_on_real_data_is_deterministic(small_train, small_run):
  r1 = small_run
  assert [h["epoch"] for h in r1.history] == [1, 2, 3]
  for key in ("loss", "triplet", "koleo", "violations", "lr", "lattice_R@10", "sign_R@10"):
    assert key in r1.history[-1]
  assert 0 <= r1.history[-1]["lattice_R@100"] <= 1
  y = r1.apply(small_train[:37])
  assert y.shape == (37, 8)
  np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1, rtol=1e-5)
  r2 = T.train(SMALL, small_train)
  assert params_equal(r1.params, r2.params)
  assert r1.history[0]["loss"] == r2.history[0]["loss"]


def test_one_and_four_devices_give_the_same_losses(small_train):
  if jax.device_count() < 4:
    pytest.skip("needs 4 forced host devices (make test sets XLA_FLAGS)")
  import jax.numpy as jnp
  from spreading_jax import mining
  cfg = SMALL.replace(epochs=1, val_every=0)
  x = jnp.asarray(small_train[:650])  # 20 full batches of 32 and a partial one of 10
  pos = jnp.asarray(mining.positives(x, cfg.rank_positive))
  neg = jnp.asarray(mining.hard_negatives(x / jnp.linalg.norm(x, axis=1, keepdims=True),
                                          x / jnp.linalg.norm(x, axis=1, keepdims=True),
                                          cfg.rank_negative))
  metrics = {}
  for name, mesh in (("one", None), ("four", sharding.make_mesh(4))):
    state = T.make_train_state(cfg, x.shape[1], T.steps_per_epoch(cfg, 650),
                               jax.random.PRNGKey(0), mesh)
    epoch = T.make_epoch_fn(650, cfg.batch_size)
    _, metrics[name] = epoch(state, x, pos, neg, jax.random.PRNGKey(1))
  # Step by step (before float differences compound through SGD), the global-batch
  # losses of the sharded step equal the single-device ones; the partial batch too.
  assert metrics["one"]["loss"].shape == (21,)
  for key in ("loss", "triplet", "koleo"):
    np.testing.assert_allclose(metrics["four"][key], metrics["one"][key], rtol=1e-4, atol=1e-5)
  # Violating triplets are counted over the global batch (a per-shard count would be ~1/4):
  # the two programs round differently, so a triplet within rounding of a tie may flip.
  diff = np.abs(metrics["four"]["violations"] - metrics["one"]["violations"])
  assert np.all(diff <= 1), (metrics["four"]["violations"], metrics["one"]["violations"])
  # The full training loop on a mesh: test_distributed compares it with a two-process job,
  # and every CLI `train` in the tests runs on the 4-device mesh.


def test_resume_equals_uninterrupted(small_train, tmp_path, monkeypatch):
  # Epoch 2's validation recall is raised by 10: it is the best epoch whatever the float
  # rounding, so a resume that lost the checkpointed best record, or read a stale one back
  # from best.json, ends with epoch 3's parameters instead of epoch 2's.
  real_validate = T.validate

  def epoch2_best(result, val, codec, mesh=None, **kw):
    out = real_validate(result, val, codec, mesh, **kw)
    if len(result.history) == 1:  # validating epoch 2 (history: the epochs before it)
      out["lattice_R@10"] += 10.0
    return out

  monkeypatch.setattr(T, "validate", epoch2_best)
  cfg = SMALL  # small_run's config: its compiled epoch is reused
  full = T.train(cfg, small_train)
  assert full.history[1]["lattice_R@10"] > 10 > full.history[2]["lattice_R@10"]

  class Interrupt(Exception):
    pass

  def stop_after_two(record):
    if record["epoch"] == 2:
      raise Interrupt

  ckpt = cfg.replace(checkpoint_dir=str(tmp_path / "run"))
  with pytest.raises(Interrupt):
    T.train(ckpt, small_train, callback=stop_after_two)
  history = (tmp_path / "run" / "history.jsonl").read_text().splitlines()
  assert [json.loads(h)["epoch"] for h in history] == [1, 2]
  # A crash after the checkpoint committed but before best.json was rewritten (a stale
  # record, worse than epoch 2's): resuming must take the best-so-far record from the
  # checkpoint itself.
  (tmp_path / "run" / "best.json").write_text(json.dumps({"metric": 0.0, "epoch": 1,
                                                          "has_best": True}))
  resumed = T.train(ckpt, small_train)
  assert [h["epoch"] for h in resumed.history] == [1, 2, 3]
  assert params_equal(full.params, resumed.params)
  with pytest.raises(ValueError, match="different config"):
    T.train(ckpt.replace(lambda_koleo=0.5), small_train)
  # Same config, same dimension, different vectors: refused, never mixed.
  with pytest.raises(ValueError, match="different training data"):
    T.train(ckpt, small_train[::-1].copy())


def test_save_load_round_trip_and_corruption(small_train, small_run, tmp_path):
  r = small_run
  r.save(tmp_path / "model")
  loaded = T.TrainResult.load(tmp_path / "model")
  np.testing.assert_array_equal(loaded.apply(small_train[:10]), r.apply(small_train[:10]))
  blob = tmp_path / "model" / "variables.msgpack"
  blob.write_bytes(blob.read_bytes()[:-10])
  with pytest.raises(ValueError, match="truncated or corrupt"):
    T.TrainResult.load(tmp_path / "model")


@pytest.mark.parametrize("change, data, match", [
    (dict(), "nan", "NaN"),
    (dict(rank_negative=50), "tiny", "at least 51"),
    (dict(batch_size=64, rank_negative=5, rank_positive=3), "tiny", "larger than"),
    (dict(d_out=40, r2=79, bits=64), "ok", "bits=64"),
    (dict(batch_size=30), "ok4", "divisible"),
    (dict(lambda_koleo=-1.0), "ok", "lambda_koleo"),
    (dict(momentum=-0.5), "ok", "momentum=-0.5"),
    (dict(momentum=1.0), "ok", "momentum=1.0"),
    (dict(seed=-1), "ok", "seed=-1"),
    (dict(seed=2**32), "ok", "seed=4294967296"),  # PRNGKey(2**32) would repeat seed 0
])
def test_bad_input_is_rejected_before_compute(change, data, match):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((300, 16)).astype(np.float32)
  if data == "nan":
    x[7, 3] = np.nan
  if data == "tiny":
    x = x[:40]
  mesh = None
  if data == "ok4":
    if jax.device_count() < 4:
      pytest.skip("needs 4 devices")
    mesh = sharding.make_mesh(4)
  cfg = SMALL.replace(val_every=0, **change)
  with pytest.raises(ValueError, match=match):
    T.train(cfg, x, mesh=mesh)


@pytest.mark.parametrize("change", [dict(momentum=2.0), dict(seed=-3)])
def test_fit_checks_the_config_before_choosing_a_shape(change):
  # fit's split and screening seed numpy and jax before train would check the config.
  from spreading_jax.autoshape import fit
  x = np.random.default_rng(0).standard_normal((300, 16)).astype(np.float32)
  field = next(iter(change))
  with pytest.raises(ValueError, match=f"{field}="):
    fit(SMALL.replace(d_out=None, lambda_koleo=None, val_every=0, **change), x)


def test_inference_imports_neither_optax_nor_orbax():
  import subprocess
  import sys
  code = ("import sys, spreading_jax.model, spreading_jax.index, spreading_jax.encode; "
          "print(sorted(m for m in sys.modules if m.split('.')[0] in ('optax', 'orbax')))")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert out.stdout.strip() == "[]"
