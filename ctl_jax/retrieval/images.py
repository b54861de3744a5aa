"""Embedding loose image files (one image or a folder tree) with a restored model.

Shared by `python -m ctl_jax.embed` and `python -m ctl_jax.search --images`. Images go
through an `ctl_jax.embedder.Embedder` (`Embedder.embed_files`: the evaluation pipeline's
decode, bilinear resize to the model's input size and ImageNet normalisation, in batches
sharded over the devices, through the jitted forward pass), with unreadable images skipped
and reported instead of failing the run.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import warnings

import numpy as np

from ctl_jax.data.image_io import UnreadableImageWarning
from ctl_jax.data.records import Split
from ctl_jax.errors import FileContentError, MissingFileError, OptionError
from ctl_jax.retrieval.embedding_file import Embeddings, parse_market_name
from ctl_jax.retrieval.identities import IdentitySource, assign_identities
from ctl_jax.retrieval.labels import pids_for_labels

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


@dataclasses.dataclass(frozen=True)
class ImageListing:
    """The images found under a path and what was passed over.

    Attributes:
      paths: sorted absolute paths of the .jpg/.jpeg/.png files.
      skipped: {suffix: count} of other files (suffix "" for files without one).
    """

    paths: list[str]
    skipped: dict[str, int]

    @property
    def num_skipped(self) -> int:
        return sum(self.skipped.values())

    def skipped_summary(self) -> str:
        """E.g. "3 non-image files (.txt: 2, .json: 1)" or ""."""
        if not self.skipped:
            return ""
        kinds = ", ".join(f"{suffix or 'no suffix'}: {n}" for suffix, n in self.skipped.items())
        return f"{self.num_skipped} non-image file(s) ({kinds})"


def model_directory(workdir: str | None, checkpoint: str | None) -> str:
    """The one checkpoint directory given by --workdir or --checkpoint."""
    if workdir and checkpoint:
        raise OptionError("give either --workdir or --checkpoint, not both")
    if not (workdir or checkpoint):
        raise OptionError("give the model: --workdir=DIR (training run) or --checkpoint=DIR")
    return workdir or checkpoint


def list_images(path: str | os.PathLike) -> ImageListing:
    """One image, or every .jpg/.jpeg/.png under a folder (recursively, sorted).

    Hidden files and folders (names starting with ".") are ignored; other files are counted
    as skipped. Symbolic links to folders are not followed (no cycles).

    Raises:
      FileNotFoundError: `path` does not exist.
      ValueError: `path` is a file that is not a .jpg/.jpeg/.png, or a folder without any.
    """
    path = pathlib.Path(path)
    if not path.exists():
        raise MissingFileError(f"--images: {path} does not exist")
    if path.is_file():
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise OptionError(
                f"--images: {path} is not a {'/'.join(IMAGE_SUFFIXES)} image; pass an image "
                "or a folder of images"
            )
        return ImageListing([str(path.resolve())], {})
    images, skipped = [], collections.Counter()
    for folder, subfolders, files in os.walk(path):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            suffix = os.path.splitext(name)[1].lower()
            if suffix in IMAGE_SUFFIXES:
                images.append(os.path.abspath(os.path.join(folder, name)))
            else:
                skipped[suffix] += 1
    listing = ImageListing(sorted(images), dict(skipped.most_common()))
    if not listing.paths:
        also = f" (skipped {listing.skipped_summary()})" if listing.skipped else ""
        raise OptionError(f"--images: no {'/'.join(IMAGE_SUFFIXES)} images under {path}{also}")
    return listing


def image_split(paths) -> Split:
    """A `Split` of image files; pid and camera parsed from Market-style names, else -1."""
    parsed = np.asarray([parse_market_name(p) for p in paths], np.int64).reshape(-1, 2)
    return Split.from_lists(list(paths), parsed[:, 0], parsed[:, 1])


@dataclasses.dataclass(frozen=True)
class EmbedReport:
    """Counts of an `embed_images` run, for the command's summary line."""

    num_embedded: int
    listing: ImageListing
    unreadable: list[str]
    identities: str = ""

    def summary(self) -> str:
        parts = [f"embedded {self.num_embedded:,} image(s)"]
        if self.identities:
            parts.append(self.identities)
        if self.listing.skipped:
            parts.append(f"skipped {self.listing.skipped_summary()}")
        if self.unreadable:
            shown = ", ".join(self.unreadable[:3]) + (", ..." if len(self.unreadable) > 3 else "")
            parts.append(f"skipped {len(self.unreadable)} unreadable image(s) ({shown})")
        return "; ".join(parts)


def embed_images(
    embedder,
    images: str | os.PathLike,
    progress: bool = True,
    identity: IdentitySource | str | None = None,
    shard: tuple[int, int] | None = None,
) -> tuple[Embeddings, EmbedReport]:
    """Embeds one image or a folder tree with an `ctl_jax.embedder.Embedder` (its batch
    size and flip test apply); `identity` (`--identity`: market, folder, csv:FILE, default
    auto) names each image's identity (`identities.py`).

    Non-image files are skipped and counted; so are images that cannot be decoded.
    `shard` (K, N) embeds only the K-th of N contiguous parts of the sorted image list
    (`shards.shard_range`), with identities assigned from the whole list; the result
    records the shard.

    Returns:
      (Embeddings in sorted path order, EmbedReport).

    Raises:
      FileNotFoundError / ValueError: missing path, no images, or none readable.
    """
    listing = list_images(images)
    found = assign_identities(listing.paths, images, identity)
    if shard is not None:
        from ctl_jax.retrieval.shards import shard_range

        rows = shard_range(len(listing.paths), shard)
        if rows.start == rows.stop:
            raise OptionError(
                f"--shard={shard[0]}/{shard[1]}: that part of the {len(listing.paths)} image(s) "
                f"under {images} is empty; use at most {len(listing.paths)} shards"
            )
        listing = dataclasses.replace(listing, paths=listing.paths[rows])
        found = dataclasses.replace(found, labels=found.labels[rows], camids=found.camids[rows])
    with warnings.catch_warnings():
        # Each unreadable image is reported once in the summary instead.
        warnings.simplefilter("ignore", UnreadableImageWarning)
        embeddings, valid = embedder.embed_files(listing.paths, progress=progress)
    paths = np.asarray(listing.paths)
    unreadable = paths[~valid].tolist()
    if not valid.any():
        raise FileContentError(
            f"--images: none of the {len(paths)} image(s) under {images} could be decoded "
            f"(e.g. {unreadable[0]})"
        )
    labels = found.labels[valid]
    result = Embeddings(
        embeddings[valid],
        pids_for_labels(labels),
        found.camids[valid],
        paths[valid],
        labels,
        shard=shard,
    )
    embedded = dataclasses.replace(found, labels=labels, camids=found.camids[valid])
    report = EmbedReport(int(valid.sum()), listing, unreadable, embedded.summary())
    return result, report
