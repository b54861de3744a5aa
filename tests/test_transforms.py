"""Numpy transforms against the torchvision / reid-strong-baseline behaviour they copy."""

import numpy as np
import pytest
from PIL import Image

from ctl_jax.data import transforms
from ctl_jax.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    TrainAugment,
    eval_transform,
    normalize,
    pad_and_random_crop,
    random_erasing,
    random_horizontal_flip,
    resize,
)


def _image(h=24, w=12, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_resize_is_pil_bilinear():
    image = _image(40, 20)
    expected = np.asarray(Image.fromarray(image).resize((8, 16), Image.BILINEAR))
    out = resize(image, 16, 8)
    assert out.shape == (16, 8, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)
    assert resize(image, 40, 20) is image


def test_flip_exact():
    image = _image()
    flips = 0
    for seed in range(40):
        out = random_horizontal_flip(image, np.random.default_rng(seed), 0.5)
        if np.array_equal(out, image[:, ::-1]):
            flips += 1
        else:
            np.testing.assert_array_equal(out, image)
    assert 5 < flips < 35
    np.testing.assert_array_equal(
        random_horizontal_flip(image, np.random.default_rng(0), 1.0), image[:, ::-1]
    )
    assert random_horizontal_flip(image, np.random.default_rng(0), 0.0) is image


def test_pad_and_crop_matches_padded_reference():
    image = _image(24, 12)
    pad = 10
    offsets = set()
    for seed in range(200):
        out = pad_and_random_crop(image, np.random.default_rng(seed), pad)
        rng = np.random.default_rng(seed)
        top, left = int(rng.integers(0, 2 * pad + 1)), int(rng.integers(0, 2 * pad + 1))
        offsets.add((top, left))
        padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))  # T.Pad(10): constant 0
        np.testing.assert_array_equal(out, padded[top : top + 24, left : left + 12])
    tops, lefts = zip(*offsets)
    assert min(tops) == 0 and max(tops) == 2 * pad  # both ends of the range are reached
    assert min(lefts) == 0 and max(lefts) == 2 * pad


def test_normalize_values():
    image = np.array([[[0, 128, 255]]], np.uint8)
    out = normalize(image)
    assert out.dtype == np.float32
    expected = (np.array([0, 128, 255]) / 255.0 - np.array(IMAGENET_MEAN)) / IMAGENET_STD
    np.testing.assert_allclose(out[0, 0], expected, rtol=1e-6, atol=1e-6)


def _erased_box(before, after):
    changed = np.any(before != after, axis=-1)
    if not changed.any():
        return None
    rows, cols = np.nonzero(changed)
    return rows.min(), rows.max() + 1, cols.min(), cols.max() + 1


@pytest.mark.parametrize("fill", ["original", "zero"])
def test_random_erasing_statistics(fill):
    height, width = 64, 32
    # A normalised image no value of which equals a fill value.
    base = np.full((height, width, 3), 7.0, np.float32)
    erased = 0
    trials = 600
    for seed in range(trials):
        out = random_erasing(base, np.random.default_rng(seed), 0.5, fill=fill)
        box = _erased_box(base, out)
        if box is None:
            assert out is base
            continue
        erased += 1
        r0, r1, c0, c1 = box
        h, w = r1 - r0, c1 - c0
        assert h < height and w < width
        # Rounding h and w moves the area a little outside [0.02, 0.4] for small images.
        assert 0.015 <= h * w / (height * width) <= 0.43
        assert 0.3 / 1.5 <= h / w <= 1.5 / 0.3
        fill_value = IMAGENET_MEAN if fill == "original" else (0.0, 0.0, 0.0)
        np.testing.assert_allclose(out[r0:r1, c0:c1], np.broadcast_to(fill_value, (h, w, 3)))
        outside = np.ones((height, width), bool)
        outside[r0:r1, c0:c1] = False
        assert (out[outside] == 7.0).all()
    assert abs(erased / trials - 0.5) < 0.08


def test_random_erasing_replays_reference_draws():
    # Same draw order as reid-strong-baseline's RandomErasing.
    import math

    base = np.zeros((32, 16, 3), np.float32)
    for seed in range(20):
        out = random_erasing(base, np.random.default_rng(seed), 1.0)
        rng = np.random.default_rng(seed)
        assert rng.random() < 1.0
        for _ in range(100):
            target = rng.uniform(0.02, 0.4) * 32 * 16
            aspect = rng.uniform(0.3, 1 / 0.3)
            h = int(round(math.sqrt(target * aspect)))
            w = int(round(math.sqrt(target / aspect)))
            if w < 16 and h < 32:
                x1, y1 = int(rng.integers(0, 32 - h + 1)), int(rng.integers(0, 16 - w + 1))
                break
        expected = base.copy()
        expected[x1 : x1 + h, y1 : y1 + w] = IMAGENET_MEAN
        np.testing.assert_array_equal(out, expected)


def test_bad_fill_rejected():
    with pytest.raises(ValueError, match="fill"):
        TrainAugment(erasing_fill="mean")


def test_train_augment_composition():
    image = _image(16, 8)
    augment = TrainAugment()
    for seed in range(10):
        out = augment(image, np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        expected = random_horizontal_flip(image, rng, 0.5)
        expected = pad_and_random_crop(expected, rng, 10)
        expected = random_erasing(normalize(expected), rng, 0.5, fill="original")
        assert out.shape == (16, 8, 3) and out.dtype == np.float32
        np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(
        transforms.train_transform(_image(32, 16), np.random.default_rng(3), 16, 8),
        augment(resize(_image(32, 16), 16, 8), np.random.default_rng(3)),
    )


def test_eval_transform():
    image = _image(40, 20)
    out = eval_transform(image, 16, 8)
    assert out.shape == (16, 8, 3) and out.dtype == np.float32
    np.testing.assert_array_equal(out, normalize(resize(image, 16, 8)))


def test_host_geometry_of_a_pil_image_is_that_of_its_array():
    """The pipeline hands PIL images to `geometry_into` (mirrored by PIL): same pixels and
    erasing draws as for the numpy array, flipped or not."""
    augment = TrainAugment(pad=4, erasing_prob=0.7)
    flips = 0
    for seed in range(16):
        image = _image(16, 8, seed)
        from_array, from_pil = np.zeros_like(image), np.zeros_like(image)
        box = augment.geometry_into(image, np.random.default_rng(seed), from_array)
        pil_box = augment.geometry_into(
            Image.fromarray(image), np.random.default_rng(seed), from_pil
        )
        np.testing.assert_array_equal(from_pil, from_array)
        assert pil_box == box
        flips += np.random.default_rng(seed).random() < augment.flip_prob
    assert 3 <= flips <= 13


@pytest.mark.parametrize("fill", ["original", "zero"])
@pytest.mark.parametrize("pad", [0, 3, 10])
def test_host_geometry_then_device_finish_is_the_float_chain(fill, pad):
    """The pipeline's split of the augmentation (uint8 geometry and erasing draws on the
    host, normalising and erasing on the device) gives the float chain's images."""
    from ctl_jax.data import on_device

    images = np.stack([_image(16, 8, seed) for seed in range(24)])
    augment = TrainAugment(pad=pad, erasing_prob=0.7, erasing_fill=fill)
    host = np.zeros_like(images)
    erase = np.zeros((len(images), 4), np.int32)
    for i, image in enumerate(images):
        erase[i] = augment.geometry_into(image, np.random.default_rng(i), host[i])
    valid = np.arange(len(images)) != 5
    out = np.asarray(on_device.finish_train_images(host, erase, valid, fill))
    assert out.shape == images.shape and out.dtype == np.float32
    erased = 0
    for i, image in enumerate(images):
        expected = augment(image, np.random.default_rng(i)) if valid[i] else 0.0
        erased += bool(erase[i, 2])
        np.testing.assert_allclose(out[i], np.broadcast_to(expected, out[i].shape), atol=2e-6)
    assert 5 <= erased <= 22
