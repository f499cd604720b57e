"""What the project shows and records reads the same on any machine: --help is plain text at
every level, and recorded results name no path of the machine that produced them."""
import argparse
import importlib
import json
import os
import pathlib
import re
import sys

import pytest

from spreading_jax import report
from spreading_jax.cli import build_parser, main

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Paths that name one machine: scratch and home directories, the checkout's own location,
# virtual environments' interpreters and site-packages, repository mirrors.
MACHINE_PATH = re.compile(r"/work/|/tmp/|/root/|/home/|/Users/|/scratch/|site-packages|"
                          r"venv/bin|\.mirror/")


def _subcommands():
  subparsers = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction))
  return subparsers.choices


@pytest.mark.parametrize("command", [None, *_subcommands()])
def test_help_is_plain_text_at_every_level(command, capsys):
  """Catches reStructuredText (``x``) or Markdown (`x`) markup in any --help, and a flag or
  argument that --help leaves unexplained."""
  argv = ["--help"] if command is None else [command, "--help"]
  assert main(argv) == 0
  out = capsys.readouterr().out
  assert out.startswith("usage: spreading-jax" + ("" if command is None else f" {command}"))
  assert "`" not in out, out
  parser = build_parser() if command is None else _subcommands()[command]
  for action in parser._actions:
    assert action.help, f"{command}: {action.option_strings or action.dest} has no help"


def test_recorded_results_name_no_machine_path():
  """Catches a results file (or a README/docs page, a script's docstring) that records
  this machine's paths, e.g. the scratch venv, the mirror and the data root that
  bench_train.json and mining_methods.json once held."""
  scanned = [*ROOT.glob("experiments/**/*"), *ROOT.glob("benchmarks/**/*"),
             *ROOT.glob("docs/**/*"), ROOT / "README.md"]
  hits, count = [], 0
  for path in scanned:
    if not path.is_file() or path.suffix not in (".json", ".md", ".py", ".txt", ".csv"):
      continue
    count += 1
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
      if MACHINE_PATH.search(line):
        hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
  assert count > 50 and not hits, "\n".join(hits)


@pytest.mark.parametrize("command, recorded", [
    ("python /repo/benchmarks/bench_train.py --n 20000 --torch-python /tmp/tv/bin/python "
     "--git-dir /work/.mirror/x/repo", "python benchmarks/bench_train.py --n 20000 "
     "--torch-python TORCH_PYTHON --git-dir GIT_DIR"),
    ("python experiments/mining_methods.py --root /work/shared/data --methods graph,exact",
     "python experiments/mining_methods.py --root DATA_ROOT --methods graph,exact"),
    ("/opt/venv/bin/python3 -m spreading_jax demo --out=/scratch/d --epochs 1",
     "python3 -m spreading_jax demo --out=OUT --epochs 1"),
    ("python experiments/run.py experiments/configs/x.py:siftsmall --set epochs=1 /data/a.h5",
     "python experiments/run.py experiments/configs/x.py:siftsmall --set epochs=1 PATH"),
])
def test_portable_command(command, recorded):
  """Catches an absolute path kept, a placeholder not named after its flag, and relative
  arguments (as typed) rewritten."""
  assert report.portable_command(command, repo="/repo") == recorded
  assert not MACHINE_PATH.search(recorded)


def test_result_writers_record_portable_commands(tmp_path, monkeypatch):
  """Catches write_report (demo, experiments/run.py) or the benchmarks' write_result
  recording the command as the machine ran it."""
  command = f"{sys.executable} {ROOT / 'benchmarks' / 'bench_x.py'} --root /work/shared/data"
  want = "python benchmarks/bench_x.py --root DATA_ROOT"
  json_path, _ = report.write_report(tmp_path, "r", {"command": command}, "text")
  assert json.loads(json_path.read_text())["command"].split(" ", 1)[1] == want.split(" ", 1)[1]
  sys.path.insert(0, str(ROOT / "benchmarks"))
  try:
    common = importlib.import_module("_common")
  finally:
    sys.path.pop(0)
  monkeypatch.setattr(common, "RESULTS", tmp_path)
  path = common.write_result("bench_x", {"command": command})
  assert json.loads(path.read_text())["command"].split(" ", 1)[1] == want.split(" ", 1)[1]
  assert os.path.dirname(path) == str(tmp_path)
