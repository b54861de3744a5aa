"""ResNet backbones (torchvision layout, NHWC) with IBN-a and padding-aware batch norm.

One `ResNet` module; the variants are `functools.partial`s of it, as in flax's imagenet
example. Parameter names mirror torchvision's state-dict keys so that PyTorch weights map onto
them mechanically: `conv1`, `bn1`, `layer{i}_{j}/{conv1,bn1,...,downsample_conv,downsample_bn}`;
an IBN-a block's `bn1` holds `IN` (InstanceNorm) and `BN` (BatchNorm).

Every batch norm takes a per-sample `valid` mask: padded samples are normalised like the others
but contribute nothing to the batch statistics (docs/method.md, 'The P x M sampler'). Under
`jax.jit` with the batch sharded over a mesh the statistics are reduced over the global batch by
XLA itself.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ctl_jax.models import cpu_ops

Dtype = Any

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu") for every convolution.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BatchNorm(nn.Module):
    """Batch norm with PyTorch semantics and a per-sample validity mask.

    Differences from `flax.linen.BatchNorm`, all to match `torch.nn.BatchNorm*d` so that
    trained and imported models behave the same: the running variance is updated with the
    unbiased batch variance (n / (n - 1)), and the mask is a per-sample (N,) vector rather than
    an array broadcastable to the input. Statistics are computed in float32 whatever `dtype`.

    Attributes:
      momentum: weight of the old running value (flax convention; PyTorch momentum 0.1 = 0.9).
      epsilon: added to the variance.
      use_bias: whether there is a learned shift `bias` (the BNNeck has none).
      dtype: dtype of the output; parameters and statistics are float32.
      fast: in training, one pass for the batch moments (shifted, see `_masked_moments`) and a
        hand-written backward pass (`_normalize_train`: same gradient, fewer passes over the
        tensor) instead of two passes and autodiff of the statistics.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    fast: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, valid: jax.Array | None = None):
        """Normalises `x` of shape (N, ..., C) over all axes but the last.

        Args:
          x: (N, ..., C) input.
          train: use (and update the running averages from) batch statistics if True, else
            the running averages.
          valid: optional (N,) bool; rows with False are excluded from the batch statistics.

        Returns:
          (N, ..., C) array of `self.dtype`.
        """
        features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (features,), self.param_dtype)
        bias = (
            self.param("bias", nn.initializers.zeros, (features,), self.param_dtype)
            if self.use_bias
            else None
        )
        ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
        ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)

        # With the hand-written backward pass the moments need no autodiff of their own, and
        # are computed in one pass.
        custom_grad = train and self.fast and not self.is_initializing()
        if train:
            moments_of = lax.stop_gradient(x) if custom_grad else x
            mean, var, count = _masked_moments(moments_of, valid, one_pass=custom_grad)
            if not self.is_initializing():
                # PyTorch feeds the unbiased variance to the running average; a batch without
                # any valid row (count 0) leaves the running averages untouched.
                unbiased = var * (count / jnp.maximum(count - 1.0, 1.0))
                m = self.momentum
                new_mean = m * ra_mean.value + (1.0 - m) * mean
                new_var = m * ra_var.value + (1.0 - m) * unbiased
                ra_mean.value = jnp.where(count > 0, new_mean, ra_mean.value)
                ra_var.value = jnp.where(count > 0, new_var, ra_var.value)
        else:
            mean, var = ra_mean.value, ra_var.value

        if custom_grad:
            weights = jnp.ones(x.shape[:1], bool) if valid is None else valid
            y = _normalize_train(
                x,
                scale,
                jnp.zeros_like(scale) if bias is None else bias,
                weights.astype(jnp.float32),
                mean,
                var,
                count,
                self.epsilon,
            )
        else:
            y = _normalize(x, scale, bias, mean, var, self.epsilon)
        return y.astype(self.dtype)


def _normalize(x, scale, bias, mean, var, epsilon):
    """(x - mean) / sqrt(var + epsilon) * scale + bias, folded into one multiply-add per
    element; float32. `bias` may be None."""
    mul = scale.astype(jnp.float32) * lax.rsqrt(var + epsilon)
    shift = -mean * mul
    if bias is not None:
        shift = shift + bias.astype(jnp.float32)
    return x.astype(jnp.float32) * mul + shift


@functools.partial(jax.custom_vjp, nondiff_argnums=(7,))
def _normalize_train(x, scale, bias, weights, mean, var, count, epsilon):
    """Training-mode batch norm output from batch statistics, with the textbook backward pass.

    Args:
      x: (N, ..., C) input; mean, var: (C,) its (masked) batch moments from
        `_masked_moments(x, valid)`, and count their element count; weights: (N,) float, 1
        for the rows in the statistics and 0 for padding; scale, bias: (C,).

    Returns:
      (N, ..., C) float32, `_normalize(x, scale, bias, mean, var, epsilon)`.

    The gradient is what autodiff of `_masked_moments` and `_normalize` gives, but as two
    passes over the tensor: one for the two reductions sum(g) and sum(g * xhat) (which XLA
    fuses into one loop), one for dx = scale / sigma * (g - w / count * (sum(g) + xhat *
    sum(g * xhat))). Autodiff of the two-pass moments made XLA read the (N, ..., C) tensors
    more often. `mean` and `var` must come from `x` under `lax.stop_gradient`: their
    contribution to the gradient is in dx, and they get none of their own.
    """
    return _normalize(x, scale, bias, mean, var, epsilon)


def _normalize_train_fwd(x, scale, bias, weights, mean, var, count, epsilon):
    y = _normalize(x, scale, bias, mean, var, epsilon)
    return y, (x, scale, weights, mean, var, count)


def _normalize_train_bwd(epsilon, residuals, g):
    x, scale, weights, mean, var, count = residuals
    axes = tuple(range(x.ndim - 1))
    rstd = lax.rsqrt(var + epsilon)
    centered = x.astype(jnp.float32) - mean
    xhat = centered * rstd
    g = g.astype(jnp.float32)
    d_bias = jnp.sum(g, axes)
    d_scale = jnp.sum(g * xhat, axes)
    # Per-row weight of x_i in the statistics; rows of weight 0 get only the direct term.
    w = (weights / jnp.maximum(count, 1.0)).reshape((-1,) + (1,) * (x.ndim - 1))
    mul = scale.astype(jnp.float32) * rstd
    dx = mul * g - w * (mul * (d_bias + xhat * d_scale))
    # The statistics (weights, mean, var, count) get zero cotangents: see the docstring.
    zeros = jax.tree.map(jnp.zeros_like, (weights, mean, var, count))
    return (dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias) + zeros


_normalize_train.defvjp(_normalize_train_fwd, _normalize_train_bwd)


def _masked_moments(x: jax.Array, valid: jax.Array | None, one_pass: bool = False):
    """Mean, biased variance and element count per channel of (N, ..., C) over valid rows.

    Two passes by default (mean, then mean squared deviation), the textbook way. With
    `one_pass` (and spatial axes), the sums of d = x - shift and of d^2, which XLA computes
    in the same loop, then var = E[d^2] - E[d]^2. The shift, the mean over the valid rows of
    their first spatial position (N * C elements to read), keeps that difference well
    conditioned: its float32 error is about 6e-8 * (1 + z^2) of var, z the shift's distance
    from the mean in standard deviations, where an unshifted sum of squares loses
    everything once mean^2 / var nears 1e7. (A reduction over the batch, not one row picked
    out of it: that works on a batch sharded under an Explicit mesh.)

    With a mask, each pass first reduces every sample to an (N, C) partial sum and masks
    those: a `where` on the full (N, ..., C) tensor made XLA materialise a masked copy of
    every batch-norm input and a broadcast zero tensor for its gradient. Masking the partial
    sums instead: ResNet-50 256x128 batch-64 training step on one core 15.5 -> 12.2 s; no
    difference at 128x64 batch 32 (1.30 vs 1.32 s). Same statistics up to float rounding.
    """
    xf = x.astype(jnp.float32)
    axes = tuple(range(x.ndim - 1))
    per_row = math.prod(x.shape[1:-1])
    if valid is None:
        count = jnp.asarray(float(x.shape[0] * per_row), jnp.float32)

        def average(values):
            return jnp.mean(values, axes)
    else:
        keep = valid.astype(bool)[:, None]
        rows = jnp.sum(valid.astype(jnp.float32))
        count = rows * per_row
        denom = jnp.maximum(count, 1.0)

        def average(values):
            # `where` on the partial sums rather than multiplying them by the mask, so that
            # non-finite values in padded rows cannot leak into the statistics.
            return jnp.sum(jnp.where(keep, jnp.sum(values, axes[1:]), 0.0), 0) / denom

    if not one_pass or x.ndim < 3:
        mean = average(xf)
        return mean, average(jnp.square(xf - mean)), count
    corner = xf[(slice(None),) + (0,) * (x.ndim - 2)]  # (N, C)
    if valid is None:
        shift = jnp.mean(corner, 0)
    else:  # no valid row: count 0 and any shift will do
        shift = jnp.sum(jnp.where(keep, corner, 0.0), 0) / jnp.maximum(rows, 1.0)
    shift = lax.stop_gradient(shift)  # any constant gives the same moments
    d = xf - shift
    d_mean = average(d)
    var = jnp.maximum(average(jnp.square(d)) - jnp.square(d_mean), 0.0)
    return shift + d_mean, var, count


class Conv1x1(nn.Module):
    """1x1 convolution, optionally computed as a matrix product (much faster on XLA CPU).

    Same parameter as `nn.Conv(features, (1, 1), strides, use_bias=False)`: `kernel` of shape
    (1, 1, Cin, Cout). With `fast=True` the strided input is subsampled first, which is exactly
    what a 1x1 convolution with stride s and no padding computes.
    """

    features: int
    strides: int = 1
    fast: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Any = conv_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, H, W, Cin) -> (N, ceil(H/s), ceil(W/s), Cout)."""
        cin = x.shape[-1]
        kernel = self.param(
            "kernel", self.kernel_init, (1, 1, cin, self.features), self.param_dtype
        )
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        s = self.strides
        if not self.fast:
            return cpu_ops.conv2d(x, kernel, s, 0, self.precision)
        if s > 1:
            x = x[:, ::s, ::s, :]
        n, h, w, _ = x.shape
        y = jnp.dot(
            x.reshape(n * h * w, cin), kernel.reshape(cin, self.features), precision=self.precision
        )
        return y.reshape(n, h, w, self.features)


class Conv3x3(nn.Module):
    """3x3 convolution with padding 1; same parameter as `nn.Conv(features, (3, 3), ...)`.

    Three ways to compute it, chosen from the static shapes (all give the convolution's
    result up to float rounding, and the same gradients):
    - patches (im2col) @ kernel when a side of the output is at most 3. XLA's CPU convolution
      falls onto a very slow path there, in the forward pass or in the input gradient (4x2
      or 8x4 -> 4x2 maps, as small demo images give in stages 3-4). Measured fwd+bwd, batch
      32: 4x2x256 -> 256 took 320-650 ms against 5 ms as patches; the strided 8x4x128 ->
      4x2x256 49 ms against 2.7 ms (its input gradient alone 49-81 ms); 3x3x256 -> 256 11 ms
      against 6.6 ms; from 8x4 up the convolution was as fast or faster.
    - Winograd F(2x2, 3x3) (`cpu_ops.winograd_conv3x3`) on the CPU backend in float32, for
      stride 1 and at least 256 input channels.
    - otherwise, on CPU in float32, `cpu_ops.conv2d_cpu`: for stride 1 the forward pass and
      the kernel gradient by Winograd, the input gradient by XLA's convolution; for stride 2
      XLA's convolution with the kernel gradient as one matrix product per tap. The plain
      convolution on other backends.

    Attributes:
      fast: allow these rewrites (False: always the plain convolution, both gradients
        included).
    """

    features: int
    strides: int = 1
    fast: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Any = conv_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, H, W, Cin) -> (N, ceil(H/s), ceil(W/s), Cout)."""
        cin = x.shape[-1]
        kernel = self.param(
            "kernel", self.kernel_init, (3, 3, cin, self.features), self.param_dtype
        )
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        s = self.strides
        n, h, w, _ = x.shape
        ho, wo = (h - 1) // s + 1, (w - 1) // s + 1
        if not self.fast:
            return cpu_ops.conv2d(x, kernel, s, 1, self.precision)
        if min(ho, wo) <= 3:  # any backend: same values, and XLA CPU is very slow here
            patches = cpu_ops.conv_patches(x, 3, s, 1).reshape(n * ho * wo, 9 * cin)
            y = jnp.dot(patches, kernel.reshape(9 * cin, self.features), precision=self.precision)
            return y.reshape(n, ho, wo, self.features)
        if not cpu_ops.cpu_float32(x):
            return cpu_ops.conv2d(x, kernel, s, 1, self.precision)
        if cpu_ops.use_winograd(x, s):
            return cpu_ops.winograd_conv3x3(x, kernel, self.precision)
        method = "winograd" if s == 1 else "taps"
        return cpu_ops.conv2d_cpu(x, kernel, s, 1, method, self.precision)


class StemConv(nn.Module):
    """The ResNet stem: 7x7 convolution, stride 2, padding 3, 64 channels, no bias; same
    parameter as `nn.Conv(64, (7, 7), (2, 2), padding=3, use_bias=False)`.

    With `fast` on CPU in float32 the kernel gradient is computed as patches^T @ gradient
    (`cpu_ops.conv2d_cpu`), 1.8x faster than XLA's; values are the same.
    """

    features: int = 64
    fast: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, H, W, 3) -> (N, ceil(H/2), ceil(W/2), 64)."""
        shape = (7, 7, x.shape[-1], self.features)
        kernel = self.param("kernel", conv_kernel_init, shape, self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        if self.fast and cpu_ops.cpu_float32(x):
            return cpu_ops.conv2d_cpu(x, kernel, 2, 3, "patches", self.precision)
        return cpu_ops.conv2d(x, kernel, 2, 3, self.precision)


class IBN(nn.Module):
    """IBN-a normalisation: InstanceNorm on channels [0:half], BatchNorm on the rest."""

    half: int
    dtype: Dtype = jnp.float32
    fast: bool = True

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, valid: jax.Array | None = None):
        """(N, H, W, C) -> (N, H, W, C); instance norm is per sample, so needs no mask."""
        x_in = nn.InstanceNorm(epsilon=1e-5, dtype=self.dtype, name="IN")(x[..., : self.half])
        bn = BatchNorm(dtype=self.dtype, fast=self.fast, name="BN")
        x_bn = bn(x[..., self.half :], train=train, valid=valid)
        return jnp.concatenate([x_in.astype(self.dtype), x_bn], axis=-1)


class _Block(nn.Module):
    """Fields shared by both residual blocks."""

    planes: int
    strides: int = 1
    ibn: bool = False
    fast_1x1: bool = True
    fast_ops: bool = True
    dtype: Dtype = jnp.float32

    def conv3x3(self, features: int, strides: int, name: str) -> Conv3x3:
        return Conv3x3(features, strides, fast=self.fast_ops, dtype=self.dtype, name=name)

    def conv1x1(self, features: int, strides: int, name: str) -> Conv1x1:
        return Conv1x1(features, strides, fast=self.fast_1x1, dtype=self.dtype, name=name)

    def bn(self, name: str) -> BatchNorm:
        return BatchNorm(dtype=self.dtype, fast=self.fast_ops, name=name)

    def shortcut(self, x, out_features: int, train: bool, valid):
        if self.strides == 1 and x.shape[-1] == out_features:
            return x
        y = self.conv1x1(out_features, self.strides, "downsample_conv")(x)
        return self.bn("downsample_bn")(y, train=train, valid=valid)


class BasicBlock(_Block):
    """torchvision BasicBlock: 3x3 (stride) -> BN -> ReLU -> 3x3 -> BN, + shortcut, ReLU."""

    expansion = 1

    @nn.compact
    def __call__(self, x, *, train: bool, valid=None):
        """(N, H, W, Cin) -> (N, H/s, W/s, planes)."""
        if self.ibn:
            raise ValueError("IBN-a is only defined for bottleneck blocks here")
        y = self.conv3x3(self.planes, self.strides, "conv1")(x)
        y = nn.relu(self.bn("bn1")(y, train=train, valid=valid))
        y = self.conv3x3(self.planes, 1, "conv2")(y)
        y = self.bn("bn2")(y, train=train, valid=valid)
        return nn.relu(y + self.shortcut(x, self.planes, train, valid))


class Bottleneck(_Block):
    """torchvision Bottleneck (v1.5: the stride sits on the 3x3 conv); IBN-a optional."""

    expansion = 4

    @nn.compact
    def __call__(self, x, *, train: bool, valid=None):
        """(N, H, W, Cin) -> (N, H/s, W/s, 4 * planes)."""
        out_features = self.planes * self.expansion
        y = self.conv1x1(self.planes, 1, "conv1")(x)
        if self.ibn:
            ibn = IBN(self.planes // 2, dtype=self.dtype, fast=self.fast_ops, name="bn1")
            y = ibn(y, train=train, valid=valid)
        else:
            y = self.bn("bn1")(y, train=train, valid=valid)
        y = nn.relu(y)
        y = self.conv3x3(self.planes, self.strides, "conv2")(y)
        y = nn.relu(self.bn("bn2")(y, train=train, valid=valid))
        y = self.conv1x1(out_features, 1, "conv3")(y)
        y = self.bn("bn3")(y, train=train, valid=valid)
        return nn.relu(y + self.shortcut(x, out_features, train, valid))


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
      fast_1x1: compute 1x1 convolutions as matrix products (same result, faster on CPU).
      fast_ops: the other CPU rewrites in `cpu_ops` (same parameters, same results to float
        rounding): the max pool's custom VJP, the 3x3 convolutions' patches, Winograd and
        matmul kernel-gradient paths, the stem's patches kernel gradient; and the batch
        norms' one-pass moments and hand-written backward pass (`BatchNorm.fast`). False
        gives the straightforward flax/lax formulation, which the tests compare against.
    """

    stage_sizes: Sequence[int]
    block_cls: type[_Block]
    last_stride: int = 1
    stem_relu: bool = False
    ibn: bool = False
    dtype: Dtype = jnp.float32
    fast_1x1: bool = True
    fast_ops: bool = True

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
        x = StemConv(fast=self.fast_ops, dtype=self.dtype, name="conv1")(x)
        x = BatchNorm(dtype=self.dtype, fast=self.fast_ops, name="bn1")(x, train=train, valid=valid)
        if self.stem_relu:
            x = nn.relu(x)
        x = cpu_ops.max_pool_3x3_s2(x, fast=self.fast_ops)
        for i, num_blocks in enumerate(self.stage_sizes):
            planes = 64 * 2**i
            stage_stride = 1 if i == 0 else (self.last_stride if i == 3 else 2)
            for j in range(num_blocks):
                x = self.block_cls(
                    planes=planes,
                    strides=stage_stride if j == 0 else 1,
                    ibn=self.ibn and i < 3,
                    fast_1x1=self.fast_1x1,
                    fast_ops=self.fast_ops,
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
