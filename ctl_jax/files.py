"""Writing user-facing output files safely: never over an existing file unless asked,
atomically (a crash leaves the old file or none, never half a file), and with a one-line
error when the output cannot be written.

Every writer goes through here: `atomic_open` for files, `make_folder` for folders, both
inside `writing`, which turns an `OSError` (no permission, a parent that is a file, a full
disk) into `UnwritableOutputError`: `cannot write <path>: <reason>`, exit 1 on the command
line. One place for it, so no command prints a traceback for an unwritable output.

Temporary files. `atomic_open` writes `.<name>.<pid>.<random>.tmp` next to the target and
renames it over the target when complete. A writer killed before the rename (kill -9, out of
memory, a power cut) leaves its temporary file; the next write of the same target removes
every temporary file of that target whose process no longer runs on this host. Only names of
exactly that pattern are ever removed, so nothing a user wrote is touched. (Temporary files
written by ctl_jax before the pid was part of the name, `.<name>.<random>.tmp`, are left
alone: delete them by hand once no write is running.)
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import re
import tempfile
from collections.abc import Iterable

from ctl_jax.errors import FileContentError, OutputExistsError, UnwritableOutputError, UserError


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


def _reason(error: OSError, path: pathlib.Path, folder: bool = False) -> str:
    """Why writing `path` (a `folder`, else a file) failed, in words: a parent that is a
    file (or the folder itself) is named as such."""
    for parent in [path, *path.parents] if folder else path.parents:
        if parent.exists() or parent.is_symlink():
            if not parent.is_dir():
                return f"{parent} is a file, not a folder"
            break
    reason = error.strerror or str(error) or type(error).__name__
    named = error.filename
    if named is not None and os.fspath(named) not in (os.fspath(path), ""):
        reason += f" ({os.fspath(named)})"
    return reason


@contextlib.contextmanager
def writing(path: str | os.PathLike, folder: bool = False, output: str | os.PathLike = ""):
    """Turns an `OSError` raised in the block into `UnwritableOutputError` naming `path` (a
    `folder` to create, else a file), or `output` when given (the file `path` is made for).

    A `UserError` (also those that are OSErrors, such as `OutputExistsError` or an unreadable
    input image) passes unchanged: it already says what is wrong.
    """
    try:
        yield
    except UserError:
        raise
    except OSError as e:
        path = pathlib.Path(path)
        reason = _reason(e, path, folder)
        raise UnwritableOutputError(f"cannot write {output or path}: {reason}") from e


def make_folder(path: str | os.PathLike, output: str | os.PathLike = "") -> pathlib.Path:
    """Creates the folder `path` and its parents (fine if it exists); returns it as a Path.

    Raises:
      UnwritableOutputError: it cannot be created (e.g. a parent is a file); the message
        names `output` when given (the file the folder is made for), else `path`.
    """
    path = pathlib.Path(path)
    with writing(path, folder=True, output=output):
        path.mkdir(parents=True, exist_ok=True)
    return path


# `.<name>.<pid>.<random>.tmp`, the temporary files of `atomic_open` (mkstemp's random part
# is 8 characters of [a-z0-9_]); the fixed end makes the split into name and pid unique.
_TEMPORARY = re.compile(r"\.(.+)\.(\d+)\.[a-z0-9_]{8}\.tmp")


def _running(pid: int) -> bool:
    """Whether a process `pid` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_temporaries(folder: str | os.PathLike, names: Iterable[str]) -> list[pathlib.Path]:
    """Removes the temporary files that interrupted `atomic_open` writes of the files
    `names` in `folder` left there (those of processes that no longer run on this host);
    returns what was removed. One scan of the folder, whatever the number of names."""
    names = set(names)
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or match.group(1) not in names:
            continue
        if not entry.is_file(follow_symlinks=False):
            continue
        pid = int(match.group(2))
        if pid == os.getpid() or _running(pid):
            continue
        with contextlib.suppress(FileNotFoundError):  # another writer removed it first
            os.unlink(entry.path)
            removed.append(pathlib.Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb", clean: bool = True):
    """Opens a temporary file next to `path`; on success it is synced and renamed over `path`.

    Usage: `with atomic_open(path) as f: np.savez(f, ...)`. Parent folders are created, and
    with `clean` the temporary files of earlier interrupted writes of `path` removed (module
    docstring; a writer of many files in one folder calls `remove_stale_temporaries` once
    for all and passes clean=False).

    Raises:
      UnwritableOutputError: the file cannot be written (no permission, a parent that is a
        file, a full disk); the temporary file is removed.
    """
    path = pathlib.Path(path)
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        if clean:
            remove_stale_temporaries(path.parent, [path.name])
        fd, tmp = tempfile.mkstemp(
            prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent
        )
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


def require_numpy_file(path: pathlib.Path, what: str) -> None:
    """Raises `FileContentError` unless `path` starts like an .npz (a zip) or an .npy.

    numpy reads anything else as a pickle, and with allow_pickle=False then advises
    allow_pickle=True: unsafe advice for a file from elsewhere. `what` names the file
    ("embeddings file", "index file") and what should have written it.
    """
    with open(path, "rb") as f:
        head = f.read(6)
    if not (head.startswith(b"PK\x03\x04") or head.startswith(b"\x93NUMPY")):
        kind = "it is empty" if not head else "not a zip archive"
        raise FileContentError(f"{what} {path} is not an .npz ({kind})")
