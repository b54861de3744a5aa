"""One writer at a time: an exclusive, self-releasing lock on a `<something>.lock` file.

The lock is an `fcntl.flock` on an open file, so the kernel releases it when the process ends,
however it ends (kill -9, out of memory, a crash): a lock file left behind never blocks anyone.
The file holds who took it (pid, host, command, time) for the message a refused writer gets.

The lock file is removed when its holder finishes. That is safe because a taker checks, once
it holds the lock, that the path still names the file it locked: a process that opened the
file just before the holder removed it would otherwise hold a lock on a file nobody else can
see, beside a new one. It then retries on the new file.

Used for a training's work directory (`train.lock`) and for an index file (`I.npz.lock`,
shared by `python -m ctl_jax.search --add/--remove` and the service's live updates).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
import sys
import time
from collections.abc import Callable, Iterator

from ctl_jax.files import make_folder, writing

# How often a waiting taker tries again.
_POLL_SECONDS = 0.05


class LockHeld(Exception):
    """Raised by `exclusive_lock` when another living process holds the lock.

    `holder` describes it ("pid 123 on host, `search`, started 2026-...") for the caller's
    message; callers turn this into their own `UserError`.
    """

    def __init__(self, path: pathlib.Path, holder: str):
        super().__init__(f"{path} is held by {holder}")
        self.path = path
        self.holder = holder


@contextlib.contextmanager
def exclusive_lock(
    path: str | os.PathLike,
    command: str = "",
    wait_seconds: float = 0.0,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[pathlib.Path]:
    """Holds the lock file `path` exclusively for the duration of the block.

    Args:
      path: the lock file (created, with its parent folder, if missing).
      command: what the holder is doing ("train", "search --add", "serve"), for the message.
      wait_seconds: how long to wait for a holder to finish; 0 refuses at once.
      on_wait: called once with the holder's description when the lock is busy and we wait.

    Yields:
      The lock file's path.

    Raises:
      LockHeld: the lock is still held by another process after `wait_seconds`.
    """
    path = pathlib.Path(path)
    make_folder(path.parent)
    deadline = time.monotonic() + max(wait_seconds, 0.0)
    told = False
    while True:
        with writing(path):  # an unwritable place is a one-line error
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = _holder(path)
            if time.monotonic() >= deadline:
                raise LockHeld(path, holder) from None
            if on_wait is not None and not told:
                on_wait(holder)
                told = True
            time.sleep(_POLL_SECONDS)
            continue
        if _same_file(fd, path):
            break
        os.close(fd)  # the holder removed the file after we opened it: lock the new one
    try:
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command or os.path.basename(sys.argv[0] or "python"),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield path
    finally:
        # Remove while still holding the lock (see the module docstring), then release.
        with contextlib.suppress(OSError):
            if _same_file(fd, path):
                os.unlink(path)
        os.close(fd)


def _same_file(fd: int, path: pathlib.Path) -> bool:
    try:
        here, there = os.fstat(fd), os.stat(path)
    except FileNotFoundError:
        return False
    return (here.st_dev, here.st_ino) == (there.st_dev, there.st_ino)


def _holder(path: pathlib.Path) -> str:
    try:
        holder = json.loads(path.read_text())
        command = f", `{holder['command']}`" if holder.get("command") else ""
        return f"pid {holder['pid']} on {holder['host']}{command}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"another process (see {path})"
