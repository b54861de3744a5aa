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


def test_prepare_command_then_train_from_the_build(tmp_path, capsys):
    """`python -m ctl_jax.data.prepare` output is what `data.source=tfds` trains from."""
    from ctl_jax.checkpoints import CheckpointStore
    from ctl_jax.configs import load_config
    from ctl_jax.data import prepare
    from ctl_jax.data.source import load_dataset
    from ctl_jax.training.loop import train_and_evaluate

    folder = tmp_path / "synthetic"
    synthetic.generate(
        folder, seed=6, num_train_ids=6, num_test_ids=3, num_distractors=1, num_background=2,
        num_junk=1, num_cameras=3, height=32, width=16, workers=1,
    )  # fmt: skip
    assert prepare.main(["--name=synthetic", "--manual_dir", str(tmp_path / "nope"),
                         "--data_dir", str(tmp_path / "tfds")]) == 2  # fmt: skip
    assert "is not a folder" in capsys.readouterr().err
    args = ["--name=synthetic", f"--manual_dir={folder}", f"--data_dir={tmp_path / 'tfds'}"]
    assert prepare.main(args) == 0
    assert "prepared synthetic" in capsys.readouterr().out

    config = load_config("configs/default.py")
    config.data.source, config.data.tfds_data_dir = "tfds", str(tmp_path / "tfds")
    config.data.height, config.data.width, config.data.num_identities = 32, 16, 4
    config.solver.num_epochs, config.eval.modes = 1, ("instance",)
    dataset, _ = load_dataset(config.data)
    assert dataset.num_classes == 6
    results = train_and_evaluate(config, tmp_path / "run", log=lambda *_: None)
    assert 0.0 <= results["instance"]["mAP"] <= 1.0
    assert CheckpointStore(tmp_path / "run", read_only=True).latest_step() > 0
