"""Embedding loose image files (one image or a folder tree) with a restored model.

Shared by `python -m ctl_jax.embed` and `python -m ctl_jax.search --images`. Images go
through the embedding loop evaluation uses (`ctl_jax.inference.embed_split`: the evaluation
pipeline's decode, bilinear resize to the model's input size and ImageNet normalisation, in
batches sharded over the devices, through the jitted forward pass), with unreadable images
skipped and reported instead of failing the run.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import pathlib
import warnings

import numpy as np

from ctl_jax.data.image_io import FileImageReader, UnreadableImageWarning
from ctl_jax.data.records import Split
from ctl_jax.errors import FileContentError, MissingFileError, OptionError
from ctl_jax.retrieval.embedding_file import Embeddings, parse_market_name

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


def embed_files(
    model,
    variables,
    paths,
    height: int,
    width: int,
    batch_size: int,
    mesh=None,
    progress: bool = True,
    flip: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """BNNeck embeddings of image files with the test-time preprocessing.

    Args:
      model: a `ReidModel` (`model.apply(variables, images, train=False)`).
      variables: {"params", "batch_stats"}.
      paths: (N,) image file paths.
      height, width: the model's input size.
      batch_size: images per step (rounded up to a multiple of the device count).
      mesh: device mesh (default: all devices).
      progress: show a progress bar.
      flip: flip test (mean of the embeddings of each image and its mirror).

    Returns:
      embeddings (N, D) float32, not normalised (rows of unreadable images are zero), and
      valid (N,) bool, False for images that could not be read or decoded.
    """
    # Imported here: the commands check their flags and paths (`model_directory`,
    # `list_images`) before paying for jax.
    from ctl_jax import parallel
    from ctl_jax.inference import embed_split, make_embed_fn

    mesh = mesh if mesh is not None else parallel.make_mesh()
    split = image_split(paths)
    return embed_split(
        make_embed_fn(model, mesh, flip=flip),
        variables,
        split,
        FileImageReader(split.paths),
        height,
        width,
        batch_size,
        mesh,
        skip_unreadable=True,
        progress=progress,
        leave=True,
    )


@dataclasses.dataclass(frozen=True)
class EmbedReport:
    """Counts of an `embed_images` run, for the command's summary line."""

    num_embedded: int
    listing: ImageListing
    unreadable: list[str]

    def summary(self) -> str:
        parts = [f"embedded {self.num_embedded:,} image(s)"]
        if self.listing.skipped:
            parts.append(f"skipped {self.listing.skipped_summary()}")
        if self.unreadable:
            shown = ", ".join(self.unreadable[:3]) + (", ..." if len(self.unreadable) > 3 else "")
            parts.append(f"skipped {len(self.unreadable)} unreadable image(s) ({shown})")
        return "; ".join(parts)


def embed_images(
    restored,
    images: str | os.PathLike,
    batch_size: int | None = None,
    progress: bool = True,
    flip: bool = False,
) -> tuple[Embeddings, EmbedReport]:
    """Embeds one image or a folder tree with a restored model (`restore_model`); `flip`
    averages each image's embedding with its mirror's.

    Non-image files are skipped and counted; so are images that cannot be decoded.

    Returns:
      (Embeddings in sorted path order, EmbedReport).

    Raises:
      FileNotFoundError / ValueError: missing path, no images, or none readable.
    """
    listing = list_images(images)
    data_cfg = restored.config.data
    with warnings.catch_warnings():
        # Each unreadable image is reported once in the summary instead.
        warnings.simplefilter("ignore", UnreadableImageWarning)
        embeddings, valid = embed_files(
            restored.model,
            restored.variables,
            listing.paths,
            int(data_cfg.height),
            int(data_cfg.width),
            int(batch_size or data_cfg.eval_batch_size),
            progress=progress,
            flip=flip,
        )
    paths = np.asarray(listing.paths)
    unreadable = paths[~valid].tolist()
    if not valid.any():
        raise FileContentError(
            f"--images: none of the {len(paths)} image(s) under {images} could be decoded "
            f"(e.g. {unreadable[0]})"
        )
    split = image_split(paths[valid])
    result = Embeddings(embeddings[valid], split.pids, split.camids, split.paths)
    return result, EmbedReport(int(valid.sum()), listing, unreadable)
