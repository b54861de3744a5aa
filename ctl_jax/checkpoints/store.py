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
"""

from __future__ import annotations

import math
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers

from ctl_jax.errors import CheckpointError  # noqa: F401  (re-exported)


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
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            create=not read_only,
            read_only=read_only,
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
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=ocp.args.JsonSave(data),
            meta=ocp.args.JsonSave(meta),
        )
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
                f"cannot read checkpoint {self.directory / str(step)}: {e}"
            ) from e
        return restored[item]

    def restore(self, abstract_state, step: int | None = None):
        """Restores (state, data, meta) of `step` (default: latest) onto `abstract_state`.

        Args:
          abstract_state: a pytree of `jax.ShapeDtypeStruct` (with shardings) shaped like the
            state, e.g. from `jax.eval_shape`.
        """
        step = self._resolve(step)
        args = ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore(),
        )
        try:
            restored = self._manager.restore(step, args=args)
        except Exception as e:
            raise CheckpointError(
                f"cannot restore checkpoint {self.directory / str(step)} "
                f"(corrupt, or written for a different model?): {e}"
            ) from e
        return restored["state"], restored["data"], restored["meta"]

    def restore_raw(self, step: int | None = None) -> dict:
        """The `state` item as plain nested dicts of numpy arrays (no abstract state needed).

        Used to take weights from a checkpoint whose model differs (initialisation), and by
        evaluation and embedding. The arrays are read as host numpy arrays whatever devices
        and processes saved them, so a checkpoint written by a TPU pod or several processes
        opens on one CPU (without a target orbax would recreate the saved device layout,
        and fail with a topology mismatch), and every process of a multi-process run reads
        its own full copy.
        """
        step = self._resolve(step)
        try:
            metadata = self._manager.item_metadata(step)["state"]
            target = jax.tree.map(lambda m: np.empty(m.shape, m.dtype), metadata)
            restored = self._manager.restore(
                step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target))
            )
        except Exception as e:
            raise CheckpointError(
                f"cannot read checkpoint {self.directory / str(step)}: {e}"
            ) from e
        state = restored["state"]
        return state if isinstance(state, dict) else dict(state.__dict__)

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
        self._manager.wait_until_finished()

    def close(self):
        self._manager.wait_until_finished()
        self._manager.close()
