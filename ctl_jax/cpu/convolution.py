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
import numpy as np
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


# Winograd F(m x m, 3x3) (Lavin & Gray 2016): an (m+2) x (m+2) input tile d and the 3x3
# kernel g give the m x m output tile A^T [(G g G^T) * (B^T d B)] A, (m+2)^2 multiplies
# instead of 9 m^2, as (m+2)^2 batched matrix products: the forward pass and both gradients
# (autodiff of the same linear maps) do 2.25x (m = 2) or 4x (m = 4) fewer flops. The
# transformed input is (m+2)^2 / m^2 times the input: 4x for m = 2, 2.25x for m = 4, so the
# larger tile also moves less memory. The transforms only add and scale, so the results
# differ from the direct convolution by float rounding: relative ~1e-6 in float32 for
# m = 2 (its coefficients are 0, +-1, +-1/2), ~1e-5 for m = 4 (interpolation points 0, +-1,
# +-2: coefficients up to 8; docs/performance.md has the measured errors).
WINOGRAD_TILES = (2, 4)
_WINOGRAD = {
    2: (  # B^T, G, A^T
        np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
        np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]]),
    ),
    4: (
        np.array(
            [
                [4, 0, -5, 0, 1, 0],
                [0, -4, -4, 1, 1, 0],
                [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0],
                [0, 2, -1, -2, 1, 0],
                [0, 4, 0, -5, 0, 1],
            ]
        ),
        np.array(
            [
                [1 / 4, 0, 0],
                [-1 / 6, -1 / 6, -1 / 6],
                [-1 / 6, 1 / 6, -1 / 6],
                [1 / 24, 1 / 12, 1 / 6],
                [1 / 24, -1 / 12, 1 / 6],
                [0, 0, 1],
            ]
        ),
        np.array(
            [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]
        ),
    ),
}


def _combine(matrix: np.ndarray, rows: list[jax.Array]) -> list[jax.Array]:
    """[sum_j matrix[i, j] * rows[j] for each i], skipping zero coefficients and multiplying
    only by coefficients other than +-1 (elementwise work XLA fuses into one loop)."""
    out = []
    for coefficients in matrix:
        total = None
        for c, row in zip(coefficients.tolist(), rows):
            if c == 0:
                continue
            term = row if c == 1 else -row if c == -1 else c * row
            total = term if total is None else total + term
        out.append(total)
    return out


def winograd_conv3x3(
    x: jax.Array, kernel: jax.Array, precision: Any = None, tile: int = 2
) -> jax.Array:
    """3x3 convolution, stride 1, padding 1, NHWC x HWIO, by Winograd F(tile x tile, 3x3),
    `tile` 2 or 4 (`WINOGRAD_TILES`).

    Same result as `lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)))` up to
    float rounding, for any H, W >= 1 (sizes that are not a multiple of `tile` are padded
    to whole tiles and cropped).
    """
    b_t, g, a_t = _WINOGRAD[tile]
    m, a = tile, tile + 2
    n, h, w, cin = x.shape
    cout = kernel.shape[-1]
    th, tw = -(-h // m), -(-w // m)
    # Tile (i, j) reads padded rows m*i .. m*i+a-1 and the same columns. Each transform runs
    # in two stages, rows then columns, each stacked into one array: XLA then writes the
    # stage in one loop; transforming each of the a*a outputs separately from the padded
    # image made a*a small loops and a copy to stack them, 2-7x slower (docs/performance.md).
    # Reshapes split or merge one axis at a time, so that a batch sharded under an Explicit
    # mesh keeps working (JAX cannot infer the sharding of a reshape that splits several).
    xp = jnp.pad(x, ((0, 0), (1, m * th + 1 - h), (1, m * tw + 1 - w), (0, 0)))
    row_taps = [xp[:, d : d + m * (th - 1) + 1 : m] for d in range(a)]  # (n, th, Wp, cin)
    rows = jnp.stack(_combine(b_t, row_taps))  # (a, n, th, Wp, cin)
    col_taps = [rows[:, :, :, d : d + m * (tw - 1) + 1 : m] for d in range(a)]
    v = jnp.stack(_combine(b_t, col_taps), 1)  # (a, a, n, th, tw, cin)
    v = v.reshape(a * a, n, th, tw, cin).reshape(a * a, n * th * tw, cin)
    # The kernel's transform G g G^T as one product (G kron G) (a*a, 9) @ (9, cin*cout): the
    # long axis stays the minor one, so the product is a plain wide matmul. Written as a*a
    # chains of sums like the input's, it made the compiled ResNet-18 step's resident memory
    # 40-70 MB larger; as `einsum("ai,bj,ijco->abco")`, XLA made it two tall (cin*cout*a, 3)
    # @ (3, a) products, 25x slower (60 ms vs 2 ms at 512x512 channels; docs/performance.md).
    # Tied to x (`recompute.after`): the transform depends on the kernel only, so XLA would
    # otherwise compute every layer's at the start of the program and keep them all (16/9
    # of each kernel: +50 MB for ResNet-18's three 4x2x512 layers when embedding).
    g2 = recompute.after(x, jnp.asarray(np.kron(g, g), jnp.float32))
    u = jnp.dot(g2, kernel.reshape(9, cin * cout), precision=precision).reshape(a * a, cin, cout)
    prod = lax.dot_general(v, u, (((2,), (1,)), ((0,), (0,))), precision=precision)
    prod = prod.reshape(a, a, n * th * tw, cout).reshape(a, a, n, th * tw, cout)
    prod = prod.reshape(a, a, n, th, tw, cout)
    cols = jnp.stack(_combine(a_t, [prod[i] for i in range(a)]), 3)  # (a, n, th, m, tw, cout)
    y = jnp.stack(_combine(a_t, [cols[i] for i in range(a)]), 4)  # (n, th, m, tw, m, cout)
    y = y.reshape(n, th, m, tw * m, cout).reshape(n, th * m, tw * m, cout)
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
    # The kernel is only read by the input gradient's convolution: tying it too would copy it.
    x, kernel = residuals
    x = recompute.after(g, x) if recompute_after else x
    _, vjp_x = jax.vjp(lambda x_: conv2d(x_, kernel, strides, padding, precision), x)
    size = kernel.shape[0]
    dk = _KERNEL_GRADS[method](x, g, size, strides, padding, precision)
    return vjp_x(g)[0], dk.astype(kernel.dtype)


conv2d_cpu.defvjp(_conv_fwd, _conv_bwd)
