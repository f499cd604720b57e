"""spreading-jax: learned spherical quantization ("Spreading vectors", ICLR 2019) in JAX."""
from spreading_jax.binary import sign_codes, unpack
from spreading_jax.catalyzer import Catalyzer, l2_normalize
from spreading_jax.datasets import Dataset, load_dataset
from spreading_jax.index import SpreadingIndex
from spreading_jax.lattice import ZnSphereCodec, zn_codec, zn_r2_for_bits
from spreading_jax.losses import koleo, spreading_loss, triplet_rank
from spreading_jax.quantizers import Quantizer, make_quantizer
from spreading_jax.hamming import hamming_knn
from spreading_jax.lattice_search import search_lattice
from spreading_jax.metrics import recall_at
from spreading_jax.search import knn
from spreading_jax.sharding import make_mesh
from spreading_jax.vecs_io import read_bvecs, read_fvecs, read_ivecs, write_fvecs, write_ivecs
from spreading_jax.config import TrainConfig
from spreading_jax.model import TrainResult  # train(): spreading_jax.train.train

__version__ = "0.1.0"


def __getattr__(name):
  # ``spreading_jax.fit`` (choose the unset shape, then train) imports the training stack
  # (optax, orbax) on first use only, so that inference imports stay light.
  if name == "fit":
    from spreading_jax.autoshape import fit  # pylint: disable=import-outside-toplevel
    return fit
  raise AttributeError(f"module 'spreading_jax' has no attribute {name!r}")


__all__ = [
    "Catalyzer", "Dataset", "Quantizer", "SpreadingIndex", "TrainConfig", "TrainResult",
    "ZnSphereCodec", "fit", "hamming_knn", "knn", "koleo", "l2_normalize", "load_dataset",
    "make_mesh", "make_quantizer", "read_bvecs", "read_fvecs", "read_ivecs", "recall_at",
    "search_lattice", "sign_codes", "spreading_loss", "triplet_rank", "unpack", "write_fvecs",
    "write_ivecs", "zn_codec", "zn_r2_for_bits",
]
