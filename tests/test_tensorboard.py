"""TensorBoard event files of training (``TrainConfig.log_dir``, ``train --log-dir``), read
back with TensorBoard's own reader and compared with ``TrainResult.history``."""
import json
import re
import time

import numpy as np
import pytest

from spreading_jax import _tensorboard
from spreading_jax import train as T

event_accumulator = pytest.importorskip(
    "tensorboard.backend.event_processing.event_accumulator")

# test_train's shrunk recipe (its compiled epoch is shared within one pytest process).
SMALL = T.TrainConfig(d_out=8, r2=10, bits=32, hidden=(64, 64), epochs=3, batch_size=32,
                      lambda_koleo=0.05, val_every=2, val_queries=50, val_base=400,
                      verbose=False)


def _read(log_dir):
  """{tag: [(step, value)]} of the scalars and the config text of a log directory."""
  acc = event_accumulator.EventAccumulator(
      str(log_dir), size_guidance={event_accumulator.SCALARS: 0, event_accumulator.TENSORS: 0})
  acc.Reload()
  scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
  texts = [e.tensor_proto.string_val[0].decode() for e in acc.Tensors("config/text_summary")]
  return scalars, texts


def _expected(history):
  """The scalars the history should have produced: every number but the epoch, float32."""
  want = {}
  for record in history:
    for key, value in record.items():
      if key != "epoch":
        want.setdefault(_tensorboard.tag(key), []).append(
            (record["epoch"], float(np.float32(value))))
  return want


def test_events_match_the_history_also_after_a_resume(mini, tmp_path):
  """Catches: a metric of the history not logged or logged under another step or value (e.g.
  the validation recalls, the SGD seconds), a config text that is not the run's config,
  and a resumed run whose curves keep the events an interrupted run wrote past its last
  checkpoint (purge_step)."""
  x = np.asarray(mini.train[:1474])
  config = SMALL.replace(log_dir=str(tmp_path / "tb"), checkpoint_dir=str(tmp_path / "ck"))

  class Interrupt(Exception):
    pass

  def stop_after_two(record):
    if record["epoch"] == 2:
      raise Interrupt

  with pytest.raises(Interrupt):
    T.train(config, x, callback=stop_after_two)
  # What a run killed during epoch 3, after logging it but before its checkpoint
  # committed, leaves behind: resuming redoes epoch 3 and must hide these.
  # A killed run's late events sit in its own file; this stand-in gets a name of its own
  # (tensorboardX names files by the second, and one created in the interrupted run's
  # second under the same name would replace that run's file).
  from tensorboardX import SummaryWriter
  with SummaryWriter(str(tmp_path / "tb"), filename_suffix=".stale") as stale:
    stale.add_scalar("train/loss", 1e9, 3)
    stale.add_scalar("train/loss", 1e9, 4)
  result = T.train(config, x)
  assert [h["epoch"] for h in result.history] == [1, 2, 3]
  assert {"sgd_s", "mining_s", "lattice_R@10", "sign_R@100"} <= set(result.history[-1])
  scalars, texts = _read(tmp_path / "tb")
  assert scalars == _expected(result.history)
  assert {"train/loss", "train/triplet", "train/koleo", "train/violations", "train/lr",
          "validation/lattice_R_10", "seconds/mining", "seconds/sgd"} <= set(scalars)
  # The config as text, once per run (the resumed run writes its own).
  assert [json.loads(t) for t in texts] == [config.to_dict()] * 2


def test_a_resumed_writer_is_read_after_the_files_of_its_second(tmp_path):
  """Catches: a writer whose event file takes the name of an existing one (and truncates it:
  tensorboardX names files by the second and host) or sorts before it, as for a run resumed
  within a second of the interrupted one: the earlier epochs vanish, or the purge is read
  first and hides nothing. The existing file is stamped two seconds ahead, so a writer that
  does not wait lands on or before it every time."""
  from tensorboardX import SummaryWriter
  log = tmp_path / "tb"
  with SummaryWriter(str(log)) as old:
    for step in (1, 2, 3):
      old.add_scalar("train/loss", float(step), step)
  (old_file,) = log.iterdir()
  ahead = int(time.time()) + 2
  old_file.rename(log / re.sub(r"tfevents\.\d{10}\.", f"tfevents.{ahead}.", old_file.name))
  writer = _tensorboard.EpochWriter(SMALL.replace(log_dir=str(log)), first_epoch=3)
  writer({"epoch": 3, "loss": 0.5})
  writer.close()
  assert len(list(log.iterdir())) == 2
  assert _read(log)[0] == {"train/loss": [(1, 1.0), (2, 2.0), (3, 0.5)]}


def test_only_process_zero_writes(tmp_path, monkeypatch):
  """Catches: every process of a --distributed job writing the same events."""
  import jax
  config = SMALL.replace(log_dir=str(tmp_path / "tb"))
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  writer = _tensorboard.EpochWriter(config)
  writer({"epoch": 1, "loss": 0.5})
  writer.close()
  assert not writer.active and not (tmp_path / "tb").exists()
  monkeypatch.setattr(jax, "process_index", lambda: 0)
  writer = _tensorboard.EpochWriter(config)
  writer({"epoch": 1, "loss": 0.5})
  writer.close()
  assert _read(tmp_path / "tb")[0] == {"train/loss": [(1, 0.5)]}


def test_cli_train_log_dir(mini, tmp_path, capsys):
  """`train --log-dir` (conftest's tiny_model_dir recipe, whose compiled epoch it reuses):
  catches the flag not reaching the config, a log directory that is a file failing after
  training instead of before it, and a saved model that carries the machine path of the
  run's log directory."""
  from spreading_jax.cli import main
  from spreading_jax.model import TrainResult
  config = {"d_out": 8, "r2": 10, "bits": 32, "hidden": [32, 32], "epochs": 1, "val_every": 0,
            "lambda_koleo": 0.05, "verbose": False, "num_train": 2944}
  (tmp_path / "config.json").write_text(json.dumps(config))
  args = ["train", "fashion-mnist-mini", "--config", str(tmp_path / "config.json"),
          "--out", str(tmp_path / "model")]
  (tmp_path / "file").write_text("")
  assert main(args + ["--log-dir", str(tmp_path / "file")]) == 2
  assert "--log-dir" in capsys.readouterr().err and not (tmp_path / "model").exists()
  assert main(args + ["--log-dir", str(tmp_path / "tb")]) == 0
  model = TrainResult.load(tmp_path / "model")
  assert model.config.log_dir is None
  assert json.loads((tmp_path / "model" / "model.json").read_text())["config"]["log_dir"] is None
  scalars, texts = _read(tmp_path / "tb")
  assert scalars == _expected(model.history) and len(texts) == 1
