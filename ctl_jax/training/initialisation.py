"""The initial train state: random from the run seed, then (optionally) the arrays of a
ctl_jax checkpoint (e.g. converted ImageNet weights) where names and shapes match, and its
center-loss centers when it has them (a converted CTL run) for the same number of classes."""

from __future__ import annotations

import pathlib

import jax
import numpy as np
from flax import traverse_util

from ctl_jax.checkpoints import CheckpointError, CheckpointStore, model_variables
from ctl_jax.models.reid import init_variables
from ctl_jax.training import backbone_checkpoints
from ctl_jax.training.state import TrainState, create_train_state

# `converted_from` values of `ctl_jax.convert` checkpoints that hold ImageNet backbones.
IMAGENET_LAYOUTS = ("torchvision_resnet", "resnet_ibn_a", "timm_vit", "torchreid_osnet")


def load_checkpoint(path: str | pathlib.Path) -> tuple[dict, dict, np.ndarray | None]:
    """(variables, meta, centers) of the newest readable checkpoint in a ctl_jax work or
    checkpoint directory: variables {"params", "batch_stats"}; meta holds the checkpoint's
    `config` (a dict) among others; centers (num_classes, D), or None when it has none (a
    converted ImageNet backbone)."""
    path = pathlib.Path(path)
    if not (path / "checkpoints").is_dir():
        raise CheckpointError(
            f"model.init_checkpoint={str(path)!r}: expected a ctl_jax checkpoint directory "
            f"containing checkpoints/ (create one with `python -m ctl_jax.convert`)"
        )
    store = CheckpointStore(path, read_only=True)
    try:
        _, state, meta = store.restore_raw_and_meta()  # the newest readable checkpoint
    finally:
        store.close()
    variables = model_variables(state)
    if meta.get("converted_from") in IMAGENET_LAYOUTS:
        # An ImageNet classifier (1000 classes) is never a re-ID classifier, even for a
        # dataset that happens to have 1000 identities.
        variables["params"] = {k: v for k, v in variables["params"].items() if k != "classifier"}
    centers = state.get("centers")
    return variables, meta, (None if centers is None else np.asarray(centers))


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


def init_train_state(
    model, tx, num_classes: int, feature_dim: int, image_shape: tuple[int, int, int], seed: int
) -> TrainState:
    """The initial train state of a run: random model variables and centers from `seed`.

    A pure function of its arguments: `jax.eval_shape` of it is the abstract state a
    checkpoint is restored onto.

    Args:
      model: the `ReidModel`.
      tx: the model optimiser.
      num_classes: training identities (rows of the centers).
      feature_dim: D of the pooled features.
      image_shape: (H, W, 3) of the model input.
      seed: the run seed.
    """
    rng_model, rng_centers = jax.random.split(jax.random.key(seed))
    variables = init_variables(model, rng_model, image_shape)
    return create_train_state(variables, tx, num_classes, feature_dim, rng_centers)


def with_init_checkpoint(
    state: TrainState, model_cfg, log=print, image_size: tuple[int, int] | None = None
) -> TrainState:
    """`state` with the arrays of `model_cfg.init_checkpoint` where names and shapes match,
    and with its centers when it has them for this run's classes (see `_with_centers`).

    Shapes and dtypes stay those of `state`, so the optimiser state (zero moments) fits the
    new parameters as it is. Nothing changes when `init_checkpoint` is empty. A ViT's
    position embeddings saved for another patch grid are resampled to the grid of
    `image_size` (height, width) and `model_cfg.vit_stride` (`backbone_checkpoints.py`).

    Raises:
      CheckpointError: not a checkpoint directory, no parameter in common, or a ViT
        checkpoint of another shape than `model_cfg.arch` (or a ViT for a ResNet, or the
        reverse).
    """
    if not model_cfg.init_checkpoint:
        return state
    pretrained, meta, centers = load_checkpoint(model_cfg.init_checkpoint)
    saved_cfg = meta.get("config") if isinstance(meta.get("config"), dict) else {}
    backbone_checkpoints.check_same_backbone(saved_cfg, model_cfg)
    if image_size is not None:
        pretrained, note = backbone_checkpoints.regrid(pretrained, saved_cfg, model_cfg, image_size)
        if note:
            log(note)
    fresh = jax.device_get(model_variables(state))
    merged, taken, kept = merge_pretrained(fresh, pretrained)
    if not taken:
        raise CheckpointError(
            f"model.init_checkpoint={model_cfg.init_checkpoint!r} shares no parameter with "
            f"model.arch={model_cfg.arch!r}"
        )
    log(
        f"initialised {len(taken)} arrays from {model_cfg.init_checkpoint}; "
        f"{len(kept)} start fresh: {', '.join(kept[:6])}{' ...' if len(kept) > 6 else ''}"
    )
    state = state.replace(params=merged["params"], batch_stats=merged["batch_stats"])
    return _with_centers(state, centers, model_cfg.init_checkpoint, log)


def _with_centers(state: TrainState, centers: np.ndarray | None, source: str, log) -> TrainState:
    """`state` with the checkpoint's center-loss centers when they fit (same classes and
    feature size): the centers belong with the classifier and features they were trained
    with, so fine-tuning or continuing an original CTL run keeps them (as it keeps the
    classifier). Otherwise the fresh N(0, 1) centers stay, with a one-line note."""
    if centers is None:
        return state
    expected = tuple(state.centers.shape)
    if tuple(centers.shape) != expected:
        log(
            f"note: the centers of {source} ({centers.shape[0]} classes x {centers.shape[1]}) "
            f"do not fit this run ({expected[0]} classes x {expected[1]}); they start fresh"
        )
        return state
    log(f"centers taken from {source} ({expected[0]} classes)")
    return state.replace(centers=np.asarray(centers, dtype=np.asarray(state.centers).dtype))
