"""Readers of the product retrieval benchmarks: Stanford Online Products and DeepFashion
In-Shop Clothes Retrieval, from their published list files.

Layouts (`root` is the unpacked download):

- Stanford Online Products (Song et al., CVPR 2016): `<root>/Ebay_train.txt` and
  `<root>/Ebay_test.txt` with the header `image_id class_id super_class_id path` and lines
  `1 1 1 bicycle_final/111085122871_0.JPG`, paths relative to `root`. Train classes are
  relabelled; the test split is both query and gallery: every test image queries all the
  others (protocol "recall_at_k", Recall@1/10/100/1000).
- DeepFashion In-Shop (Liu et al., CVPR 2016): `<root>/Eval/list_eval_partition.txt`
  (first line the number of images, second the header `image_name item_id
  evaluation_status`, then `img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002
  train|query|gallery`) and the images under `<root>/Img/` (`Img/img/WOMEN/...`, as
  `img.zip` unpacks there). The list and `img/` directly in `root` work too. Queries are
  searched in the gallery split (protocol "recall_at_k", Recall@1/10/20/30/40/50; the
  Market protocol gives mAP as well).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ctl_jax.data.list_files import check_images_exist, read_lines
from ctl_jax.data.readers import DatasetError, _relabel
from ctl_jax.data.records import SPLITS, RetrievalDataset, Split, check_splits

SOP_RECALL_KS = (1, 10, 100, 1000)
INSHOP_RECALL_KS = (1, 10, 20, 30, 40, 50)
SOP_HEADER = "image_id class_id super_class_id path"
INSHOP_HEADER = "image_name item_id evaluation_status"

_SOP_LAYOUT = f"expected layout: <root>/Ebay_{{train,test}}.txt ('{SOP_HEADER}') and <root>/<path>"
_INSHOP_LAYOUT = (
    "expected layout: <root>/Eval/list_eval_partition.txt and <root>/Img/img/... "
    "(or both directly in <root>)"
)


def _read_sop_list(path: Path, root: Path) -> tuple[list[str], list[int]]:
    lines = read_lines(path, "List file", _SOP_LAYOUT)
    if not lines or lines[0][1].split() != SOP_HEADER.split():
        raise DatasetError(f"{path}: first line must be '{SOP_HEADER}' ({_SOP_LAYOUT})")
    paths, classes = [], []
    for number, line in lines[1:]:
        fields = line.split()
        if len(fields) != 4 or not all(f.isdigit() for f in fields[:3]):
            raise DatasetError(
                f"{path}:{number}: expected 'image_id class_id super_class_id path', got {line!r}"
            )
        paths.append(str((root / fields[3]).resolve()))
        classes.append(int(fields[1]))
    if not paths:
        raise DatasetError(f"{path}: lists no image ({_SOP_LAYOUT})")
    check_images_exist(paths, path)
    return paths, classes


def read_sop(root: str | os.PathLike, *, splits=SPLITS) -> RetrievalDataset:
    """Reads Stanford Online Products from `root` (see the module docstring).

    Query and gallery are the same test images (camera 0 and 1, not real cameras); the
    Recall@K protocol leaves each query's own image out of its ranking. Ebay_train.txt is
    read when `splits` has "train", Ebay_test.txt when it has "query" or "gallery".
    """
    root = Path(root).expanduser()
    chosen = check_splits(splits)
    train = query = gallery = Split.empty()
    if "train" in chosen:
        train_paths, train_classes = _read_sop_list(root / "Ebay_train.txt", root)
        train = Split(
            np.asarray(train_paths, dtype=str),
            _relabel(np.asarray(train_classes, np.int64)),
            np.zeros(len(train_paths), np.int64),
        )
    if chosen & {"query", "gallery"}:
        test_paths, test_classes = _read_sop_list(root / "Ebay_test.txt", root)
        query = Split.from_lists(test_paths, test_classes, np.zeros(len(test_paths), np.int64))
        gallery = Split(query.paths, query.pids, np.ones(len(query), np.int64))
    return RetrievalDataset(
        name="sop",
        train=train,
        query=query if "query" in chosen else Split.empty(),
        gallery=gallery if "gallery" in chosen else Split.empty(),
        protocols=("recall_at_k",),
        ground_truth={"recall_ks": SOP_RECALL_KS},
        has_cameras=False,
    )


def read_inshop(root: str | os.PathLike, *, splits=SPLITS) -> RetrievalDataset:
    """Reads DeepFashion In-Shop from `root` (see the module docstring).

    Item ids `id_00000002` become pids 2; train pids are relabelled. No camera ids: 0 for
    train and query, 1 for the gallery. The list is read whole; only the images of `splits`
    are looked for on disk (the others are empty).
    """
    chosen = check_splits(splits)
    root = Path(root).expanduser()
    list_file = root / "Eval" / "list_eval_partition.txt"
    if not list_file.is_file() and (root / "list_eval_partition.txt").is_file():
        list_file = root / "list_eval_partition.txt"
    image_root = root / "Img" if (root / "Img" / "img").is_dir() else root
    lines = read_lines(list_file, "List file", _INSHOP_LAYOUT)
    if len(lines) < 2 or not lines[0][1].isdigit() or lines[1][1].split() != INSHOP_HEADER.split():
        raise DatasetError(
            f"{list_file}: must start with the number of images and the header "
            f"'{INSHOP_HEADER}' ({_INSHOP_LAYOUT})"
        )
    rows = lines[2:]
    if int(lines[0][1]) != len(rows):
        raise DatasetError(
            f"{list_file}: announces {lines[0][1]} images but lists {len(rows)} (truncated?)"
        )
    listed = {"train": ([], []), "query": ([], []), "gallery": ([], [])}
    for number, line in rows:
        fields = line.split()
        item = fields[1] if len(fields) == 3 else ""
        if len(fields) != 3 or fields[2] not in listed or not item.startswith("id_"):
            raise DatasetError(
                f"{list_file}:{number}: expected '<image_name> id_NNNNNNNN "
                f"train|query|gallery', got {line!r}"
            )
        if not item[3:].isdigit():
            raise DatasetError(f"{list_file}:{number}: bad item id {item!r}")
        paths, pids = listed[fields[2]]
        paths.append(str((image_root / fields[0]).resolve()))
        pids.append(int(item[3:]))
    records = {}
    for split, (paths, pids) in listed.items():
        if split not in chosen:
            records[split] = Split.empty()
            continue
        if not paths:
            raise DatasetError(f"{list_file}: no image with evaluation_status {split!r}")
        check_images_exist(paths, list_file)
        cams = np.full(len(paths), 1 if split == "gallery" else 0, np.int64)
        records[split] = Split.from_lists(paths, pids, cams)
    train = records["train"]
    records["train"] = Split(train.paths, _relabel(train.pids), train.camids)
    return RetrievalDataset(
        name="inshop",
        **records,
        protocols=("recall_at_k", "market"),
        ground_truth={"recall_ks": INSHOP_RECALL_KS},
        has_cameras=False,
    )
