"""Rebuilding a trained (or converted) model from a checkpoint directory alone."""

from __future__ import annotations

import dataclasses
import pathlib

import ml_collections

from ctl_jax import configs as config_lib
from ctl_jax.build import build_model
from ctl_jax.checkpoints.store import CheckpointError, CheckpointStore
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
) -> RestoredModel:
    """Loads the model settings and weights of a work directory or converted checkpoint.

    Args:
      checkpoint_dir: a directory containing `checkpoints/` (a training work directory or the
        output of `ctl_jax.convert`).
      step: checkpoint step; default the latest.
      config: if given, must describe the same model as the checkpoint (else an error); its
        data and evaluation settings are used instead of the saved ones.
    """
    store = CheckpointStore(checkpoint_dir, read_only=True)
    step = step if step is not None else store.latest_step()
    if step is None:
        raise CheckpointError(f"no checkpoints in {store.directory}")
    meta = store.read_meta(step)
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
    variables = model_variables(store.restore_raw(step))
    return RestoredModel(model, variables, config, int(step), num_classes)
