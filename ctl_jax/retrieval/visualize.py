"""Ranked-results pictures: per query a PNG strip, the query then its top-k matches.

Like the original code's ranked-results figures: the query has a blue frame; each match a
green frame when it has the query's identity, red when not, grey when either identity is
unknown (pid -1). Under each picture: the rank, the identity and the cosine score. A
centroid match is drawn with its representative image (the member closest to the
centroid) and captioned with its number of images. Images that cannot be read are drawn as
grey placeholders, so results computed on another machine can still be pictured.
"""

from __future__ import annotations

import functools
import os
import pathlib
import re

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ctl_jax.errors import NotAFolderError, OutputExistsError
from ctl_jax.files import atomic_open, make_folder, remove_stale_temporaries
from ctl_jax.progress import progress_bar
from ctl_jax.retrieval.gallery import GalleryItems
from ctl_jax.retrieval.labels import UNKNOWN, labels_from_pids

QUERY_COLOR = (30, 90, 220)
CORRECT_COLOR = (0, 170, 0)
WRONG_COLOR = (220, 0, 0)
UNKNOWN_COLOR = (150, 150, 150)
_BACKGROUND = (255, 255, 255)
_TEXT = (0, 0, 0)
_BORDER = 4
_CAPTION_LINES = 2
_LINE_HEIGHT = 12
_QUERY_GAP = 14  # extra space between the query and its matches


def match_status(query_label, match_labels: np.ndarray) -> np.ndarray:
    """(k,) "correct" / "wrong" / "unknown" for matches of a query, by identity label ("" =
    unknown; integer pids, -1 = unknown, are accepted too)."""
    match_labels = np.asarray(match_labels)
    if match_labels.dtype.kind in "iu":
        match_labels = labels_from_pids(match_labels)
        query_label = labels_from_pids(np.asarray([query_label]))[0]
    query_label = str(query_label)
    if query_label == UNKNOWN:
        return np.full(match_labels.shape, "unknown")
    return np.where(
        match_labels == UNKNOWN,
        "unknown",
        np.where(match_labels == query_label, "correct", "wrong"),
    )


_STATUS_COLORS = {"correct": CORRECT_COLOR, "wrong": WRONG_COLOR, "unknown": UNKNOWN_COLOR}


@functools.lru_cache(maxsize=4096)
def thumbnail(path: str, width: int, height: int) -> Image.Image:
    """The image at `path` resized to (width, height), or a grey placeholder if unreadable.

    Cached: a gallery image usually appears in the results of many queries.
    """
    try:
        with Image.open(path) as image:
            return image.convert("RGB").resize((width, height), Image.BILINEAR)
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError):
        placeholder = Image.new("RGB", (width, height), (200, 200, 200))
        draw = ImageDraw.Draw(placeholder)
        draw.line((0, 0, width, height), fill=(120, 120, 120), width=2)
        draw.line((0, height, width, 0), fill=(120, 120, 120), width=2)
        return placeholder


def render_strip(
    query: tuple[Image.Image, list[str]],
    matches: list[tuple[Image.Image, list[str], str]],
    width: int,
    height: int,
) -> Image.Image:
    """Composes one strip.

    Args:
      query: (thumbnail (width x height), caption lines).
      matches: per match (thumbnail, caption lines, status "correct"/"wrong"/"unknown").
      width, height: thumbnail size.

    Returns:
      An RGB image of height `height + 2 * border + captions`.
    """
    font = ImageFont.load_default()
    cell_w, cell_h = width + 2 * _BORDER, height + 2 * _BORDER
    total_h = cell_h + 4 + _CAPTION_LINES * _LINE_HEIGHT
    total_w = (1 + len(matches)) * (cell_w + 4) + _QUERY_GAP
    strip = Image.new("RGB", (total_w, total_h), _BACKGROUND)
    draw = ImageDraw.Draw(strip)
    cells = [(query[0], query[1], QUERY_COLOR)] + [
        (image, caption, _STATUS_COLORS[status]) for image, caption, status in matches
    ]
    x = 0
    for i, (image, caption, color) in enumerate(cells):
        draw.rectangle((x, 0, x + cell_w - 1, cell_h - 1), fill=color)
        strip.paste(image, (x + _BORDER, _BORDER))
        for line_no, line in enumerate(caption[:_CAPTION_LINES]):
            draw.text((x + 1, cell_h + 2 + line_no * _LINE_HEIGHT), line, fill=_TEXT, font=font)
        x += cell_w + 4 + (_QUERY_GAP if i == 0 else 0)
    return strip


def strip_file_names(query_paths) -> list[str]:
    """`00000_<query file stem>.png`, ...: numbered (query order), unique, file-system safe."""
    names = []
    for i, path in enumerate(query_paths):
        stem = pathlib.Path(str(path)).stem or "query"
        names.append(f"{i:05d}_{re.sub(r'[^A-Za-z0-9_.-]+', '_', stem)[:80]}.png")
    return names


def write_strips(
    directory: str | os.PathLike,
    query_paths: np.ndarray,
    query_pids: np.ndarray,
    indices: np.ndarray,
    scores: np.ndarray,
    items: GalleryItems,
    width: int = 64,
    height: int = 128,
    overwrite: bool = False,
    progress: bool = True,
    query_labels: np.ndarray | None = None,
) -> list[pathlib.Path]:
    """Writes one PNG strip per query.

    Args:
      directory: output folder (created).
      query_paths: (Q,) query image paths.
      query_pids: (Q,) query identities, -1 where unknown.
      indices: (Q, k) gallery rows of the matches, best first (-1 = no match, not drawn).
      scores: (Q, k) cosine similarities.
      items: the gallery the rows refer to.
      width, height: thumbnail size in pixels.
      overwrite: replace existing strips; otherwise an existing one is an error.
      query_labels: (Q,) query identity names ("" = unknown); default from `query_pids`.
        Matches are judged and captioned by label.

    Returns:
      The written files, in query order.

    Raises:
      FileExistsError: a strip exists and `overwrite` is False (checked before writing).
    """
    directory = pathlib.Path(directory)
    if directory.exists() and not directory.is_dir():
        raise NotAFolderError(f"--visualize={directory} exists and is not a folder")
    files = [directory / name for name in strip_file_names(query_paths)]
    existing = [f for f in files if f.exists()]
    if existing and not overwrite:
        raise OutputExistsError(
            f"{len(existing)} result picture(s) already exist in {directory} (e.g. "
            f"{existing[0].name}); pass --overwrite or choose another --visualize folder"
        )
    make_folder(directory)
    remove_stale_temporaries(directory, [f.name for f in files])
    centroids = items.kind == "centroid"
    bar = progress_bar(range(len(files)), desc="drawing", unit="query", enabled=progress)
    if query_labels is None:
        query_labels = labels_from_pids(query_pids)
    query_labels = np.asarray(query_labels).astype(str)
    for q in bar:
        query_label = str(query_labels[q])
        query = (
            thumbnail(str(query_paths[q]), width, height),
            ["query", f"id {_short(query_label)}"],
        )
        rows = indices[q][indices[q] >= 0]
        status = match_status(query_label, items.labels[rows])
        matches = []
        for rank, (row, s) in enumerate(zip(rows.tolist(), status.tolist()), start=1):
            score = f"{float(scores[q, rank - 1]):.3f}"
            if centroids:  # how many images the centroid averages
                score += f" n={int(items.counts[row])}"
            caption = [f"#{rank} id {_short(str(items.labels[row]))}", score]
            matches.append((thumbnail(str(items.paths[row]), width, height), caption, s))
        with atomic_open(files[q], clean=False) as f:  # cleaned once above
            render_strip(query, matches, width, height).save(f, format="PNG")
    return files


def _short(label: str, size: int = 9) -> str:
    """A label as it fits under a thumbnail: "?" when unknown, cut with "~" when long."""
    if label == UNKNOWN:
        return "?"
    return label if len(label) <= size else label[: size - 1] + "~"
