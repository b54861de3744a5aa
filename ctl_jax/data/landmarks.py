"""Readers of the landmark retrieval benchmarks: Revisited Oxford 5k and Paris 6k, INRIA
Holidays, and Google Landmarks v2 (clean) as a training source.

Layouts (`root` is the unpacked download; nothing is downloaded here):

- Revisited Oxford / Paris (Radenović et al., CVPR 2018, the revisitop layout):
  `<root>/jpg/<name>.jpg` (all images in one folder) and `<root>/gnd_roxford5k.pkl` /
  `gnd_rparis6k.pkl`: a pickle of {"imlist": [name], "qimlist": [name], "gnd": [per query
  {"bbx": [x0, y0, x1, y1], "easy": [i], "hard": [i], "junk": [i]}]}, indices into imlist.
  The pickle is read without running any code (`plain_pickle`). Queries are cropped to
  their box when read. The optional +1M distractors (`distractors=DIR`):
  `DIR/revisitop1m.txt` (one image path per line, relative to `DIR/jpg/`), appended to the
  gallery. Protocol "revisited" only; no training split.
- INRIA Holidays: `<root>/jpg/<NNNNNN>.jpg` (or the images directly in `root`); image
  NNNNNN belongs to group NNNNNN // 100 and is the group's query when NNNNNN % 100 == 0.
  Queries are also in the gallery (the query itself is excluded when ranking). Protocol
  "holidays" (default) or "recall_at_k"; no training split. `rotation_fix`: "" (images as
  stored), "exif" (turn images as their EXIF orientation says), or a text file of
  `<image name> <degrees clockwise>` lines (90/180/270) listing the images to turn upright.
- Google Landmarks v2, clean subset: `<root>/train_clean.csv` (`landmark_id,images`; images
  space-separated ids) and `<root>/train/<a>/<b>/<c>/<abc...>.jpg`. A training split only.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np

from ctl_jax.data.image_edits import EXIF, ImageEdits
from ctl_jax.data.list_files import check_images_exist, read_lines, require_file
from ctl_jax.data.plain_pickle import PlainPickleError, load_plain_pickle
from ctl_jax.data.readers import DatasetError, _relabel, list_images
from ctl_jax.data.records import RetrievalDataset, Split

REVISITED_GROUND_TRUTH = {"roxford5k": "gnd_roxford5k.pkl", "rparis6k": "gnd_rparis6k.pkl"}
DISTRACTOR_LIST = "revisitop1m.txt"
HOLIDAYS_NAME = re.compile(r"^(\d+)\.jpe?g$", re.IGNORECASE)

_REVISITED_LAYOUT = "expected layout: <root>/jpg/<name>.jpg and <root>/{gnd}"
_HOLIDAYS_LAYOUT = "expected layout: <root>/jpg/NNNNNN.jpg (e.g. 100000.jpg, 100001.jpg)"
_GLD_LAYOUT = "expected layout: <root>/train_clean.csv and <root>/train/a/b/c/abc....jpg"


@dataclasses.dataclass(frozen=True)
class RevisitedGroundTruth:
    """The revisited annotation of one dataset (contents of `gnd_<dataset>.pkl`).

    Attributes:
      source: the file it was read from.
      imlist: (N,) database image names (no extension).
      qimlist: (Q,) query image names.
      easy, hard, junk: Q int64 arrays of indices into imlist per query.
      boxes: (Q, 4) float64 query boxes (x0, y0, x1, y1), NaN rows where absent.
    """

    source: str
    imlist: tuple[str, ...]
    qimlist: tuple[str, ...]
    easy: tuple[np.ndarray, ...]
    hard: tuple[np.ndarray, ...]
    junk: tuple[np.ndarray, ...]
    boxes: np.ndarray


def load_revisited_ground_truth(path: str | os.PathLike) -> RevisitedGroundTruth:
    """Reads and checks a revisitop ground-truth pickle (`gnd_roxford5k.pkl`, ...).

    Raises:
      DatasetError: missing file, a pickle that names any class or function, or contents
        not of the revisitop structure; the message names the file.
    """
    path = Path(path)
    try:
        data = load_plain_pickle(path)
    except FileNotFoundError as e:
        raise DatasetError(f"Ground-truth file not found: {path}") from e
    except PlainPickleError as e:
        raise DatasetError(str(e)) from e

    def bad(what: str) -> DatasetError:
        return DatasetError(
            f"{path}: {what} (expected the revisitop structure {{'imlist': [str], "
            "'qimlist': [str], 'gnd': [{'bbx', 'easy', 'hard', 'junk'}]}})"
        )

    if not isinstance(data, dict) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise bad("not a dict with keys 'imlist', 'qimlist' and 'gnd'")
    for key in ("imlist", "qimlist"):
        if not isinstance(data[key], list) or not all(isinstance(n, str) for n in data[key]):
            raise bad(f"'{key}' is not a list of strings")
    imlist, qimlist, gnd = data["imlist"], data["qimlist"], data["gnd"]
    if not isinstance(gnd, list) or len(gnd) != len(qimlist):
        raise bad(f"'gnd' is not a list of one entry per query ({len(qimlist)} queries)")
    lists = {"easy": [], "hard": [], "junk": []}
    boxes = np.full((len(qimlist), 4), np.nan)
    for i, entry in enumerate(gnd):
        if not isinstance(entry, dict):
            raise bad(f"gnd[{i}] is not a dict")
        for key, out in lists.items():
            values = _numbers(entry.get(key), "iu")
            if (
                values is None
                or values.ndim != 1
                or not np.all((values >= 0) & (values < len(imlist)))
            ):
                raise bad(f"gnd[{i}]['{key}'] is not a list of indices into imlist")
            out.append(values.astype(np.int64))
        box = entry.get("bbx")
        if box is not None:
            box = _numbers(box, "iuf")
            if box is None or box.shape != (4,):
                raise bad(f"gnd[{i}]['bbx'] is not 4 numbers [x0, y0, x1, y1]")
            boxes[i] = box
    return RevisitedGroundTruth(
        source=str(path),
        imlist=tuple(imlist),
        qimlist=tuple(qimlist),
        easy=tuple(lists["easy"]),
        hard=tuple(lists["hard"]),
        junk=tuple(lists["junk"]),
        boxes=boxes,
    )


def _numbers(values, kinds: str) -> np.ndarray | None:
    """`values` (a list or tuple of numbers, numpy scalars included, or a numpy array, as
    revisitop files and their NumPy re-saves hold them) as a plain array whose dtype kind is
    in `kinds` ("i"/"u" integers, "f" floats); None for anything else (bools included)."""
    if isinstance(values, np.ndarray):
        array = np.array(values)  # a plain ndarray copy
    elif isinstance(values, (list, tuple)):
        allowed = (int,) + ((float,) if "f" in kinds else ())
        numpy_types = (np.integer,) + ((np.floating,) if "f" in kinds else ())
        if not all((type(v) in allowed) or isinstance(v, numpy_types) for v in values):
            return None
        array = np.array([v.item() if isinstance(v, np.generic) else v for v in values])
        if not values:
            array = array.astype(np.int64)
    else:
        return None
    return array if array.dtype.kind in kinds else None


def read_distractors(folder: str | os.PathLike) -> list[str]:
    """Absolute paths of the revisitop +1M distractors: `folder/revisitop1m.txt` names
    images relative to `folder/jpg/`."""
    folder = Path(folder).expanduser()
    layout = f"expected layout: <distractors>/{DISTRACTOR_LIST} and <distractors>/jpg/"
    list_file = folder / DISTRACTOR_LIST
    names = [line for _, line in read_lines(list_file, "Distractor list", layout)]
    paths = [str((folder / "jpg" / n).resolve()) for n in names]
    check_images_exist(paths, list_file)
    return paths


def read_revisited(
    root: str | os.PathLike, name: str = "roxford5k", *, distractors: str | os.PathLike = ""
) -> RetrievalDataset:
    """Reads Revisited Oxford 5k ("roxford5k") or Paris 6k ("rparis6k") from `root`.

    Query i is `jpg/<qimlist[i]>.jpg` (cropped to its box when read), gallery item j is
    `jpg/<imlist[j]>.jpg`, followed by the +1M distractors when `distractors` names their
    folder. No identity labels (pids -1); the ground truth travels with the records.
    """
    if name not in REVISITED_GROUND_TRUTH:
        raise DatasetError(f"Unknown revisited dataset {name!r}; known: roxford5k, rparis6k")
    root = Path(root).expanduser()
    layout = _REVISITED_LAYOUT.format(gnd=REVISITED_GROUND_TRUTH[name])
    gnd_path = require_file(root / REVISITED_GROUND_TRUTH[name], "Ground-truth file", layout)
    gt = load_revisited_ground_truth(gnd_path)
    image_dir = (root / "jpg").resolve()
    query_paths = [str(image_dir / f"{q}.jpg") for q in gt.qimlist]
    gallery_paths = [str(image_dir / f"{n}.jpg") for n in gt.imlist]
    check_images_exist(query_paths + gallery_paths, gnd_path)
    if distractors:
        gallery_paths += read_distractors(distractors)
    query = Split.from_lists(query_paths, [-1] * len(query_paths), [0] * len(query_paths))
    gallery = Split.from_lists(gallery_paths, [-1] * len(gallery_paths), [1] * len(gallery_paths))
    return RetrievalDataset(
        name=name,
        train=Split.empty(),
        query=query,
        gallery=gallery,
        protocols=("revisited",),
        ground_truth=gt,
        image_edits={"query": ImageEdits(boxes=gt.boxes)},
        has_cameras=False,
    )


def holidays_group(file_name: str | os.PathLike) -> int | None:
    """The Holidays group of an image name (`100301.jpg` -> 1003), None if not a Holidays name."""
    match = HOLIDAYS_NAME.match(os.path.basename(os.fspath(file_name)))
    return None if match is None else int(match.group(1)) // 100


def _holidays_rotations(names: list[str], rotation_fix: str) -> np.ndarray | None:
    """Per-image rotation codes for `rotation_fix` ("", "exif" or a list file)."""
    if not rotation_fix:
        return None
    if rotation_fix == "exif":
        return np.full(len(names), EXIF, np.int64)
    list_file = Path(rotation_fix).expanduser()
    layout = "expected lines '<image name> <degrees clockwise: 90, 180 or 270>'"
    index = {n: i for i, n in enumerate(names)}
    rotations = np.zeros(len(names), np.int64)
    for number, line in read_lines(list_file, "Rotation list", layout):
        fields = line.split()
        if len(fields) != 2 or fields[1] not in ("90", "180", "270"):
            raise DatasetError(f"{list_file}:{number}: {line!r}; {layout}")
        if fields[0] not in index:
            raise DatasetError(f"{list_file}:{number}: no Holidays image named {fields[0]}")
        rotations[index[fields[0]]] = int(fields[1])
    return rotations


def read_holidays(root: str | os.PathLike, *, rotation_fix: str = "") -> RetrievalDataset:
    """Reads INRIA Holidays from `root` (see the module docstring).

    Query pids and gallery pids are the group numbers; the gallery holds every image,
    queries included (camera 0 for queries, 1 for the gallery).
    """
    root = Path(root).expanduser()
    folder = root / "jpg" if (root / "jpg").is_dir() else root
    if not folder.is_dir():
        raise DatasetError(f"Folder not found: {folder} ({_HOLIDAYS_LAYOUT})")
    paths = list_images(folder)
    names = [os.path.basename(p) for p in paths]
    groups = [holidays_group(n) for n in names]
    bad = [n for n, g in zip(names, groups) if g is None]
    if bad:
        raise DatasetError(
            f"{len(bad)} file(s) in {folder} are not Holidays names NNNNNN.jpg, e.g. {bad[:3]} "
            f"({_HOLIDAYS_LAYOUT})"
        )
    if not paths:
        raise DatasetError(f"No images in {folder} ({_HOLIDAYS_LAYOUT})")
    is_query = np.array([int(n.split(".")[0]) % 100 == 0 for n in names])
    groups = np.asarray(groups, dtype=np.int64)
    orphans = sorted(set(groups[~is_query].tolist()) - set(groups[is_query].tolist()))
    if orphans:
        example = names[int(np.flatnonzero(groups == orphans[0])[0])]
        raise DatasetError(
            f"{folder}: {len(orphans)} group(s) have no query image NNNN00.jpg, e.g. the "
            f"group of {example} ({_HOLIDAYS_LAYOUT})"
        )
    gallery = Split.from_lists(paths, groups, np.ones(len(paths), np.int64))
    query = gallery.subset(is_query)
    query = Split(query.paths, query.pids, np.zeros(len(query), np.int64))
    rotations = _holidays_rotations(names, rotation_fix)
    edits = {}
    if rotations is not None:
        edits = {
            "query": ImageEdits(rotations=rotations[is_query]),
            "gallery": ImageEdits(rotations=rotations),
        }
    return RetrievalDataset(
        name="holidays",
        train=Split.empty(),
        query=query,
        gallery=gallery,
        protocols=("holidays", "recall_at_k"),
        image_edits=edits,
        has_cameras=False,
    )


def read_gldv2(root: str | os.PathLike, *, check_files: bool = True) -> RetrievalDataset:
    """Reads the clean training set of Google Landmarks v2 from `root`.

    Every image id of a `train_clean.csv` row is one training image of that landmark;
    landmark ids are relabelled to 0..K-1 in sorted order. Query and gallery are empty:
    evaluate on another dataset (`data.eval_name`, e.g. roxford5k).
    """
    root = Path(root).expanduser()
    csv_path = root / "train_clean.csv"
    lines = read_lines(csv_path, "Landmark list", _GLD_LAYOUT)
    if not lines or lines[0][1].replace(" ", "") != "landmark_id,images":
        raise DatasetError(f"{csv_path}: first line must be 'landmark_id,images' ({_GLD_LAYOUT})")
    image_dir = (root / "train").resolve()
    paths, pids = [], []
    for number, line in lines[1:]:
        landmark, _, images = line.partition(",")
        ids = images.split()
        if not landmark.strip().isdigit() or not ids:
            raise DatasetError(f"{csv_path}:{number}: expected '<landmark id>,<id> <id> ...'")
        for image_id in ids:
            if len(image_id) < 3 or not image_id.isalnum():
                raise DatasetError(f"{csv_path}:{number}: bad image id {image_id!r}")
            a, b, c = image_id[:3]
            paths.append(str(image_dir / a / b / c / f"{image_id}.jpg"))
            pids.append(int(landmark))
    if not paths:
        raise DatasetError(f"{csv_path}: lists no image ({_GLD_LAYOUT})")
    if check_files:
        check_images_exist(paths, csv_path)
    pids = np.asarray(pids, np.int64)
    train = Split(np.asarray(paths, dtype=str), _relabel(pids), np.zeros(len(paths), np.int64))
    return RetrievalDataset(
        name="gldv2",
        train=train,
        query=Split.empty(),
        gallery=Split.empty(),
        protocols=(),
        has_cameras=False,
    )
