"""Training-mode batch norm in fewer passes over the tensor, for XLA's CPU backend.

What the CPU layer set's batch norm (`ctl_jax.cpu.layers.BatchNorm`) changes in the
reference `ctl_jax.models.layers.BatchNorm` (same statistics, outputs and gradients up to
float rounding; tests/test_speed_paths.py):
- the batch moments in one pass (`one_pass_moments`) instead of two;
- a hand-written backward pass (`normalize_train`) instead of autodiff of the moments: the
  two reductions sum(g) and sum(g * xhat), which XLA fuses into one loop, then dx in one
  more pass. Autodiff of the two-pass moments made XLA read the (N, ..., C) tensors more
  often.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from ctl_jax.cpu import recompute
from ctl_jax.models import layers


def one_pass_moments(x: jax.Array, valid: jax.Array | None):
    """(mean, biased variance, count) per channel of (N, ..., C) `x` over the valid rows,
    float32, as `layers.masked_moments` but in one pass over the tensor.

    The sums of d = x - shift and of d^2, which XLA computes in the same loop, then
    var = E[d^2] - E[d]^2. The shift, the mean over the valid rows of their first spatial
    position (N * C elements to read), keeps that difference well conditioned: its float32
    error is about 6e-8 * (1 + z^2) of var, z the shift's distance from the mean in standard
    deviations, where an unshifted sum of squares loses everything once mean^2 / var nears
    1e7. (A reduction over the batch, not one row picked out of it: that works on a batch
    sharded under an Explicit mesh.) Inputs without spatial axes, (N, C), take the two-pass
    moments: there is no pass to save.
    """
    if x.ndim < 3:
        return layers.masked_moments(x, valid)
    xf = x.astype(jnp.float32)
    count = layers.valid_count(x, valid)
    corner = xf[(slice(None),) + (0,) * (x.ndim - 2)]  # (N, C)
    if valid is None:
        shift = jnp.mean(corner, 0)
    else:  # no valid row: count 0 and any shift will do
        keep = valid.astype(bool)[:, None]
        rows = jnp.sum(valid.astype(jnp.float32))
        shift = jnp.sum(jnp.where(keep, corner, 0.0), 0) / jnp.maximum(rows, 1.0)
    shift = lax.stop_gradient(shift)  # any constant gives the same moments
    d = xf - shift
    d_mean = layers.masked_mean(d, valid, count)
    var = jnp.maximum(layers.masked_mean(jnp.square(d), valid, count) - jnp.square(d_mean), 0.0)
    return shift + d_mean, var, count


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def normalize_train(x, scale, bias, weights, mean, var, count, epsilon, recompute_after=True):
    """Training-mode batch norm output from batch statistics, with the textbook backward pass.

    Args:
      x: (N, ..., C) input; mean, var: (C,) its (masked) batch moments, and count their
        element count; weights: (N,) float, 1 for the rows in the statistics and 0 for
        padding; scale, bias: (C,).

    Returns:
      (N, ..., C) float32, `layers.normalize(x, scale, bias, mean, var, epsilon)`.

    `recompute_after`: the backward pass computes xhat from x only once the gradient exists
    (`recompute.after`), so that XLA does not compute it in the forward pass and keep it next
    to x (less memory, some speed: docs/performance.md).

    The gradient is what autodiff of the moments and of `layers.normalize` gives:
    dx = scale / sigma * (g - w / count * (sum(g) + xhat * sum(g * xhat))). `mean` and
    `var` must come from `x` under `lax.stop_gradient`: their contribution to the gradient
    is in dx, and they get none of their own.
    """
    del recompute_after  # only the backward pass uses it
    return layers.normalize(x, scale, bias, mean, var, epsilon)


def _normalize_train_fwd(x, scale, bias, weights, mean, var, count, epsilon, recompute_after):
    del recompute_after
    y = layers.normalize(x, scale, bias, mean, var, epsilon)
    return y, (x, scale, weights, mean, var, count)


def _normalize_train_bwd(epsilon, recompute_after, residuals, g):
    x, scale, weights, mean, var, count = residuals
    # x after g: otherwise XLA computes xhat (or scale * rstd * x) in the forward pass and
    # keeps it for the backward pass next to x, which it keeps anyway (the ReLU after the
    # batch norm recomputes its mask from x): one more tensor per batch norm.
    if recompute_after:
        x = recompute.after(g, x)
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


normalize_train.defvjp(_normalize_train_fwd, _normalize_train_bwd)
