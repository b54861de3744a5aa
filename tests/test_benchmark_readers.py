"""Readers of the benchmark datasets on tiny fixtures in their exact published layouts."""

import io
import os
import pickle

import numpy as np
import pytest
from benchmark_fixtures import (
    REVISITED_GND,
    make_cuhk03_np,
    make_gldv2,
    make_holidays,
    make_inshop,
    make_msmt17,
    make_revisited,
    make_sop,
    make_veri,
    touch,
)
from PIL import Image

from ctl_jax.configs import load_config
from ctl_jax.data.catalog import open_dataset
from ctl_jax.data.image_edits import EditedImageReader, ImageEdits
from ctl_jax.data.landmarks import load_revisited_ground_truth
from ctl_jax.data.readers import DatasetError
from ctl_jax.data.source import check_trainable, load_dataset


def _names(split):
    return [os.path.basename(p) for p in split.paths]


def _image_size(data: bytes):
    return Image.open(io.BytesIO(data)).size


# --------------------------------------------------------------------------------------
# MSMT17


def test_msmt17_lists(tmp_path):
    make_msmt17(tmp_path)
    ds = open_dataset("msmt17", tmp_path / "MSMT17_V1")
    # Train + val (the published training set), relabelled; cameras from the third field.
    assert len(ds.train) == 6 and ds.num_classes == 3
    assert ds.train.camids.tolist() == [0, 4, 2, 2, 14, 13]
    assert ds.query.pids.tolist() == [0] and ds.query.camids.tolist() == [1]
    assert ds.gallery.pids.tolist() == [0, 1] and ds.gallery.camids.tolist() == [6, 1]
    assert ds.train.paths[0].endswith("MSMT17_V1/train/0000/0000_000_01_0303morning_0015_0.jpg")
    assert ds.gallery.paths[1].endswith("MSMT17_V1/test/0001/0001_000_02_0113noon_0001_0.jpg")
    assert ds.protocols[0] == "market"
    # Without the val list; and found from the folder holding MSMT17_V1/.
    only_train = open_dataset("msmt17", tmp_path, use_val=False)
    assert len(only_train.train) == 4 and only_train.num_classes == 2


def test_msmt17_v2_layout(tmp_path):
    make_msmt17(tmp_path, "MSMT17_V2")
    ds = open_dataset("msmt17", tmp_path / "MSMT17_V2")
    assert "mask_train_v2" in ds.train.paths[0] and "mask_test_v2" in ds.query.paths[0]


def test_msmt17_bad_input(tmp_path):
    base = make_msmt17(tmp_path)
    (base / "list_query.txt").unlink()
    with pytest.raises(DatasetError, match=r"List file not found: .*list_query.txt"):
        open_dataset("msmt17", base)
    make_msmt17(tmp_path)
    os.remove(base / "test" / "0001" / "0001_000_02_0113noon_0001_0.jpg")
    with pytest.raises(DatasetError, match=r"list_gallery.txt: 1 listed image\(s\) missing, e.g."):
        open_dataset("msmt17", base)
    make_msmt17(tmp_path)
    (base / "list_val.txt").write_text("0002/0002_000_15_x.jpg\n")
    with pytest.raises(DatasetError, match=r"list_val.txt:1: expected '<path> <label>'"):
        open_dataset("msmt17", base)


# --------------------------------------------------------------------------------------
# CUHK03-NP and VeRi-776


def test_cuhk03_np_variants(tmp_path):
    make_cuhk03_np(tmp_path)
    detected = open_dataset("cuhk03_detected", tmp_path / "cuhk03-np")
    labeled = open_dataset("cuhk03_labeled", tmp_path)  # the folder holding cuhk03-np/
    assert len(detected.train) == 4 and len(labeled.train) == 5
    assert detected.name == "cuhk03_detected" and "/detected/" in detected.query.paths[0]
    assert "/labeled/" in labeled.gallery.paths[0]
    assert detected.train.pids.tolist() == [0, 0, 1, 1]
    assert detected.train.camids.tolist() == [0, 1, 0, 1]
    assert detected.gallery.pids.tolist() == [5, 6]


def test_cuhk03_missing_variant(tmp_path):
    (tmp_path / "cuhk03-np").mkdir()
    with pytest.raises(DatasetError, match=r"Folder not found: .*detected"):
        open_dataset("cuhk03_detected", tmp_path / "cuhk03-np")


def test_veri776(tmp_path):
    base = make_veri(tmp_path)
    ds = open_dataset("veri776", base)
    assert ds.train.pids.tolist() == [0, 0, 1, 1]
    assert ds.train.camids.tolist() == [0, 1, 18, 19]  # c001..c020 -> 0..19
    assert ds.query.pids.tolist() == [2] and ds.query.camids.tolist() == [1]
    assert sorted(ds.gallery.camids.tolist()) == [1, 2, 9]
    touch(base / "image_test" / "car.jpg")
    with pytest.raises(DatasetError, match=r"image_test do not follow the VeRi naming rule"):
        open_dataset("veri776", base)


# --------------------------------------------------------------------------------------
# Stanford Online Products and In-Shop


def test_sop_lists(tmp_path):
    base = make_sop(tmp_path)
    ds = open_dataset("sop", base)
    assert ds.train.pids.tolist() == [0, 0, 1, 1]
    assert ds.query.pids.tolist() == [11319, 11319, 11320, 11320, 11320]
    assert (ds.query.paths == ds.gallery.paths).all()  # every test image queries the others
    assert ds.protocols == ("recall_at_k",)
    assert ds.ground_truth["recall_ks"] == (1, 10, 100, 1000)
    assert ds.train.paths[0].endswith("Stanford_Online_Products/bicycle_final/111085122871_0.JPG")


def test_sop_bad_input(tmp_path):
    base = make_sop(tmp_path)
    (base / "Ebay_test.txt").unlink()
    with pytest.raises(DatasetError, match=r"List file not found: .*Ebay_test.txt"):
        open_dataset("sop", base)
    base = make_sop(tmp_path / "b")
    os.remove(base / "cabinet_final" / "111085122872_1.JPG")
    with pytest.raises(DatasetError, match=r"Ebay_test.txt: 1 listed image\(s\) missing"):
        open_dataset("sop", base)
    (base / "Ebay_train.txt").write_text("id class path\n")
    with pytest.raises(DatasetError, match=r"Ebay_train.txt: first line must be"):
        open_dataset("sop", base)


def test_inshop_partition(tmp_path):
    base = make_inshop(tmp_path)
    ds = open_dataset("inshop", base)
    assert ds.train.pids.tolist() == [0, 0, 1, 1]
    assert ds.query.pids.tolist() == [1, 7] and ds.gallery.pids.tolist() == [1, 7]
    assert ds.gallery.camids.tolist() == [1, 1] and ds.query.camids.tolist() == [0, 0]
    assert ds.query.paths[0].endswith(
        "inshop/Img/img/WOMEN/Blouses_Shirts/id_00000001/02_1_front.jpg"
    )
    assert ds.protocols == ("recall_at_k", "market")
    assert ds.ground_truth["recall_ks"] == (1, 10, 20, 30, 40, 50)


def test_inshop_truncated_list(tmp_path):
    base = make_inshop(tmp_path)
    partition = base / "Eval" / "list_eval_partition.txt"
    partition.write_text("\n".join(partition.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(
        DatasetError, match=r"list_eval_partition.txt: announces 8 images but lists 7"
    ):
        open_dataset("inshop", base)


# --------------------------------------------------------------------------------------
# Holidays


def test_holidays_groups(tmp_path):
    base = make_holidays(tmp_path)
    ds = open_dataset("holidays", base)
    assert _names(ds.query) == ["100000.jpg", "100100.jpg", "100200.jpg"]
    assert ds.query.pids.tolist() == [1000, 1001, 1002]
    assert len(ds.gallery) == 6 and ds.gallery.pids.tolist() == [1000] * 3 + [1001] * 2 + [1002]
    assert ds.protocols == ("holidays", "recall_at_k") and len(ds.train) == 0
    assert ds.image_edits == {}


def test_holidays_bad_names(tmp_path):
    base = make_holidays(tmp_path, extra=("100301.jpg",))
    with pytest.raises(
        DatasetError, match=r"1 group\(s\) have no query image NNNN00.jpg, e.g. .*100301"
    ):
        open_dataset("holidays", base)
    base = make_holidays(tmp_path / "b", extra=("holiday.jpg",))
    with pytest.raises(
        DatasetError, match=r"are not Holidays names NNNNNN.jpg, e.g. \['holiday.jpg'\]"
    ):
        open_dataset("holidays", base)


def test_holidays_rotation_fix(tmp_path):
    base = make_holidays(tmp_path)  # images 12 wide, 8 high
    rotations = tmp_path / "rotated.txt"
    rotations.write_text("100001.jpg 90\n100100.jpg 270\n")
    ds = open_dataset("holidays", base, rotation_fix=str(rotations))
    gallery = EditedImageReader(ds.gallery.paths, ds.image_edits["gallery"])
    assert _image_size(gallery.read(1)) == (8, 12)  # turned
    assert _image_size(gallery.read(0)) == (12, 8)  # as stored
    assert gallery.read(0) == open(ds.gallery.paths[0], "rb").read()  # untouched bytes
    query = EditedImageReader(ds.query.paths, ds.image_edits["query"])
    assert _image_size(query.read(1)) == (8, 12)
    rotations.write_text("100001.jpg 45\n")
    with pytest.raises(DatasetError, match=r"rotated.txt:1: '100001.jpg 45'"):
        open_dataset("holidays", base, rotation_fix=str(rotations))


def test_exif_rotation(tmp_path):
    path = tmp_path / "100000.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: turn 90 degrees clockwise to view
    Image.new("RGB", (12, 8)).save(path, exif=exif)
    reader = EditedImageReader([str(path)], ImageEdits(rotations=[-1]))
    assert _image_size(reader.read(0)) == (8, 12)


# --------------------------------------------------------------------------------------
# Google Landmarks v2


def test_gldv2_clean(tmp_path):
    base = make_gldv2(tmp_path)
    ds = open_dataset("gldv2", base)
    assert ds.train.pids.tolist() == [0, 0, 1, 1, 1, 2]
    assert ds.train.paths[0].endswith("gldv2/train/6/e/1/6e158a47eb2ca3f6.jpg")
    assert len(ds.query) == 0 and ds.protocols == ()
    os.remove(base / "train" / "4" / "f" / "9" / "4f9d9dbcb6ebe6a3.jpg")
    with pytest.raises(DatasetError, match=r"train_clean.csv: 1 listed image\(s\) missing"):
        open_dataset("gldv2", base)
    (base / "train_clean.csv").write_text("id,url\n")
    with pytest.raises(
        DatasetError, match=r"train_clean.csv: first line must be 'landmark_id,images'"
    ):
        open_dataset("gldv2", base)


def test_gldv2_trains_and_evaluates_on_roxford(tmp_path):
    make_gldv2(tmp_path)
    make_revisited(tmp_path)
    config = load_config("configs/gldv2.py")
    config.data.root = str(tmp_path / "gldv2")
    config.data.eval_root = str(tmp_path / "roxford5k")
    dataset, readers = load_dataset(config.data)
    assert dataset.name == "gldv2+roxford5k" and dataset.num_classes == 3
    assert dataset.protocols == ("revisited",) and len(dataset.query) == 2
    check_trainable(dataset)
    assert _image_size(readers["query"].read(0)) == (4, 5)  # cropped to its box
    # Landmarks of fewer than M = 3 images dropped: only landmark 7 stays, relabelled 0.
    config.data.small_identities = "drop"
    config.data.num_instances = 3
    dropped, _ = load_dataset(config.data)
    assert dropped.train.pids.tolist() == [0, 0, 0] and dropped.num_classes == 1
    # Without an evaluation dataset, training on GLDv2 is a clear error.
    config.data.eval_name = ""
    config.data.small_identities = "pad"
    alone, _ = load_dataset(config.data)
    with pytest.raises(DatasetError, match=r"'gldv2' has no query/gallery split.*data.eval_name"):
        check_trainable(alone)


# --------------------------------------------------------------------------------------
# Revisited Oxford / Paris


def test_revisited_layout(tmp_path):
    base = make_revisited(tmp_path)
    ds = open_dataset("roxford5k", base)
    gt = ds.ground_truth
    assert _names(ds.query) == ["all_souls_000013.jpg", "ashmolean_000058.jpg"]
    assert _names(ds.gallery) == [f"{n}.jpg" for n in REVISITED_GND["imlist"]]
    assert gt.easy[0].tolist() == [0] and gt.hard[0].tolist() == [1] and gt.junk[1].tolist() == []
    assert ds.protocols == ("revisited",) and len(ds.train) == 0
    # Queries are cropped to their box as PIL crops it (rounded), the gallery is not.
    np.testing.assert_allclose(ds.image_edits["query"].boxes[0], [1.5, 2.0, 6.4, 7.0])
    reader = EditedImageReader(ds.query.paths, ds.image_edits["query"])
    assert _image_size(reader.read(0)) == (4, 5) and _image_size(reader.read(1)) == (4, 3)
    with pytest.raises(DatasetError, match=r"'roxford5k' has no training split"):
        check_trainable(ds)


def test_revisited_distractors(tmp_path):
    base = make_revisited(tmp_path, "rparis6k")
    r1m = tmp_path / "revisitop1m"
    for name in ("0/00/000aaa.jpg", "f/ff/fffbbb.jpg"):
        touch(r1m / "jpg" / name)
    (r1m / "revisitop1m.txt").write_text("0/00/000aaa.jpg\nf/ff/fffbbb.jpg\n")
    ds = open_dataset("rparis6k", base, distractors=str(r1m))
    assert len(ds.gallery) == 7 and ds.gallery.paths[-1].endswith("revisitop1m/jpg/f/ff/fffbbb.jpg")
    (r1m / "revisitop1m.txt").write_text("0/00/000aaa.jpg\n1/11/111ccc.jpg\n")
    with pytest.raises(DatasetError, match=r"revisitop1m.txt: 1 listed image\(s\) missing"):
        open_dataset("rparis6k", base, distractors=str(r1m))


def test_revisited_missing_files(tmp_path):
    with pytest.raises(DatasetError, match=r"Ground-truth file not found: .*gnd_roxford5k.pkl"):
        open_dataset("roxford5k", tmp_path)
    base = make_revisited(tmp_path)
    os.remove(base / "jpg" / "balliol_000000.jpg")
    with pytest.raises(DatasetError, match=r"gnd_roxford5k.pkl: 1 listed image\(s\) missing"):
        open_dataset("roxford5k", base)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


@pytest.mark.parametrize(
    "content, message",
    [
        ({**REVISITED_GND, "evil": _Evil()}, r"refused: it names (posix|os)\.system"),
        ({**REVISITED_GND, "imlist": np.array(["a"])}, r"refused: it builds numpy.dtype\('U1'\)"),
        ({**REVISITED_GND, "imlist": {"all_souls_000000"}}, r"holds a set"),
        ({**REVISITED_GND, "gnd": REVISITED_GND["gnd"][:1]}, r"'gnd' is not a list of one entry"),
        (
            {
                **REVISITED_GND,
                "gnd": [REVISITED_GND["gnd"][0], {"easy": [9], "hard": [], "junk": []}],
            },
            r"gnd\[1\]\['easy'\] is not a list of indices into imlist",
        ),
        ([1, 2, 3], r"not a dict with keys 'imlist', 'qimlist' and 'gnd'"),
    ],
)
def test_ground_truth_pickle_refused(tmp_path, content, message):
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(pickle.dumps(content, protocol=4))
    with pytest.raises(DatasetError, match=message) as info:
        load_revisited_ground_truth(path)
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_ground_truth_pickle_not_a_pickle(tmp_path):
    path = tmp_path / "gnd_roxford5k.pkl"
    path.write_bytes(b"not a pickle at all")
    with pytest.raises(DatasetError, match=r"gnd_roxford5k.pkl: not a readable pickle"):
        load_revisited_ground_truth(path)
    # Every pickle protocol of plain data loads (the published files use an old one).
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        path.write_bytes(pickle.dumps(REVISITED_GND, protocol=protocol))
        assert load_revisited_ground_truth(path).qimlist == tuple(REVISITED_GND["qimlist"])


def test_configs_name_the_readers():
    for name, dataset in [
        ("msmt17", "msmt17"),
        ("cuhk03.py:labeled", "cuhk03_labeled"),
        ("veri776", "veri776"),
        ("sop", "sop"),
        ("inshop", "inshop"),
        ("gldv2", "gldv2"),
        ("roxford5k", "roxford5k"),
        ("rparis6k", "rparis6k"),
        ("holidays", "holidays"),
    ]:
        path = f"configs/{name}" if name.endswith(":labeled") else f"configs/{name}.py"
        assert load_config(path).data.name == dataset


# --------------------------------------------------------------------------------------
# Reading only the evaluated splits


def _remove_files_and_empty_folders(paths, root):
    """Deletes `paths`, then every folder under `root` left empty (deepest first)."""
    for path in paths:
        os.remove(path)
    for folder, _, _ in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
        if folder != str(root) and not os.listdir(folder):
            os.rmdir(folder)


@pytest.mark.parametrize(
    "name, make, sub, cameras",
    [
        ("msmt17", make_msmt17, "MSMT17_V1", True),
        ("cuhk03_detected", make_cuhk03_np, "cuhk03-np", True),
        ("veri776", make_veri, None, True),
        ("sop", make_sop, None, False),
        ("inshop", make_inshop, None, False),
    ],
)
def test_evaluation_reads_no_training_image(tmp_path, name, make, sub, cameras):
    """With splits=("query", "gallery") the training images may be gone: query and gallery
    are those of a full read, train is empty (a full read now fails: the files mattered).
    Real camera ids: the re-ID sets; SOP and In-Shop have none."""
    base = make(tmp_path)
    root = tmp_path / sub if sub else base
    full = open_dataset(name, root)
    assert full.has_cameras is cameras
    train_only = set(full.train.paths) - set(full.query.paths) - set(full.gallery.paths)
    assert train_only
    _remove_files_and_empty_folders(sorted(train_only), tmp_path)
    with pytest.raises(DatasetError):
        open_dataset(name, root)
    partial = open_dataset(name, root, splits=("query", "gallery"))
    assert len(partial.train) == 0 and partial.has_cameras == full.has_cameras
    for split in ("query", "gallery"):
        for field in ("paths", "pids", "camids"):
            want = getattr(getattr(full, split), field)
            np.testing.assert_array_equal(getattr(getattr(partial, split), field), want)
