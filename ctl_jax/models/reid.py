"""Re-ID model: backbone -> global pooling -> BNNeck -> bias-free classifier.

The backbone is a ResNet (`resnet.py`) or an OSNet (`osnet.py`), whose feature map is
pooled, or a ViT (`vit.py`), whose feature is its class token (no pooling).

Parameter tree (a contract for weight import): `backbone/...` (`resnet.py`, `osnet.py`,
`vit.py`),
`bnneck/scale` (no `bias`: the BNNeck shift is zero by construction), `classifier/kernel`
of shape (C, num_classes) whatever the classifier head, and `pooling/p` (1,) only for a
learnable GeM exponent; batch statistics under `batch_stats` with the same paths. The layer
set (`ctl_jax.models.layers`) changes how the model computes, never these names.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctl_jax import margin_losses
from ctl_jax.errors import ConfigError
from ctl_jax.models import osnet, pooling, resnet, vit
from ctl_jax.models.classifier import CosineClassifier
from ctl_jax.models.layers import REFERENCE_LAYERS, Layers

_ARCHS: dict[str, Callable[..., resnet.ResNet]] = {
    "resnet18": resnet.ResNet18,
    "resnet34": resnet.ResNet34,
    "resnet50": resnet.ResNet50,
    "resnet101": resnet.ResNet101,
    "resnet152": resnet.ResNet152,
    "resnet50_ibn_a": resnet.ResNet50IBNa,
    "resnet101_ibn_a": resnet.ResNet101IBNa,
}
ARCH_NAMES: tuple[str, ...] = tuple(_ARCHS) + tuple(vit.VIT_SPECS) + tuple(osnet.OSNET_SPECS)
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def feature_dim(arch: str) -> int:
    """Width C of the feature f for `arch` (512 for ResNet-18/34, 2048 for the other
    ResNets, the width of a ViT, the last stage's width of an OSNet)."""
    _check_arch(arch)
    if arch in vit.VIT_SPECS:
        return vit.VIT_SPECS[arch].width
    if arch in osnet.OSNET_SPECS:
        return osnet.OSNET_SPECS[arch].channels[-1]
    return 512 if arch in ("resnet18", "resnet34") else 2048


def is_vit(arch: str) -> bool:
    """Whether `arch` names a ViT (`vit.VIT_SPECS`)."""
    return arch in vit.VIT_SPECS


def _check_arch(arch: str) -> None:
    if arch not in ARCH_NAMES:
        raise ConfigError(f"unknown arch {arch!r}; valid names: {', '.join(ARCH_NAMES)}")


class ReidModel(nn.Module):
    """BNNeck re-ID model with named outputs.

    Attributes:
      backbone: a callable building the trunk, e.g. `functools.partial(ResNet50, last_stride=1)`;
        it is called with `dtype=`, `layers=` and `name="backbone"`.
      num_classes: number of training identities.
      dtype: compute dtype of the backbone; the head always computes in float32.
      layers: the layer set of the backbone and of the BNNeck's batch norm.
      pooling, gem_p, gem_learnable, rmac_levels: the global pooling (see `pooling.Pooling`).
      classifier: "softmax" (linear logits) or a margin head ("cosface", "arcface"), whose
        `logits` are the cosines between the normalised BNNeck feature and the normalised
        class weights (the margin and scale are applied by the loss, which knows the labels).
    """

    backbone: Callable[..., nn.Module]
    num_classes: int
    dtype: Any = jnp.float32
    layers: Layers = REFERENCE_LAYERS
    pooling: str = "avg"
    gem_p: float = 3.0
    gem_learnable: bool = False
    rmac_levels: int = 3
    classifier: str = "softmax"

    @nn.compact
    def __call__(
        self, images: jax.Array, *, train: bool, valid: jax.Array | None = None
    ) -> dict[str, jax.Array]:
        """Runs the model.

        Args:
          images: (N, H, W, 3) normalised images.
          train: batch statistics (updating `batch_stats`, which must then be mutable) and
            a ViT's stochastic depth (drawing from the `dropout` RNG) if True, running
            averages if False.
          valid: optional (N,) bool; padded rows (False) are left out of every batch statistic.
            Their outputs are computed but meaningless.

        Returns:
          dict with float32 `features` (N, C) = pooled feature f, or a ViT's class token
          (triplet, CTL, center losses),
          `bn_features` (N, C) = BNNeck output (retrieval embedding), `logits` (N, num_classes)
          (cosines for a margin head).
        """
        backbone = self.backbone(dtype=self.dtype, layers=self.layers, name="backbone")
        fmap = backbone(images, train=train, valid=valid)
        if fmap.ndim == 2:  # a ViT's class token: already one vector per image
            features = fmap.astype(jnp.float32)
        else:
            features = pooling.Pooling(
                self.pooling, self.gem_p, self.gem_learnable, self.rmac_levels, name="pooling"
            )(fmap.astype(jnp.float32))
        bnneck = self.layers.norm(use_bias=False, dtype=jnp.float32, name="bnneck")
        bn_features = bnneck(features, train=train, valid=valid)
        if self.classifier in margin_losses.MARGIN_CLASSIFIERS:
            head = CosineClassifier(self.num_classes, name="classifier")
        else:
            head = nn.Dense(
                self.num_classes,
                use_bias=False,
                dtype=jnp.float32,
                param_dtype=jnp.float32,
                kernel_init=nn.initializers.normal(stddev=0.001),
                name="classifier",
            )
        logits = head(bn_features)
        return {"features": features, "bn_features": bn_features, "logits": logits}


def model_from_config(
    model_cfg: Any,
    num_classes: int,
    layers: Layers = REFERENCE_LAYERS,
    classifier: str = "softmax",
) -> ReidModel:
    """Builds a `ReidModel` from a config's `model` group and a layer set.

    Args:
      model_cfg: object with `arch` (one of `ARCH_NAMES`), `last_stride` (int), `stem_relu`
        (None = the architecture's original choice: False for plain ResNets, True for IBN-a),
        `dtype` ('float32' or 'bfloat16'), and `pooling`, `gem_p`, `gem_learnable`,
        `rmac_levels` (a config saved before they existed gets average pooling); for a ViT
        `vit_stride` (None = the patch size: no overlap) and `drop_path` (0 when absent)
        instead of `last_stride`, `stem_relu` and the pooling. Other keys are ignored
        (configs saved by earlier versions hold `fast_1x1` and `fast_ops`).
      num_classes: number of training identities (classifier width).
      layers: the layer set; the model's parameters do not depend on it. Applications pick
        it with `ctl_jax.build.build_model`.
      classifier: the config's `loss.classifier`; only training needs it (the embedding and
        the parameters are the same for every head).

    Returns:
      An unbound `ReidModel`.
    """
    arch = model_cfg.arch
    _check_arch(arch)
    if model_cfg.dtype not in _DTYPES:
        raise ConfigError(
            f"config model.dtype: unknown dtype {model_cfg.dtype!r}; valid: {', '.join(_DTYPES)}"
        )
    if is_vit(arch):
        backbone = _vit_backbone(model_cfg)
    elif arch in osnet.OSNET_SPECS:
        backbone = osnet.osnet(arch)
    else:
        kwargs: dict[str, Any] = {"last_stride": int(model_cfg.last_stride)}
        if model_cfg.stem_relu is not None:
            kwargs["stem_relu"] = bool(model_cfg.stem_relu)
        backbone = functools.partial(_ARCHS[arch], **kwargs)
    pool = {
        "pooling": model_cfg.get("pooling", "avg"),
        "gem_p": model_cfg.get("gem_p", 3.0),
        "gem_learnable": bool(model_cfg.get("gem_learnable", False)),
        "rmac_levels": model_cfg.get("rmac_levels", 3),
    }
    pooling.check_pooling(pool["pooling"], pool["gem_p"], pool["rmac_levels"])
    if is_vit(arch) and (pool["pooling"] != "avg" or pool["gem_learnable"]):
        raise ConfigError(
            f"config model.pooling={pool['pooling']!r}: pooling applies to a ResNet's feature "
            f"map; {arch}'s feature is its class token (use model.pooling='avg')"
        )
    margin_losses.check_classifier(classifier)
    return ReidModel(
        backbone=backbone,
        num_classes=num_classes,
        dtype=_DTYPES[model_cfg.dtype],
        layers=layers,
        classifier=classifier,
        **pool,
    )


def _vit_backbone(model_cfg: Any) -> functools.partial:
    """The ViT partial of a config's model group, its stride and drop path checked."""
    arch = model_cfg.arch
    patch = vit.VIT_SPECS[arch].patch
    stride = model_cfg.get("vit_stride", None)
    if stride is not None and (not isinstance(stride, int) or not 1 <= stride <= patch):
        raise ConfigError(
            f"config model.vit_stride: expected an integer from 1 to {arch}'s patch size "
            f"{patch} (or None for {patch}), got {stride!r}"
        )
    drop_path = model_cfg.get("drop_path", 0.0) or 0.0
    if not 0.0 <= float(drop_path) < 1.0:
        raise ConfigError(f"config model.drop_path: expected a rate in [0, 1), got {drop_path!r}")
    return vit.vit(arch, stride=stride, drop_path=float(drop_path))


def init_variables(
    model: nn.Module, rng: jax.Array, image_shape: tuple[int, int, int]
) -> dict[str, Any]:
    """Initialises `model` on one zero image of shape `image_shape` = (H, W, 3).

    Returns:
      `{"params": ..., "batch_stats": ...}` with real float32 arrays (BN running mean 0,
      variance 1).
    """
    images = jnp.zeros((1, *image_shape), jnp.float32)
    # One compiled program is much faster than running the initialisers op by op.
    init = jax.jit(functools.partial(model.init, train=False))
    return dict(init(rng, images))
