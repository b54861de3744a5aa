"""Rebuilding a trained (or converted) model from a checkpoint directory alone."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable

import ml_collections

from ctl_jax import configs as config_lib
from ctl_jax.build import build_model
from ctl_jax.checkpoints.store import CheckpointError, CheckpointStore, warn_on_stderr
from ctl_jax.checkpoints.variables import model_variables


@dataclasses.dataclass
class RestoredModel:
    """A model ready for inference: `model.apply(variables, images, train=False)`."""

    model: object
    variables: dict
    config: ml_collections.ConfigDict
    step: int
    num_classes: int


def restore_model(
    checkpoint_dir: str | pathlib.Path,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    warn: Callable[[str], None] = warn_on_stderr,
) -> RestoredModel:
    """Loads the model settings and weights of a work directory or converted checkpoint.

    Args:
      checkpoint_dir: a directory containing `checkpoints/` (a training work directory or the
        output of `ctl_jax.convert`).
      step: checkpoint step (an error listing the readable steps if it cannot be read);
        default the latest, or the newest readable one when it cannot be read (the steps
        skipped are reported through `warn` and left in place).
      config: if given, must describe the same model as the checkpoint (else an error); its
        data and evaluation settings are used instead of the saved ones.
    """
    store = CheckpointStore(checkpoint_dir, read_only=True)
    try:
        return _restore(store, checkpoint_dir, step, config, warn)
    finally:
        # Closed here: an open checkpoint manager keeps background threads, and a process
        # that exits with them running can abort in C++ at interpreter shutdown.
        store.close()


def _restore(store, checkpoint_dir, step, config, warn) -> RestoredModel:
    step, state, meta = store.restore_raw_and_meta(step, warn)
    saved = ml_collections.ConfigDict(meta["config"])
    if config is not None:
        current = config.to_dict()
        diffs = [
            d
            for d in config_lib.identity_differences(meta["config"], current)
            if d.startswith("model.")
        ]
        if diffs:
            raise CheckpointError(
                f"{checkpoint_dir} holds a different model than the config "
                f"({'; '.join(diffs)}); pass the config it was trained with or omit --config"
            )
    else:
        config = saved
    num_classes = int(meta["num_classes"])
    model = build_model(saved, num_classes, cpu_fast_path=config.get("cpu_fast_path"))
    variables = model_variables(state)
    return RestoredModel(model, variables, config, int(step), num_classes)
