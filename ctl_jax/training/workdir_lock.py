"""One training per work directory: an exclusive lock on `<workdir>/train.lock`.

The lock is an `fcntl.flock` on an open file, so the kernel releases it when the process
ends, however it ends (kill -9, out of memory, a crash): a stale lock file never blocks the
next run, and nothing has to be cleaned up. The file holds who took it (pid, host, time) for
the message a second training gets. Evaluation and embedding only read and take no lock.

In a multi-process run only process 0 takes the lock: the processes of one run write into the
same work directory together (process 0 the config and logs, all of them their shards of a
checkpoint), and on a shared file system a per-process lock would make them refuse each
other. A second multi-process run on a held directory fails in its process 0; its other
processes then stop when the coordinator reports process 0 gone.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket

from ctl_jax.errors import WorkdirInUseError

LOCK_FILE = "train.lock"


@contextlib.contextmanager
def workdir_lock(workdir: pathlib.Path, take: bool = True):
    """Holds `<workdir>/train.lock` exclusively for the duration of the block.

    Args:
      workdir: the work directory (created if missing).
      take: False in processes other than 0 of a multi-process run (no lock, see above).

    Raises:
      WorkdirInUseError: another living process holds the lock.
    """
    if not take:
        yield
        return
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise WorkdirInUseError(
                f"work directory {workdir} is in use by another training ({_holder(path)}); "
                "wait for it to finish or stop it, or use another --workdir"
            ) from None
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (removing it would race a new run)


def _holder(path: pathlib.Path) -> str:
    try:
        holder = json.loads(path.read_text())
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return f"see {path}"
