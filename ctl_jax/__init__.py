"""ctl_jax: Centroid Triplet Loss image retrieval in JAX/Flax.

The Python API: `ctl_jax.Embedder` (images -> embeddings, `ctl_jax.embedder`). It is
imported on first use, so `import ctl_jax` does not load JAX.
"""

__version__ = "0.1.0"

__all__ = ["Embedder"]


def __getattr__(name):
    if name == "Embedder":
        from ctl_jax.embedder import Embedder

        return Embedder
    raise AttributeError(f"module 'ctl_jax' has no attribute {name!r}")
