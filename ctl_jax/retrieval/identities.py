"""Which identity each embedded image shows: `embed --identity=market|folder|csv:FILE`.

* `market`: Market-1501 / DukeMTMC names, `0002_c1s1_000451_03.jpg` is identity "2" seen by
  camera 0 (`-1_...` junk images: unknown). Every file must follow the naming.
* `folder`: the first folder under the `--images` folder, `gallery/<identity>/*.jpg` or
  `gallery/<identity>/any/depth/*.jpg` (`folder_identities`). Every image must sit in a
  sub-folder of the `--images` folder.
* `csv:FILE`: rows `path,identity[,camera]` (a first row `path,identity[,camera]` is a
  header). A relative path is relative to the `--images` folder; camera a 0-based integer
  (empty: unknown). Images without a row have unknown identity.
* default (`auto`): `market` when every file follows the Market naming, else `folder`, with
  images directly in the `--images` folder (no sub-folder) of unknown identity.

The camera comes from Market-style names where they parse (and from the CSV's column with
`csv:`), -1 otherwise. Labels are strings, "" where unknown; the integer pids follow from
them (`labels.pids_for_labels`).
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib

import numpy as np

from ctl_jax.data import readers
from ctl_jax.errors import FileContentError, MissingFileError, OptionError
from ctl_jax.evaluation.centroids import MAX_CAMERA
from ctl_jax.retrieval.labels import UNKNOWN, labels_from_pids

MODES = ("auto", "market", "folder", "csv")
FLAG_HELP = (
    "Identity of each image: market (Market-style names 0002_c1s1_...jpg), folder (the "
    "folder holding it: DIR/<identity>/x.jpg) or csv:FILE (rows path,identity[,camera]); "
    "default: market when every file follows it, else folder."
)


@dataclasses.dataclass(frozen=True)
class IdentitySource:
    """A parsed `--identity` value: `mode` in MODES, `csv_path` for "csv"."""

    mode: str = "auto"
    csv_path: str | None = None

    @classmethod
    def parse(cls, value: str | None) -> IdentitySource:
        """`None`/"" -> auto; "market", "folder", "csv:FILE". Raises OptionError."""
        if not value or value == "auto":
            return cls()
        if value in ("market", "folder"):
            return cls(value)
        if value.startswith("csv:") and len(value) > 4:
            path = value[4:]
            if not pathlib.Path(path).is_file():
                raise MissingFileError(f"--identity={value}: {path} does not exist")
            return cls("csv", path)
        raise OptionError(
            f"--identity={value} is not one of market, folder, csv:FILE (e.g. "
            "--identity=csv:identities.csv)"
        )


@dataclasses.dataclass(frozen=True)
class Identities:
    """Per image its label ("" = unknown) and camera (-1 = unknown), and how they were
    found (`mode`: market, folder or csv; `summary` for the command's report)."""

    labels: np.ndarray
    camids: np.ndarray
    mode: str

    def summary(self) -> str:
        known = int((self.labels != UNKNOWN).sum())
        distinct = len(set(self.labels.tolist()) - {UNKNOWN})
        return (
            f"identities from {self.mode}: {known:,} of {len(self.labels):,} image(s) in "
            f"{distinct:,} identities"
        )


def assign_identities(
    paths, images: str | os.PathLike, source: IdentitySource | str | None = None
) -> Identities:
    """Labels and cameras of the image files `paths` found under `images` (see the module
    docstring).

    Args:
      paths: (N,) absolute image paths (`images.list_images(images).paths`).
      images: the `--images` path (a folder, or one image).
      source: an IdentitySource, or the `--identity` string.

    Raises:
      OptionError / FileContentError / MissingFileError: one line naming the bad file, CSV
        line or option.
    """
    if not isinstance(source, IdentitySource):
        source = IdentitySource.parse(source)
    paths = [str(p) for p in paths]
    parsed = [readers.parse_market_name(p) for p in paths]  # None: not a Market-style name
    market = all(found is not None for found in parsed)
    market_cams = np.asarray([found[1] if found else -1 for found in parsed], np.int64)
    root = pathlib.Path(os.path.abspath(images))
    if root.is_file():
        root = root.parent
    if source.mode == "market" or (source.mode == "auto" and market and paths):
        if not market:
            bad = next(p for p, found in zip(paths, parsed) if found is None)
            raise OptionError(
                f"--identity=market: {bad} does not follow the Market-style naming "
                "PPPP_cC...jpg (e.g. 0002_c1s1_000451_03.jpg); use --identity=folder or "
                "--identity=csv:FILE"
            )
        pids = np.asarray([pid for pid, _ in parsed], np.int64).reshape(-1)
        pids[pids < 0] = -1  # junk images (-1_...) have unknown identity
        return Identities(labels_from_pids(pids), market_cams, "market names")
    if source.mode == "csv":
        labels, camids = _csv_identities(paths, root, source.csv_path)
        return Identities(labels, np.where(camids >= 0, camids, market_cams), "csv")
    labels = []
    for path, label in zip(paths, folder_identities(paths, root)):
        if label is None and source.mode == "folder":
            raise OptionError(
                f"--identity=folder: {path} is not in a sub-folder of {root} (expected "
                f"{root}/<identity>/{pathlib.Path(path).name})"
            )
        labels.append(UNKNOWN if label is None else label)
    return Identities(np.asarray(labels, str).reshape(-1), market_cams, "folder names")


def folder_identities(paths, root: str | os.PathLike | None = None) -> list[str | None]:
    """The folder rule, the one place it is written: an image's identity is the FIRST
    folder under the image root, whatever lies below it (`root/alice/2019/a.jpg` and
    `root/alice/b.jpg` are both "alice"); None for an image directly in the root or
    outside it.

    Args:
      paths: (N,) image paths (made absolute against the working directory).
      root: the image root (`embed --images`); None: the deepest folder all the images'
        folders share (what an embeddings file, which keeps absolute paths only, implies).

    Returns:
      (N,) identity names, None where the rule gives none.
    """
    paths = [os.path.abspath(str(p)) for p in paths]
    if root is None:
        root = os.path.commonpath([os.path.dirname(p) for p in paths]) if paths else "."
    root = pathlib.PurePath(os.path.abspath(root))
    out = []
    for path in paths:
        try:
            parts = pathlib.PurePath(path).relative_to(root).parts
        except ValueError:  # outside the root
            parts = ()
        out.append(parts[0] if len(parts) >= 2 else None)
    return out


def _csv_identities(paths, root: pathlib.Path, csv_path: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels, camids) of `paths` from the CSV; images without a row are unknown / -1."""
    row_of = {os.path.normpath(p): i for i, p in enumerate(paths)}
    labels = np.full(len(paths), UNKNOWN, dtype=object)
    camids = np.full(len(paths), -1, np.int64)
    seen = {}
    name = f"--identity=csv:{csv_path}"
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise FileContentError(f"{name}: cannot read it as CSV: {e}") from e
    for line, row in enumerate(rows, start=1):
        cells = [cell.strip() for cell in row]
        if not cells or not any(cells):
            continue
        if line == 1 and cells[0].lower() == "path":
            continue
        where = f"{name} line {line}"
        if len(cells) not in (2, 3):
            raise FileContentError(
                f"{where}: expected path,identity[,camera], got {len(cells)} column(s)"
            )
        path, label = cells[0], cells[1]
        if not path or not label:
            raise FileContentError(f"{where}: the path and the identity must not be empty")
        full = os.path.normpath(path if os.path.isabs(path) else os.path.join(root, path))
        if full in seen:
            raise FileContentError(
                f"{where}: {path} is listed twice (lines {seen[full]} and {line})"
            )
        seen[full] = line
        if not os.path.exists(full):
            raise FileContentError(f"{where}: {path} does not exist ({full})")
        if full not in row_of:
            raise FileContentError(
                f"{where}: {path} is not one of the .jpg/.jpeg/.png images under {root}"
            )
        if len(cells) == 3 and cells[2]:
            if not cells[2].isdigit() or int(cells[2]) > MAX_CAMERA:
                raise FileContentError(
                    f"{where}: camera must be an integer in 0..{MAX_CAMERA}, got {cells[2]!r}"
                )
            camids[row_of[full]] = int(cells[2])
        labels[row_of[full]] = label
    return labels.astype(str).reshape(-1), camids
