"""Reading uploaded images within limits: the request body (size checked from Content-Length
before a byte of it is read, and again while it streams in), multipart/form-data parsed by
python-multipart (through Starlette) with a bounded number of parts, and decoding with the
pixel count checked from the image header before the pixels are decoded.

Every refusal is a `RequestError` carrying the HTTP status the service answers with.
"""

from __future__ import annotations

import dataclasses
import io

import numpy as np
from PIL import Image, UnidentifiedImageError

from ctl_jax.data import transforms

# Pillow refuses images over 2 x Image.MAX_IMAGE_PIXELS (~179 M pixels, ~540 MB decoded) and
# only warns above ~89 M. The service caps far lower by default: 16 M pixels is a 4:3 phone
# photo of 4,600 x 3,450 and ~48 MB once decoded to RGB.
DEFAULT_MAX_PIXELS = 16_000_000
DEFAULT_MAX_PARTS = 16
IMAGE_TYPES = ("image/", "application/octet-stream")


class RequestError(Exception):
    """A request the service refuses: HTTP `status` and a one-line message."""

    def __init__(self, status: int, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


@dataclasses.dataclass(frozen=True)
class UploadLimits:
    """What one request may send.

    Attributes:
      max_bytes: the largest request body.
      max_pixels: the largest width x height of an image, checked before decoding.
      max_parts: the most multipart/form-data parts (files and fields each).
    """

    max_bytes: int = 16 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_parts: int = DEFAULT_MAX_PARTS


def declared_length(headers, max_bytes: int) -> int | None:
    """The body size a request declares (None: chunked), refused before the body is read.

    Raises:
      RequestError 400: a Content-Length that is not a non-negative integer; 411: neither
        Content-Length nor chunked transfer; 413: over `max_bytes`.
    """
    value = headers.get("content-length")
    if value is None:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return None
        raise RequestError(411, "send the image with a Content-Length header")
    value = value.strip()
    # Digits only: int() would also take "-5", "+5", " 5" and "1_000".
    if not value.isascii() or not value.isdigit():
        raise RequestError(400, f"bad Content-Length {value[:40]!r}: expected a byte count")
    size = int(value)
    if size > max_bytes:
        raise RequestError(413, f"the body has {size:,} bytes; the limit is {max_bytes:,}")
    return size


async def read_body(request, max_bytes: int) -> bytes:
    """The request body, at most `max_bytes` (a chunked body is cut off as it exceeds it)."""
    declared_length(request.headers, max_bytes)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise RequestError(413, f"the body is over the limit of {max_bytes:,} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not body:
        raise RequestError(400, "empty body: post an image")
    return body


async def uploaded_images(request, limits: UploadLimits, many: bool) -> list[tuple[bytes, str]]:
    """(encoded image bytes, file name) of the images a request carries.

    The raw body (Content-Type image/* or application/octet-stream) is one image. A
    multipart/form-data body gives its part named "image" (or, with `many`, every file part;
    else the first file part).

    Raises:
      RequestError 415: another content type; 400: a malformed multipart body, too many
        parts, no file; plus those of `read_body`.
    """
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException, MultiPartParser

    content_type = request.headers.get("content-type", "")
    kind = content_type.split(";")[0].strip().lower()
    if kind.startswith(IMAGE_TYPES[0]) or kind == IMAGE_TYPES[1]:
        return [(await read_body(request, limits.max_bytes), "upload")]
    if kind != "multipart/form-data":
        raise RequestError(
            415,
            f"Content-Type {kind or '(none)'} is not accepted: post the image as the raw body "
            "(image/* or application/octet-stream) or as multipart/form-data",
        )
    body = await read_body(request, limits.max_bytes)

    async def stream():
        yield body

    parser = MultiPartParser(
        request.headers,
        stream(),
        max_files=limits.max_parts,
        max_fields=limits.max_parts,
        max_part_size=64 * 1024,  # text fields only; files are bounded by the body limit
    )
    try:
        form = await parser.parse()
    except MultiPartException as e:
        raise RequestError(400, f"bad multipart/form-data body: {e.message}") from e
    try:
        files = [(key, value) for key, value in form.multi_items() if isinstance(value, UploadFile)]
        named = [item for item in files if item[0] == "image"]
        chosen = files if many else (named or files)[:1]
        if not chosen:
            raise RequestError(400, "the multipart/form-data body has no file (field 'image')")
        return [(await upload.read(), upload.filename or "upload") for _, upload in chosen]
    finally:
        await form.close()


def decode_image(data: bytes, height: int, width: int, max_pixels: int) -> np.ndarray:
    """Encoded bytes -> (height, width, 3) uint8 RGB at the model's input size.

    The same decode and bilinear resize as evaluation (`image_io.decode_pil`,
    `transforms.resize_pil`), with the image's size read from its header first: an image
    over `max_pixels` is refused before its pixels are decoded.

    Raises:
      RequestError 400: not a decodable image; 413: too many pixels.
    """
    try:
        image = Image.open(io.BytesIO(data))  # reads the header only
        pixels = image.width * image.height
        if pixels > max_pixels:
            raise RequestError(
                413,
                f"the image is {image.width} x {image.height} = {pixels:,} pixels; the limit "
                f"is {max_pixels:,}",
            )
        image.load()
        if image.mode != "RGB":
            image = image.convert("RGB")
    except Image.DecompressionBombError as e:
        raise RequestError(413, f"the image has too many pixels: {e}") from e
    except UnidentifiedImageError as e:
        raise RequestError(400, "not a readable image (or a format PIL cannot read)") from e
    except (OSError, ValueError, SyntaxError) as e:
        raise RequestError(400, f"not a readable image: {e}") from e
    return transforms.resize_pil(image, height, width)
