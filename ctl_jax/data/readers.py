"""Readers that turn a dataset on disk into a `RetrievalDataset`.

Supported layouts:

- Market-1501 style (Market-1501, DukeMTMC-reID, the synthetic set): folders
  `bounding_box_train/` (train), `query/`, `bounding_box_test/` (gallery) of images named
  `PPPP_cC...jpg`. Person and camera ids are parsed from the file name (not the full path)
  with the regex `([-\\d]+)_c(\\d)`; pid -1 is junk and dropped; pid 0 (background
  distractors) is kept; cameras are 1-based in names and 0-based in the records.
- COCO-style JSON per split (Street2Shop, DeepFashion consumer-to-shop), images under
  `<root>/{train,query,gallery}/<file_name>` as in the original code.
- One folder per identity: `<root>/{train,query,gallery}/<identity>/<images>`.

A file whose name does not follow the Market naming rule is an error (listing a few
examples), not silently skipped: a stray file usually means a wrong folder. Pass
`skip_unparsable=True` to skip such files with a warning instead. Every problem with the
input raises `DatasetError`, whose message names the offending file or folder.

`Split.paths` holds absolute paths, so `dataset.query.paths[i]` is the image of query i.

Every reader takes `splits=` (default all three): the splits left out are empty and their
files are not looked at, so an evaluation needs no training images on disk.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ctl_jax.data.records import SPLITS, RetrievalDataset, Split, check_splits
from ctl_jax.errors import DatasetError

MARKET_NAME_PATTERN = re.compile(r"([-\d]+)_c(\d)")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MARKET_SPLIT_FOLDERS = {
    "train": "bounding_box_train",
    "query": "query",
    "gallery": "bounding_box_test",
}
# Folder under `root` for each Market-style dataset; `None` means `root` itself.
MARKET_STYLE_DIRS = {"market1501": "market1501", "dukemtmc": "DukeMTMC-reID", "synthetic": None}
FASHION_SPLITS = SPLITS

_MARKET_LAYOUT = (
    "expected layout: <dataset dir>/{bounding_box_train,query,bounding_box_test}/"
    "PPPP_cC*.jpg (e.g. 0002_c1s1_000451_00.jpg)"
)
_FOLDER_LAYOUT = "expected layout: <root>/{train,query,gallery}/<identity>/<images>"

log = logging.getLogger(__name__)


def parse_market_name(file_name: str | os.PathLike) -> tuple[int, int] | None:
    """(pid, 0-based camera id) from a Market-style file name, or None if it does not match.

    Only the base name is looked at (`0002_c1s1_000451_03.jpg` -> (2, 0)).
    """
    match = MARKET_NAME_PATTERN.search(os.path.basename(os.fspath(file_name)))
    if match is None:
        return None
    try:
        pid = int(match.group(1))
    except ValueError:  # e.g. "--_c1": digits and dashes but not a number
        return None
    return pid, int(match.group(2)) - 1


def list_images(folder: str | os.PathLike) -> list[str]:
    """Sorted absolute paths of the jpg/jpeg/png files directly inside `folder`."""
    folder = Path(folder)
    return sorted(
        str(p.resolve())
        for p in folder.iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _require_dir(folder: Path, layout: str) -> None:
    if not folder.is_dir():
        raise DatasetError(f"Folder not found: {folder} ({layout})")


def _relabel(pids: np.ndarray) -> np.ndarray:
    """Map raw pids to 0..K-1 in sorted order of the raw values."""
    _, labels = np.unique(pids, return_inverse=True)
    return labels.astype(np.int64)


def _read_market_folder(folder: Path, relabel: bool, skip_unparsable: bool) -> Split:
    _require_dir(folder, _MARKET_LAYOUT)
    paths, pids, camids, bad = [], [], [], []
    for path in list_images(folder):
        parsed = parse_market_name(path)
        if parsed is None or parsed[1] < 0:
            bad.append(os.path.basename(path))
            continue
        pid, camid = parsed
        if pid == -1:  # junk
            continue
        if pid < -1:
            bad.append(os.path.basename(path))
            continue
        paths.append(path)
        pids.append(pid)
        camids.append(camid)
    if bad:
        message = (
            f"{len(bad)} file(s) in {folder} do not follow the naming rule "
            f"'{MARKET_NAME_PATTERN.pattern}' with a camera >= 1, e.g. {bad[:3]}"
        )
        if not skip_unparsable:
            raise DatasetError(f"{message}; {_MARKET_LAYOUT}")
        log.warning("Skipping %s", message)
    if not paths:
        raise DatasetError(f"No usable images in {folder} ({_MARKET_LAYOUT})")
    split = Split.from_lists(paths, pids, camids)
    if relabel:
        split = Split(paths=split.paths, pids=_relabel(split.pids), camids=split.camids)
    return split


def market_style_dir(root: str | os.PathLike, name: str) -> Path:
    """The folder that directly holds `bounding_box_train/` etc. for dataset `name`.

    `<root>/market1501`, `<root>/DukeMTMC-reID`, or `root` itself for "synthetic". When the
    named sub-folder is absent but `root` itself has the three split folders, `root` is used.
    """
    if name not in MARKET_STYLE_DIRS:
        raise DatasetError(
            f"Unknown Market-style dataset {name!r}; known: {sorted(MARKET_STYLE_DIRS)}"
        )
    root = Path(root).expanduser()
    sub = MARKET_STYLE_DIRS[name]
    if sub is None:
        return root
    candidate = root / sub
    if not candidate.is_dir() and all((root / f).is_dir() for f in MARKET_SPLIT_FOLDERS.values()):
        return root
    return candidate


def read_market_folders(base: Path, splits=SPLITS, skip_unparsable: bool = False) -> dict:
    """{split: Split} of the Market-style folders under `base` (`MARKET_SPLIT_FOLDERS`),
    empty for the splits not in `splits`; train pids relabelled."""
    chosen = check_splits(splits)
    return {
        split: _read_market_folder(base / folder, split == "train", skip_unparsable)
        if split in chosen
        else Split.empty()
        for split, folder in MARKET_SPLIT_FOLDERS.items()
    }


def read_market_style(
    root: str | os.PathLike,
    name: str = "market1501",
    *,
    skip_unparsable: bool = False,
    splits=SPLITS,
) -> RetrievalDataset:
    """Reads Market-1501 (`<root>/market1501/`), DukeMTMC-reID (`<root>/DukeMTMC-reID/`) or
    the synthetic set (`root` itself) into a `RetrievalDataset`.

    Train pids are relabelled to 0..num_classes-1 (sorted raw pids); query and gallery keep
    raw pids. Junk (pid -1) is dropped everywhere; pid 0 stays. Paths are sorted. Only the
    folders of `splits` are read.
    """
    base = market_style_dir(root, name)
    _require_dir(base, f"dataset {name!r}: {_MARKET_LAYOUT}")
    return RetrievalDataset(name=name, **read_market_folders(base, splits, skip_unparsable))


# --------------------------------------------------------------------------------------
# COCO-style fashion datasets.


def _load_json(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"Annotation file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(f"Invalid JSON in {path}: {e}") from e
    expected = (
        "a COCO-style object with 'images' [{id, file_name}] and "
        "'annotations' [{image_id, pair_id, source}]"
    )
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: expected {expected}; 'images' list missing")
    if not isinstance(data.get("annotations"), list):
        raise DatasetError(f"{path}: expected {expected}; 'annotations' list missing")
    for key, fields in (("images", ("id", "file_name")), ("annotations", ("image_id", "pair_id"))):
        for i, item in enumerate(data[key]):
            if not isinstance(item, dict) or any(f not in item for f in fields):
                raise DatasetError(
                    f"{path}: {key}[{i}] lacks one of {fields} (expected {expected}): "
                    f"{str(item)[:100]}"
                )
            for field in fields:
                # Ids are matched as dictionary keys (an unhashable list would be a
                # TypeError), file names joined to a folder: each must have its JSON type.
                wanted = (str,) if field == "file_name" else (int, str)
                value = item[field]
                if not isinstance(value, wanted) or isinstance(value, bool):
                    kind = "a string" if field == "file_name" else "an integer or a string"
                    raise DatasetError(
                        f"{path}: {key}[{i}].{field} must be {kind}, got "
                        f"{type(value).__name__} {str(value)[:60]}"
                    )
    return data


def _resolve_json_paths(root: Path, json_paths) -> dict[str, Path]:
    if json_paths is None:
        return {s: root / f"{s}.json" for s in FASHION_SPLITS}
    if isinstance(json_paths, (str, os.PathLike)):
        # As the original: the query/gallery files are named like the train file.
        train = Path(json_paths)
        if "train" not in train.name:
            raise DatasetError(f"Cannot derive query/gallery JSON names from {train}")
        return {s: train.with_name(train.name.replace("train", s)) for s in FASHION_SPLITS}
    if not isinstance(json_paths, Mapping) or set(json_paths) != set(FASHION_SPLITS):
        raise DatasetError(f"json_paths must map exactly {FASHION_SPLITS} to files")
    return {s: Path(json_paths[s]) for s in FASHION_SPLITS}


def _read_coco_split(json_path: Path, image_dir: Path, split: str, check_files: bool) -> Split:
    data = _load_json(json_path)
    file_of = {img["id"]: img["file_name"] for img in data["images"]}
    entries, unknown = [], 0  # (pair_id, annotation order, file_name)
    for order, ann in enumerate(data["annotations"]):
        if ann["image_id"] not in file_of:
            unknown += 1  # the original skips these silently
            continue
        pair_id = ann["pair_id"]
        if not isinstance(pair_id, int) or pair_id < 0:
            raise DatasetError(f"{json_path}: annotation {order} has invalid pair_id {pair_id!r}")
        entries.append((pair_id, order, file_of[ann["image_id"]]))
    if unknown:
        log.warning("%s: skipped %d annotations with unknown image_id", json_path, unknown)
    if split == "train":
        counts: dict[int, int] = {}
        for pair_id, _, _ in entries:
            counts[pair_id] = counts.get(pair_id, 0) + 1
        entries = [e for e in entries if counts[e[0]] > 1]
    entries.sort()  # by pair id, then annotation order, as the original
    if not entries:
        raise DatasetError(f"{json_path}: no usable annotations for split {split!r}")
    paths = [str((image_dir / name).resolve()) for _, _, name in entries]
    if check_files:
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DatasetError(
                f"{json_path}: {len(missing)} referenced image(s) missing under {image_dir}, "
                f"e.g. {missing[:3]}"
            )
    pids = np.array([e[0] for e in entries], dtype=np.int64)
    if split == "train":
        pids = _relabel(pids)
    camids = np.full(len(paths), 1 if split == "gallery" else 0, dtype=np.int64)
    return Split(paths=np.asarray(paths, dtype=str), pids=pids, camids=camids)


def read_coco_fashion(
    root: str | os.PathLike,
    json_paths: Mapping[str, str | os.PathLike] | str | os.PathLike | None = None,
    *,
    name: str = "fashion",
    check_files: bool = True,
    splits=SPLITS,
) -> RetrievalDataset:
    """Reads a COCO-JSON fashion dataset (Street2Shop, DeepFashion consumer-to-shop).

    Args:
      root: folder with `train/`, `query/`, `gallery/` image folders; each JSON's
        `file_name` is relative to the folder of its split.
      json_paths: {"train","query","gallery"} -> JSON file; or only the train JSON, whose
        name has "train" replaced to find the others (as the original); or None for
        `<root>/{split}.json`.
      name: dataset name stored in the records.
      check_files: raise `DatasetError` if an image referenced by a JSON is missing.
      splits: the splits to read (the others are empty; their JSON is not opened).

    Every annotation is one sample (its image path, pair_id). Train identities with a
    single sample are removed and train pids relabelled. No camera ids (`has_cameras`
    False): camera 0 for train and query, 1 for gallery. Samples are ordered by pair_id,
    then annotation order.
    """
    root = Path(root).expanduser()
    chosen = check_splits(splits)
    paths = _resolve_json_paths(root, json_paths)
    records = {}
    for split in FASHION_SPLITS:
        if split not in chosen:
            records[split] = Split.empty()
            continue
        image_dir = root / split
        _require_dir(image_dir, "expected layout: <root>/{train,query,gallery}/<file_name>")
        records[split] = _read_coco_split(paths[split], image_dir, split, check_files)
    return RetrievalDataset(name=name, **records, has_cameras=False)


# --------------------------------------------------------------------------------------
# One folder per identity.


def read_folder_per_identity(
    root: str | os.PathLike, *, name: str = "folder", splits=SPLITS
) -> RetrievalDataset:
    """Reads `<root>/{train,query,gallery}/<identity>/<images>` (jpg/jpeg/png).

    Identities: train ids are relabelled to 0..K-1 in sorted order of folder names. For
    query and gallery, if every identity folder name is an integer that integer is the pid;
    otherwise pids are positions in the sorted union of query and gallery folder names, so
    equal names mean equal pids across the two splits (the identity folder names of both
    are listed even when only one is read, so that pids do not depend on `splits`).

    Cameras: taken from a Market-style file name (`..._c3...` -> 2) when the name matches;
    otherwise 0 for train and query and 1 for gallery, so that the same-camera filter of
    the evaluation removes nothing. `has_cameras` is True only when every query and gallery
    image read has a camera in its name.

    Only the folders of `splits` are read (the others are empty); the identity folder
    names of query and gallery are listed whenever one of them is read.
    """
    root = Path(root).expanduser()
    chosen = check_splits(splits)
    listed = chosen | ({"query", "gallery"} if chosen & {"query", "gallery"} else set())
    folders = {}
    for split in FASHION_SPLITS:
        if split not in listed:
            continue
        split_dir = root / split
        _require_dir(split_dir, _FOLDER_LAYOUT)
        ids = sorted(p.name for p in split_dir.iterdir() if p.is_dir())
        if not ids:
            raise DatasetError(f"No identity folders in {split_dir} ({_FOLDER_LAYOUT})")
        folders[split] = ids
    test_names = sorted(set(folders.get("query", ())) | set(folders.get("gallery", ())))
    if all(re.fullmatch(r"-?\d+", n) for n in test_names):
        test_pid = {n: int(n) for n in test_names}
    else:
        test_pid = {n: i for i, n in enumerate(test_names)}
    records, named_cameras = {}, True
    for split in FASHION_SPLITS:
        if split not in chosen:
            records[split] = Split.empty()
            continue
        default_cam = 1 if split == "gallery" else 0
        paths, pids, camids = [], [], []
        for label, identity in enumerate(folders[split]):
            for path in list_images(root / split / identity):
                parsed = parse_market_name(path)
                named = parsed is not None and parsed[1] >= 0
                if split != "train":
                    named_cameras &= named
                paths.append(path)
                pids.append(label if split == "train" else test_pid[identity])
                camids.append(parsed[1] if named else default_cam)
        if not paths:
            raise DatasetError(f"No images under {root / split} ({_FOLDER_LAYOUT})")
        records[split] = Split.from_lists(paths, pids, camids)
    train = records["train"]
    records["train"] = Split(train.paths, _relabel(train.pids), train.camids)
    evaluated = bool(chosen & {"query", "gallery"})
    return RetrievalDataset(name=name, **records, has_cameras=evaluated and named_cameras)
