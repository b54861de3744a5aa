"""ResNet / ResNet-IBN-a backbones and the BNNeck re-ID model."""

from ctl_jax.models.reid import (
    ARCH_NAMES,
    ReidModel,
    build_model,
    feature_dim,
    init_variables,
)
from ctl_jax.models.resnet import (
    BatchNorm,
    Conv1x1,
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
    "BatchNorm",
    "Conv1x1",
    "ReidModel",
    "ResNet",
    "ResNet18",
    "ResNet34",
    "ResNet50",
    "ResNet50IBNa",
    "ResNet101",
    "ResNet101IBNa",
    "ResNet152",
    "build_model",
    "feature_dim",
    "init_variables",
]
