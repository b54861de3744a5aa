"""tfds array_record builders: build the tiny synthetic set, read it back without TF."""

import io
import pickle

import numpy as np
import pytest
from PIL import Image

from ctl_jax.data import synthetic
from ctl_jax.data.readers import DatasetError, read_market_style
from ctl_jax.data.tfds_builders import load_tfds, prepare_tfds


def test_build_and_read_back(tmp_path):
    folder = tmp_path / "synthetic"
    synthetic.generate(
        folder, seed=5, num_train_ids=6, num_test_ids=4, num_distractors=1, num_background=2,
        num_junk=1, num_cameras=3, height=32, width=16, workers=1,
    )  # fmt: skip
    with pytest.raises(DatasetError, match="not prepared"):
        load_tfds("synthetic", tmp_path / "tfds")
    builder = prepare_tfds("synthetic", manual_dir=folder, data_dir=tmp_path / "tfds")
    assert builder.info.splits["query"].num_examples > 0

    dataset, readers = load_tfds("synthetic", tmp_path / "tfds")
    expected = read_market_style(folder, "synthetic")
    for split in ("train", "query", "gallery"):
        got, want = getattr(dataset, split), getattr(expected, split)
        np.testing.assert_array_equal(got.paths, want.paths)
        np.testing.assert_array_equal(got.pids, want.pids)
        np.testing.assert_array_equal(got.camids, want.camids)
        assert len(readers[split]) == len(want)
    # Bytes are the original file, and the reader survives pickling (worker processes).
    reader = pickle.loads(pickle.dumps(readers["gallery"]))
    index = len(expected.gallery) - 1
    data = reader.read(index)
    with open(expected.gallery.paths[index], "rb") as f:
        assert data == f.read()
    decoded = np.asarray(Image.open(io.BytesIO(data)))
    np.testing.assert_array_equal(decoded, np.asarray(Image.open(expected.gallery.paths[index])))
    assert decoded.shape == (32, 16, 3)
    with pytest.raises(DatasetError, match="No tfds builder"):
        prepare_tfds("imagenet", folder, tmp_path / "tfds")
