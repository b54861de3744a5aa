"""The service's index: the one searches read, changed by live updates and kept equal to
its file.

Readers take `store.index` (one attribute read) and use that object for the whole search:
an update builds a new `Index` beside it (a copy, changed, saved, warmed up) and only then
swaps the reference, so no search sees a half-applied update.

Writers. The index file has one writer at a time: whoever holds `I.npz.lock`
(`ctl_jax.file_lock`), which `python -m ctl_jax.search --add/--remove` takes too. The
service takes it for each update only (not for its whole life), so a command-line update
while the service runs waits at most one service update. Under the lock the service checks
whether the file changed since it last read or wrote it (inode, size, modification time);
if so it reloads it and applies its change on top, so no command-line change is lost. The
same check runs every second (`SearchService`), so searches also see a change made from
the command line.
"""

from __future__ import annotations

import collections.abc
import os
import pathlib
import threading

from ctl_jax.deploy.uploads import RequestError
from ctl_jax.file_lock import LockHeld, exclusive_lock
from ctl_jax.retrieval import approximate
from ctl_jax.retrieval.updatable_index import Index


def lock_path(index_path: str | os.PathLike) -> pathlib.Path:
    """The one-writer lock file of an index file: `I.npz` -> `I.npz.lock`."""
    path = pathlib.Path(index_path)
    return path.with_name(path.name + ".lock")


def _signature(path) -> tuple | None:
    try:
        info = os.stat(path)
    except OSError:
        return None
    return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)


def _copy(index: Index) -> Index:
    """An `Index` that can be changed without touching `index` (which searches may be
    using). An exact index's updates build new arrays, so sharing its searcher is enough;
    faiss changes its index in place, so that is copied."""
    searcher = index._searcher
    if index.method != "exact":
        import dataclasses

        faiss = approximate.require_faiss()
        searcher = dataclasses.replace(searcher, index=faiss.clone_index(searcher.index))
    return Index(searcher, index._sums)


class IndexStore:
    """The current index, its file, and the update path.

    Args:
      path: the index file.
      read_only: refuse updates.
      lock_wait: seconds an update waits for another writer of the file.
      on_change: called with each new index before it becomes current, in the updating
        thread (the service compiles the new gallery size there, so searches do not).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        read_only: bool = False,
        lock_wait: float = 10.0,
        on_change: collections.abc.Callable[[Index], None] | None = None,
    ):
        self.path = pathlib.Path(path)
        self.read_only = read_only
        self.lock_wait = lock_wait
        self.on_change = on_change
        self._write = threading.Lock()  # one updating thread inside this process
        self._signature = _signature(self.path)
        self.index = Index.load(self.path)

    def _install(self, index: Index) -> None:
        if self.on_change is not None:
            self.on_change(index)
        self.index = index

    def refresh(self) -> bool:
        """Reloads the file if another writer changed it; True if it did."""
        if _signature(self.path) == self._signature:
            return False
        with self._write:
            signature = _signature(self.path)
            if signature == self._signature or signature is None:
                return False
            index = Index.load(self.path)
            self._signature = signature
            self._install(index)
        return True

    def update(self, change: collections.abc.Callable[[Index], None]) -> Index:
        """Applies `change` (a function changing an `Index` in place) to a copy of the index,
        saves it atomically to the file under the writers' lock, then makes it current.

        Raises:
          RequestError 405: a read-only service; 503: another writer holds the file's lock
            after `lock_wait` seconds (named); 500: the file cannot be written.
          InvalidValueError: from `change` (nothing is changed then).
        """
        if self.read_only:
            raise RequestError(405, "this service is read-only (--read_only): updates are off")
        with self._write:
            try:
                with exclusive_lock(
                    lock_path(self.path), command="serve", wait_seconds=self.lock_wait
                ):
                    base = self.index
                    signature = _signature(self.path)
                    if signature != self._signature:  # changed by another writer
                        base = Index.load(self.path)
                    index = _copy(base)
                    change(index)
                    try:
                        index.save(self.path, overwrite=True)
                    except OSError as e:
                        raise RequestError(
                            500, f"cannot write the index file {self.path}: {e}"
                        ) from e
                    self._signature = _signature(self.path)
            except LockHeld as e:
                raise RequestError(
                    503,
                    f"the index file is being changed by {e.holder}; try again",
                    {"Retry-After": "5"},
                ) from e
            self._install(index)
        return index
