"""Convolutions rewritten for XLA's CPU backend: same values and gradients up to float
rounding, computed as matrix products where XLA's CPU convolution is slow.

- `conv_taps`, `conv_patches`: what each kernel tap sees, and im2col (the taps side by
  side), for small maps and for kernel gradients as matrix products.
- `winograd_conv3x3`: stride-1 3x3 convolution by Winograd F(2x2, 3x3).
- `conv2d_cpu`: a convolution whose kernel gradient is computed as matrix products instead
  of XLA's convolution over the whole image (and whose forward pass may be Winograd).

Images are NHWC, kernels HWIO. tests/test_speed_paths.py compares each with `lax`'s
convolution; docs/performance.md has the measurements behind the choices and thresholds.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from ctl_jax.cpu import recompute

_DIMENSIONS = ("NHWC", "HWIO", "NHWC")


def conv2d(
    x: jax.Array, kernel: jax.Array, strides: int, padding: int, precision: Any = None
) -> jax.Array:
    """The plain convolution: (N, H, W, Cin) x (k, k, Cin, Cout) -> (N, Ho, Wo, Cout)."""
    pad = ((padding, padding), (padding, padding))
    return lax.conv_general_dilated(
        x, kernel, (strides, strides), pad, dimension_numbers=_DIMENSIONS, precision=precision
    )


def conv_taps(x: jax.Array, size: int, strides: int, padding: int) -> list[jax.Array]:
    """The input each kernel tap (dy, dx) sees, row-major: size * size arrays of shape
    (N, Ho, Wo, Cin), tap (dy, dx) holding x_padded[strides * i + dy, strides * j + dx]."""
    _, h, w, _ = x.shape
    ho = (h + 2 * padding - size) // strides + 1
    wo = (w + 2 * padding - size) // strides + 1
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    span_h, span_w = strides * (ho - 1) + 1, strides * (wo - 1) + 1
    return [
        xp[:, dy : dy + span_h : strides, dx : dx + span_w : strides, :]
        for dy in range(size)
        for dx in range(size)
    ]


def conv_patches(x: jax.Array, size: int, strides: int, padding: int) -> jax.Array:
    """(N, H, W, Cin) -> (N, Ho, Wo, size * size * Cin): every output position's input window,
    channels ordered (dy, dx, cin) to match `kernel.reshape(size * size * Cin, Cout)`."""
    return jnp.concatenate(conv_taps(x, size, strides, padding), axis=-1)


# Winograd F(2x2, 3x3) (Lavin & Gray 2016): a 4x4 input tile d and the 3x3 kernel g give the
# 2x2 output tile A^T [(G g G^T) * (B^T d B)] A: 16 multiplies instead of 36, so the forward
# pass and both gradients (autodiff of the same linear maps) do 2.25x fewer flops, as 16
# batched matrix products. The transforms only add, subtract and halve, so the results
# differ from the direct convolution by float rounding (relative 1e-6 in float32).
#   B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]
#   G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]
#   A^T = [[1, 1, 1, 0], [0, 1, -1, -1]]


def _winograd_input_1d(rows: list[jax.Array]) -> list[jax.Array]:
    d0, d1, d2, d3 = rows
    return [d0 - d2, d1 + d2, d2 - d1, d1 - d3]


def _winograd_kernel_1d(rows: list[jax.Array]) -> list[jax.Array]:
    g0, g1, g2 = rows
    return [g0, 0.5 * (g0 + g1 + g2), 0.5 * (g0 - g1 + g2), g2]


def _winograd_output_1d(rows: list[jax.Array]) -> list[jax.Array]:
    m0, m1, m2, m3 = rows
    return [m0 + m1 + m2, m1 - m2 - m3]


def winograd_conv3x3(x: jax.Array, kernel: jax.Array, precision: Any = None) -> jax.Array:
    """3x3 convolution, stride 1, padding 1, NHWC x HWIO, by Winograd F(2x2, 3x3).

    Same result as `lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)))` up to
    float rounding, for any H, W >= 1 (odd sizes are padded to whole tiles and cropped).
    """
    n, h, w, cin = x.shape
    cout = kernel.shape[-1]
    th, tw = (h + 1) // 2, (w + 1) // 2
    # Tile (i, j) reads padded rows 2i..2i+3 and columns 2j..2j+3. The image reshapes split
    # or merge one axis at a time, so that a batch sharded under an Explicit mesh keeps
    # working (JAX cannot infer the sharding of a reshape that splits several axes).
    xp = jnp.pad(x, ((0, 0), (1, 2 * th + 1 - h), (1, 2 * tw + 1 - w), (0, 0)))
    xp = xp.reshape(n, th + 1, 2, 2 * tw + 2, cin).reshape(n, th + 1, 2, tw + 1, 2, cin)
    row_taps = [xp[:, u : u + th, a] for u in (0, 1) for a in (0, 1)]  # (n, th, tw+1, 2, cin)
    v = []
    for r in _winograd_input_1d(row_taps):
        v += _winograd_input_1d([r[:, :, u : u + tw, a] for u in (0, 1) for a in (0, 1)])
    v = jnp.stack(v).reshape(16, n * th * tw, cin)
    u = []
    for r in _winograd_kernel_1d([kernel[0], kernel[1], kernel[2]]):
        u += _winograd_kernel_1d([r[0], r[1], r[2]])
    u = jnp.stack(u).reshape(16, cin, cout)
    m = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), precision=precision)
    m = m.reshape(4, 4, n * th * tw, cout).reshape(4, 4, n, th * tw, cout)
    m = m.reshape(4, 4, n, th, tw, cout)
    rows = _winograd_output_1d([m[0], m[1], m[2], m[3]])
    y = [_winograd_output_1d([r[0], r[1], r[2], r[3]]) for r in rows]
    y = jnp.stack([jnp.stack(y[0], 3), jnp.stack(y[1], 3)], 2)  # (n, th, 2, tw, 2, cout)
    y = y.reshape(n, th, 2, 2 * tw, cout).reshape(n, 2 * th, 2 * tw, cout)
    return y[:, :h, :w, :]


# Kernel gradients. XLA computes dL/dkernel of a convolution as another convolution whose
# window is the whole output map, which XLA's CPU backend runs 2-3x slower than the forward
# pass. Written as matrix products instead:
# - "winograd" (stride-1 3x3): the kernel gradient of `winograd_conv3x3`, 2.25x fewer flops.
# - "taps" (strided 3x3): one (Cin, R) @ (R, Cout) product per tap, R = N * Ho * Wo.
# - "patches" (the 7x7 stem, 3 input channels, where per-tap products are too thin):
#   patches (R, 147)^T @ (R, 64).


def _kernel_grad_winograd(x, g, size, strides, padding, precision):
    del size, strides, padding  # 3x3, stride 1, padding 1
    kernel_shape = (3, 3, x.shape[-1], g.shape[-1])
    _, vjp = jax.vjp(lambda k: winograd_conv3x3(x, k, precision), jnp.zeros(kernel_shape, x.dtype))
    return vjp(g)[0]


def _kernel_grad_taps(x, g, size, strides, padding, precision):
    cin, cout = x.shape[-1], g.shape[-1]
    rows = g.shape[0] * g.shape[1] * g.shape[2]
    g2 = g.reshape(rows, cout)
    taps = [
        jnp.dot(tap.reshape(rows, cin).T, g2, precision=precision)
        for tap in conv_taps(x, size, strides, padding)
    ]
    return jnp.stack(taps).reshape(size, size, cin, cout)


def _kernel_grad_patches(x, g, size, strides, padding, precision):
    cin, cout = x.shape[-1], g.shape[-1]
    n, ho, wo, _ = g.shape
    patches = conv_patches(x, size, strides, padding).reshape(n * ho * wo, size * size * cin)
    dk = jnp.dot(patches.T, g.reshape(n * ho * wo, cout), precision=precision)
    return dk.reshape(size, size, cin, cout)


_KERNEL_GRADS = {
    "winograd": _kernel_grad_winograd,
    "taps": _kernel_grad_taps,
    "patches": _kernel_grad_patches,
}


# Largest input (elements) whose forward pass `conv2d_cpu` computes by Winograd: 8 MiB of
# float32. Beyond it the transformed tiles (4x the input) no longer stay in cache, and XLA's
# convolution is as fast or faster (ResNet-50 stages 1-2 at 256x128, batch 64).
WINOGRAD_FORWARD_MAX_ELEMENTS = 2**21


def _forward(x, kernel, strides, padding, method, precision):
    if method == "winograd" and x.size <= WINOGRAD_FORWARD_MAX_ELEMENTS:
        return winograd_conv3x3(x, kernel, precision)
    return conv2d(x, kernel, strides, padding, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def conv2d_cpu(
    x: jax.Array,
    kernel: jax.Array,
    strides: int,
    padding: int,
    method: str,
    precision: Any = None,
    recompute_after: bool = True,
) -> jax.Array:
    """`conv2d(x, kernel, strides, padding)` with the kernel gradient by `method` ("winograd",
    "taps" or "patches", see above) and the input gradient by XLA's transposed convolution.

    With "winograd" the forward pass is Winograd too for inputs of at most
    `WINOGRAD_FORWARD_MAX_ELEMENTS` (the transformed tiles stay in cache), XLA's convolution
    for larger ones. The input gradient stays XLA's: Winograd there was no faster.
    `recompute_after`: the backward pass computes the kernel gradient's patches, taps or
    transformed input only once the gradient exists (`recompute.after`), so that they are
    not kept from the forward pass (less memory, some speed: docs/performance.md).
    """
    del recompute_after  # only the backward pass uses it
    return _forward(x, kernel, strides, padding, method, precision)


def _conv_fwd(x, kernel, strides, padding, method, precision, recompute_after):
    del recompute_after
    return _forward(x, kernel, strides, padding, method, precision), (x, kernel)


def _conv_bwd(strides, padding, method, precision, recompute_after, residuals, g):
    # After g: otherwise XLA computes the kernel gradient's patches, taps or transformed
    # input in the forward pass (they depend on x only) and keeps them (`recompute.py`).
    x, kernel = recompute.after(g, residuals) if recompute_after else residuals
    _, vjp_x = jax.vjp(lambda x_: conv2d(x_, kernel, strides, padding, precision), x)
    size = kernel.shape[0]
    dk = _KERNEL_GRADS[method](x, g, size, strides, padding, precision)
    return vjp_x(g)[0], dk.astype(kernel.dtype)


conv2d_cpu.defvjp(_conv_fwd, _conv_bwd)
