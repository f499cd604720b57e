"""Evaluation protocols over the Quantizer interface agree with direct computations."""
import numpy as np
import pytest

from spreading_jax import evaluate, lattice, quantizers, search


@pytest.fixture(scope="module")
def small(mini):
  return mini.subset(nb=2000, nq=50, nt=2000)


def test_faiss_quantizer_protocol_equals_faiss_baseline(small, one_faiss_thread):
  pytest.importorskip("faiss")
  from spreading_jax import baselines
  proj = evaluate.random_projection(small.d, 16, seed=1)
  # "PQ4np": PQ4 without faiss' polysemous training (seconds; codes and recall unchanged).
  got = evaluate.evaluate_quantizer(small, proj, quantizers.make_quantizer("PQ4np", 16))
  assert got == baselines.evaluate_faiss(small, "PQ4np", proj)
  assert set(got) == {1, 10, 100} and 0 < got[100] <= 1


def test_lattice_and_sign_protocols_equal_direct_search(small):
  proj = evaluate.random_projection(small.d, 24, seed=0)
  yb, yq = proj(np.asarray(small.base)), proj(np.asarray(small.query))
  codec = lattice.zn_codec(24, 64)
  _, ids = search.search_lattice(yq, codec.encode(yb), codec, 100)
  assert evaluate.evaluate_lattice(small, proj, codec) == search.recall_at(
      ids, small.groundtruth, (1, 10, 100))
  from spreading_jax import binary
  _, ids = search.hamming_knn(binary.sign_codes(yq), binary.sign_codes(yb), 10)
  assert evaluate.evaluate_sign(small, proj, ks=(1, 10)) == search.recall_at(
      ids, small.groundtruth, (1, 10))
  with pytest.raises(ValueError, match="no k"):
    evaluate.evaluate_sign(small, proj, ks=(5000,))


def test_cli_eval_prints_lattice_and_sign_rows(tiny_model_dir, capsys):
  from spreading_jax.cli import main
  from spreading_jax.model import TrainResult
  # The shared tiny model (conftest.py): d_out=8, r2=10 (a 14-bit sphere in a 32-bit budget).
  codec = TrainResult.load(tiny_model_dir).codec()
  assert main(["eval", str(tiny_model_dir), "fashion-mnist-mini"]) in (0, None)
  out = capsys.readouterr().out
  assert f"catalyzer + Zn lattice (d=8, r2=10) | {codec.code_bits} |" in out
  assert "catalyzer + sign (8 bits) | 8 |" in out
