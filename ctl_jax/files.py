"""Writing user-facing output files safely: never over an existing file unless asked, and
atomically (a crash leaves the old file or none, never half a file)."""

from __future__ import annotations

import contextlib
import os
import pathlib
import tempfile

from ctl_jax.errors import OutputExistsError


def refuse_overwrite(path: str | os.PathLike, overwrite: bool, flag: str = "--output"):
    """Returns `path` as a Path; raises FileExistsError if it exists and `overwrite` is False.

    `flag` names the option that chose the path, for the message.
    """
    path = pathlib.Path(path)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{path} already exists; pass --overwrite to replace it or choose another {flag}"
        )
    return path


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb"):
    """Opens a temporary file next to `path`; on success it is synced and renamed over `path`.

    Usage: `with atomic_open(path) as f: np.savez(f, ...)`. Parent folders are created.
    """
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; these are ordinary user files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
