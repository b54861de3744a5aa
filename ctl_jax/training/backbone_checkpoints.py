"""A ViT (or OSNet) checkpoint as the start of a training (`model.init_checkpoint`): the
same backbone shape, and position embeddings on the patch grid of the new run.

A ResNet checkpoint shares its parameters by name and shape with the model being trained
(another ResNet may share a part of them on purpose). A ViT checkpoint of another patch
size, width or depth, an OSNet of another width, or either for another family shares almost
nothing and would train from scratch in all but name, so it is refused with what differs.
A ViT's position embeddings, a parameter of the patch grid, are resampled when the image
size or stride differs (timm's bicubic rule, `ctl_jax.weights.resample`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ctl_jax.checkpoints import CheckpointError
from ctl_jax.models import osnet, vit
from ctl_jax.weights import resample


def _describe(arch: str) -> str:
    spec = vit.VIT_SPECS.get(arch)
    if spec is None:
        return f"a {arch}"
    return f"a {arch} ({spec.patch}x{spec.patch} patches, width {spec.width}, depth {spec.depth})"


def check_same_backbone(saved_cfg: dict, model_cfg: Any) -> None:
    """Raises CheckpointError when the checkpoint's `model.arch` (from its saved config) and
    `model_cfg.arch` differ and either is a ViT or an OSNet (two ResNets may share part of
    their parameters on purpose); the message names the shapes that differ."""
    saved = (saved_cfg.get("model") or {}).get("arch")
    wanted = model_cfg.arch
    if saved is None or saved == wanted:
        return
    others = {**vit.VIT_SPECS, **osnet.OSNET_SPECS}  # not ResNets
    if saved not in others and wanted not in others:
        return
    if saved in vit.VIT_SPECS and wanted in vit.VIT_SPECS:
        a, b = vit.VIT_SPECS[saved], vit.VIT_SPECS[wanted]
        fields = [(n, getattr(a, n), getattr(b, n)) for n in ("patch", "width", "depth")]
        differs = "; ".join(f"{n} {x} there, {y} here" for n, x, y in fields if x != y)
        detail = f" ({differs})" if differs else ""
    else:
        detail = ""
    raise CheckpointError(
        f"model.init_checkpoint={model_cfg.init_checkpoint!r} holds {_describe(saved)}, not "
        f"{_describe(wanted)} as model.arch says{detail}: set model.arch={saved} or convert "
        f"weights of a {wanted}"
    )


def _grid(arch: str, height: int, width: int, stride: int | None) -> tuple[int, int]:
    spec = vit.VIT_SPECS[arch]
    return vit.grid_size(int(height), int(width), spec.patch, int(stride or spec.patch))


def regrid(
    variables: dict, saved_cfg: dict, model_cfg: Any, image_size: tuple[int, int]
) -> tuple[dict, str | None]:
    """`variables` with a ViT's `backbone/pos_embed` resampled from the grid of the saved
    config's image size and stride to the grid of `image_size` and `model_cfg.vit_stride`.

    Returns:
      (variables, a note for the log or None when nothing changed).
    """
    arch = model_cfg.arch
    backbone = variables.get("params", {}).get("backbone", {})
    if arch not in vit.VIT_SPECS or "pos_embed" not in backbone:
        return variables, None
    data, model = saved_cfg.get("data") or {}, saved_cfg.get("model") or {}
    if "height" not in data or "width" not in data:
        return variables, None
    old = _grid(arch, data["height"], data["width"], model.get("vit_stride"))
    new = _grid(arch, image_size[0], image_size[1], model_cfg.get("vit_stride", None))
    pos = np.asarray(backbone["pos_embed"])
    if old == new or pos.shape[1] != 1 + old[0] * old[1]:
        return variables, None
    params = dict(variables["params"])
    params["backbone"] = {**backbone, "pos_embed": resample.resample_pos_embed(pos, old, new)}
    note = (
        f"position embeddings resampled from the checkpoint's {old[0]}x{old[1]} patch grid "
        f"to {new[0]}x{new[1]}"
    )
    return {**variables, "params": params}, note
