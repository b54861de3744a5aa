"""Tiny copies of the published benchmark layouts (file names, list files, ground truth),
a few 8x8 images each, for the reader and protocol tests."""

from __future__ import annotations

import pickle

from PIL import Image


def touch(path, size=(8, 8), color=(120, 60, 30), fmt=None):
    """Writes a small image (JPEG unless the name or `fmt` says otherwise)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path, format=fmt)
    return path


def make_msmt17(root, version="MSMT17_V1"):
    """`root/MSMT17_V1/{train,test}/<pid>/<name>` and the four list files."""
    train_dir, test_dir = {
        "MSMT17_V1": ("train", "test"),
        "MSMT17_V2": ("mask_train_v2", "mask_test_v2"),
    }[version]
    base = root / version
    lists = {
        "list_train.txt": (
            train_dir,
            [
                ("0000/0000_000_01_0303morning_0015_0.jpg", 0),
                ("0000/0000_001_05_0303morning_0016_1.jpg", 0),
                ("0001/0001_000_03_0303noon_0020_0.jpg", 1),
                ("0001/0001_002_03_0303noon_0021_0.jpg", 1),
            ],
        ),
        "list_val.txt": (
            train_dir,
            [
                ("0002/0002_000_15_0303afternoon_0001_0.jpg", 2),
                ("0002/0002_003_14_0303afternoon_0002_0.jpg", 2),
            ],
        ),
        "list_query.txt": (test_dir, [("0000/0000_000_02_0113morning_0005_0.jpg", 0)]),
        "list_gallery.txt": (
            test_dir,
            [
                ("0000/0000_001_07_0113morning_0006_0.jpg", 0),
                ("0001/0001_000_02_0113noon_0001_0.jpg", 1),
            ],
        ),
    }
    for list_name, (folder, rows) in lists.items():
        for rel, _ in rows:
            touch(base / folder / rel)
        text = "".join(f"{rel} {label}\n" for rel, label in rows)
        (base / list_name).write_text(text)
    return base


def make_cuhk03_np(root):
    """`root/cuhk03-np/{detected,labeled}/{bounding_box_train,query,bounding_box_test}`."""
    base = root / "cuhk03-np"
    names = {
        "bounding_box_train": ["0001_c1_1.png", "0001_c2_6.png", "0003_c1_2.png", "0003_c2_7.png"],
        "query": ["0005_c1_1.png"],
        "bounding_box_test": ["0005_c2_6.png", "0006_c1_1.png"],
    }
    for variant in ("detected", "labeled"):
        for folder, files in names.items():
            for name in files:
                touch(base / variant / folder / name)
    # The labeled boxes hold one more training image than the detected ones.
    touch(base / "labeled" / "bounding_box_train" / "0003_c2_8.png")
    return base


def make_veri(root):
    """`root/VeRi/{image_train,image_query,image_test}` with VeRi names."""
    base = root / "VeRi"
    names = {
        "image_train": [
            "0001_c001_00016450_0.jpg",
            "0001_c002_00016455_0.jpg",
            "0004_c019_00027815_1.jpg",
            "0004_c020_00027830_0.jpg",
        ],
        "image_query": ["0002_c002_00030600_0.jpg"],
        "image_test": [
            "0002_c003_00084310_0.jpg",
            "0002_c002_00030605_0.jpg",
            "0006_c010_00012345_0.jpg",
        ],
    }
    for folder, files in names.items():
        for name in files:
            touch(base / folder / name)
    return base


def make_sop(root):
    """`root/Stanford_Online_Products/Ebay_{train,test}.txt` and the images."""
    base = root / "Stanford_Online_Products"
    train = [
        (1, 1, 1, "bicycle_final/111085122871_0.JPG"),
        (2, 1, 1, "bicycle_final/111085122871_1.JPG"),
        (3, 7, 1, "bicycle_final/111265328556_0.JPG"),
        (4, 7, 1, "bicycle_final/111265328556_1.JPG"),
    ]
    test = [
        (59552, 11319, 1, "bicycle_final/111085122871_9.JPG"),
        (59553, 11319, 1, "bicycle_final/111085122871_8.JPG"),
        (59554, 11320, 2, "cabinet_final/111085122872_0.JPG"),
        (59555, 11320, 2, "cabinet_final/111085122872_1.JPG"),
        (59556, 11320, 2, "cabinet_final/111085122872_2.JPG"),
    ]
    for name, rows in (("Ebay_train.txt", train), ("Ebay_test.txt", test)):
        lines = ["image_id class_id super_class_id path"]
        for image_id, class_id, super_id, rel in rows:
            touch(base / rel, fmt="JPEG")
            lines.append(f"{image_id} {class_id} {super_id} {rel}")
        (base / name).write_text("\n".join(lines) + "\n")
    return base


def make_inshop(root):
    """`root/inshop/Eval/list_eval_partition.txt` and `root/inshop/Img/img/...`."""
    base = root / "inshop"
    rows = [
        ("img/WOMEN/Dresses/id_00000002/02_1_front.jpg", "id_00000002", "train"),
        ("img/WOMEN/Dresses/id_00000002/02_2_side.jpg", "id_00000002", "train"),
        ("img/MEN/Denim/id_00000080/01_1_front.jpg", "id_00000080", "train"),
        ("img/MEN/Denim/id_00000080/01_2_side.jpg", "id_00000080", "train"),
        ("img/WOMEN/Blouses_Shirts/id_00000001/02_1_front.jpg", "id_00000001", "query"),
        ("img/WOMEN/Blouses_Shirts/id_00000001/02_2_side.jpg", "id_00000001", "gallery"),
        ("img/WOMEN/Blouses_Shirts/id_00000007/01_1_front.jpg", "id_00000007", "query"),
        ("img/WOMEN/Blouses_Shirts/id_00000007/01_3_back.jpg", "id_00000007", "gallery"),
    ]
    lines = [str(len(rows)), "image_name item_id evaluation_status"]
    for rel, item, status in rows:
        touch(base / "Img" / rel)
        lines.append(f"{rel:<60}{item:<20}{status}")
    (base / "Eval").mkdir(parents=True)
    (base / "Eval" / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    return base


def make_holidays(root, extra=()):
    """`root/holidays/jpg/NNNNNN.jpg`: groups 1000 (3 images), 1001 (2), 1002 (query only)."""
    base = root / "holidays"
    for name in (
        "100000.jpg",
        "100001.jpg",
        "100002.jpg",
        "100100.jpg",
        "100101.jpg",
        "100200.jpg",
        *extra,
    ):
        touch(base / "jpg" / name, size=(12, 8))
    return base


def make_gldv2(root):
    """`root/gldv2/train_clean.csv` and `train/a/b/c/<id>.jpg`."""
    base = root / "gldv2"
    rows = {
        1: ["6e158a47eb2ca3f6", "202cd79556f30760"],
        7: ["3ad87684c99c06e1", "e7f70e9c61e66af3", "4f9d9dbcb6ebe6a3"],
        12: ["0c3f5cc2b2a3a0c9"],
    }
    lines = ["landmark_id,images"]
    for landmark, ids in rows.items():
        for image_id in ids:
            touch(base / "train" / image_id[0] / image_id[1] / image_id[2] / f"{image_id}.jpg")
        lines.append(f"{landmark},{' '.join(ids)}")
    (base / "train_clean.csv").write_text("\n".join(lines) + "\n")
    return base


REVISITED_GND = {
    "imlist": [
        "all_souls_000000",
        "all_souls_000001",
        "ashmolean_000000",
        "balliol_000000",
        "bodleian_000000",
    ],
    "qimlist": ["all_souls_000013", "ashmolean_000058"],
    "gnd": [
        {"bbx": [1.5, 2.0, 6.4, 7.0], "easy": [0], "hard": [1], "junk": [4]},
        {"bbx": [0.0, 0.0, 4.0, 3.0], "easy": [2, 3], "hard": [], "junk": []},
    ],
}


def make_revisited(root, name="roxford5k", gnd=None, protocol=2):
    """`root/<name>/jpg/*.jpg` and `gnd_<name>.pkl` (a pickle of plain lists and dicts)."""
    gnd = REVISITED_GND if gnd is None else gnd
    base = root / name
    for image in gnd["imlist"] + gnd["qimlist"]:
        touch(base / "jpg" / f"{image}.jpg", size=(10, 8))
    with open(base / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump(gnd, f, protocol=protocol)
    return base
