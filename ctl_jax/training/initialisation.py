"""Initial model variables: random, or taken from a ctl_jax checkpoint (e.g. converted
ImageNet weights) where names and shapes match."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from flax import traverse_util

from ctl_jax.models.reid import init_variables
from ctl_jax.training.checkpoints import CheckpointError, CheckpointStore

# `converted_from` values of `ctl_jax.convert` checkpoints that hold ImageNet backbones.
IMAGENET_LAYOUTS = ("torchvision_resnet", "resnet_ibn_a")


def load_checkpoint_variables(path: str | pathlib.Path) -> dict:
    """{"params", "batch_stats"} of the latest checkpoint in a ctl_jax work/checkpoint dir."""
    path = pathlib.Path(path)
    if not (path / "checkpoints").is_dir():
        raise CheckpointError(
            f"model.init_checkpoint={str(path)!r}: expected a ctl_jax checkpoint directory "
            f"containing checkpoints/ (create one with `python -m ctl_jax.convert`)"
        )
    store = CheckpointStore(path, read_only=True)
    state = store.restore_raw()
    params = dict(state["params"])
    if store.read_meta().get("converted_from") in IMAGENET_LAYOUTS:
        # An ImageNet classifier (1000 classes) is never a re-ID classifier, even for a
        # dataset that happens to have 1000 identities.
        params.pop("classifier", None)
    return {"params": params, "batch_stats": state.get("batch_stats", {})}


def merge_pretrained(fresh: dict, pretrained: dict) -> tuple[dict, list[str], list[str]]:
    """Copies every pretrained array whose path and shape match into `fresh`.

    Returns:
      (merged variables, names taken from the checkpoint, names left at their fresh value,
      e.g. the classifier when the number of classes differs).
    """
    flat_fresh = traverse_util.flatten_dict(fresh, sep="/")
    flat_pre = traverse_util.flatten_dict(pretrained, sep="/")
    taken, kept_fresh = [], []
    for name, value in flat_fresh.items():
        candidate = flat_pre.get(name)
        if candidate is not None and np.shape(candidate) == np.shape(value):
            flat_fresh[name] = np.asarray(candidate, dtype=np.asarray(value).dtype)
            taken.append(name)
        else:
            kept_fresh.append(name)
    return traverse_util.unflatten_dict(flat_fresh, sep="/"), taken, kept_fresh


def initial_variables(model, model_cfg, rng, image_shape, log=print) -> dict:
    """Random variables, overwritten by `model_cfg.init_checkpoint` where it has them."""
    variables = init_variables(model, rng, image_shape)
    variables = {"params": variables["params"], "batch_stats": variables.get("batch_stats", {})}
    if not model_cfg.init_checkpoint:
        return variables
    pretrained = load_checkpoint_variables(model_cfg.init_checkpoint)
    merged, taken, fresh = merge_pretrained(jax.device_get(variables), pretrained)
    if not taken:
        raise CheckpointError(
            f"model.init_checkpoint={model_cfg.init_checkpoint!r} shares no parameter with "
            f"model.arch={model_cfg.arch!r}"
        )
    log(
        f"initialised {len(taken)} arrays from {model_cfg.init_checkpoint}; "
        f"{len(fresh)} start fresh: {', '.join(fresh[:6])}{' ...' if len(fresh) > 6 else ''}"
    )
    return merged
