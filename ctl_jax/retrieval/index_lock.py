"""One writer per index file: an exclusive lock on `<index>.lock` beside it.

An update of an index file is a read-modify-write (load, add or remove, save). Two of them
started together would each load the old file, and the second save would drop the first
one's change while both report success. So every writer of an index file holds this lock
from before it loads the file until the new file is in place: `search --index=I.npz
--add=X.npz --save_index=I.npz` and the service's live updates alike.

Built on `ctl_jax.file_lock`: a lock held by a killed process is released by the kernel and
never blocks; a second writer waits up to `wait_seconds` (told once whom it waits for), then
gets `IndexInUseError` naming the holder. Readers (a search that does not save) take no lock:
index files are replaced atomically, so a reader sees the old file or the new one.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import Callable, Iterator

from ctl_jax import files
from ctl_jax.errors import IndexInUseError
from ctl_jax.file_lock import LockHeld, exclusive_lock

# How long the command line waits for another writer of the same index by default: an
# update of a large index takes seconds; a writer stuck much longer is worth a message.
DEFAULT_WAIT_SECONDS = 30.0


def lock_path(index_path: str | os.PathLike) -> pathlib.Path:
    """`<folder>/<name>.lock` for the index file `<folder>/<name>`, its folder resolved so
    that two spellings of one file (`I.npz`, `./I.npz`, a symlinked folder) share a lock."""
    index_path = pathlib.Path(index_path)
    return index_path.parent.resolve() / f"{index_path.name}.lock"


@contextlib.contextmanager
def index_lock(
    index_path: str | os.PathLike,
    command: str = "",
    wait_seconds: float = DEFAULT_WAIT_SECONDS,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[pathlib.Path]:
    """Holds the lock of the index file `index_path` for the block (load, change and save
    inside it).

    Args:
      index_path: the index file being written (it need not exist yet).
      command: what the holder does ("search --add", "serve"), for a refused writer's message.
      wait_seconds: how long to wait for another writer; 0 refuses at once.
      on_wait: called once with the holder's description when we have to wait.

    Yields:
      The lock file's path.

    Raises:
      IndexInUseError: another process still holds the lock after `wait_seconds`.
      UnwritableOutputError: the lock file cannot be created beside the index.
    """
    # Named after the index: the lock file is ours, the place is the user's.
    files.make_folder(pathlib.Path(index_path).parent, output=index_path)
    with contextlib.ExitStack() as stack:
        try:
            lock = stack.enter_context(
                exclusive_lock(lock_path(index_path), command, wait_seconds, on_wait)
            )
        except LockHeld as held:
            waited = f" after waiting {wait_seconds:g} s" if wait_seconds > 0 else ""
            raise IndexInUseError(
                f"index {index_path} is being updated by {held.holder}{waited}; try again "
                "when it has finished"
            ) from None
        yield lock
