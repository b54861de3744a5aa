"""One orbax `CheckpointManager` per work directory.

A checkpoint holds three items:
  - `state`: the `TrainState` (parameters, batch statistics, optimiser state, centers, step,
    epoch), restored onto an abstract target so shardings and optax types come back intact;
  - `data`: the input pipeline position (epoch and grain iterator state) as JSON, so a resumed
    run sees exactly the batches an uninterrupted one would (training reads and writes it as
    `ctl_jax.training.position.DataPosition`; inference checkpoints hold {});
  - `meta`: the resolved config and the number of classes as JSON, so evaluate/embed can
    rebuild the network from the checkpoint alone.
The latest `keep` checkpoints are kept, plus the best one by the monitored evaluation metric.

A checkpoint that cannot be read (a data file truncated by a full disk or an interrupted copy,
a metadata file missing) does not stop a run: reading "the latest" falls back to the newest
readable step with a one-line warning, and a writable store moves the unreadable step folder
aside as `<step>.unreadable-<UTC time>` (never deleted; orbax ignores such names), so that a
later save of the same step number does not collide with it.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import math
import os
import pathlib
import sys
from collections.abc import Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from ctl_jax.errors import CheckpointError  # noqa: F401  (re-exported)

# Suffix of a step folder moved aside because it could not be read (`<step>.unreadable-<time>`).
# It must not end in `_<digits>`: orbax would take such a folder for a step.
UNREADABLE_SUFFIX = ".unreadable-"


def warn_on_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _cause(error: BaseException) -> str:
    """The first line of the root cause of an orbax/TensorStore error, shortened: orbax
    wraps TensorStore's own message ("OUT_OF_RANGE: Error reading ... Requested byte range
    [0, 4096) is not valid for value of size 1000") in one that prints a 60-line spec."""
    seen = {id(error)}
    while error.__cause__ is not None and id(error.__cause__) not in seen:
        error = error.__cause__
        seen.add(id(error))
    text = str(error).strip().splitlines()
    line = text[0] if text else type(error).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def _disk_full(error: BaseException) -> bool:
    """True when `error` or an exception in its cause chain is ENOSPC or EDQUOT."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


# Checkpoint directories opened by a store in this process (resolved paths): asyncio's
# reports of failed reads from them are dropped, see `_drop_unretrieved_checkpoint_reads`.
_OPENED_DIRECTORIES: set[str] = set()


def _quiet_failed_reads(directory: pathlib.Path) -> None:
    """Installed once (by every store, which registers its directory). A restore that fails
    is reported by the store as one error; what the failed read leaves behind is not:

    orbax runs each restore in a fresh event loop (`run_until_complete`, then `close`) over
    an `asyncio.gather` of one TensorStore read per array. When a read fails, gather fails and
    the loop stops at once. Reads that complete on TensorStore's threads after that try to
    wake the closed loop (Python prints an "Event loop is closed" traceback through
    `sys.unraisablehook`); reads whose failure was set in the loop's last iteration never get
    gather's callback, which would have retrieved their exception, so when collected they
    make asyncio log "Future (or Task) exception was never retrieved" with the whole error,
    possibly after our error line (2 of 60 runs of `evaluate --step` on a truncated
    checkpoint, on a loaded 2-core machine; 8 of 200 failed restores in one process). That
    happens inside orbax's `asyncio_utils.run_sync`, out of our reach; so these reports,
    and only those naming a directory a store opened, are dropped here. The read
    coroutines closed by the garbage collector print the same errors again through
    `sys.unraisablehook`: dropped too. Anything else is passed on."""
    _OPENED_DIRECTORIES.add(str(directory))
    previous = sys.unraisablehook
    if getattr(previous, "_ctl_jax_quiet", False):
        return

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and "Event loop is closed" in str(value):
            return
        # orbax's read coroutines closed by the garbage collector after the failure: each
        # would print the whole TensorStore spec (60 lines) of the array it was reading.
        code = getattr(unraisable.object, "cr_code", None)
        if code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename:
            return
        previous(unraisable)

    hook._ctl_jax_quiet = True
    sys.unraisablehook = hook
    logging.getLogger("asyncio").addFilter(_drop_unretrieved_checkpoint_reads)


def _drop_unretrieved_checkpoint_reads(record: logging.LogRecord) -> bool:
    """Logging filter for the `asyncio` logger: False for its "... exception was never
    retrieved" report of a read from a checkpoint directory a store opened (the store has
    reported that failure as an error already); True for anything else."""
    message = record.getMessage()
    if not message.startswith(
        ("Task exception was never retrieved", "Future exception was never retrieved")
    ):
        return True
    error = record.exc_info[1] if record.exc_info else None
    text = f"{message}\n{error}"
    return not any(directory in text for directory in _OPENED_DIRECTORIES)


class CheckpointStore:
    """Saves and restores train states under `<workdir>/checkpoints`.

    Args:
      workdir: the run's work directory.
      keep: how many of the latest checkpoints to keep.
      monitor: metric name (a key of the `metrics` passed to `save`) whose highest value marks
        the best checkpoint, which is kept in addition to the latest ones.
      read_only: open an existing directory without creating or deleting anything.
    """

    def __init__(
        self,
        workdir: str | pathlib.Path,
        keep: int = 2,
        monitor: str = "centroid_camera/mAP",
        read_only: bool = False,
    ):
        self.directory = pathlib.Path(workdir).resolve() / "checkpoints"
        if read_only and not self.directory.is_dir():
            raise CheckpointError(f"no checkpoints found: {self.directory} does not exist")
        self.monitor = monitor
        self._read_only = read_only
        _quiet_failed_reads(self.directory)  # a damaged checkpoint's read: one error, no more
        policy = checkpoint_managers.AnyPreservationPolicy(
            [
                checkpoint_managers.LatestN(n=max(keep, 1)),
                checkpoint_managers.BestN(
                    get_metric_fn=lambda m: m.get(monitor, -math.inf),
                    reverse=False,
                    n=1,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        # A reader is read-only by construction: no folder created, and `save` and
        # `_move_aside` refuse (orbax deletes steps only when saving). orbax's own
        # `read_only=True` is not used: it adds nothing for a store that never saves, and
        # logs absl warnings ("Given directory is read only", one per option it overrides)
        # on every open, which a library user (`Embedder.load`) would see on every load.
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            create=not read_only,
            enable_async_checkpointing=True,
        )
        # Handlers given explicitly (not just item names) so that `item_metadata` can
        # describe the state item without restoring it (see `restore_raw`).
        handlers = {
            "state": ocp.StandardCheckpointHandler(),
            "data": ocp.JsonCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(
            self.directory, item_handlers=handlers, options=options
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state, data: dict, meta: dict, metrics: dict | None = None):
        """Starts an asynchronous save (call `wait()` before reading it back or exiting)."""
        if self._read_only:
            raise CheckpointError(f"{self.directory} was opened read-only; cannot save")
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            meta=ocp.args.JsonSave(meta),
        )
        with self._writing():
            self._manager.save(step, args=args, metrics=metrics, force=True)

    def read_meta(self, step: int | None = None) -> dict:
        """The JSON `meta` item (config and class count) of a checkpoint."""
        return self._read_json("meta", step)

    def read_data_position(self, step: int | None = None) -> dict:
        """The JSON `data` item (input pipeline position) of a checkpoint."""
        return self._read_json("data", step)

    def _read_json(self, item: str, step: int | None) -> dict:
        step = self._resolve(step)
        try:
            restored = self._manager.restore(
                step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()})
            )
        except Exception as e:  # orbax raises many types for a damaged directory
            raise CheckpointError(
                f"cannot read checkpoint {self.directory / str(step)}: {_cause(e)}"
            ) from e
        return restored[item]

    def restore(
        self, abstract_state, step: int | None = None, warn: Callable[[str], None] = warn_on_stderr
    ):
        """Restores (state, data, meta) of `step`, or of the newest readable checkpoint.

        Args:
          abstract_state: a pytree of `jax.ShapeDtypeStruct` (with shardings) shaped like the
            state, e.g. from `jax.eval_shape`.
          step: the step to restore (an error if it cannot be read); default: the latest, or
            when it cannot be read the newest one that can (each one skipped is reported
            through `warn` and, in a writable store, moved aside).
        """
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )

        def read(s):
            restored = self._manager.restore(s, args=args)
            return restored["state"], restored["data"], restored["meta"]

        return self._read_newest(read, step, warn)[1]

    def restore_raw(
        self, step: int | None = None, warn: Callable[[str], None] = warn_on_stderr
    ) -> dict:
        """The `state` item as plain nested dicts of numpy arrays (no abstract state needed).

        Used to take weights from a checkpoint whose model differs (initialisation), and by
        evaluation and embedding. The arrays are read as host numpy arrays whatever devices
        and processes saved them, so a checkpoint written by a TPU pod or several processes
        opens on one CPU (without a target orbax would recreate the saved device layout,
        and fail with a topology mismatch), and every process of a multi-process run reads
        its own full copy. Without `step`, the newest readable checkpoint (see `restore`).
        """
        return self.restore_raw_and_meta(step, warn)[1]

    def restore_raw_and_meta(
        self, step: int | None = None, warn: Callable[[str], None] = warn_on_stderr
    ) -> tuple[int, dict, dict]:
        """(step, state, meta): `restore_raw` and `read_meta` of one checkpoint, `step` or the
        newest one both can be read from (the ones skipped reported through `warn`, see
        `restore`)."""
        step, (state, meta) = self._read_newest(self._read_raw_and_meta, step, warn)
        return step, state, meta

    def _read_raw_and_meta(self, step: int) -> tuple[dict, dict]:
        metadata = self._manager.item_metadata(step)["state"]
        target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), metadata)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            ),
        )
        state = restored["state"]
        return (state if isinstance(state, dict) else dict(state.__dict__)), restored["meta"]

    def readable_steps(self) -> list[int]:
        """The steps whose state and meta items can be read (reads each one whole)."""
        readable = []
        for s in self.all_steps():
            try:
                self._read_raw_and_meta(s)
            except Exception:
                continue
            readable.append(s)
        return readable

    def _read_newest(self, read, step: int | None, warn: Callable[[str], None]):
        """`(step, read(step))` for the given step, or for the newest step `read` succeeds on.

        A failure of a given step is an error listing the readable steps. Without a step,
        each unreadable newer one is reported through `warn` (and moved aside when the store
        is writable); when none can be read the error lists every step and its cause.
        """
        if step is not None:
            self._resolve(step)
            try:
                return step, read(step)
            except Exception as e:  # orbax raises many types for a damaged directory
                cause = _cause(e)
            others = [s for s in self.readable_steps() if s != step]
            raise CheckpointError(
                f"cannot read checkpoint {self.directory / str(step)} ({cause}); "
                + (f"readable steps: {others}" if others else "no other step is readable")
            )
        steps = sorted(self.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        failures = []
        for s in steps:
            try:
                result = read(s)
            except Exception as e:
                failures.append((s, _cause(e)))
                continue
            for bad, cause in failures:
                moved = self._move_aside(bad)
                where = f"moved aside to {moved.name}" if moved else "left in place"
                warn(
                    f"checkpoint step {bad} in {self.directory} cannot be read ({cause}); "
                    f"{where}, using step {s}"
                )
            return s, result
        causes = "; ".join(f"step {s}: {cause}" for s, cause in failures)
        raise CheckpointError(
            f"no checkpoint in {self.directory} can be read ({causes}); move the folder "
            "away to start a new run, or restore it from a backup"
        )

    def _move_aside(self, step: int) -> pathlib.Path | None:
        """Renames an unreadable step folder to `<step>.unreadable-<UTC time>` (writable
        store, process 0 only; the others wait for it); returns the new path, or None when
        the folder stays (read-only store)."""
        if self._read_only:
            return None
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.directory / f"{step}{UNREADABLE_SUFFIX}{stamp}"
        if jax.process_index() == 0:
            try:
                (self.directory / str(step)).rename(target)
            except OSError as e:  # left in place, a later save of this step would collide
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} cannot be read and cannot be "
                    f"moved aside ({e.strerror}); move or remove it, then run again"
                ) from e
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"ctl_jax moved aside step {step}")
        self._manager.reload()
        return target

    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        if step is None:
            return max(steps)
        if step not in steps:
            raise CheckpointError(
                f"no checkpoint for step {step} in {self.directory}; have {steps}"
            )
        return step

    def wait(self):
        with self._writing():
            self._manager.wait_until_finished()

    def close(self):
        try:
            self.wait()
        finally:
            self._manager.close()

    @contextlib.contextmanager
    def _writing(self):
        """A full disk (or quota) while saving is a one-line error: an asynchronous save
        reports it at the next save or wait, as whatever orbax wraps it in. The step being
        written stays a temporary folder, which orbax ignores and removes later."""
        try:
            yield
        except Exception as e:
            if not _disk_full(e):
                raise
            readable = self.all_steps()
            raise CheckpointError(
                f"cannot write a checkpoint in {self.directory}: no space left on the device. "
                f"Free some space and run the same command again "
                f"(it resumes from step {max(readable)})"
                if readable
                else f"cannot write a checkpoint in {self.directory}: no space left on the device"
            ) from e
