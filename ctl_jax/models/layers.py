"""The layers a ResNet is built from, passed to it as one set of factories.

flax's ImageNet example hands its ResNet `conv` and `norm` partials; here the set is a frozen
`Layers` dataclass: the stem convolution, 3x3 and 1x1 convolutions, the batch norm and the
stem's max pool. `REFERENCE_LAYERS` is plain Flax/lax (`nn.Conv`, `nn.max_pool`, the batch
norm below, differentiated by autodiff); `ctl_jax.cpu` provides a set with the same
parameters that runs faster on XLA's CPU backend. Images are NHWC, kernels HWIO.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any
ModuleDef = Any  # a flax module class, or a partial of one

# torchvision: kaiming_normal_(mode="fan_out", nonlinearity="relu") for every convolution.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class Layers:
    """Factories of the layers of a ResNet; every set creates the same parameters.

    Attributes:
      stem_conv: `stem_conv(features, dtype=, name=)`: 7x7, stride 2, padding 3, no bias.
      conv3x3: `conv3x3(features, strides=, dtype=, name=)`: padding 1, no bias.
      conv1x1: `conv1x1(features, strides=, dtype=, name=)`: no padding, no bias.
        All three hold one parameter, `kernel` of shape (k, k, Cin, features), as `nn.Conv`.
      norm: `norm(use_bias=True, dtype=, name=)`, called as `(x, train=, valid=)`: a
        `BatchNorm` (or a subclass of it), the parameters and statistics of `BatchNorm`.
      max_pool: (N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C), the stem's 3x3 stride-2 max
        pool with padding 1.
    """

    stem_conv: ModuleDef
    conv3x3: ModuleDef
    conv1x1: ModuleDef
    norm: ModuleDef
    max_pool: Callable[[jax.Array], jax.Array]


def valid_count(x: jax.Array, valid: jax.Array | None) -> jax.Array:
    """Number of elements per channel of (N, ..., C) `x` in the batch statistics: valid rows
    times the spatial size. float32 scalar."""
    per_row = math.prod(x.shape[1:-1])
    if valid is None:
        return jnp.asarray(float(x.shape[0] * per_row), jnp.float32)
    return jnp.sum(valid.astype(jnp.float32)) * per_row


def masked_mean(values: jax.Array, valid: jax.Array | None, count: jax.Array) -> jax.Array:
    """Per-channel mean of (N, ..., C) `values` over the rows where `valid` (N,) is True;
    `count` from `valid_count`. A batch without valid rows gives 0.

    Each sample is first reduced to an (N, C) partial sum and those are masked, with `where`
    so that non-finite values in padded rows cannot leak in. A `where` on the whole tensor
    would make XLA materialise a masked copy of every batch-norm input (and a zero tensor
    for its gradient).
    """
    axes = tuple(range(values.ndim - 1))
    if valid is None:
        return jnp.mean(values, axes)
    partial_sums = jnp.sum(values, axes[1:])  # (N, C)
    kept = jnp.where(valid.astype(bool)[:, None], partial_sums, 0.0)
    return jnp.sum(kept, 0) / jnp.maximum(count, 1.0)


def masked_moments(x: jax.Array, valid: jax.Array | None):
    """(mean, biased variance, count) per channel of (N, ..., C) `x` over the valid rows, in
    float32 and in two passes (the mean, then the mean squared deviation)."""
    xf = x.astype(jnp.float32)
    count = valid_count(x, valid)
    mean = masked_mean(xf, valid, count)
    return mean, masked_mean(jnp.square(xf - mean), valid, count), count


def normalize(x, scale, bias, mean, var, epsilon) -> jax.Array:
    """(x - mean) / sqrt(var + epsilon) * scale + bias as one multiply-add per element, in
    float32; (C,) statistics and parameters, `bias` may be None."""
    mul = scale.astype(jnp.float32) * lax.rsqrt(var + epsilon)
    shift = -mean * mul
    if bias is not None:
        shift = shift + bias.astype(jnp.float32)
    return x.astype(jnp.float32) * mul + shift


class BatchNorm(nn.Module):
    """Batch norm with PyTorch semantics and a per-sample validity mask.

    Differences from `flax.linen.BatchNorm`, all to match `torch.nn.BatchNorm*d` so that
    trained and imported models behave the same: the running variance is updated with the
    unbiased batch variance (n / (n - 1)), and the mask is a per-sample (N,) vector: padded
    samples are normalised like the others but contribute nothing to the batch statistics.
    Statistics are computed in float32 whatever `dtype`. Under `jax.jit` with the batch
    sharded over a mesh they are reduced over the global batch by XLA itself.

    Parameters `scale` (and `bias` with `use_bias`); statistics `batch_stats/{mean,var}`.
    Subclasses may change how the batch statistics are computed and differentiated
    (`batch_moments`, `normalize_batch`), not what they are.

    Attributes:
      momentum: weight of the old running value (flax convention; PyTorch momentum 0.1 = 0.9).
      epsilon: added to the variance.
      use_bias: whether there is a learned shift `bias` (the BNNeck has none).
      dtype: dtype of the output; parameters and statistics are float32.
    """

    momentum: float = 0.9
    epsilon: float = 1e-5
    use_bias: bool = True
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool, valid: jax.Array | None = None):
        """Normalises (N, ..., C) `x` over all axes but the last.

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
        if not train:
            y = normalize(x, scale, bias, ra_mean.value, ra_var.value, self.epsilon)
            return y.astype(self.dtype)

        mean, var, count = self.batch_moments(x, valid)
        if not self.is_initializing():
            # PyTorch feeds the unbiased variance to the running average; a batch without
            # any valid row (count 0) leaves the running averages untouched.
            unbiased = var * (count / jnp.maximum(count - 1.0, 1.0))
            m = self.momentum
            new_mean = m * ra_mean.value + (1.0 - m) * mean
            new_var = m * ra_var.value + (1.0 - m) * unbiased
            ra_mean.value = jnp.where(count > 0, new_mean, ra_mean.value)
            ra_var.value = jnp.where(count > 0, new_var, ra_var.value)
        y = self.normalize_batch(x, scale, bias, valid, mean, var, count)
        return y.astype(self.dtype)

    def batch_moments(self, x: jax.Array, valid: jax.Array | None):
        """(mean, biased variance, count) of the valid rows: `masked_moments`."""
        return masked_moments(x, valid)

    def normalize_batch(self, x, scale, bias, valid, mean, var, count) -> jax.Array:
        """float32 (N, ..., C) output from the batch moments, differentiated through them."""
        del valid, count  # in the moments already
        return normalize(x, scale, bias, mean, var, self.epsilon)


_conv = functools.partial(nn.Conv, use_bias=False, kernel_init=conv_kernel_init)

REFERENCE_LAYERS = Layers(
    stem_conv=functools.partial(_conv, kernel_size=(7, 7), strides=2, padding=3),
    conv3x3=functools.partial(_conv, kernel_size=(3, 3), padding=1),
    conv1x1=functools.partial(_conv, kernel_size=(1, 1), padding=0),
    norm=BatchNorm,
    max_pool=functools.partial(
        nn.max_pool, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1))
    ),
)
