"""timm VisionTransformer state dicts: recognising them and inferring the ViT they hold.

The names map onto `ctl_jax.models.vit` mechanically (`mapping.torch_key`): `blocks.3.attn.qkv`
<-> `blocks_3/attn/qkv`, LayerNorm `weight` <-> `scale`. What the tensors fix is the patch
size (the patch embedding's kernel), the width and the depth; the number of heads is not in
them and comes from `VIT_SPECS` (timm's models of a width all have the same head count).
Variants with parts ctl_jax's ViT lacks (layer scale, register tokens, a pre-norm, qk-norm,
average pooling's `fc_norm`, a distillation token) are refused rather than mapped partly.
"""

from __future__ import annotations

import re

import numpy as np

from ctl_jax.models.vit import VIT_SPECS
from ctl_jax.weights.torch_pickle import TorchFileError

LAYOUT = "timm_vit"

_BLOCK_KEYS = re.compile(
    r"blocks\.(\d+)\.(norm1|norm2|attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)"
)
_OTHER_KEYS = {
    "cls_token",
    "pos_embed",
    "patch_embed.proj.weight",
    "patch_embed.proj.bias",
    "norm.weight",
    "norm.bias",
    "head.weight",
    "head.bias",
}


def is_vit_layout(tensors: dict[str, np.ndarray]) -> bool:
    """Whether the keys are a timm ViT's (a patch embedding and a class token)."""
    return "patch_embed.proj.weight" in tensors and "cls_token" in tensors


def infer_architecture(tensors: dict[str, np.ndarray], source: str, architecture_cls):
    """The `VIT_SPECS` entry of a timm ViT state dict, as an `architecture_cls`
    (`mapping.Architecture`) with `width`, `patch` and `depth` set.

    Raises:
      TorchFileError: parts ctl_jax's ViT lacks, gaps in the blocks, or a shape no
        `VIT_SPECS` entry has (naming the patch size, width and depth found).
    """
    foreign = sorted(k for k in tensors if k not in _OTHER_KEYS and not _BLOCK_KEYS.fullmatch(k))
    if foreign:
        shown = ", ".join(foreign[:4]) + (
            f" (+{len(foreign) - 4} more)" if len(foreign) > 4 else ""
        )
        raise TorchFileError(
            f"{source}: a timm ViT with parts ctl_jax's ViT does not have: {shown} (supported: "
            "class token, learned position embeddings, pre-norm blocks, final norm)"
        )
    proj = tensors["patch_embed.proj.weight"]
    if proj.ndim != 4 or proj.shape[1] != 3 or proj.shape[2] != proj.shape[3]:
        raise TorchFileError(
            f"{source}: patch_embed.proj.weight has shape {proj.shape}, expected "
            "(width, 3, patch, patch)"
        )
    width, patch = int(proj.shape[0]), int(proj.shape[2])
    blocks = {int(m.group(1)) for k in tensors if (m := _BLOCK_KEYS.fullmatch(k))}
    if not blocks or blocks != set(range(max(blocks) + 1)):
        raise TorchFileError(
            f"{source}: the ViT's blocks are missing or have gaps ({sorted(blocks)})"
        )
    depth = len(blocks)
    for arch, spec in VIT_SPECS.items():
        if (spec.patch, spec.width, spec.depth) == (patch, width, depth):
            return architecture_cls(arch, (), False, False, width=width, patch=patch, depth=depth)
    known = ", ".join(
        f"{a} ({s.patch}x{s.patch} patches, width {s.width}, depth {s.depth})"
        for a, s in VIT_SPECS.items()
    )
    raise TorchFileError(
        f"{source}: a ViT with {patch}x{patch} patches, width {width} and depth {depth}, "
        f"which ctl_jax does not build (known: {known})"
    )
