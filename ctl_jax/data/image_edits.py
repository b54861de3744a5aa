"""Per-image edits applied when an image is read: crop boxes and rotations.

Revisited Oxford/Paris queries are the part of the query image inside its bounding box
(`gnd[i]['bbx']`), and INRIA Holidays is commonly evaluated with its sideways images turned
upright. `EditedImageReader` reads the file, applies the edit with PIL and hands back the
edited image encoded as PNG (lossless), so everything downstream (the grain pipeline, the
test-time resize) is unchanged; images without an edit are passed through byte for byte.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image

from ctl_jax.data.image_io import FileImageReader, UnreadableImageError, decode_pil

EXIF = -1  # rotation code: turn the image as its EXIF orientation tag says
_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@dataclasses.dataclass(frozen=True)
class ImageEdits:
    """Edits of the N images of one split.

    Attributes:
      boxes: (N, 4) float64 crop boxes (x0, y0, x1, y1) in pixels, as PIL's `Image.crop`
        takes them (the revisitop query crop), NaN rows for no crop; or None.
      rotations: (N,) int64 clockwise rotations in degrees (0, 90, 180, 270), or `EXIF`
        for the image's EXIF orientation; or None.
    """

    boxes: np.ndarray | None = None
    rotations: np.ndarray | None = None

    def __post_init__(self):
        if self.boxes is not None:
            boxes = np.asarray(self.boxes, dtype=np.float64)
            if boxes.ndim != 2 or boxes.shape[1] != 4:
                raise ValueError(f"crop boxes must have shape (N, 4), got {boxes.shape}")
            object.__setattr__(self, "boxes", boxes)
        if self.rotations is not None:
            rotations = np.asarray(self.rotations, dtype=np.int64)
            if rotations.ndim != 1 or not np.isin(rotations, (EXIF, 0, 90, 180, 270)).all():
                raise ValueError("rotations must be 0, 90, 180, 270 or EXIF (-1) per image")
            object.__setattr__(self, "rotations", rotations)

    def edits(self, index: int) -> tuple[tuple[float, ...] | None, int]:
        """(crop box or None, rotation) of image `index`."""
        box = None
        if self.boxes is not None and not np.isnan(self.boxes[index]).any():
            box = tuple(float(v) for v in self.boxes[index])
        rotation = 0 if self.rotations is None else int(self.rotations[index])
        return box, rotation


class EditedImageReader(FileImageReader):
    """`FileImageReader` that applies `ImageEdits` (picklable: paths and arrays only)."""

    def __init__(self, paths, edits: ImageEdits, root=None):
        super().__init__(paths, root)
        self.image_edits = edits

    def read(self, index: int) -> bytes:
        data = super().read(index)
        box, rotation = self.image_edits.edits(index)
        if box is None and rotation == 0:
            return data
        path = self.path(index)
        image = decode_pil(data, path)
        if box is not None:  # in the coordinates of the stored pixels, before any rotation
            image = image.crop(box)
            if image.width < 1 or image.height < 1:
                raise UnreadableImageError(f"crop box {box} of image {path!r} is empty")
        if rotation == EXIF:
            orientation = Image.open(io.BytesIO(data)).getexif().get(_ORIENTATION_TAG, 1)
            if orientation in _EXIF_TRANSPOSE:
                image = image.transpose(_EXIF_TRANSPOSE[orientation])
        elif rotation:
            image = image.rotate(-rotation, expand=True)  # PIL rotates anticlockwise
        out = io.BytesIO()
        image.save(out, format="PNG")
        return out.getvalue()


def image_reader(paths, edits: ImageEdits | None) -> FileImageReader:
    """A reader of `paths` that applies `edits` when given."""
    return FileImageReader(paths) if edits is None else EditedImageReader(paths, edits)
