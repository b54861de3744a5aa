"""Dataset readers on tiny fake trees: parsing rules, relabelling and bad input."""

import json

import numpy as np
import pytest
from PIL import Image

from ctl_jax.data.catalog import open_dataset
from ctl_jax.data.readers import (
    DatasetError,
    parse_market_name,
    read_coco_fashion,
    read_folder_per_identity,
    read_market_style,
)


def _touch(path, size=(8, 16)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (100, 50, 25)).save(path)


def _market_tree(base, extra_train=()):
    names = {
        "bounding_box_train": [
            "0007_c1s1_000001_00.jpg",
            "0007_c2s1_000002_00.jpg",
            "0003_c1s1_000003_00.png",
            "0010_c6s1_000004_00.jpeg",
            "-1_c3s1_000005_00.jpg",
            *extra_train,
        ],
        "query": ["0005_c1s1_000006_00.jpg", "0008_c2s1_000007_00.jpg"],
        "bounding_box_test": [
            "0005_c2s1_000008_00.jpg",
            "0008_c1s1_000009_00.jpg",
            "0000_c3s1_000010_00.jpg",
            "-1_c4s1_000011_00.jpg",
        ],
    }
    for folder, files in names.items():
        for name in files:
            _touch(base / folder / name)
    (base / "query" / "readme.txt").write_text("not an image, ignored")


def test_parse_market_name():
    assert parse_market_name("/a/b/0002_c1s1_000451_00.jpg") == (2, 0)
    assert parse_market_name("-1_c3s1_000451_00.jpg") == (-1, 2)
    assert parse_market_name("cat.jpg") is None


def test_market_rules(tmp_path):
    _market_tree(tmp_path / "market1501")
    ds = read_market_style(tmp_path, "market1501")
    # Junk dropped, train relabelled in sorted raw-pid order, cameras 0-based.
    assert len(ds.train) == 4 and ds.num_classes == 3
    by_name = {p.rsplit("/", 1)[1]: (pid, cam) for p, pid, cam in zip(*vars(ds.train).values())}
    assert by_name["0003_c1s1_000003_00.png"] == (0, 0)
    assert by_name["0007_c2s1_000002_00.jpg"] == (1, 1)
    assert by_name["0010_c6s1_000004_00.jpeg"] == (2, 5)
    # Query/gallery keep raw pids; pid 0 stays in the gallery; junk gone.
    assert ds.query.pids.tolist() == [5, 8]
    assert sorted(ds.gallery.pids.tolist()) == [0, 5, 8]
    assert -1 not in ds.gallery.pids
    assert all(p.startswith("/") for p in ds.gallery.paths)
    assert list(ds.train.paths) == sorted(ds.train.paths)
    assert "query    |     2 |        2 |         2" in ds.statistics_table()


def test_duke_and_synthetic_paths(tmp_path):
    _market_tree(tmp_path / "DukeMTMC-reID")
    assert len(open_dataset("dukemtmc", tmp_path).query) == 2
    assert len(open_dataset("synthetic", tmp_path / "DukeMTMC-reID").query) == 2
    # A root that itself has the split folders is accepted too.
    assert len(open_dataset("market1501", tmp_path / "DukeMTMC-reID").train) == 4


def test_market_bad_input(tmp_path):
    with pytest.raises(DatasetError, match="market1501"):
        read_market_style(tmp_path, "market1501")
    _market_tree(tmp_path / "market1501", extra_train=["holiday.jpg"])
    with pytest.raises(DatasetError, match="holiday.jpg"):
        read_market_style(tmp_path, "market1501")
    ds = read_market_style(tmp_path, "market1501", skip_unparsable=True)
    assert len(ds.train) == 4
    (tmp_path / "market1501" / "bounding_box_train" / "holiday.jpg").unlink()
    for p in (tmp_path / "market1501" / "query").glob("*.jpg"):
        p.unlink()
    with pytest.raises(DatasetError, match="query"):
        read_market_style(tmp_path, "market1501")
    with pytest.raises(DatasetError, match="Unknown dataset"):
        open_dataset("imagenet", tmp_path)


def _coco(tmp_path, split, pairs):
    """pairs: list of pair ids, one image+annotation each."""
    images, anns = [], []
    for i, pair in enumerate(pairs):
        name = f"{split}_{i}.jpg"
        _touch(tmp_path / split / name)
        images.append({"id": 100 + i, "file_name": name})
        anns.append({"image_id": 100 + i, "pair_id": pair, "source": "user"})
    path = tmp_path / f"{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return path


def test_coco_fashion(tmp_path):
    paths = {
        "train": _coco(tmp_path, "train", [40, 40, 7, 12, 12, 12]),
        "query": _coco(tmp_path, "query", [3, 9]),
        "gallery": _coco(tmp_path, "gallery", [9, 3, 3]),
    }
    ds = read_coco_fashion(tmp_path, paths, name="street2shop")
    # Pair 7 has one image and is removed; 12 -> 0, 40 -> 1.
    assert ds.train.pids.tolist() == [0, 0, 0, 1, 1]
    assert ds.num_classes == 2
    assert set(ds.train.camids) == {0} and set(ds.query.camids) == {0}
    assert set(ds.gallery.camids) == {1}
    assert ds.query.pids.tolist() == [3, 9]
    assert ds.gallery.pids.tolist() == [3, 3, 9]
    assert ds.gallery.paths[2].endswith("gallery/gallery_0.jpg")
    # Defaults: <root>/{split}.json, or the train file with "train" replaced.
    assert len(open_dataset("deepfashion", tmp_path).train) == 5
    assert len(read_coco_fashion(tmp_path, str(paths["train"])).gallery) == 3


def test_coco_bad_input(tmp_path):
    paths = {s: _coco(tmp_path, s, [1, 1]) for s in ("train", "query", "gallery")}
    paths["query"].write_text("{not json")
    with pytest.raises(DatasetError, match="query.json"):
        read_coco_fashion(tmp_path, paths)
    paths["query"].write_text(json.dumps({"images": []}))
    with pytest.raises(DatasetError, match="annotations"):
        read_coco_fashion(tmp_path, paths)
    paths["query"].write_text(json.dumps({"images": [{"id": 1}], "annotations": []}))
    with pytest.raises(DatasetError, match="file_name"):
        read_coco_fashion(tmp_path, paths)
    _coco(tmp_path, "query", [1, 1])
    (tmp_path / "gallery" / "gallery_1.jpg").unlink()
    with pytest.raises(DatasetError, match="gallery_1.jpg"):
        read_coco_fashion(tmp_path, paths)
    with pytest.raises(DatasetError, match="not found"):
        read_coco_fashion(tmp_path, {**paths, "train": tmp_path / "nope.json"})
    # Fields of the wrong JSON type: one line naming the field, not a TypeError.
    for image, field in (
        ({"id": 1, "file_name": 5}, "file_name"),
        ({"id": [1], "file_name": "a.jpg"}, "id"),
    ):
        paths["query"].write_text(json.dumps({"images": [image], "annotations": []}))
        with pytest.raises(DatasetError, match=rf"images\[0\]\.{field} must be"):
            read_coco_fashion(tmp_path, paths)


def test_fashion_config_without_annotation_names_says_which_keys(tmp_path):
    from ctl_jax.configs import load_config
    from ctl_jax.data.source import load_dataset
    from ctl_jax.errors import ConfigError

    config = load_config("configs/street2shop.py")
    config.data.root = str(tmp_path)
    config.data.query_json = ""
    with pytest.raises(ConfigError, match="set data.query_json"):
        load_dataset(config.data)


def test_folder_per_identity(tmp_path):
    for split, ident, name in [
        ("train", "bob", "a.jpg"),
        ("train", "bob", "b.jpg"),
        ("train", "alice", "c.png"),
        ("query", "carol", "q.jpg"),
        ("query", "dave", "0001_c4s1_000001_00.jpg"),
        ("gallery", "carol", "g1.jpg"),
        ("gallery", "dave", "g2.jpg"),
        ("gallery", "erin", "g3.jpg"),
    ]:
        _touch(tmp_path / split / ident / name)
    ds = read_folder_per_identity(tmp_path)
    assert ds.train.pids.tolist() == [0, 1, 1]  # alice, bob, bob
    assert ds.query.pids.tolist() == [0, 1] and ds.gallery.pids.tolist() == [0, 1, 2]
    assert ds.query.camids.tolist() == [0, 3]  # default 0; Market name gives camera 4 -> 3
    assert ds.gallery.camids.tolist() == [1, 1, 1]
    with pytest.raises(DatasetError, match="gallery"):
        read_folder_per_identity(tmp_path / "train")
    np.testing.assert_array_equal(open_dataset("folder", tmp_path).gallery.pids, [0, 1, 2])


def _folder_tree(root, query_gallery_names):
    """train/<id>/ with plain names; query/ and gallery/ with `query_gallery_names`."""
    for ident, name in [("bob", "a.jpg"), ("bob", "b.jpg"), ("alice", "c.jpg")]:
        _touch(root / "train" / ident / name)
    for split, ident, name in query_gallery_names:
        _touch(root / split / ident / name)


def test_folder_cameras_are_real_only_when_every_test_image_names_one(tmp_path):
    plain = [("query", "bob", "q.jpg"), ("gallery", "bob", "g.jpg"), ("gallery", "eve", "h.jpg")]
    _folder_tree(tmp_path / "plain", plain)
    ds = read_folder_per_identity(tmp_path / "plain")
    assert not ds.has_cameras
    table = ds.statistics_table()
    assert "  query    |     1 |        1 |         -" in table
    assert "  gallery  |     2 |        2 |         -" in table
    assert table.endswith("(no camera ids in the data)")
    named = [
        ("query", "bob", "0001_c1s1_0_00.jpg"),
        ("gallery", "bob", "0001_c2s1_0_00.jpg"),
        ("gallery", "eve", "0002_c3s1_0_00.jpg"),
    ]
    _folder_tree(tmp_path / "named", named)
    ds = read_folder_per_identity(tmp_path / "named")
    assert ds.has_cameras and ds.gallery.camids.tolist() == [1, 2]
    assert "  gallery  |     2 |        2 |         2" in ds.statistics_table()
    assert "no camera ids" not in ds.statistics_table()
    # One test image without a camera in its name: the cameras are not all real.
    _folder_tree(tmp_path / "mixed", [*named, ("gallery", "eve", "x.jpg")])
    assert not read_folder_per_identity(tmp_path / "mixed").has_cameras


def test_camera_ids_real_for_market_not_for_coco(tmp_path):
    _market_tree(tmp_path / "market1501")
    assert read_market_style(tmp_path, "market1501").has_cameras
    for split, pids in (("train", [4, 4]), ("query", [3]), ("gallery", [3])):
        _coco(tmp_path / "fashion", split, pids)
    assert not read_coco_fashion(tmp_path / "fashion").has_cameras


def _assert_same_test_splits(got, want):
    assert len(got.train) == 0 and got.has_cameras == want.has_cameras
    for split in ("query", "gallery"):
        for field in ("paths", "pids", "camids"):
            np.testing.assert_array_equal(
                getattr(getattr(got, split), field), getattr(getattr(want, split), field)
            )


def test_market_folder_and_coco_evaluation_reads_no_training_folder(tmp_path):
    import shutil

    _market_tree(tmp_path / "market1501")
    _folder_tree(tmp_path / "folder", [("query", "x", "q.jpg"), ("gallery", "x", "g.jpg")])
    for split, pids in (("train", [4, 4]), ("query", [3]), ("gallery", [3, 5])):
        _coco(tmp_path / "fashion", split, pids)
    cases = [
        ("market1501", tmp_path, tmp_path / "market1501" / "bounding_box_train"),
        ("folder", tmp_path / "folder", tmp_path / "folder" / "train"),
        ("street2shop", tmp_path / "fashion", tmp_path / "fashion" / "train"),
    ]
    for name, root, train_folder in cases:
        full = open_dataset(name, root)
        shutil.rmtree(train_folder)
        if name == "street2shop":
            (root / "train.json").unlink()
        with pytest.raises(DatasetError, match="train"):
            open_dataset(name, root)
        partial = open_dataset(name, root, splits=("query", "gallery"))
        _assert_same_test_splits(partial, full)
    with pytest.raises(ValueError, match="unknown split"):
        open_dataset("folder", tmp_path / "folder", splits=("test",))


def test_folder_layout_under_the_market_default_suggests_data_name_folder(tmp_path):
    from ctl_jax.configs import load_config
    from ctl_jax.data.source import load_dataset

    _folder_tree(tmp_path, [("query", "x", "q.jpg"), ("gallery", "x", "g.jpg")])
    for config_file in ("configs/default.py", "configs/market1501.py"):
        config = load_config(config_file)
        config.data.root = str(tmp_path)
        with pytest.raises(DatasetError) as info:
            load_dataset(config.data)
        message = str(info.value)
        assert "\n" not in message and "--config.data.name=folder" in message
        assert "bounding_box_train" in message or "market1501" in message
        config.data.name = "folder"
        assert len(load_dataset(config.data)[0].train) == 3
    # No folder layout next to it: no hint.
    (tmp_path / "train").rename(tmp_path / "elsewhere")
    config = load_config("configs/default.py")
    config.data.root = str(tmp_path)
    with pytest.raises(DatasetError) as info:
        load_dataset(config.data)
    assert "data.name=folder" not in str(info.value)
