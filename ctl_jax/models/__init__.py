"""The reference model: ResNet / ResNet-IBN-a backbones and the BNNeck re-ID model, in plain
Flax, built from a set of layers (`layers.REFERENCE_LAYERS` unless another is passed in)."""

from ctl_jax.models.layers import REFERENCE_LAYERS, BatchNorm, Layers
from ctl_jax.models.reid import (
    ARCH_NAMES,
    ReidModel,
    feature_dim,
    init_variables,
    model_from_config,
)
from ctl_jax.models.resnet import (
    ResNet,
    ResNet18,
    ResNet34,
    ResNet50,
    ResNet50IBNa,
    ResNet101,
    ResNet101IBNa,
    ResNet152,
)

__all__ = [
    "ARCH_NAMES",
    "REFERENCE_LAYERS",
    "BatchNorm",
    "Layers",
    "ReidModel",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet50IBNa",
    "ResNet101",
    "ResNet101IBNa",
    "ResNet152",
    "feature_dim",
    "init_variables",
    "model_from_config",
]
