"""Which gallery pictures `GET /image` may send, and the paths search answers show.

A file is served only when it is one the index names, its path is absolute, it ends in
.jpg/.jpeg/.png, its real path (every symbolic link resolved) is the indexed path itself,
and it is a regular file that starts like a JPEG or PNG. This is checked when the index is
loaded (a path that fails is never offered) and again on every request, where the file is
opened with O_NOFOLLOW and checked through its open descriptor: swapping a gallery file for
a link to /etc/shadow after start-up, or an index file whose paths name /etc/passwd, gets a
404, not the file.

Answers name gallery images relative to the image root (default: the deepest folder holding
every indexed image), so they do not disclose the server's folder layout; `absolute=True`
keeps the absolute paths.
"""

from __future__ import annotations

import os
import stat

from ctl_jax.deploy.uploads import RequestError
from ctl_jax.retrieval.images import IMAGE_SUFFIXES

MAX_IMAGE_BYTES = 64 * 1024 * 1024
_SIGNATURES = {b"\x89PNG\r\n\x1a\n": "image/png", b"\xff\xd8\xff": "image/jpeg"}


def _plain_path(path: str) -> bool:
    """An absolute .jpg/.jpeg/.png path with no symbolic link anywhere along it."""
    return (
        os.path.isabs(path)
        and path.lower().endswith(IMAGE_SUFFIXES)
        and os.path.realpath(path) == os.path.normpath(path)
    )


def _servable(path: str) -> bool:
    try:
        return _plain_path(path) and stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


class GalleryFiles:
    """The index's servable pictures, keyed by the path answers show.

    Args:
      paths: the index's item paths ("" for none).
      root: folder answers are relative to; default the common folder of the paths.
      absolute: show absolute paths instead.
      known: {absolute path: servable} already checked (a previous `GalleryFiles.checked`),
        so an update re-checks only new paths.
    """

    def __init__(self, paths, root: str | None = None, absolute: bool = False, known=None):
        paths = sorted({str(p) for p in paths if p})
        if root is None:
            folders = [os.path.dirname(p) for p in paths if os.path.isabs(p)]
            root = os.path.commonpath(folders) if folders else "/"
        self.root = os.path.normpath(root)
        self.absolute = absolute
        known = known or {}
        self.checked = {p: known[p] if p in known else _servable(p) for p in paths}
        self._by_shown = {self.shown(p): p for p, ok in self.checked.items() if ok}

    def __len__(self) -> int:
        return len(self._by_shown)

    def shown(self, path: str | None) -> str | None:
        """The path an answer gives for an indexed path."""
        if not path or self.absolute or not os.path.isabs(path):
            return path or None
        relative = os.path.relpath(path, self.root)
        return path if relative.startswith("..") else relative

    def servable(self, path: str | None) -> bool:
        return bool(path) and self.checked.get(path, False)

    def read(self, shown: str) -> tuple[bytes, str]:
        """(bytes, content type) of the picture an answer named `shown`.

        Raises:
          RequestError 404: not a servable picture of the index (whatever `shown` is).
        """
        path = self._by_shown.get(shown)
        if path is None or not _plain_path(path):
            raise RequestError(404, "not an image of the index")
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
        except OSError as e:
            raise RequestError(404, "the index's image cannot be read") from e
        with os.fdopen(fd, "rb") as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_IMAGE_BYTES:
                raise RequestError(404, "not an image of the index")
            data = f.read(MAX_IMAGE_BYTES + 1)
        kind = next((k for sig, k in _SIGNATURES.items() if data.startswith(sig)), None)
        if kind is None:
            raise RequestError(404, "not an image of the index")
        return data, kind
