"""`ctl_jax.Embedder`: every input form gives the model's own embedding of the image."""

import numpy as np
import pytest
from PIL import Image
from tiny_model import direct_embeddings, random_images, save_random_model

import ctl_jax
from ctl_jax.data import transforms
from ctl_jax.deploy.verify import cosine_rows
from ctl_jax.errors import CheckpointError, InvalidValueError, UnreadableImageError

H, W = 32, 16


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    model, state = save_random_model(directory, height=H, width=W)
    return directory, model, state


@pytest.fixture(scope="module")
def embedder(model_dir):
    return ctl_jax.Embedder.load(model_dir[0])


def test_uint8_batch_equals_the_model_applied_directly(model_dir, embedder):
    _, model, state = model_dir
    images = random_images(7, H, W, seed=1)
    got = embedder(images)
    want = direct_embeddings(model, state, images)
    assert got.dtype == np.float32 and got.shape == (7, 512) == (7, embedder.dim)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    assert (cosine_rows(got, np.roll(got, 1, axis=0)) < 0.99).all()  # images told apart
    # One image, and more images than a batch holds, give the same rows.
    np.testing.assert_allclose(embedder(images[3:4]), want[3:4], rtol=1e-4, atol=1e-4)
    small = ctl_jax.Embedder.load(model_dir[0], batch_size=3)
    np.testing.assert_allclose(small(images), want, rtol=1e-4, atol=1e-4)


def test_paths_pil_images_and_other_sizes(model_dir, embedder, tmp_path):
    _, model, state = model_dir
    big = random_images(3, 70, 40, seed=2)
    paths = []
    for i, image in enumerate(big):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    want = direct_embeddings(model, state, np.stack([transforms.resize(x, H, W) for x in big]))
    for images in (
        paths,  # through the evaluation input pipeline
        [str(p) for p in paths],
        [Image.fromarray(x) for x in big],
        big,  # a uint8 batch of another size is resized like a file
        [paths[0], Image.fromarray(big[1]), big[2]],
    ):
        np.testing.assert_allclose(embedder(images), want, rtol=1e-4, atol=1e-4)
    gray = Image.fromarray(big[0]).convert("L")
    np.testing.assert_allclose(
        embedder([gray]),
        embedder([np.asarray(gray.convert("RGB"))]),
        rtol=1e-5,
        atol=1e-5,
    )


def test_bad_input_is_a_one_line_error(model_dir, embedder, tmp_path):
    with pytest.raises(InvalidValueError, match=r"uint8 \(N, H, W, 3\).*float32"):
        embedder(np.zeros((2, H, W, 3), np.float32))
    with pytest.raises(InvalidValueError, match="pass a list"):
        embedder("one.jpg")
    with pytest.raises(InvalidValueError, match="no images"):
        embedder([])
    with pytest.raises(InvalidValueError, match="got int"):
        embedder([1])
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(UnreadableImageError, match="bad.jpg"):
        embedder([tmp_path / "bad.jpg"])
    with pytest.raises(UnreadableImageError, match="bad.jpg"):
        embedder([tmp_path / "bad.jpg", Image.new("RGB", (4, 4))])
    with pytest.raises(CheckpointError, match="is not a folder"):
        ctl_jax.Embedder.load(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no checkpoints"):
        ctl_jax.Embedder.load(tmp_path)


def test_load_prints_nothing_and_writes_nothing(model_dir, tmp_path):
    """A library user's load is silent: orbax's read-only mode used to log absl warnings
    ("Given directory is read only", one per option it overrides) on every load. The folder
    is made read-only as a user's shared model folder would be; running as root that does
    not stop writes, so the test also checks that nothing in the folder changed."""
    import shutil
    import subprocess
    import sys

    from tiny_model import REPO

    folder = tmp_path / "model"
    shutil.copytree(model_dir[0], folder)
    before = sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*"))
    for p in [folder, *folder.rglob("*")]:
        p.chmod(p.stat().st_mode & ~0o222)
    try:
        result = subprocess.run(
            [sys.executable, "-c", f"import ctl_jax; ctl_jax.Embedder.load({str(folder)!r})"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
    finally:
        for p in [folder, *folder.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""
    assert sorted((str(p), p.stat().st_mtime_ns) for p in folder.rglob("*")) == before


def test_small_batches_for_few_images():
    """Few images are not padded to the configured batch: the smallest power of two that
    holds them (never above the batch size)."""
    from ctl_jax.embedder import small_batch

    for batch_size in (1, 4, 6, 128):
        for n in range(1, 300):
            got = small_batch(batch_size, n)
            want = batch_size if n >= batch_size else min(batch_size, 2 ** (n - 1).bit_length())
            assert got == want and got >= min(n, batch_size), (batch_size, n)
