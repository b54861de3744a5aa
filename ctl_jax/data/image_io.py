"""Reading and decoding images: bytes from a reader, uint8 RGB arrays out.

A *reader* is any picklable object with ``read(index) -> bytes`` (the encoded image of
dataset index ``index``). `FileImageReader` reads files; a tfds-backed reader has the same
method. Readers are pickled into grain worker processes, so they hold paths, not handles.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image

from ctl_jax.errors import UnreadableImageError


class UnreadableImageWarning(UserWarning):
    """An unreadable image was replaced by an invalid (masked) slot."""


class FileImageReader:
    """Reads image files by dataset index.

    Args:
      paths: (N,) image paths, absolute or relative to ``root``.
      root: optional directory the paths are relative to.
    """

    def __init__(self, paths, root: str | os.PathLike | None = None):
        self.paths = [str(p) for p in paths]
        self.root = None if root is None else str(root)

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, index: int) -> str:
        path = self.paths[index]
        return path if self.root is None else os.path.join(self.root, path)

    def read(self, index: int) -> bytes:
        """Encoded bytes of image ``index``. Raises `UnreadableImageError` naming the path."""
        path = self.path(index)
        try:
            with open(path, "rb") as f:
                return f.read()
        except OSError as e:
            raise UnreadableImageError(f"cannot read image {path!r}: {e}") from e


def decode_pil(data: bytes, path_for_errors: str = "<bytes>") -> Image.Image:
    """Decodes encoded image bytes into a fully loaded RGB PIL image.

    Grayscale, palette, RGBA and CMYK images are converted to RGB (alpha is dropped, as
    ``PIL.Image.convert('RGB')`` in the original loader does).

    Raises:
      UnreadableImageError: naming ``path_for_errors`` for empty, truncated or non-image data.
    """
    try:
        image = Image.open(io.BytesIO(data))
        # load() forces the full decode here, so a truncated file fails now and not later.
        image.load()
        if image.mode != "RGB":
            image = image.convert("RGB")
        return image
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        raise UnreadableImageError(f"cannot decode image {path_for_errors!r}: {e}") from e


def decode_image(data: bytes, path_for_errors: str = "<bytes>") -> np.ndarray:
    """Decodes encoded image bytes. Returns (H, W, 3) uint8 RGB.

    Raises:
      UnreadableImageError: naming ``path_for_errors`` for empty, truncated or non-image data.
    """
    return np.asarray(decode_pil(data, path_for_errors))


class UnreadableCounter:
    """Counts unreadable images in this process and warns once per image with the count."""

    def __init__(self):
        self.count = 0

    def report(self, path: str, error: Exception) -> None:
        self.count += 1
        warnings.warn(
            f"skipping unreadable image {path!r} ({error}); its slot is marked invalid "
            f"({self.count} unreadable image(s) so far in this process)",
            UnreadableImageWarning,
            stacklevel=3,
        )


# One counter per process: worker processes count their own images.
UNREADABLE = UnreadableCounter()
