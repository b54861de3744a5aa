"""ctl_jax: Centroid Triplet Loss image retrieval in JAX/Flax.

The Python API: `ctl_jax.Embedder` (images -> embeddings, `ctl_jax.embedder`) and
`ctl_jax.Index` (build, update, search and save a gallery index; see
`ctl_jax.retrieval.updatable_index`). Imported on first use, so `import ctl_jax` stays light.
"""

__version__ = "0.1.0"

__all__ = ["Embedder", "Index"]

_LAZY = {"Embedder": "ctl_jax.embedder", "Index": "ctl_jax.retrieval.updatable_index"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'ctl_jax' has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
