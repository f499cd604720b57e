"""spreading-jax: learned spherical quantization ("Spreading vectors", ICLR 2019) in JAX."""
__version__ = "0.1.0"
