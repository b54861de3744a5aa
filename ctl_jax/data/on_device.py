"""The end of the training augmentation, run on the accelerator inside the jitted step.

The host pipeline (`ctl_jax.data.pipeline`) hands over uint8 images that are resized,
flipped and padded + cropped, and the erasing rectangle it drew for each image; this module
normalises them and writes the erasing fill. Why: normalising on the host costs more CPU than
decoding (a float32 multiply-add per value) and makes every batch 4x larger to move between
processes and to the device; on the device the same work is one fused elementwise pass.

All random draws stay on the host, with the slot's generator in the original's order
(`transforms.TrainAugment.geometry_into`), so the images are those of
`transforms.TrainAugment.__call__` (docs/method.md, 'Input pipeline').
"""

from __future__ import annotations

import jax.numpy as jnp

from ctl_jax.data import transforms


def finish_train_images(images, erase, valid, fill: str = "original"):
    """Normalises uint8 training images and applies their random erasing.

    Args:
      images: (B, H, W, 3) uint8, as the training pipeline yields them.
      erase: (B, 4) int32 erasing rectangles (top, left, h, w); h = w = 0 for none.
      valid: (B,) bool; invalid slots (padding, unreadable images) become zeros.
      fill: "original" or "zero" (`transforms.random_erasing`).

    Returns:
      (B, H, W, 3) float32: ``(x / 255 - mean) / std``, the fill inside each rectangle.
    """
    _, height, width, _ = images.shape
    x = images.astype(jnp.float32) * transforms.NORMALIZE_SCALE - transforms.NORMALIZE_SHIFT
    top, left, h, w = (erase[:, i, None, None] for i in range(4))
    rows = jnp.arange(height)[None, :, None]
    cols = jnp.arange(width)[None, None, :]
    inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
    value = jnp.asarray(transforms.erasing_value(fill), jnp.float32)
    x = jnp.where(inside[..., None], value, x)
    return jnp.where(valid[:, None, None, None], x, 0.0)


def train_images(batch, fill: str = "original"):
    """The float32 images of a training batch: finished here when the pipeline left them as
    uint8 with their erasing rectangles; float32 images (synthetic batches of benchmarks and
    tests) are used as they are."""
    images = batch["images"]
    if images.dtype != jnp.uint8:
        return images
    return finish_train_images(images, batch["erase"], batch["valid"], fill)
