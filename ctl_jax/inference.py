"""Embedding images with a trained model: the jitted forward pass and the one loop that runs
it over batches sharded on a device mesh.

Used by evaluation (`ctl_jax.evaluator`, during training and by `ctl_jax.evaluate`) and by
`ctl_jax.embed` / `ctl_jax.search --images` (`ctl_jax.retrieval.images`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import jax
import numpy as np
from jax.sharding import Mesh

from ctl_jax import parallel
from ctl_jax.data.pipeline import eval_num_batches, make_eval_iterator
from ctl_jax.data.records import Split
from ctl_jax.progress import progress_bar


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
        in_shardings=(parallel.replicated(mesh), parallel.batch_sharded(mesh)),
        out_shardings=parallel.batch_sharded(mesh),
    )


def place_variables(variables, mesh: Mesh):
    """`variables` replicated on `mesh`: host arrays (identical in every process) are placed
    once, so the embedding steps do not copy them again; device arrays are left as they are
    (the train state is already replicated)."""
    if all(isinstance(x, jax.Array) for x in jax.tree.leaves(variables)):
        return variables
    return parallel.replicate(variables, mesh)


def embed_batches(
    embed_fn: Callable, variables, batches: Iterable[dict], num_images: int, mesh: Mesh
) -> tuple[np.ndarray, np.ndarray]:
    """BNNeck embeddings of the images an evaluation iterator yields, placed by position.

    Args:
      embed_fn: `make_embed_fn(model, mesh)`.
      variables: {"params", "batch_stats"}, replicated on `mesh` or on the host (see
        `place_variables`).
      batches: this process's rows of each global batch (`make_eval_iterator`): dicts of
        images (b, H, W, 3) float32, index (b,) int64 position (-1 for padding) and
        valid (b,) bool (False for padding and unreadable images).
      num_images: N, the number of positions.
      mesh: the mesh `embed_fn` shards over.

    Returns:
      embeddings (N, D) float32, not normalised, zero where not valid; valid (N,) bool.
      Every process gets all N rows.
    """
    variables = place_variables(variables, mesh)
    embeddings, valid = None, np.zeros(num_images, bool)
    for batch in batches:
        local = {key: batch[key] for key in ("images", "index", "valid")}
        placed = parallel.put_batch(local, mesh)
        bn_features, _ = embed_fn(variables, placed["images"])
        emb, index, ok = parallel.to_host((bn_features, placed["index"], placed["valid"]))
        keep = index >= 0  # padding of the last batch
        if embeddings is None:
            embeddings = np.zeros((num_images, emb.shape[-1]), np.float32)
        embeddings[index[keep]] = np.where(ok[keep, None], emb[keep], 0.0)
        valid[index[keep]] = ok[keep]
    if embeddings is None:
        raise ValueError(f"split with {num_images} images produced no batches")
    return embeddings, valid


def embed_split(
    embed_fn: Callable,
    variables,
    split: Split,
    reader,
    height: int,
    width: int,
    batch_size: int,
    mesh: Mesh,
    *,
    skip_unreadable: bool = False,
    description: str = "embedding",
    progress: bool = True,
    leave: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """BNNeck embeddings of every image of a split, in split order, with the test-time
    preprocessing (`make_eval_iterator`).

    Args:
      embed_fn, variables, mesh: as for `embed_batches`.
      split, reader: the images and the reader of their bytes.
      height, width: the model's input size.
      batch_size: images per global batch, rounded up to a multiple of the device count.
      skip_unreadable: an unreadable image gets a zero row and valid False (with a warning)
        instead of raising `UnreadableImageError`.
      description, progress, leave: the progress bar (process 0 only).

    Returns:
      embeddings (len(split), D) float32, not normalised; valid (len(split),) bool.
    """
    num_devices = mesh.devices.size
    # The batch must split evenly over devices; round the requested size up.
    batch_size = -(-max(1, int(batch_size)) // num_devices) * num_devices
    iterator = make_eval_iterator(
        split,
        reader,
        height,
        width,
        batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        skip_unreadable=skip_unreadable,
    )
    show = progress and jax.process_index() == 0
    bar = progress_bar(
        iterator,
        total=eval_num_batches(len(split), batch_size),
        desc=description,
        unit="batch",
        enabled=show,
        leave=leave,
    )
    return embed_batches(embed_fn, variables, bar, len(split), mesh)
