"""Embedding images with a trained model: the jitted forward pass and the loop over a split.

Used by evaluation during training, `ctl_jax.evaluate` and `ctl_jax.embed`.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh
from tqdm.auto import tqdm

from ctl_jax.data.pipeline import make_eval_iterator
from ctl_jax.data.records import Split
from ctl_jax.training import sharding


def make_embed_fn(model, mesh: Mesh, flip: bool = False) -> Callable:
    """Jitted `embed(variables, images) -> (bn_features, features)`, batch sharded on `mesh`.

    Args:
      model: the `ReidModel`.
      mesh: the device mesh.
      flip: flip test: each output is the mean of the un-normalised outputs for the image
        and its horizontal mirror (two forward passes in the one compiled function).

    Args (of the returned function):
      variables: {"params", "batch_stats"}, replicated.
      images: (B, H, W, 3) float32 normalised images, sharded along B.

    Returns:
      bn_features (B, D) float32 (the retrieval embedding, not normalised) and the pooled
      features (B, D) float32.
    """

    def embed(variables, images):
        out = model.apply(variables, images, train=False)
        if flip:
            mirrored = model.apply(variables, images[:, :, ::-1, :], train=False)
            return tuple((out[key] + mirrored[key]) * 0.5 for key in ("bn_features", "features"))
        return out["bn_features"], out["features"]

    return jax.jit(
        embed,
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharded(mesh)),
        out_shardings=sharding.batch_sharded(mesh),
    )


def embed_split(
    embed_fn: Callable,
    variables,
    split: Split,
    reader,
    data_cfg,
    mesh: Mesh,
    description: str = "embedding",
    progress: bool = True,
) -> np.ndarray:
    """BNNeck embeddings of every image of a split, in split order.

    Returns:
      (len(split), D) float32 array (not normalised).
    """
    num_devices = mesh.devices.size
    # The eval batch must split evenly over devices; round the configured size up.
    batch_size = -(-int(data_cfg.eval_batch_size) // num_devices) * num_devices
    iterator = make_eval_iterator(
        split,
        reader,
        data_cfg.height,
        data_cfg.width,
        batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    result = None
    total = -(-len(split) // batch_size)
    show = progress and jax.process_index() == 0
    bar = tqdm(iterator, total=total, desc=description, disable=not show, leave=False)
    for batch in bar:
        local = {"images": batch["images"], "index": batch["index"]}
        placed = sharding.put_batch(local, mesh)
        bn_features, _ = embed_fn(variables, placed["images"])
        emb, index = sharding.to_host((bn_features, placed["index"]))
        keep = index >= 0
        if result is None:
            result = np.zeros((len(split), emb.shape[-1]), np.float32)
        result[index[keep]] = emb[keep]
    if result is None:
        raise ValueError(f"split with {len(split)} images produced no batches")
    return result
