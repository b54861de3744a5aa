"""ResNet backbones (torchvision layout, NHWC) with IBN-a, built from a set of layers.

One `ResNet` module; the variants are `functools.partial`s of it, as in flax's ImageNet
example. The convolutions, batch norms and the stem's max pool come from `layers` (see
`ctl_jax.models.layers`; `REFERENCE_LAYERS` by default), so the same definition runs with the
plain Flax layers or with faster ones that create the same parameters.

Parameter names mirror torchvision's state-dict keys so that PyTorch weights map onto them
mechanically: `conv1`, `bn1`, `layer{i}_{j}/{conv1,bn1,...,downsample_conv,downsample_bn}`;
an IBN-a block's `bn1` holds `IN` (InstanceNorm) and `BN` (BatchNorm). Every batch norm takes
a per-sample `valid` mask: padded samples contribute nothing to the batch statistics.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctl_jax.models.layers import REFERENCE_LAYERS, Dtype, Layers, ModuleDef


class IBN(nn.Module):
    """IBN-a normalisation: InstanceNorm on channels [0:half], batch norm on the rest."""

    half: int
    norm: ModuleDef
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, valid: jax.Array | None = None):
        """(N, H, W, C) -> (N, H, W, C); instance norm is per sample, so needs no mask."""
        x_in = nn.InstanceNorm(epsilon=1e-5, dtype=self.dtype, name="IN")(x[..., : self.half])
        x_bn = self.norm(dtype=self.dtype, name="BN")(x[..., self.half :], train=train, valid=valid)
        return jnp.concatenate([x_in.astype(self.dtype), x_bn], axis=-1)


class BasicBlock(nn.Module):
    """torchvision BasicBlock: 3x3 (stride) -> BN -> ReLU -> 3x3 -> BN, + shortcut, ReLU."""

    planes: int
    layers: Layers
    strides: int = 1
    ibn: bool = False
    dtype: Dtype = jnp.float32
    expansion = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, valid: jax.Array | None = None):
        """(N, H, W, Cin) -> (N, H/s, W/s, planes)."""
        if self.ibn:
            raise ValueError("IBN-a is only defined for bottleneck blocks here")
        conv3x3 = functools.partial(self.layers.conv3x3, dtype=self.dtype)
        norm = functools.partial(self.layers.norm, dtype=self.dtype)
        y = conv3x3(self.planes, strides=self.strides, name="conv1")(x)
        y = nn.relu(norm(name="bn1")(y, train=train, valid=valid))
        y = conv3x3(self.planes, strides=1, name="conv2")(y)
        y = norm(name="bn2")(y, train=train, valid=valid)
        return nn.relu(y + _shortcut(self, x, self.planes, train, valid))


class Bottleneck(nn.Module):
    """torchvision Bottleneck (v1.5: the stride sits on the 3x3 conv); IBN-a optional."""

    planes: int
    layers: Layers
    strides: int = 1
    ibn: bool = False
    dtype: Dtype = jnp.float32
    expansion = 4

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, valid: jax.Array | None = None):
        """(N, H, W, Cin) -> (N, H/s, W/s, 4 * planes)."""
        conv1x1 = functools.partial(self.layers.conv1x1, dtype=self.dtype)
        conv3x3 = functools.partial(self.layers.conv3x3, dtype=self.dtype)
        norm = functools.partial(self.layers.norm, dtype=self.dtype)
        out_features = self.planes * self.expansion
        y = conv1x1(self.planes, strides=1, name="conv1")(x)
        if self.ibn:
            y = IBN(self.planes // 2, self.layers.norm, self.dtype, name="bn1")(
                y, train=train, valid=valid
            )
        else:
            y = norm(name="bn1")(y, train=train, valid=valid)
        y = nn.relu(y)
        y = conv3x3(self.planes, strides=self.strides, name="conv2")(y)
        y = nn.relu(norm(name="bn2")(y, train=train, valid=valid))
        y = conv1x1(out_features, strides=1, name="conv3")(y)
        y = norm(name="bn3")(y, train=train, valid=valid)
        return nn.relu(y + _shortcut(self, x, out_features, train, valid))


def _shortcut(block, x, out_features: int, train: bool, valid):
    """The identity, or a strided 1x1 convolution and batch norm where the shape changes;
    called inside `block`'s compact method, so its layers are the block's submodules."""
    if block.strides == 1 and x.shape[-1] == out_features:
        return x
    conv = block.layers.conv1x1(
        out_features, strides=block.strides, dtype=block.dtype, name="downsample_conv"
    )
    norm = block.layers.norm(dtype=block.dtype, name="downsample_bn")
    return norm(conv(x), train=train, valid=valid)


class ResNet(nn.Module):
    """ResNet trunk without the classifier; returns the last feature map.

    Attributes:
      stage_sizes: number of blocks in each of the 4 stages.
      block_cls: `BasicBlock` or `Bottleneck`.
      last_stride: stride of stage 4 (1 keeps a 16x8 map for 256x128 input; torchvision: 2).
      stem_relu: ReLU after the stem batch norm. The original CTL plain ResNet has none; the
        IBN-a backbone (and torchvision) has one.
      ibn: IBN-a normalisation in the first BN of the bottlenecks of stages 1-3.
      dtype: compute dtype (e.g. bfloat16); parameters and BN statistics stay float32.
      layers: the convolution, normalisation and pooling layers (`ctl_jax.models.layers`).
    """

    stage_sizes: Sequence[int]
    block_cls: type[BasicBlock] | type[Bottleneck]
    last_stride: int = 1
    stem_relu: bool = False
    ibn: bool = False
    dtype: Dtype = jnp.float32
    layers: Layers = REFERENCE_LAYERS

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, valid: jax.Array | None = None):
        """Computes the feature map.

        Args:
          x: (N, H, W, 3) images.
          train: batch statistics (and running-average updates) if True, else running averages.
          valid: optional (N,) bool; False rows (padding) are left out of every batch statistic.

        Returns:
          (N, H/16, W/16, C) for last_stride 1 (H/32, W/32 for 2); C = 512 * expansion.
        """
        x = jnp.asarray(x, self.dtype)
        x = self.layers.stem_conv(64, dtype=self.dtype, name="conv1")(x)
        x = self.layers.norm(dtype=self.dtype, name="bn1")(x, train=train, valid=valid)
        if self.stem_relu:
            x = nn.relu(x)
        x = self.layers.max_pool(x)
        for i, num_blocks in enumerate(self.stage_sizes):
            stage_stride = 1 if i == 0 else (self.last_stride if i == 3 else 2)
            for j in range(num_blocks):
                x = self.block_cls(
                    planes=64 * 2**i,
                    layers=self.layers,
                    strides=stage_stride if j == 0 else 1,
                    ibn=self.ibn and i < 3,
                    dtype=self.dtype,
                    name=f"layer{i + 1}_{j}",
                )(x, train=train, valid=valid)
        return x


ResNet18 = functools.partial(ResNet, stage_sizes=(2, 2, 2, 2), block_cls=BasicBlock)
ResNet34 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=BasicBlock)
ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3), block_cls=Bottleneck)
ResNet101 = functools.partial(ResNet, stage_sizes=(3, 4, 23, 3), block_cls=Bottleneck)
ResNet152 = functools.partial(ResNet, stage_sizes=(3, 8, 36, 3), block_cls=Bottleneck)
ResNet50IBNa = functools.partial(ResNet50, ibn=True, stem_relu=True)
ResNet101IBNa = functools.partial(ResNet101, ibn=True, stem_relu=True)
