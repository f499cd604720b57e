"""CLI commands end to end through ``main([...])`` on the shipped dataset with a tiny model."""
import importlib.util
import json

import numpy as np
import pytest

from spreading_jax.cli import main


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
  # `train fashion-mnist-mini --config ... --out ...` through main(): see conftest.py (the
  # model is shared with test_index and test_evaluate).
  return tiny_model_dir


def test_build_search_info_encode(model_dir, mini, tmp_path, capsys):
  xb, xq = tmp_path / "xb.npy", tmp_path / "xq.npy"
  np.save(xb, np.asarray(mini.base, np.float32))
  np.save(xq, np.asarray(mini.query[:100], np.float32))
  np.save(tmp_path / "gt.npy", np.asarray(mini.groundtruth[:100], np.int32))
  idx = tmp_path / "idx"
  assert main(["build", str(model_dir), str(xb), "--out", str(idx), "--bits", "32"]) == 0
  assert main(["info", str(idx)]) == 0
  assert "ntotal=10000" in capsys.readouterr().out
  assert main(["search", str(idx), str(xq), "--k", "10", "--out", str(tmp_path / "res"),
               "--groundtruth", str(tmp_path / "gt.npy")]) == 0
  assert "R@10=" in capsys.readouterr().out
  assert np.load(tmp_path / "res_I.npy").shape == (100, 10)
  # A true neighbour outside the index is refused before the search writes anything.
  for bad_id in (-1, 10000):
    gt = np.array(mini.groundtruth[:100], np.int32)
    gt[7, 0] = bad_id
    np.save(tmp_path / "gt_bad.npy", gt)
    assert main(["search", str(idx), str(xq), "--k", "10", "--out", str(tmp_path / "bad"),
                 "--groundtruth", str(tmp_path / "gt_bad.npy")]) == 2
    assert f"row 7 gives id {bad_id}" in capsys.readouterr().err
  assert not list(tmp_path.glob("bad_*"))
  assert main(["encode", str(model_dir), str(xq), str(tmp_path / "codes.npy")]) == 0
  assert np.load(tmp_path / "codes.npy").shape[0] == 100
  assert main(["info", str(model_dir)]) == 0


def test_user_error_is_one_line(model_dir, tmp_path, capsys):
  assert main(["info", str(tmp_path / "missing")]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "error" in err[0]
  assert main(["bench", "no_such_bench"]) == 2


def test_build_faiss_quantizer(model_dir, mini, tmp_path, capsys):
  pytest.importorskip("faiss")
  xb, xt = tmp_path / "xb.npy", tmp_path / "xt.npy"
  np.save(xb, np.asarray(mini.base[:2000], np.float32))
  np.save(xt, np.asarray(mini.train[:2000], np.float32))
  idx = tmp_path / "idx"
  # "PQ4np": faiss' PQ4 without its polysemous training (seconds, and no effect on codes).
  assert main(["build", str(model_dir), str(xb), "--out", str(idx), "--quantizer", "PQ4np"]) == 2
  assert "--train" in capsys.readouterr().err
  assert main(["build", str(model_dir), str(xb), "--out", str(idx), "--quantizer", "PQ4np",
               "--train", str(xt)]) == 0
  assert main(["info", str(idx)]) == 0
  assert "bytes_per_vector=4 ntotal=2000" in capsys.readouterr().out


def test_demo_runs_on_the_shipped_data(tmp_path, capsys, one_faiss_thread, monkeypatch):
  """`make demo` end to end (1 epoch): train, index save/reload/search, table, plot. The
  demo's faiss row asks for OPQ8_64,PQ8 and gets PQ8 here: training the 784-d rotation took
  18 s of the suite's 2-core budget (OPQ itself is tested in test_baselines, and `make demo`
  on a fresh clone runs it for real)."""
  from spreading_jax import baselines
  asked, evaluate_faiss = [], baselines.evaluate_faiss

  def cheaper(ds, factory, *args, **kwargs):
    asked.append(factory)
    return evaluate_faiss(ds, "PQ8", *args, **kwargs)

  monkeypatch.setattr(baselines, "evaluate_faiss", cheaper)
  # 1,460 rows: 500 validation queries, 192 database, 768 training rows (12 full batches).
  assert main(["demo", "--epochs", "1", "--train-rows", "1460", "--out", str(tmp_path)]) == 0
  assert asked == ["OPQ8_64,PQ8"]
  out = capsys.readouterr().out
  assert "| catalyzer + Zn lattice (SpreadingIndex, d=24, r2=79) | 64 |" in out
  assert "| random projection + Zn lattice" in out
  saved = json.loads((tmp_path / "demo.json").read_text())
  assert saved["dataset"].startswith("fashion-mnist-mini")
  assert [r["bits"] for r in saved["rows"]] == [64, 64, 24, 64]
  assert all(0 < r["recall"]["100"] <= 1 for r in saved["rows"])
  assert (tmp_path / "training.png").stat().st_size > 0
  assert (tmp_path / "index" / "index.json").is_file()


def _err(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1, err
  return err[0]


def test_build_and_search_refuse_bad_files_naming_them(model_dir, mini, tmp_path, capsys):
  """build refuses an empty database file (it wrote an index no search could use) and
  names the file and the model's d_in for another dimension (also --train's), and the
  file for a NaN row found on the device; search names the query file and the index's
  d_in (and the file for a NaN row), and refuses an --out that is a directory (it wrote
  DIR/_I.npy and DIR/_D.npy into a directory it does not own). Nothing is written by a
  refused command."""
  d = mini.d
  xb = np.asarray(mini.base[:300], np.float32)
  files = {"xb": xb, "empty": xb[:0], "narrow": xb[:, :10], "q": xb[:20],
           "qnarrow": xb[:20, :8]}
  nan = xb.copy()
  nan[123, 45] = np.nan
  files["nan"] = nan
  for name, arr in files.items():
    np.save(tmp_path / f"{name}.npy", arr)
  f = {name: str(tmp_path / f"{name}.npy") for name in files}
  idx = tmp_path / "idx"
  build = ["build", str(model_dir)]
  assert main(build + [f["empty"], "--out", str(idx)]) == 2
  assert "empty.npy has no rows: an index of no vectors cannot be searched" in _err(capsys)
  assert main(build + [f["narrow"], "--out", str(idx)]) == 2
  assert (f"narrow.npy has vectors of dimension d_in=10, but the model {model_dir} takes "
          f"d_in={d}") in _err(capsys)
  assert main(build + [f["nan"], "--out", str(idx)]) == 2
  assert "nan.npy row 123 contains NaN or Inf" in _err(capsys)
  assert not idx.exists()
  if importlib.util.find_spec("faiss") is not None:
    assert main(build + [f["xb"], "--out", str(idx), "--quantizer", "PQ4np",
                         "--train", f["narrow"]]) == 2
    assert "narrow.npy has vectors of dimension d_in=10" in _err(capsys)
    assert not idx.exists()
  assert main(build + [f["xb"], "--out", str(idx)]) == 0
  capsys.readouterr()
  assert main(["search", str(idx), f["qnarrow"], "--out", str(tmp_path / "res")]) == 2
  assert (f"qnarrow.npy has vectors of dimension d_in=8, but the index {idx} takes "
          f"d_in={d}") in _err(capsys)
  assert main(["search", str(idx), f["nan"], "--out", str(tmp_path / "res")]) == 2
  assert "nan.npy contains NaN or Inf (first at row 123, column 45)" in _err(capsys)
  foreign = tmp_path / "foreign"
  foreign.mkdir()
  (foreign / "theirs.txt").write_text("not ours")
  for out in (f"{foreign}/", str(foreign)):
    assert main(["search", str(idx), f["q"], "--out", out]) == 2
    assert f"--out {out} is a directory; --out is a file prefix" in _err(capsys)
  assert sorted(p.name for p in foreign.iterdir()) == ["theirs.txt"]
  assert main(["search", str(idx), f["q"], "--out", str(foreign / "res")]) == 0
  assert np.load(foreign / "res_I.npy").shape == (20, 10)


def test_eval_names_a_dataset_of_another_dimension(tmp_path, capsys):
  # It failed inside model.apply with "x has d_in=784 but 16 was expected".
  from spreading_jax import TrainConfig
  from spreading_jax.train import train
  x = np.random.default_rng(0).standard_normal((200, 16)).astype(np.float32)
  config = TrainConfig(d_out=8, bits=16, lambda_koleo=0.05, epochs=1, hidden=(16,),
                       batch_size=32, val_every=0, verbose=False)
  train(config, x).save(tmp_path / "m16")
  assert main(["eval", str(tmp_path / "m16"), "fashion-mnist-mini"]) == 2
  err = capsys.readouterr().err
  assert "fashion-mnist-mini has vectors of dimension d_in=784" in err and "d_in=16" in err
