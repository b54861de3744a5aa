"""One training per work directory: an exclusive lock on `<workdir>/train.lock`.

Built on `ctl_jax.file_lock` (a kernel lock released however the process ends; the file is
removed when the training finishes, and a file left by a crash never blocks). Evaluation and
embedding only read and take no lock.

In a multi-process run only process 0 takes the lock: the processes of one run write into the
same work directory together (process 0 the config and logs, all of them their shards of a
checkpoint), and on a shared file system a per-process lock would make them refuse each
other. A second multi-process run on a held directory fails in its process 0; its other
processes then stop when the coordinator reports process 0 gone.
"""

from __future__ import annotations

import contextlib
import pathlib

from ctl_jax import files
from ctl_jax.errors import WorkdirInUseError
from ctl_jax.file_lock import LockHeld, exclusive_lock

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
    files.make_folder(workdir)  # an unwritable --workdir is named in the message
    if not take:
        yield
        return
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(exclusive_lock(pathlib.Path(workdir) / LOCK_FILE, command="train"))
        except LockHeld as held:
            raise WorkdirInUseError(
                f"work directory {workdir} is in use by another training ({held.holder}); "
                "wait for it to finish or stop it, or use another --workdir"
            ) from None
        yield
