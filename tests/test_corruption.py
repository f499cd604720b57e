"""Property tests: damaged vector files and edited metadata are a ValueError, never a crash.

Every reader (``vecs_io.read_vectors``) and loader (``TrainResult.load``,
``SpreadingIndex.load``) is fed files damaged at random (truncated, bytes overwritten,
JSON fields replaced by values of other types); each either returns a well-formed result
or raises ``ValueError`` naming the problem. Any other exception is a bug.
"""
import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from spreading_jax import SpreadingIndex, vecs_io
from spreading_jax.model import TrainResult
from spreading_jax.train import TrainConfig, train

SETTINGS = settings(max_examples=40, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture,
                                           HealthCheck.too_slow])
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40),
                        st.floats(allow_nan=True), st.text(max_size=5),
                        st.lists(st.integers(-3, 3), max_size=3), st.just({}))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  d = tmp_path_factory.mktemp("vectors")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((20, 6)).astype(np.float32)
  vecs_io.write_fvecs(d / "x.fvecs", x)
  vecs_io.write_ivecs(d / "x.ivecs", rng.integers(0, 20, (20, 6)))
  vecs_io.write_bvecs(d / "x.bvecs", rng.integers(0, 255, (20, 6)))
  np.save(d / "x.npy", x)
  vecs_io.write_hdf5(d / "x.hdf5", x, x[:3], rng.integers(0, 20, (3, 4)))
  return d


@SETTINGS
@given(name=st.sampled_from(["x.fvecs", "x.ivecs", "x.bvecs", "x.npy", "x.hdf5"]),
       cut=st.floats(0, 1), edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                           max_size=4))
def test_damaged_vector_files_are_a_value_error(files, tmp_path, name, cut, edits):
  blob = bytearray((files / name).read_bytes())
  for where, value in edits:
    blob[int(where * (len(blob) - 1))] = value
  blob = blob[:max(0, int(cut * len(blob))) if cut < 0.9 else len(blob)]
  path = tmp_path / name
  path.write_bytes(bytes(blob))
  try:
    x = vecs_io.read_vectors(path)
  except ValueError:
    return
  assert x.ndim == 2 and x.shape[0] >= 1


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  d = tmp_path_factory.mktemp("saved")
  x = np.random.default_rng(1).standard_normal((288, 16)).astype(np.float32)  # 9 batches
  config = TrainConfig(d_out=8, r2=15, bits=16, hidden=(16,), epochs=1, batch_size=32,
                       lambda_koleo=0.05, val_every=0, verbose=False)
  model = train(config, x)
  model.save(d / "model")
  index = SpreadingIndex(model, "sign")
  index.add(x[:50])
  index.save(d / "index")
  return d, x


def _edit_json(path, data, value, cut):
  meta = json.loads(path.read_text())
  keys = sorted(meta)
  key = keys[data.draw(st.integers(0, len(keys) - 1))]
  if isinstance(meta[key], dict) and meta[key] and data.draw(st.booleans()):
    sub = sorted(meta[key])
    meta[key][sub[data.draw(st.integers(0, len(sub) - 1))]] = value
  else:
    meta[key] = value
  text = json.dumps(meta)
  path.write_text(text[:int(cut * len(text))] if cut < 0.2 else text)


@SETTINGS
@given(data=st.data(), value=JSON_VALUES, cut=st.floats(0, 1))
def test_edited_model_metadata_is_a_value_error(saved, tmp_path, data, value, cut):
  d, x = saved
  shutil.copytree(d / "model", tmp_path / "m", dirs_exist_ok=True)
  _edit_json(tmp_path / "m" / "model.json", data, value, cut)
  try:
    model = TrainResult.load(tmp_path / "m")
  except ValueError:
    return
  assert model.apply(x[:3]).shape == (3, model.config.d_out)


@SETTINGS
@given(data=st.data(), value=JSON_VALUES, cut=st.floats(0, 1))
def test_edited_index_metadata_is_a_value_error(saved, tmp_path, data, value, cut):
  d, x = saved
  target = tmp_path / "i"
  if os.path.exists(target):
    shutil.rmtree(target)
  shutil.copytree(d / "index", target)
  _edit_json(target / "index.json", data, value, cut)
  try:
    index = SpreadingIndex.load(target)
  except ValueError:
    return
  D, I = index.search(x[:2], 3)
  assert I.shape == (2, 3)
