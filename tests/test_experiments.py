"""The experiment runner and its configs: every config runs end to end on a tiny real subset,
every number a config's docstring quotes is in the results file it cites, each config still
resolves to the TrainConfig of its recorded runs, and ``--set`` reaches the TrainConfig that
trains, through the runner and through ``spreading-jax train --config`` (one format)."""
import glob
import importlib.util
import json
import os
import re

import pytest

EXPERIMENTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "experiments")
REPO = os.path.dirname(EXPERIMENTS)
# paper.py is the paper's recipe for `spreading-jax train --config`, no experiment.
PAPER = os.path.join(EXPERIMENTS, "configs", "paper.py")
CONFIGS = sorted(p for p in glob.glob(os.path.join(EXPERIMENTS, "configs", "*.py")) if p != PAPER)
# nt=1010: 50 validation queries, 192 database, 768 training rows (12 full batches of 64).
TINY = ["dataset=fashion-mnist-mini", "epochs=1", "hidden=32", "nb=1000", "nq=20", "nt=1010",
        "val_queries=50", "bits=16", "d_out=8", "verbose=false"]
GRIDS = {"table1_lattice": None, "table2_binary": "16", "crossval_lambda": "0,0.05",
         "dout_sweep": "8", "lattice_ablation": "0.05", "validation_ranking": "8",
         "auto_shape": None}
# Results files written by experiments/run.py (they record the whole TrainConfig).
RECORDED = sorted(p for p in glob.glob(os.path.join(EXPERIMENTS, "results", "*", "*.json"))
                  if "train_config" in json.loads(open(p).read()))
QUOTE = re.compile(r"^  ([\w-]+): (.+?)(?: (\d+)b)? = "
                   r"([\d.]+)/([\d.]+)/([\d.]+)$", re.M)

pytestmark = pytest.mark.usefixtures("one_faiss_thread")


def _runner():
  spec = importlib.util.spec_from_file_location("run", os.path.join(EXPERIMENTS, "run.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _docstring(path):
  spec = importlib.util.spec_from_file_location("config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.__doc__


def test_every_experiment_has_a_config():
  names = {os.path.basename(p)[:-3] for p in CONFIGS}
  assert names == set(_runner().EXPERIMENTS) == set(GRIDS)
  assert {json.loads(open(p).read())["experiment"] for p in RECORDED} == {"auto_shape",
                                                                         "validation_ranking"}


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_docstring_states_command_runtime_and_recorded_numbers(path):
  doc = _docstring(path)
  rel = os.path.relpath(path, REPO)
  assert f"python experiments/run.py {rel}:" in doc and "Expected runtime" in doc
  quotes = QUOTE.findall(doc)
  assert quotes, f"{rel} quotes no recorded number"
  for dataset, method, bits, *recalls in quotes:
    results = os.path.join("experiments", "results", dataset, os.path.basename(path)[:-3] + ".json")
    rows = json.loads(open(os.path.join(REPO, results)).read())["rows"]
    match = [r for r in rows if r["method"] == method and (not bits or r["bits"] == int(bits))]
    assert len(match) == 1, f"{rel}: {method!r} is not one row of {results}"
    got = [round(100 * match[0]["recall"][k], 1) for k in ("1", "10", "100")]
    assert got == [float(v) for v in recalls], f"{rel}: {method} {recalls}, {results}: {got}"


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_runner_smoke_run_writes_report(mini, tmp_path, path):
  name = os.path.basename(path)[:-3]
  if name == "table1_lattice":
    pytest.importorskip("faiss")
  grid = [] if GRIDS[name] is None else ["--set", f"grid={GRIDS[name]}"]
  args = [f"{path}:fashion-mnist-mini", "--out", str(tmp_path), *grid]
  for item in TINY:
    args += ["--set", item]
  payload = _runner().main(args)
  suffixes = [".json", ".md", ".png", "_nn_hist.png", "_training.png"]
  if name == "crossval_lambda":
    suffixes.append("_lambda.png")
  for suffix in suffixes:
    assert (tmp_path / f"{name}{suffix}").stat().st_size > 0
  saved = json.loads((tmp_path / f"{name}.json").read_text())
  assert saved["experiment"] == name and saved["rows"] == json.loads(json.dumps(payload["rows"]))
  assert saved["train_config"]["epochs"] == 1 and saved["sizes"]["nb"] == 1000
  assert saved["histories"] and all(len(h) == 1 for h in saved["histories"].values())
  assert all(0 <= v <= 1 for r in saved["rows"] for v in r["recall"].values())
  assert "| method | bits |" in (tmp_path / f"{name}.md").read_text()


def test_runner_rejects_unknown_keys_and_missing_files(tmp_path, capsys):
  run = _runner()
  with pytest.raises(SystemExit):
    run.main([CONFIGS[0], "--set", "epochz=1"])
  assert "epochz" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    run.main([str(tmp_path / "nope.py")])
  assert "does not exist" in capsys.readouterr().err
  with pytest.raises(SystemExit):  # a config for `spreading-jax train`, no experiment
    run.main([PAPER])
  assert "experiment=None" in capsys.readouterr().err


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: os.path.relpath(p, EXPERIMENTS))
def test_configs_resolve_to_the_train_config_of_their_recorded_runs(path):
  """Catches a config edit (or a change of the runner's reading) that silently changes the
  recipe of a recorded run: e.g. a config that forgets val_every=2 or verbose=False, or a
  --set/KEYS mapping that drops a field. Every results file written by experiments/run.py
  records its command and whole TrainConfig; the config named by that command resolves to
  the same fields (records made before a field existed lack it) and the same other keys."""
  from spreading_jax.cli import load_config
  record = json.loads(open(path).read())
  command = record["command"].split()
  assert command[:2] == ["python", "experiments/run.py"], command
  assert "--set" not in command, f"{path}: a recorded run with --set; compare its result too"
  config = load_config(os.path.join(REPO, command[2]), (), _runner().KEYS)
  recorded = record["train_config"]
  now = config["train"].to_dict()
  assert set(recorded) <= set(now), f"{path} records unknown fields"
  assert {k: now[k] for k in recorded} == recorded
  recorded_keys = {k: v for k, v in record["config"].items() if k in _runner().KEYS}
  assert json.loads(json.dumps({k: v for k, v in config.items() if k != "train"})) \
      == {**{k: None for k in _runner().KEYS}, **recorded_keys}


def test_paper_config_holds_the_paper_recipe():
  """Catches a change to the paper's recipe file (the former paper.json, whose fields it
  keeps), or a CLI that cannot read it."""
  from spreading_jax.cli import load_config
  from spreading_jax.quantizers import make_codec
  config = load_config(PAPER)
  assert set(config) == {"train"}
  c = config["train"]
  assert (c.d_out, c.hidden, c.epochs, c.batch_size, c.num_train) == (24, (1024, 1024), 160, 64,
                                                                      500_000)
  assert (c.lr_schedule, c.momentum, c.lambda_koleo, c.rank_positive, c.rank_negative) == (
      (0.1, 0.1, 0.05, 0.01), 0.9, 0.05, 10, 50)
  assert (c.r2, c.bits, c.val_every, c.val_queries, c.end_to_end) == (79, 64, 10, 1000, False)
  assert make_codec(c).code_bits <= 64


# Fields the old 15-key experiment configs could not set, each away from its default.
UNREACHABLE_BEFORE = {"batch_size": 32, "bn_mode": "joint", "end_to_end": True,
                      "mining": "exact", "drop_remainder": True}


def _sets(fields):
  return [a for k, v in fields.items() for a in ("--set", f"{k}={json.dumps(v).strip(chr(34))}")]


class _Stop(Exception):
  """Raised by a captured ``fit``: the test needs the config, not the training."""


def test_runner_set_reaches_the_train_config_that_trains(mini, tmp_path, monkeypatch):
  """Catches an override that is parsed but dropped before training (the old runner could
  not set these fields at all): the config ``fit`` receives holds the --set values."""
  run = _runner()
  seen = []

  def capture(config, *args, **kwargs):
    seen.append(config)
    raise _Stop

  monkeypatch.setattr(run, "fit", capture)
  args = [f"{os.path.join(EXPERIMENTS, 'configs', 'dout_sweep.py')}:fashion-mnist-mini",
          "--out", str(tmp_path), "--set", "grid=8"]
  for item in TINY:
    args += ["--set", item]
  with pytest.raises(_Stop):
    run.main(args + _sets(UNREACHABLE_BEFORE))
  for field, value in UNREACHABLE_BEFORE.items():
    assert getattr(seen[0], field) == value, field
  assert (seen[0].epochs, seen[0].hidden, seen[0].d_out) == (1, (32,), 8)


def test_cli_reads_the_runner_configs_and_set_reaches_fit(tmp_path, monkeypatch):
  """Catches a CLI that reads another format than the runner (each experiment config gives
  ``train --config`` the TrainConfig the runner starts from) or drops a --set: the config
  handed to ``fit`` is captured (training stops there)."""
  from spreading_jax import autoshape
  from spreading_jax.cli import main
  run = _runner()

  def capture(config, *args, **kwargs):
    seen.append(config)
    raise _Stop

  monkeypatch.setattr(autoshape, "fit", capture)
  for spec in [f"{p}:siftsmall" for p in CONFIGS] + [PAPER]:
    seen = []
    with pytest.raises(_Stop):
      main(["train", "fashion-mnist-mini", "--config", spec, "--out", str(tmp_path / "m")])
    assert seen == [run.load_config(spec, (), run.KEYS)["train"]], spec
  seen = []
  with pytest.raises(_Stop):
    main(["train", "fashion-mnist-mini", "--config", CONFIGS[0], "--out", str(tmp_path / "m"),
          *_sets(UNREACHABLE_BEFORE)])
  for field, value in UNREACHABLE_BEFORE.items():
    assert getattr(seen[0], field) == value, field


@pytest.mark.parametrize("item,message", [
    ("batch_size=abc", "batch_size='abc': expected int"),
    ("nonsense=1", "'nonsense' is neither"),
    ("end_to_end=yes", "end_to_end='yes': expected bool"),
    ("bn_mode=both", "bn_mode='both' must be one of"),
    ("hidden=64,x", "hidden='64,x': expected comma-separated integers"),
    ("grid=a,b", "'a,b' must be comma-separated numbers"),
    ("nb=many", "'many' must be an integer"),
    ("epochs", "expected KEY=VALUE"),
])
def test_runner_set_errors_are_one_line(item, message, capsys, monkeypatch):
  """Catches a bad --set value that is accepted (and crashes later, deep in training) or an
  error that does not name the key."""
  run = _runner()
  monkeypatch.setattr(run, "run", lambda *a, **k: pytest.fail(f"--set {item} was accepted"))
  with pytest.raises(SystemExit):
    run.main([CONFIGS[0], "--set", item])
  err = capsys.readouterr().err.strip().splitlines()
  assert "error: --set" in err[-1] and message in err[-1], err  # after argparse's usage


@pytest.mark.parametrize("item,message", [
    ("batch_size=abc", "batch_size='abc': expected int"),
    ("nonsense=1", "'nonsense' is not a TrainConfig field"),
    ("nt=100", "'nt' is not a TrainConfig field"),  # experiment keys are the runner's
])
def test_cli_set_errors_are_one_line(item, message, tmp_path, capsys, monkeypatch):
  """Catches a CLI --set that accepts an unknown field or a bad value, or crashes on it."""
  from spreading_jax import autoshape
  from spreading_jax.cli import main
  monkeypatch.setattr(autoshape, "fit", lambda *a, **k: pytest.fail(f"--set {item} accepted"))
  assert main(["train", "fashion-mnist-mini", "--config", CONFIGS[0], "--set", item,
               "--out", str(tmp_path / "m")]) == 2
  err = capsys.readouterr().err.strip()
  assert message in err and len(err.splitlines()) == 1, err
  assert not (tmp_path / "m").exists()


def test_config_file_errors(tmp_path):
  """Catches a config whose "train" is not a whole TrainConfig (the old 15-key dict) or
  that holds keys the runner does not know, accepted instead of refused."""
  from spreading_jax.cli import load_config
  keys = _runner().KEYS
  old = tmp_path / "old.py"
  old.write_text("def get_config(arg=None):\n  return {'experiment': 'dout_sweep', 'epochs': 10}\n")
  with pytest.raises(ValueError, match=r"unknown config keys \['epochs'\]"):
    load_config(str(old), (), keys)
  loose = tmp_path / "loose.py"
  loose.write_text("def get_config(arg=None):\n  return {'train': {'epochs': 10}}\n")
  with pytest.raises(ValueError, match="a TrainConfig was expected"):
    load_config(str(loose), (), keys)
  with pytest.raises(ValueError, match="defines no get_config"):
    (tmp_path / "none.py").write_text("x = 1\n")
    load_config(str(tmp_path / "none.py"))
