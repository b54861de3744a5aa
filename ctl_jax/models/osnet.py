"""OSNet backbones (Zhou et al., "Omni-Scale Feature Learning for Person Re-Identification",
ICCV 2019) in Flax, NHWC, built from a set of layers as the ResNets are.

Each omni-scale block reduces its input with a 1x1 convolution, runs four streams of 1-4
lightweight 3x3 convolutions (a linear 1x1 convolution, then a depthwise 3x3 one, batch norm,
ReLU) whose receptive fields grow with the stream, weighs each stream's channels with one
shared aggregation gate (global average pool, 1x1 conv, ReLU, 1x1 conv, sigmoid), sums them,
expands with a linear 1x1 convolution and adds the (projected) input. The IBN variant
normalises the stem with instance norm and ends each block of the first stage with one.

Parameter names mirror torchreid's state-dict keys, `_<index>` for its Sequential indices:
`conv1/{conv,bn}`, `conv2_0/{conv1,conv2a,conv2b_0,...,conv2d_3,gate/{fc1,fc2},conv3,
downsample,IN}`, `conv2_2_0` (the stage's transition 1x1 conv before its 2x2 average pool),
`conv5/{conv,bn}`. The backbone ends with conv5's map (N, H/8, W/8, C); torchreid's `fc`
embedding layer is not part of it (the re-ID model pools the map and applies the BNNeck).
The 1x1 convolutions, batch norms and the stem come from `layers`; the depthwise and gate
convolutions are plain `nn.Conv` (no layer set has them).
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from ctl_jax.models.layers import REFERENCE_LAYERS, Dtype, Layers, conv_kernel_init


@dataclasses.dataclass(frozen=True)
class OSNetSpec:
    """Channels of the stem and of the three stages (the last = the feature width), IBN."""

    channels: tuple[int, int, int, int]
    ibn: bool = False


OSNET_SPECS: dict[str, OSNetSpec] = {
    "osnet_x1_0": OSNetSpec((64, 256, 384, 512)),
    "osnet_x0_75": OSNetSpec((48, 192, 288, 384)),
    "osnet_x0_5": OSNetSpec((32, 128, 192, 256)),
    "osnet_x0_25": OSNetSpec((16, 64, 96, 128)),
    "osnet_ibn_x1_0": OSNetSpec((64, 256, 384, 512), ibn=True),
}


class ConvBN(nn.Module):
    """1x1 convolution (stride 1) + batch norm, with or without ReLU (torchreid's `Conv1x1`
    and `Conv1x1Linear`); parameters `conv/kernel`, `bn/*`."""

    features: int
    layers: Layers
    relu: bool = True
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool, valid=None):
        y = self.layers.conv1x1(self.features, strides=1, dtype=self.dtype, name="conv")(x)
        y = self.layers.norm(dtype=self.dtype, name="bn")(y, train=train, valid=valid)
        return nn.relu(y) if self.relu else y


class LightConv3x3(nn.Module):
    """Linear 1x1 convolution, depthwise 3x3 convolution, batch norm, ReLU."""

    features: int
    layers: Layers
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool, valid=None):
        y = self.layers.conv1x1(self.features, strides=1, dtype=self.dtype, name="conv1")(x)
        y = nn.Conv(
            self.features,
            (3, 3),
            padding=1,
            feature_group_count=self.features,
            use_bias=False,
            kernel_init=conv_kernel_init,
            dtype=self.dtype,
            name="conv2",
        )(y)
        y = self.layers.norm(dtype=self.dtype, name="bn")(y, train=train, valid=valid)
        return nn.relu(y)


class ChannelGate(nn.Module):
    """The aggregation gate: per-channel sigmoid weights from the globally pooled input,
    through a 1x1 convolution to C / 16 channels, ReLU and a 1x1 convolution back to C."""

    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        """(N, H, W, C) -> (N, H, W, C) = x * gate(x)."""
        channels = x.shape[-1]
        conv = functools.partial(
            nn.Conv, kernel_size=(1, 1), use_bias=True, dtype=self.dtype,
            kernel_init=conv_kernel_init,
        )  # fmt: skip
        pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
        g = nn.relu(conv(channels // 16, name="fc1")(pooled))
        g = jax.nn.sigmoid(conv(channels, name="fc2")(g))
        return x * g


class OSBlock(nn.Module):
    """The omni-scale residual block (bottleneck reduction 4)."""

    features: int
    layers: Layers
    instance_norm: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool, valid=None):
        """(N, H, W, Cin) -> (N, H, W, features)."""
        mid = self.features // 4
        kw = {"train": train, "valid": valid}
        x1 = ConvBN(mid, self.layers, dtype=self.dtype, name="conv1")(x, **kw)
        gate = ChannelGate(self.dtype, name="gate")  # one gate shared by the four streams
        total = 0.0
        for stream, depth in (("conv2a", 1), ("conv2b", 2), ("conv2c", 3), ("conv2d", 4)):
            y = x1
            for i in range(depth):
                name = stream if depth == 1 else f"{stream}_{i}"
                y = LightConv3x3(mid, self.layers, self.dtype, name=name)(y, **kw)
            total = total + gate(y)
        out = ConvBN(self.features, self.layers, relu=False, dtype=self.dtype, name="conv3")(
            total, **kw
        )
        identity = x
        if x.shape[-1] != self.features:
            identity = ConvBN(
                self.features, self.layers, relu=False, dtype=self.dtype, name="downsample"
            )(x, **kw)
        out = out + identity
        if self.instance_norm:
            out = nn.InstanceNorm(epsilon=1e-5, dtype=self.dtype, name="IN")(out)
        return nn.relu(out)


class Stem(nn.Module):
    """7x7 stride-2 convolution, batch norm (instance norm for IBN), ReLU: `conv`, `bn`."""

    features: int
    layers: Layers
    instance_norm: bool = False
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool, valid=None):
        x = self.layers.stem_conv(self.features, dtype=self.dtype, name="conv")(x)
        if self.instance_norm:
            x = nn.InstanceNorm(epsilon=1e-5, dtype=self.dtype, name="bn")(x)
        else:
            x = self.layers.norm(dtype=self.dtype, name="bn")(x, train=train, valid=valid)
        return nn.relu(x)


class OSNet(nn.Module):
    """OSNet trunk (two blocks per stage); returns conv5's feature map.

    Attributes:
      channels: stem and stage widths (`OSNET_SPECS`).
      ibn: instance norm in the stem and at the end of the first stage's blocks.
      dtype: compute dtype; parameters and batch statistics stay float32.
      layers: the stem convolution, 1x1 convolutions, batch norm and max pool.
    """

    channels: tuple[int, int, int, int]
    ibn: bool = False
    dtype: Dtype = jnp.float32
    layers: Layers = REFERENCE_LAYERS

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, valid: jax.Array | None = None):
        """(N, H, W, 3) -> (N, H/8, W/8, channels[3]) (H/8 rounded as the strides round)."""
        kw = {"train": train, "valid": valid}
        x = jnp.asarray(x, self.dtype)
        c = self.channels
        x = Stem(c[0], self.layers, self.ibn, self.dtype, name="conv1")(x, **kw)
        x = self.layers.max_pool(x)
        for stage, width in ((2, c[1]), (3, c[2]), (4, c[3])):
            for j in range(2):
                x = OSBlock(
                    width,
                    self.layers,
                    instance_norm=self.ibn and stage == 2,
                    dtype=self.dtype,
                    name=f"conv{stage}_{j}",
                )(x, **kw)
            if stage < 4:  # the transition: 1x1 conv + BN + ReLU, 2x2 average pool
                x = ConvBN(width, self.layers, dtype=self.dtype, name=f"conv{stage}_2_0")(x, **kw)
                x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        return ConvBN(c[3], self.layers, dtype=self.dtype, name="conv5")(x, **kw)


def osnet(arch: str) -> functools.partial:
    """The `OSNet` of an `OSNET_SPECS` name, as a partial taking `dtype=`, `layers=`, `name=`."""
    spec = OSNET_SPECS[arch]
    return functools.partial(OSNet, channels=spec.channels, ibn=spec.ibn)
