"""Triplet mining: positives among exact input-space neighbours (once), hard negatives among
output-space neighbours (every epoch).

Sablayrolles et al. 2019, section 4: a positive is drawn among the k=10 nearest neighbours
of the anchor in input space; the negative is the 50th nearest neighbour in output space.
Where the paper is silent (does a vector count as its own neighbour?), the original code's
convention is the default: it does, in both lists.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from spreading_jax import knn_graph, search
from spreading_jax._validation import check_int


def drop_self(ids: np.ndarray, k: int, self_ids: np.ndarray | None = None) -> np.ndarray:
  """Removes each row's own id from its neighbour list. ids: i32[n, k+1] -> i32[n, k].

  Row i of ``ids`` lists neighbours of vector i (of vector ``self_ids[i]`` when given),
  usually starting with that vector itself; with duplicate vectors it may sit later (or be
  absent, then the last column is dropped).

  Examples:
    >>> drop_self(np.array([[0, 5, 6], [4, 1, 7]]), 2).tolist()
    [[5, 6], [4, 7]]
  """
  ids = np.asarray(ids)
  if self_ids is None:  # row i lists the neighbours of vector i
    self_ids = np.arange(ids.shape[0])
  is_self = ids == np.asarray(self_ids)[:, None]
  # Stable sort puts every non-self column first, in order.
  order = np.argsort(is_self, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(ids, order, axis=1).astype(np.int32)


def input_neighbors(xt, k: int, *, mesh: Mesh | None = None) -> np.ndarray:
  """The ``k`` exact input-space (L2) neighbours of every row, self included: i32[n, k]."""
  k = check_int("k", k, minimum=1)
  _, ids = search.knn(xt, xt, k, mesh=mesh)
  return np.asarray(ids, np.int32)


def positives_from(ids: np.ndarray, rank_positive: int, *, include_self: bool = True
                   ) -> np.ndarray:
  """Candidate positives from exact neighbour lists that include self (``input_neighbors``
  with at least rank_positive + 1 columns when include_self is False): i32[n, rank_positive]."""
  k = check_int("rank_positive", rank_positive, minimum=1)
  ids = np.asarray(ids)
  if include_self:
    return ids[:, :k].astype(np.int32)
  return drop_self(ids[:, :k + 1], k)


def positives(xt, rank_positive: int, *, include_self: bool = True,
              mesh: Mesh | None = None) -> np.ndarray:
  """Candidate positives: the ``rank_positive`` exact input-space neighbours of every row.

  Args:
    xt: f32[n, d] training vectors.
    rank_positive: how many neighbours are candidates.
    include_self: count each vector as its own first neighbour (the original code does:
      its positive is the anchor itself with probability 1/rank_positive).
    mesh: optional mesh to shard the kNN over.

  Returns:
    i32[n, rank_positive].
  """
  k = check_int("rank_positive", rank_positive, minimum=1)
  ids = input_neighbors(xt, k + (0 if include_self else 1), mesh=mesh)
  return positives_from(ids, k, include_self=include_self)


def hard_negatives(yq, yb, rank_negative: int, *, include_self: bool = True,
                   mesh: Mesh | None = None) -> np.ndarray:
  """The ``rank_negative``-th output-space neighbour of every row: i32[n].

  Args:
    yq: f32[n, d] catalyzed training vectors (unit norm), the anchors.
    yb: f32[n, d] the same vectors as the database: ``yq`` itself, or its lattice
      quantization in end-to-end training (the original searches the unquantized outputs
      among the quantized ones). Row i of yb is vector i.
    rank_negative: rank of the negative in yq[i]'s neighbour list among yb.
    include_self: the list counts vector i itself (the original takes column
      rank_negative of the list that includes self, i.e. the (rank_negative - 1)-th other
      vector when self comes first); False skips it.
    mesh: optional mesh to shard the kNN over.
  """
  k = check_int("rank_negative", rank_negative, minimum=1)
  if yq.shape != yb.shape:
    raise ValueError(f"yq has shape {yq.shape} but yb has shape {yb.shape}; the database "
                     "row i must be vector i")
  # Unit vectors: the inner-product ranking equals the L2 ranking the original uses.
  if include_self:
    _, ids = search.knn(yq, yb, k, metric="ip", mesh=mesh)
    return np.asarray(jax.device_get(ids)[:, k - 1], np.int32)
  _, ids = search.knn(yq, yb, k + 1, metric="ip", mesh=mesh)
  return drop_self(ids, k)[:, k - 1]


# Below this many training vectors an exact epoch of mining costs seconds on a CPU.
_AUTO_GRAPH_MIN_ROWS = 100_000
# The mining methods (``TrainConfig.mining``).
METHODS = ("auto", "exact", "graph")


def mining_method(method: str, num_train: int, backend: str | None = None) -> str:
  """What ``method`` means for ``num_train`` vectors on ``backend`` ("exact" or "graph").

  "auto" follows the original code: exact search on a GPU/TPU, approximate search on a
  CPU (the original uses an HNSW index there) once there are at least 100k vectors; below
  that exact mining is cheap.

  Examples:
    >>> mining_method("auto", 500_000, "cpu"), mining_method("auto", 500_000, "gpu")
    ('graph', 'exact')
  """
  if method not in METHODS:
    raise ValueError(f"mining={method!r} must be one of {METHODS}")
  if method != "auto":
    return method
  backend = backend or jax.default_backend()
  return "graph" if backend == "cpu" and num_train >= _AUTO_GRAPH_MIN_ROWS else "exact"


class NegativeMiner:
  """Per-epoch hard negatives, exact or from an approximate kNN graph kept across epochs.

  "exact" searches every output among all of them each epoch (``hard_negatives``).

  "graph" refines last epoch's neighbour lists each epoch by neighbour-of-neighbour search
  (``knn_graph.refine``), starting from lists given to ``start`` (training gives the exact
  input-space neighbours) or, without them, from one exact search. A sample of ``sample``
  rows is searched exactly to measure the lists: the recall of the ``rank_negative`` nearest
  neighbours, and the exact rank of the id in every column. Refinement repeats until the
  recall reaches ``recall_target``; after ``max_rounds`` rounds below it the miner falls
  back to an exact search, so the lists never drift far. Missed neighbours push the ids of a
  column to larger exact ranks, so the negative is taken from the column whose median exact
  rank on the sample is closest to ``rank_negative`` (the same column when the lists are
  exact).

  Call it with each epoch's outputs; ``last`` describes the latest call (method, rounds,
  estimated recall, whether it searched exactly, the column and its median exact rank).
  """

  def __init__(self, rank_negative: int, *, include_self: bool = True, method: str = "exact",
               recall_target: float = 0.8, max_rounds: int = 3, sample: int = 1024,
               seed: int = 0, mesh: Mesh | None = None):
    self.rank = check_int("rank_negative", rank_negative, minimum=1)
    if method not in ("exact", "graph"):
      raise ValueError(f"method={method!r} must be 'exact' or 'graph' (see mining_method)")
    if not 0.0 < recall_target <= 1.0:
      raise ValueError(f"recall_target={recall_target} must be in (0, 1]")
    self.include_self, self.method, self.mesh = include_self, method, mesh
    self.recall_target = float(recall_target)
    self.max_rounds = check_int("max_rounds", max_rounds, minimum=1)
    self.sample = check_int("sample", sample, minimum=1)
    self.seed = seed
    self.graph = None
    self.last: dict = {}

  def width(self, n: int) -> int:
    """Neighbours kept per row (self included): down to the negative, plus slack for
    refinement and for the calibrated column."""
    return min(self.rank + 1 + 16, n)

  def start(self, ids) -> None:
    """Seeds the graph method with approximate lists, e.g. the exact input-space neighbours
    (``input_neighbors`` with ``width(n)`` columns): the first epoch then refines them
    instead of searching exactly."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] != self.width(ids.shape[0]):
      raise ValueError(f"seed lists have shape {ids.shape}; expected (n, {self.width(len(ids))})")
    self.graph = jnp.asarray(ids, jnp.int32)

  def __call__(self, yq, yb) -> np.ndarray:
    """The negatives of this epoch: i32[n] (see ``hard_negatives`` for yq and yb)."""
    if self.method == "exact":
      self.last = {"method": "exact"}
      return hard_negatives(yq, yb, self.rank, include_self=self.include_self, mesh=self.mesh)
    if yq.shape != yb.shape:
      raise ValueError(f"yq has shape {yq.shape} but yb has shape {yb.shape}; the database "
                       "row i must be vector i")
    n = yq.shape[0]
    width = self.width(n)
    rows = np.sort(np.random.default_rng(self.seed).choice(n, min(self.sample, n),
                                                           replace=False))
    _, truth = search.knn(yq[rows], yb, min(2 * width, n), metric="ip", mesh=self.mesh)
    truth = self._lists(np.asarray(truth), rows)
    recall, rounds = None, 0
    if self.graph is not None and self.graph.shape == (n, width):
      while rounds < self.max_rounds:
        self.graph = knn_graph.refine(yq, yb, self.graph, fan=min(32, width),
                                      fan_nn=min(16, width), mesh=self.mesh)
        rounds += 1
        recall = _recall(self._lists(np.asarray(self.graph[rows]), rows), truth, self.rank)
        if recall >= self.recall_target:
          break
    exact = recall is None or recall < self.recall_target
    if exact:
      _, self.graph = search.knn(yq, yb, width, metric="ip", mesh=self.mesh)
    lists = self._lists(np.asarray(jax.device_get(self.graph)))
    column, median_rank = _calibrated_column(lists[rows], truth, self.rank)
    self.last = {"method": "graph", "rounds": rounds, "recall": recall, "exact": exact,
                 "column": column + 1, "median_rank": median_rank}
    return lists[:, column].astype(np.int32)

  def _lists(self, ids: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
    """Neighbour lists in this miner's convention (self dropped unless include_self)."""
    if self.include_self:
      return ids
    return drop_self(ids, ids.shape[1] - 1, rows)


def _recall(approx: np.ndarray, exact: np.ndarray, k: int) -> float:
  """Fraction of each row's exact first ``k`` ids found among its approximate first ``k``."""
  return float((approx[:, :k, None] == exact[:, None, :k]).any(axis=2).mean())


def _calibrated_column(approx: np.ndarray, exact: np.ndarray, rank: int) -> tuple[int, float]:
  """The column of ``approx`` whose ids' median exact rank (1-based position in ``exact``,
  len+1 when absent) is closest to ``rank``, and that median; the lower column on ties."""
  match = approx[:, :, None] == exact[:, None, :]
  pos = np.where(match.any(axis=2), match.argmax(axis=2) + 1, exact.shape[1] + 1)
  medians = np.median(pos, axis=0)
  column = int(np.argmin(np.abs(medians - rank)))
  return column, float(medians[column])
