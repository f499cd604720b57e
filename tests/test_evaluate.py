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


def test_quantizer_recalls_keep_the_validation_protocol(mini):
  """Training validates through ``evaluate.quantizer_recalls``; its lattice search is the
  one training has always used (inner-product search among ``l2_normalize(quantize(yb))``,
  ids equal) and its recalls and per-query hits, lattice and sign, equal that protocol's
  bit for bit. Seen red (ids) with ``ZnQuantizer.search_vectors`` removed, i.e. with
  validation going through encode + decode: ``decode`` scales by 1/sqrt(r2), which moves
  a few near-ties at this d=40 shape."""
  from spreading_jax import binary
  from spreading_jax.catalyzer import l2_normalize
  x = np.asarray(mini.train, np.float32)
  proj = evaluate.random_projection(x.shape[1], 40, seed=3)
  yq, yb = proj(x[:500]), proj(x[500:])
  _, gt = search.knn(yq, yb, 100)
  codec = lattice.zn_codec(40, 64)
  _, lattice_ids = search.knn(yq, l2_normalize(codec.quantize(yb)), 100, metric="ip")
  zn = quantizers.ZnQuantizer(codec)
  np.testing.assert_array_equal(zn.search_vectors(yq, yb, 100)[1], lattice_ids)
  hits: dict = {}
  got = {}
  for q in (zn, quantizers.SignQuantizer(40)):
    got.update(evaluate.quantizer_recalls(q, yq, yb, gt, hits=hits))
  want, want_hits = {}, {}
  for name, ids in (
      ("lattice", lattice_ids),
      ("sign", search.hamming_knn(binary.sign_codes(yq), binary.sign_codes(yb), 100)[1])):
    per_query: dict = {}
    for k, v in search.recall_at(ids, gt, (1, 10, 100), per_query).items():
      want[f"{name}_R@{k}"], want_hits[f"{name}_R@{k}"] = v, per_query[k]
  assert got == want and list(got) == list(want)
  for key in want:
    np.testing.assert_array_equal(hits[key], want_hits[key])
