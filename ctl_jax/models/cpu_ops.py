"""Convolution and pooling primitives that XLA's CPU backend runs slowly, rewritten.

Each gives the plain lax/flax operation's values and gradients up to float rounding (the
tests in tests/test_speed_paths.py and tests/test_max_pool.py compare them); `resnet.py`
chooses between them from static shapes and the backend. Images are NHWC, kernels HWIO.

- `conv_taps`, `conv_patches`: what each kernel tap sees, and im2col (the taps side by
  side), for small maps and for kernel gradients as matrix products.
- `winograd_conv3x3`: stride-1 3x3 convolution by Winograd F(2x2, 3x3).
- `conv2d_cpu`: a convolution whose kernel gradient is computed as matrix products instead
  of XLA's convolution over the whole image (and whose forward pass may be Winograd).
- `max_pool_3x3_s2`: the ResNet stem's max pool with a cheap backward pass.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

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
# Used on CPU for stride-1 3x3 convolutions with at least this many input channels (ResNet-50
# stages 3-4), where it paid: one core, ResNet-50 step 128x64 batch 32 1.43 -> 1.26 s,
# 256x128 batch 64 15.4 -> 14.6 s; embedding 128 images 128x64 1.69 -> 1.48 s. With 64-128
# channels the extra memory traffic of the transforms ate the gain (no better or slower).
_WINOGRAD_MIN_CIN = 256


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


def cpu_float32(x: jax.Array) -> bool:
    """Whether the CPU rewrites that reassociate sums (Winograd, kernel gradients as matrix
    products) apply: GPUs and TPUs have fast native convolutions, and in bfloat16 the extra
    roundings of the transforms would cost precision."""
    return x.dtype == jnp.float32 and jax.default_backend() == "cpu"


def use_winograd(x: jax.Array, strides: int) -> bool:
    """Whole Winograd convolution (forward and both gradients) for this 3x3 input."""
    return strides == 1 and x.shape[-1] >= _WINOGRAD_MIN_CIN and cpu_float32(x)


# Kernel gradients. XLA computes dL/dkernel of a convolution as another convolution whose
# window is the whole output map, which XLA CPU runs 2-3x slower than the forward pass (one
# step, ResNet-50 256x128 batch 64: 0.27 s for the stem's 7x7 kernel, 0.2 s for each stage-1
# 3x3, against 0.06-0.1 s forward). Written as matrix products instead (measured alone,
# batch 64, 2 cores):
# - "winograd" (stride-1 3x3): the kernel gradient of `winograd_conv3x3`, 2.25x fewer flops;
#   64x32x64 maps 178 -> 128 ms, 32x16x128 89 -> 50 ms.
# - "taps" (strided 3x3): one (Cin, R) @ (R, Cout) product per tap, R = N * Ho * Wo;
#   64x32x128 stride 2 138 -> 59 ms, 32x16x256 67 -> 42 ms.
# - "patches" (the 7x7 stem, 3 input channels, where per-tap products are too thin):
#   patches (R, 147)^T @ (R, 64); 256x128 images 263 -> 147 ms.


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
# float32, a quarter of this machine's L3 cache. Beyond it the transformed tiles (4x the
# input) spill to memory. ResNet-50 256x128 batch-64 training step (stages 1-2 take inputs
# of 2^23 and 2^22 elements), interleaved A/B runs: XLA's forward for both 8.45 and 8.33 s;
# Winograd for both 9.15 s; Winograd for stage 2 only 8.68 s.
_WINOGRAD_FORWARD_MAX_ELEMENTS = 2**21


def _forward(x, kernel, strides, padding, method, precision):
    if method == "winograd" and x.size <= _WINOGRAD_FORWARD_MAX_ELEMENTS:
        return winograd_conv3x3(x, kernel, precision)
    return conv2d(x, kernel, strides, padding, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def conv2d_cpu(
    x: jax.Array,
    kernel: jax.Array,
    strides: int,
    padding: int,
    method: str,
    precision: Any = None,
) -> jax.Array:
    """`conv2d(x, kernel, strides, padding)` with the kernel gradient by `method` ("winograd",
    "taps" or "patches", see above) and the input gradient by XLA's transposed convolution.
    The forward pass is Winograd too with "winograd" for inputs of at most 2^21 elements
    (faster than XLA's convolution from 64 channels up: 128x16x8x64 6.1 -> 4.9 ms,
    32x32x16x64 5.6 -> 3.3 ms; embedding 128 images with ResNet-18 at 64x32 0.111 -> 0.098 s),
    XLA's otherwise (see `_WINOGRAD_FORWARD_MAX_ELEMENTS`). In training steps with 64-128
    channels this mix and Winograd throughout (input gradient included) were within noise
    of each other."""
    return _forward(x, kernel, strides, padding, method, precision)


def _conv_fwd(x, kernel, strides, padding, method, precision):
    return _forward(x, kernel, strides, padding, method, precision), (x, kernel)


def _conv_bwd(strides, padding, method, precision, residuals, g):
    x, kernel = residuals
    _, vjp_x = jax.vjp(lambda x_: conv2d(x_, kernel, strides, padding, precision), x)
    size = kernel.shape[0]
    dk = _KERNEL_GRADS[method](x, g, size, strides, padding, precision)
    return vjp_x(g)[0], dk.astype(kernel.dtype)


conv2d_cpu.defvjp(_conv_fwd, _conv_bwd)


def _pool_phases(x: jax.Array) -> tuple[jax.Array, int, int]:
    """(N, H, W, C) -> (N, Ho+1, 2, Wo+1, 2, C): -inf padded by 1 and split by row/column
    parity, so that every tap of a 3x3 stride-2 window is a plain (unstrided) slice."""
    n, h, w, c = x.shape
    ho, wo = (h - 1) // 2 + 1, (w - 1) // 2 + 1
    pad = ((0, 0), (1, 2 * ho + 1 - h), (1, 2 * wo + 1 - w), (0, 0))
    xp = jnp.pad(x, pad, constant_values=-jnp.inf)
    # One axis split per reshape: JAX cannot infer the output sharding of a reshape that
    # changes several axes when the batch axis is sharded explicitly.
    xp = xp.reshape(n, ho + 1, 2, 2 * wo + 2, c)
    return xp.reshape(n, ho + 1, 2, wo + 1, 2, c), ho, wo


def _pool_tap(x6: jax.Array, ho: int, wo: int, k: int) -> jax.Array:
    """Tap k = 3 * dy + dx of every window: x_padded[2i + dy, 2j + dx] as (N, Ho, Wo, C)."""
    (u, a), (v, b) = divmod(k // 3, 2), divmod(k % 3, 2)
    return x6[:, u : u + ho, a, v : v + wo, b, :]


def _max_of_taps(x: jax.Array) -> jax.Array:
    """The 3x3 stride-2 max pool as the maximum of its 9 taps: one elementwise fusion, 2-3.5x
    faster than XLA CPU's reduce-window (one core: 8.4 -> 2.5 ms for 32x64x32x64, 42 -> 23 ms
    for 64x128x64x64); max is exact, so the values are identical."""
    x6, ho, wo = _pool_phases(x)
    y = _pool_tap(x6, ho, wo, 0)
    for k in range(1, 9):
        y = jnp.maximum(y, _pool_tap(x6, ho, wo, k))
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_3x3_s2(x: jax.Array, input_hw: tuple[int, int]) -> jax.Array:
    del input_hw  # only the backward pass needs it
    return _max_of_taps(x)


def _max_pool_fwd(x, input_hw):
    # Index (0..8, row-major in the window) of the first maximum: where the gradient goes.
    # argmax returns the first of equal maxima, as XLA's select-and-scatter and PyTorch
    # choose (ties are common after a ReLU: several zeros). A reduction, because XLA would
    # fuse an elementwise select chain into every consumer in the backward pass and
    # recompute it there: 26 ms against 5 ms for the ResNet-50 128x64 batch-32 step.
    x6, ho, wo = _pool_phases(x)
    taps = jnp.stack([_pool_tap(x6, ho, wo, k) for k in range(9)], axis=-1)
    index = jnp.argmax(taps, axis=-1).astype(jnp.int8)
    return jnp.max(taps, axis=-1), index  # the same taps give the values (as fast)


def _max_pool_bwd(input_hw, index, g):
    h, w = input_hw
    n, ho, wo, c = g.shape
    zero = jnp.zeros((), g.dtype)

    def placed(dy: int, dx: int) -> jax.Array:
        # Gradient of tap (dy, dx), laid out on its parity phase of the padded input: tap 2
        # of output i lands on row i + 1 of the even phase, taps 0 and 1 on row i.
        t = jnp.where(index == 3 * dy + dx, g, zero)
        rows = (1, 0) if dy == 2 else (0, 1)
        cols = (1, 0) if dx == 2 else (0, 1)
        return jnp.pad(t, ((0, 0), rows, cols, (0, 0)))

    even_even = placed(0, 0) + placed(0, 2) + placed(2, 0) + placed(2, 2)
    even_odd = placed(0, 1) + placed(2, 1)
    odd_even = placed(1, 0) + placed(1, 2)
    odd_odd = placed(1, 1)
    full = jnp.stack(
        [jnp.stack([even_even, even_odd], axis=3), jnp.stack([odd_even, odd_odd], axis=3)],
        axis=2,
    )
    # One axis merge per reshape, as in `_pool_phases`.
    full = full.reshape(n, ho + 1, 2, 2 * wo + 2, c).reshape(n, 2 * ho + 2, 2 * wo + 2, c)
    return (full[:, 1 : 1 + h, 1 : 1 + w, :],)


_max_pool_3x3_s2.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_3x3_s2(x: jax.Array, fast: bool = True) -> jax.Array:
    """3x3 max pool, stride 2, padding 1 (the ResNet stem's), NHWC.

    Same values and gradients as `nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))`, ties
    included: the gradient goes to the first maximum of the window in row-major order, as
    XLA's select-and-scatter does (ties are common after a ReLU). With `fast` the backward
    pass is a custom VJP: XLA CPU differentiates `reduce_window` through select-and-scatter,
    which it expands into iotas, a variadic reduce-window and a scatter over the padded
    input: 160 ms fwd+bwd for 32x64x32x64 (the ResNet stem at 128x64, batch 32) and 1.3-1.6 s
    for 64x128x64x64 (256x128, batch 64), against 15-18 ms and 0.22-0.33 s here (machine
    under load; the forward alone: 8-13 ms and 50-70 ms). The forward records the int8
    index of each window's maximum (1/16 of the input's size) so that the input need not be
    kept for the backward pass, which places the gradients on the four row/column parity
    phases of the input and interleaves them: elementwise work only.
    """
    if not fast:
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return _max_pool_3x3_s2(x, tuple(x.shape[1:3]))
