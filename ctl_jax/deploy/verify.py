"""Running an exported model (ONNX with onnxruntime, StableHLO with JAX) and comparing it
with ctl_jax's own embeddings: `python -m ctl_jax.export --verify`, the tests and
`benchmarks/export.py` share it."""

from __future__ import annotations

import os

import numpy as np

from ctl_jax.errors import OptionalDependencyError


def onnx_session(path: str | os.PathLike, threads: int = 0):
    """An onnxruntime CPU `InferenceSession` of `path` (`threads` 0: onnxruntime's choice)."""
    try:
        import onnxruntime
    except ImportError as e:
        raise OptionalDependencyError(
            "onnxruntime is not installed; pip install -e '.[export]' (or onnxruntime)"
        ) from e
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_exported(path: str | os.PathLike, fmt: str, images: np.ndarray) -> np.ndarray:
    """Embeddings (N, D) float32 of uint8 (N, H, W, 3) `images` by the export at `path`."""
    if fmt == "onnx":
        return onnx_session(path).run(["embeddings"], {"images": images})[0]
    import jax

    with open(path, "rb") as f:
        exported = jax.export.deserialize(bytearray(f.read()))
    return np.asarray(exported.call(images))


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) cosine similarity of each row of (N, D) `a` with the same row of `b`."""
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return np.sum(a * b, axis=1)


def verify_export(path, fmt: str, embedder, num_images: int = 3, seed: int = 0) -> float:
    """Lowest cosine similarity between the export's and `embedder`'s embeddings of
    `num_images` random uint8 images at the model's input size."""
    height, width = embedder.input_size
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_images, height, width, 3), dtype=np.uint8)
    return float(cosine_rows(run_exported(path, fmt, images), embedder(images)).min())
