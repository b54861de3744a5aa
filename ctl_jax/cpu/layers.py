"""The CPU layer set: `CPU_LAYERS`, a `ctl_jax.models.layers.Layers` whose layers create the
reference layers' parameters and compute the same values and gradients (up to float
rounding) in ways XLA's CPU backend runs faster.

- 1x1 convolutions as matrix products (the strided ones subsample first, which is exactly
  what a 1x1 convolution with stride s and no padding computes): XLA's CPU backward pass of
  a 1x1 convolution is several times slower than the same product.
- 3x3 convolutions: patches (im2col) @ kernel when a side of the output is at most 3, where
  XLA's CPU convolution (forward or input gradient) falls onto a very slow path (but
  the forward pass by F(2x2, 3x3) on even-sided maps with at least 512 input channels, or
  256 with at least 128 tiles);
  otherwise,
  in float32 and stride 1, Winograd F(4x4, 3x3) on maps with both sides at least 8,
  F(2x2, 3x3) on smaller ones with at least 256 input channels, and `conv2d_cpu`'s kernel
  gradient as matrix products for the others.
- The stem: in float32, its kernel gradient as patches^T @ gradient.
- The batch norm's one-pass moments and hand-written backward pass (`batch_norm.py`).
- The stem's max pool with a custom backward pass (`max_pool.py`).
- For memory: what a backward pass needs beyond a layer's input (Winograd's transforms, the
  patches, the batch norm's normalised input, kernel-gradient patches and taps) is
  recomputed once the incoming gradient exists, not kept from the forward pass
  (`recompute.py`); only elementwise work and copies are recomputed, no product.

The rewrites that reassociate sums over the kernel window (Winograd, kernel gradients as
matrix products) apply in float32 only: in bfloat16 their extra roundings would cost
precision. Everything these layers compute is under the name scope `SCOPE`, so profiles and
lowered programs show which operations come from them.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ctl_jax.cpu import batch_norm, convolution, max_pool, recompute
from ctl_jax.errors import ConfigError
from ctl_jax.models import layers
from ctl_jax.models.layers import Dtype, Layers, conv_kernel_init

SCOPE = "cpu_fast_path"

# Stride-1 3x3 convolutions whose output map has both sides at least this long run whole
# (forward pass and both gradients) by Winograd F(4x4, 3x3): at least 2 x 2 tiles per
# image. On smaller maps its products get too thin (N * 2 rows at 8x4) and F(2x2, 3x3)
# or the patches are faster.
WINOGRAD_F4_MIN_SIDE = 8
# On smaller maps, stride-1 3x3 convolutions with at least this many input channels
# (ResNet-50 stages 3-4) run whole by Winograd F(2x2, 3x3), gradients included. With fewer
# channels its transforms' memory traffic eats the gain, and only the forward pass and the
# kernel gradient use it.
WINOGRAD_MIN_CIN = 256
# Maps with a side of 2-3 take the patches (XLA's convolution is very slow there), but the
# forward pass of stride-1 ones with both sides even runs by F(2x2, 3x3), which tiles them
# exactly with 2.25x fewer multiplies, when its products are large enough: at least 512
# input channels (ResNet-18 stage 4 on 64x32 images: 4x2 maps), or at least 256 channels
# and at least 128 tiles (N * Ho * Wo / 4: a batch of 64 or more on 4x2 maps, as when
# embedding). Forward, 4x2 maps, ms: 512 channels, batch 32 / 64 / 128, patches 10.9 / 20.1
# / 44.2, Winograd 7.1 / 15.0 / 31.7; 256 channels, batch 32 / 64 / 128, patches 3.2 / 6.6 /
# 12.0, Winograd 3.9 / 4.5 / 7.0. On odd or 1-wide sides the patches stay faster
# (docs/performance.md).
WINOGRAD_SMALL_MAP_MIN_CIN = 512
WINOGRAD_SMALL_MAP_MIN_CIN_MANY_TILES = 256
WINOGRAD_SMALL_MAP_MANY_TILES = 128


def _reassociate(x: jax.Array) -> bool:
    """Whether the rewrites that sum in another order apply: float32 only."""
    return x.dtype == jnp.float32


def conv3x3(
    x: jax.Array,
    kernel: jax.Array,
    strides: int,
    precision: Any = None,
    recompute_: bool = True,
    winograd_tile: int = 4,
) -> jax.Array:
    """3x3 convolution, padding 1, (N, H, W, Cin) -> (N, ceil(H/s), ceil(W/s), Cout), by the
    fastest of the ways above for this shape and dtype; `recompute_=False` keeps the
    intermediates from the forward pass, `winograd_tile=2` never uses F(4x4, 3x3) (see
    `cpu_layers`)."""
    n, h, w, cin = x.shape
    ho, wo = (h - 1) // strides + 1, (w - 1) // strides + 1
    # The patches (9x the input) and Winograd's transforms (4x the input, 16/9 of the
    # kernel) are recomputed in the backward pass rather than kept (`recompute.py`); the
    # other paths keep only x and the kernel already.
    if min(ho, wo) <= 3:
        if strides == 1 and _reassociate(x) and _small_map_winograd(n, ho, wo, cin):
            return _winograd_forward_patches_backward(x, kernel, precision, recompute_)
        fn = functools.partial(_patches_conv3x3, strides=strides, precision=precision)
        # Only the patches are recomputed: the kernel goes to the products as it is.
        return recompute.recomputed(fn, x, kernel, untied=(1,)) if recompute_ else fn(x, kernel)
    if not _reassociate(x):
        return convolution.conv2d(x, kernel, strides, 1, precision)
    whole_f4 = winograd_tile == 4 and min(ho, wo) >= WINOGRAD_F4_MIN_SIDE
    if strides == 1 and (whole_f4 or cin >= WINOGRAD_MIN_CIN):
        tile = 4 if whole_f4 else 2
        fn = functools.partial(convolution.winograd_conv3x3, precision=precision, tile=tile)
        return recompute.recomputed(fn, x, kernel) if recompute_ else fn(x, kernel)
    method = "winograd" if strides == 1 else "taps"
    return convolution.conv2d_cpu(x, kernel, strides, 1, method, precision, recompute_)


def _patches_conv3x3(x: jax.Array, kernel: jax.Array, strides: int, precision: Any) -> jax.Array:
    """3x3 convolution, padding 1, as patches (im2col) @ kernel."""
    n, _, _, cin = x.shape
    cout = kernel.shape[-1]
    patches = convolution.conv_patches(x, 3, strides, 1)
    _, ho, wo, _ = patches.shape
    y = jnp.dot(
        patches.reshape(n * ho * wo, 9 * cin), kernel.reshape(9 * cin, cout), precision=precision
    )
    return y.reshape(n, ho, wo, cout)


def _small_map_winograd(n: int, ho: int, wo: int, cin: int) -> bool:
    """Whether a stride-1 output map with a side of 2-3 runs its forward pass by F(2x2, 3x3)."""
    if min(ho, wo) < 2 or ho % 2 or wo % 2:
        return False
    tiles = n * (ho // 2) * (wo // 2)
    return cin >= WINOGRAD_SMALL_MAP_MIN_CIN or (
        cin >= WINOGRAD_SMALL_MAP_MIN_CIN_MANY_TILES and tiles >= WINOGRAD_SMALL_MAP_MANY_TILES
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _winograd_forward_patches_backward(x, kernel, precision, recompute_):
    """Stride-1 3x3 convolution: forward by F(2x2, 3x3), gradients by the patches.

    On 4x2 maps with 512 channels the whole Winograd path was faster as well, but its
    backward pass holds kernel-sized Winograd arrays (the transformed kernel and its
    gradient, 16/9 of the kernel each: 17 MB at 512x512), which outweigh the activations at
    such small maps (+28 MB in ResNet-18's 64x32 training step); the patches' backward
    holds only the kernel gradient.
    """
    del recompute_  # only the backward pass uses it
    return convolution.winograd_conv3x3(x, kernel, precision, tile=2)


def _small_map_fwd(x, kernel, precision, recompute_):
    return _winograd_forward_patches_backward(x, kernel, precision, recompute_), (x, kernel)


def _small_map_bwd(precision, recompute_, residuals, g):
    patches = functools.partial(_patches_conv3x3, strides=1, precision=precision)
    if recompute_:  # the patches recomputed after g, as `conv3x3`'s patches path does
        return recompute.vjp_after(patches, residuals, g, untied=(1,))
    return jax.vjp(patches, *residuals)[1](g)


_winograd_forward_patches_backward.defvjp(_small_map_fwd, _small_map_bwd)


class Conv3x3(nn.Module):
    """3x3 convolution, padding 1, no bias: `conv3x3` with `nn.Conv`'s `kernel`."""

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Any = conv_kernel_init
    recompute: bool = True  # see `cpu_layers`
    winograd_tile: int = 4  # see `cpu_layers`

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, H, W, Cin) -> (N, ceil(H/s), ceil(W/s), features)."""
        shape = (3, 3, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        with jax.named_scope(SCOPE):
            return conv3x3(
                x, kernel, self.strides, self.precision, self.recompute, self.winograd_tile
            )


class Conv1x1(nn.Module):
    """1x1 convolution, no padding, no bias, as a matrix product; `nn.Conv`'s `kernel`."""

    features: int
    strides: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Any = conv_kernel_init

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, H, W, Cin) -> (N, ceil(H/s), ceil(W/s), features)."""
        cin = x.shape[-1]
        shape = (1, 1, cin, self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        with jax.named_scope(SCOPE):
            s = self.strides
            if s > 1:
                x = x[:, ::s, ::s, :]
            n, h, w, _ = x.shape
            kernel = kernel.reshape(cin, self.features)
            y = jnp.dot(x.reshape(n * h * w, cin), kernel, precision=self.precision)
            return y.reshape(n, h, w, self.features)


class StemConv(nn.Module):
    """The ResNet stem: 7x7 convolution, stride 2, padding 3, no bias; `nn.Conv`'s `kernel`.
    In float32 its kernel gradient is patches^T @ gradient (`conv2d_cpu`, "patches")."""

    features: int = 64
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    precision: Any = None
    kernel_init: Any = conv_kernel_init
    recompute: bool = True  # see `cpu_layers`

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, H, W, Cin) -> (N, ceil(H/2), ceil(W/2), features)."""
        shape = (7, 7, x.shape[-1], self.features)
        kernel = self.param("kernel", self.kernel_init, shape, self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        with jax.named_scope(SCOPE):
            if _reassociate(x):
                return convolution.conv2d_cpu(
                    x, kernel, 2, 3, "patches", self.precision, self.recompute
                )
            return convolution.conv2d(x, kernel, 2, 3, self.precision)


class BatchNorm(layers.BatchNorm):
    """The reference batch norm (same parameters and statistics) with, in training, the
    one-pass moments and the hand-written backward pass of `batch_norm.py`."""

    recompute: bool = True  # see `cpu_layers`

    def batch_moments(self, x, valid):
        with jax.named_scope(SCOPE):
            # No autodiff through the moments: `normalize_train`'s backward pass covers them.
            return batch_norm.one_pass_moments(lax.stop_gradient(x), valid)

    def normalize_batch(self, x, scale, bias, valid, mean, var, count):
        weights = jnp.ones(x.shape[:1], bool) if valid is None else valid
        shift = jnp.zeros_like(scale) if bias is None else bias
        with jax.named_scope(SCOPE):
            return batch_norm.normalize_train(
                x,
                scale,
                shift,
                weights.astype(jnp.float32),
                mean,
                var,
                count,
                self.epsilon,
                self.recompute,
            )


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """`max_pool.max_pool_3x3_s2` under `SCOPE`."""
    with jax.named_scope(SCOPE):
        return max_pool.max_pool_3x3_s2(x)


def cpu_layers(recompute: bool = True, winograd_tile: int = 4) -> Layers:
    """The CPU layer set.

    `recompute=True` (the config's `cpu_recompute`, default): the backward passes recompute
    their elementwise intermediates (Winograd transforms, patches, the batch norm's xhat)
    once the incoming gradient exists instead of keeping them from the forward pass
    (`recompute.py`): half the step's temporary buffer at ResNet-50, for some speed at small
    sizes (ResNet-50 128x64: 8% slower; 256x128: no difference measured). `False`: they are
    kept, as before. Values and gradients are the same either way.

    `winograd_tile=4` (the config's `cpu_winograd_tile`, default): stride-1 3x3 convolutions
    on maps of at least `WINOGRAD_F4_MIN_SIDE` run by Winograd F(4x4, 3x3), 4x fewer
    multiplies than the direct convolution (F(2x2, 3x3): 2.25x) at ~10x its float rounding
    (relative ~1e-5 instead of ~1e-6); `2`: F(2x2, 3x3) only, as before."""
    if winograd_tile not in convolution.WINOGRAD_TILES:
        raise ConfigError(f"cpu_winograd_tile: expected 2 or 4, got {winograd_tile!r}")
    return Layers(
        stem_conv=functools.partial(StemConv, recompute=recompute),
        conv3x3=functools.partial(Conv3x3, recompute=recompute, winograd_tile=winograd_tile),
        conv1x1=Conv1x1,
        norm=functools.partial(BatchNorm, recompute=recompute),
        max_pool=max_pool_3x3_s2,
    )


CPU_LAYERS = cpu_layers(recompute=True)
