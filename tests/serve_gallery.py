"""The small world the service tests run in: a random ResNet-18 at 32x16, a folder per
identity of noise images, their instance index, and images kept out of it for updates."""

import numpy as np
from PIL import Image
from tiny_model import random_images, save_random_model

import ctl_jax
from ctl_jax.retrieval.images import embed_images

H, W = 32, 16
LABELS = ("alice", "bob", "carol", "dave")


def build_gallery(root):
    """{"model", "index", "root" (gallery folder), "paths", "embedder", "embeddings",
    "extra" (2 PNG paths of images outside the gallery)}."""
    model_dir = root / "model"
    save_random_model(model_dir, height=H, width=W)
    images = random_images(len(LABELS) * 2 + 2, 64, 32, seed=5)
    paths = []
    for i, image in enumerate(images[: len(LABELS) * 2]):
        path = root / "gallery" / LABELS[i // 2] / f"{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        paths.append(str(path.resolve()))
    extra = []
    for i, image in enumerate(images[len(LABELS) * 2 :]):
        path = root / "extra" / f"new{i}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
        extra.append(str(path.resolve()))
    embedder = ctl_jax.Embedder.load(model_dir)
    embeddings, _ = embed_images(embedder, root / "gallery", progress=False, identity="folder")
    index_path = root / "index.npz"
    ctl_jax.Index.build(embeddings, kind="instance").save(index_path)
    return {
        "model": model_dir,
        "index": index_path,
        "root": str((root / "gallery").resolve()),
        "paths": paths,
        "extra": extra,
        "embedder": embedder,
        "embeddings": embeddings,
    }


def png_bytes(image: np.ndarray) -> bytes:
    import io

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="png")
    return out.getvalue()
