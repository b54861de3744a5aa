"""Image transforms of the original training and test pipelines, in numpy.

Images are HWC: uint8 RGB in, float32 out. Every random transform takes an explicit
``np.random.Generator`` and is otherwise pure, so the grain pipeline can derive one generator
per (seed, epoch, slot) and a test can replay it.

The training chain is that of reid-strong-baseline / centroids-reid
(``Resize -> RandomHorizontalFlip -> Pad(10) -> RandomCrop -> ToTensor -> Normalize ->
RandomErasing``); the evaluation chain is ``Resize -> ToTensor -> Normalize``. Random draws per
image, in this order: flip (``random() < p``), crop top and left (each uniform in
``[0, 2 * pad]``), erasing (``random() < p``, then per attempt area fraction, aspect ratio,
top, left). Python's ``round`` (half to even) is used for the erased rectangle, as there.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from PIL import Image

from ctl_jax.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# normalise(x) = (x / 255 - mean) / std = x * NORMALIZE_SCALE - NORMALIZE_SHIFT: one
# multiply-add (also what the exported models compute, ctl_jax.deploy).
NORMALIZE_SCALE = (1.0 / (255.0 * np.asarray(IMAGENET_STD))).astype(np.float32)
NORMALIZE_SHIFT = (np.asarray(IMAGENET_MEAN) / np.asarray(IMAGENET_STD)).astype(np.float32)

ERASING_FILLS = ("original", "zero")


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize to (height, width) with PIL, as torchvision ``T.Resize((h, w))``.

    Args:
      image: (H, W, 3) uint8.

    Returns:
      (height, width, 3) uint8; the input itself when it already has that size.
    """
    if image.shape[:2] == (height, width):
        return image
    resized = Image.fromarray(image).resize((width, height), Image.BILINEAR)
    return np.asarray(resized)


def resize_pil(image: Image.Image, height: int, width: int) -> np.ndarray:
    """`resize` for a decoded PIL image, avoiding a round trip through numpy."""
    return np.asarray(resize_pil_image(image, height, width))


def resize_pil_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """`resize_pil` that stays a PIL image (the input itself when it has the size)."""
    if image.size != (width, height):
        image = image.resize((width, height), Image.BILINEAR)
    return image


def random_horizontal_flip(
    image: np.ndarray, rng: np.random.Generator, prob: float = 0.5
) -> np.ndarray:
    """Mirrors the image left-right with probability ``prob``. (H, W, C) -> (H, W, C)."""
    if rng.random() < prob:
        return image[:, ::-1]
    return image


def pad_and_random_crop(image: np.ndarray, rng: np.random.Generator, pad: int = 10) -> np.ndarray:
    """Zero-pads ``pad`` pixels on every side, then crops a random window of the input size.

    Same as ``T.Pad(pad)`` (constant 0, before normalisation, so black) followed by
    ``T.RandomCrop((H, W))``, without building the padded image.

    Args:
      image: (H, W, C) array.

    Returns:
      (H, W, C) array of the same dtype.
    """
    if pad == 0:
        return image
    height, width = image.shape[:2]
    top = int(rng.integers(0, 2 * pad + 1))
    left = int(rng.integers(0, 2 * pad + 1))
    # Output pixel (i, j) is input pixel (i + top - pad, j + left - pad) when inside.
    dy, dx = top - pad, left - pad
    out = np.zeros_like(image)
    if abs(dy) < height and abs(dx) < width:  # else the window holds padding only
        out[max(0, -dy) : height - max(0, dy), max(0, -dx) : width - max(0, dx)] = image[
            max(0, dy) : height + min(0, dy), max(0, dx) : width + min(0, dx)
        ]
    return out


def normalize(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 ``(x / 255 - mean) / std`` with ImageNet mean and std."""
    return image.astype(np.float32) * NORMALIZE_SCALE - NORMALIZE_SHIFT


def random_erasing(
    image: np.ndarray,
    rng: np.random.Generator,
    prob: float = 0.5,
    area_range: tuple[float, float] = (0.02, 0.4),
    min_aspect: float = 0.3,
    max_attempts: int = 100,
    fill: str = "original",
) -> np.ndarray:
    """Random erasing (Zhong et al.) exactly as reid-strong-baseline applies it.

    With probability ``prob``, up to ``max_attempts`` times: draw an area fraction uniform in
    ``area_range`` and an aspect ratio uniform in ``[min_aspect, 1 / min_aspect]``; the
    rectangle is ``h = round(sqrt(a * r))``, ``w = round(sqrt(a / r))``; the first one with
    ``h < H`` and ``w < W`` is placed uniformly and filled.

    Fill: the original runs erasing AFTER normalisation and fills with the constants
    (0.485, 0.456, 0.406), i.e. the ImageNet mean written into already-normalised space (a
    light grey-ish value, not the mean pixel). ``fill="original"`` reproduces that;
    ``fill="zero"`` fills with 0, which is the mean pixel in normalised space.

    Args:
      image: (H, W, 3) float32, normalised.

    Returns:
      (H, W, 3) float32; a new array when erased, the input otherwise.
    """
    if fill not in ERASING_FILLS:
        raise ConfigError(f"erasing fill must be one of {ERASING_FILLS}, got {fill!r}")
    top, left, h, w = erasing_box(
        rng, image.shape[0], image.shape[1], prob, area_range, min_aspect, max_attempts
    )
    if h == 0:
        return image
    out = image.copy()
    out[top : top + h, left : left + w] = erasing_value(fill)
    return out


def erasing_value(fill: str) -> tuple[float, float, float]:
    """The (3,) value random erasing writes, in normalised space (see `random_erasing`)."""
    return IMAGENET_MEAN if fill == "original" else (0.0, 0.0, 0.0)


def erasing_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    prob: float = 0.5,
    area_range: tuple[float, float] = (0.02, 0.4),
    min_aspect: float = 0.3,
    max_attempts: int = 100,
) -> tuple[int, int, int, int]:
    """The random draws of `random_erasing` for an (height, width) image, without the image.

    Returns:
      (top, left, h, w) of the rectangle to erase; (0, 0, 0, 0) when nothing is erased (the
      probability draw failed, or no attempt fitted).
    """
    if rng.random() >= prob:
        return 0, 0, 0, 0
    area = height * width
    for _ in range(max_attempts):
        target_area = rng.uniform(*area_range) * area
        aspect = rng.uniform(min_aspect, 1.0 / min_aspect)
        h = int(round(math.sqrt(target_area * aspect)))
        w = int(round(math.sqrt(target_area / aspect)))
        if w < width and h < height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    return 0, 0, 0, 0


@dataclasses.dataclass(frozen=True)
class TrainAugment:
    """Training augmentation of an image already resized to the model input size.

    ``__call__(image, rng)``: (H, W, 3) uint8 -> (H, W, 3) float32 normalised.
    """

    flip_prob: float = 0.5
    pad: int = 10
    erasing_prob: float = 0.5
    erasing_fill: str = "original"

    def __post_init__(self):
        if self.erasing_fill not in ERASING_FILLS:
            raise ConfigError(
                f"erasing_fill must be one of {ERASING_FILLS}, got {self.erasing_fill!r}"
            )

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        # Geometry on uint8 (4x less memory traffic than float), as the original does it on
        # the PIL image before ToTensor.
        image = random_horizontal_flip(image, rng, self.flip_prob)
        image = pad_and_random_crop(image, rng, self.pad)
        image = normalize(image)
        return random_erasing(image, rng, self.erasing_prob, fill=self.erasing_fill)

    def geometry_into(
        self, image: np.ndarray, rng: np.random.Generator, out: np.ndarray
    ) -> tuple[int, int, int, int]:
        """The host half of `__call__`: flip and pad + crop written into ``out`` (uint8), and
        the erasing rectangle drawn but not applied; normalising and erasing are left to
        `ctl_jax.data.on_device.finish_train_images`. Same draws in the same order as
        `__call__`, so both give the same image for the same generator.

        Args:
          image: (H, W, 3) uint8, already resized; or an RGB PIL image of that size, which
            is mirrored by PIL: copying a mirrored numpy view of 3-byte pixels costs ~100 us
            at 256 x 128, PIL's mirror and the conversion ~35 us.
          rng: the slot's generator.
          out: (H, W, 3) uint8, zero-filled (its zeros are the padding).

        Returns:
          The erasing rectangle (top, left, h, w); h = w = 0 for none.
        """
        flip = rng.random() < self.flip_prob
        if isinstance(image, Image.Image):
            if flip:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            image = np.asarray(image)
        elif flip:
            image = image[:, ::-1]  # a view: the copy below is the only one
        height, width = image.shape[:2]
        dy = dx = 0
        if self.pad:
            dy = int(rng.integers(0, 2 * self.pad + 1)) - self.pad
            dx = int(rng.integers(0, 2 * self.pad + 1)) - self.pad
        # Output pixel (i, j) is input pixel (i + dy, j + dx) when inside (`pad_and_random_crop`).
        if abs(dy) < height and abs(dx) < width:
            out[max(0, -dy) : height - max(0, dy), max(0, -dx) : width - max(0, dx)] = image[
                max(0, dy) : height + min(0, dy), max(0, dx) : width + min(0, dx)
            ]
        return erasing_box(rng, height, width, self.erasing_prob)


def train_transform(
    image: np.ndarray, rng: np.random.Generator, height: int, width: int, **augment_options
) -> np.ndarray:
    """Full training transform: resize + `TrainAugment`. (h, w, 3) uint8 -> (H, W, 3) f32."""
    return TrainAugment(**augment_options)(resize(image, height, width), rng)


def eval_transform(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Evaluation transform: resize + normalise. (h, w, 3) uint8 -> (H, W, 3) float32."""
    return normalize(resize(image, height, width))
