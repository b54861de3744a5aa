"""ctl_jax: Centroid Triplet Loss image retrieval in JAX/Flax."""

__version__ = "0.1.0"
