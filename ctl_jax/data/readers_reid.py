"""Readers of more re-identification benchmarks: MSMT17, CUHK03-NP and VeRi-776.

Layouts (`root` is the unpacked download):

- MSMT17 (Wei et al., CVPR 2018): `<root>/list_{train,val,query,gallery}.txt` with lines
  `<path> <label>` (`0000/0000_000_01_0303morning_0015_0.jpg 0`), train and val paths
  relative to `<root>/train/`, query and gallery paths to `<root>/test/` (MSMT17_V2:
  `mask_train_v2/`, `mask_test_v2/`). `root` may also be the folder holding `MSMT17_V1/`
  or `MSMT17_V2/`. The camera is the third `_` field of the file name (`..._01_...` ->
  camera 0), as torchreid reads it. Labels are the pids (train labels are 0..1040 already;
  test labels are the test pids). By default the val list is added to training, the
  published 32,621-image training set (`use_val=False` keeps list_train.txt only).
- CUHK03-NP (Zhong et al., CVPR 2017, the new protocol): `<root>/{detected,labeled}/
  {bounding_box_train,query,bounding_box_test}/` with Market-style names
  (`0001_c1_1.png`), read as Market-1501 is; `variant` chooses detected or labeled.
- VeRi-776 (Liu et al., ICME 2016): `<root>/{image_train,image_query,image_test}/` with
  names `0001_c001_00016450_0.jpg` (vehicle id, camera c001..c020).

All are evaluated with the Market-1501 protocol (same identity and camera removed). Each
reader takes `splits=` as those of `ctl_jax.data.readers` do.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from ctl_jax.data.list_files import check_images_exist, read_lines
from ctl_jax.data.readers import (
    DatasetError,
    _relabel,
    _require_dir,
    list_images,
    read_market_folders,
)
from ctl_jax.data.records import SPLITS, RetrievalDataset, Split, check_splits

MSMT17_VERSIONS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
CUHK03_VARIANTS = ("detected", "labeled")
VERI_NAME_PATTERN = re.compile(r"^(\d+)_c(\d+)_")
VERI_SPLIT_FOLDERS = {"train": "image_train", "query": "image_query", "gallery": "image_test"}

_MSMT_LAYOUT = (
    "expected layout: <root>/list_{train,val,query,gallery}.txt ('<path> <label>' lines) "
    "with images under <root>/train/ and <root>/test/"
)
_CUHK_LAYOUT = (
    "expected layout: <root>/{detected,labeled}/{bounding_box_train,query,bounding_box_test}/"
)
_VERI_LAYOUT = (
    "expected layout: <root>/{image_train,image_query,image_test}/ with names like "
    "0001_c001_00016450_0.jpg"
)


def msmt17_camera(file_name: str | os.PathLike) -> int | None:
    """0-based camera of an MSMT17 image (`0000_000_01_0303morning_0015_0.jpg` -> 0)."""
    fields = os.path.basename(os.fspath(file_name)).split("_")
    if len(fields) < 3 or not fields[2].isdigit() or int(fields[2]) < 1:
        return None
    return int(fields[2]) - 1


def _msmt17_dirs(root: Path, needs_train: bool = True) -> tuple[Path, Path, Path]:
    """(folder of the list files, train image folder, test image folder); the train image
    folder need not exist when `needs_train` is False (an evaluation)."""
    bases = [root] + [root / v for v in MSMT17_VERSIONS] + [root / "msmt17" / v for v in MSMT17_VERSIONS]
    for base in bases:
        for train, test in MSMT17_VERSIONS.values():
            if ((base / train).is_dir() or not needs_train) and (base / test).is_dir():
                return base, base / train, base / test
    raise DatasetError(f"MSMT17 image folders not found under {root} ({_MSMT_LAYOUT})")


def _read_msmt17_list(list_file: Path, image_dir: Path) -> Split:
    paths, pids, cams = [], [], []
    for number, line in read_lines(list_file, "List file", _MSMT_LAYOUT):
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            raise DatasetError(f"{list_file}:{number}: expected '<path> <label>', got {line!r}")
        camera = msmt17_camera(fields[0])
        if camera is None:
            raise DatasetError(
                f"{list_file}:{number}: no camera in {fields[0]!r} (expected names like "
                "0000_000_01_0303morning_0015_0.jpg, camera 01)"
            )
        paths.append(str((image_dir / fields[0]).resolve()))
        pids.append(int(fields[1]))
        cams.append(camera)
    if not paths:
        raise DatasetError(f"{list_file}: lists no image ({_MSMT_LAYOUT})")
    check_images_exist(paths, list_file)
    return Split.from_lists(paths, pids, cams)


def read_msmt17(
    root: str | os.PathLike, *, use_val: bool = True, splits=SPLITS
) -> RetrievalDataset:
    """Reads MSMT17 (V1 or V2) from its list files (see the module docstring)."""
    chosen = check_splits(splits)
    base, train_dir, test_dir = _msmt17_dirs(Path(root).expanduser(), "train" in chosen)
    records = dict.fromkeys(SPLITS, Split.empty())
    if "train" in chosen:
        train = _read_msmt17_list(base / "list_train.txt", train_dir)
        if use_val:
            val = _read_msmt17_list(base / "list_val.txt", train_dir)
            train = Split(
                np.concatenate([train.paths, val.paths]),
                np.concatenate([train.pids, val.pids]),
                np.concatenate([train.camids, val.camids]),
            )
        records["train"] = Split(train.paths, _relabel(train.pids), train.camids)
    for split in chosen - {"train"}:
        records[split] = _read_msmt17_list(base / f"list_{split}.txt", test_dir)
    return RetrievalDataset(name="msmt17", **records)


def read_cuhk03_np(
    root: str | os.PathLike,
    variant: str = "detected",
    *,
    skip_unparsable: bool = False,
    splits=SPLITS,
) -> RetrievalDataset:
    """Reads CUHK03-NP, `variant` "detected" or "labeled" (see the module docstring)."""
    if variant not in CUHK03_VARIANTS:
        raise DatasetError(f"CUHK03-NP variant must be one of {CUHK03_VARIANTS}, got {variant!r}")
    root = Path(root).expanduser()
    if not (root / variant).is_dir() and (root / "cuhk03-np" / variant).is_dir():
        root = root / "cuhk03-np"
    base = root / variant
    _require_dir(base, _CUHK_LAYOUT)
    records = read_market_folders(base, splits, skip_unparsable)
    return RetrievalDataset(name=f"cuhk03_{variant}", **records)


def _read_veri_folder(folder: Path, relabel: bool) -> Split:
    _require_dir(folder, _VERI_LAYOUT)
    paths, pids, cams, bad = [], [], [], []
    for path in list_images(folder):
        match = VERI_NAME_PATTERN.match(os.path.basename(path))
        if match is None or int(match.group(2)) < 1:
            bad.append(os.path.basename(path))
            continue
        paths.append(path)
        pids.append(int(match.group(1)))
        cams.append(int(match.group(2)) - 1)
    if bad:
        raise DatasetError(
            f"{len(bad)} file(s) in {folder} do not follow the VeRi naming rule "
            f"'{VERI_NAME_PATTERN.pattern}', e.g. {bad[:3]} ({_VERI_LAYOUT})"
        )
    if not paths:
        raise DatasetError(f"No images in {folder} ({_VERI_LAYOUT})")
    split = Split.from_lists(paths, pids, cams)
    return Split(split.paths, _relabel(split.pids), split.camids) if relabel else split


def read_veri776(root: str | os.PathLike, *, splits=SPLITS) -> RetrievalDataset:
    """Reads VeRi-776 (see the module docstring); train vehicle ids are relabelled."""
    root = Path(root).expanduser()
    chosen = check_splits(splits)
    records = {
        split: _read_veri_folder(root / folder, split == "train")
        if split in chosen
        else Split.empty()
        for split, folder in VERI_SPLIT_FOLDERS.items()
    }
    return RetrievalDataset(name="veri776", **records)
