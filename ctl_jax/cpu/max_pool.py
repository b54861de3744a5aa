"""The ResNet stem's max pool (3x3, stride 2, padding 1) with a cheap backward pass.

Same values and gradients as `nn.max_pool(x, (3, 3), (2, 2), ((1, 1), (1, 1)))`, ties
included (tests/test_max_pool.py). XLA's CPU backend differentiates `reduce_window` through
select-and-scatter, which it expands into iotas, a variadic reduce-window and a scatter over
the padded input, an order of magnitude slower than the forward pass. Here the forward pass
is the maximum of the window's 9 taps (elementwise work, exact) and records the int8 index
of each window's first maximum (1/16 of the input's size, so the input need not be kept); the
backward pass places the gradient on the four row/column parity phases of the input and
interleaves them, elementwise work again.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp


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
    """The pool as the maximum of its 9 taps: one elementwise fusion, faster than XLA CPU's
    reduce-window; max is exact, so the values are identical."""
    x6, ho, wo = _pool_phases(x)
    y = _pool_tap(x6, ho, wo, 0)
    for k in range(1, 9):
        y = jnp.maximum(y, _pool_tap(x6, ho, wo, k))
    return y


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_3x3_s2(x: jax.Array, input_hw: tuple[int, int]) -> jax.Array:
    del input_hw  # only the backward pass needs it
    return _max_of_taps(x)


def _first_max(x6: jax.Array, ho: int, wo: int, taps: range) -> tuple[jax.Array, jax.Array]:
    """The maximum over `taps` of every window and the int8 index of its first occurrence,
    as a select chain (one elementwise pass)."""
    y = _pool_tap(x6, ho, wo, taps[0])
    index = jnp.full(y.shape, taps[0], jnp.int8)
    for k in taps[1:]:
        tap = _pool_tap(x6, ho, wo, k)
        greater = tap > y
        index = jnp.where(greater, jnp.int8(k), index)
        y = jnp.where(greater, tap, y)
    return y, index


def _better(a, b):
    """Of two (value, index) pairs the larger value, the smaller index among equal ones: a
    total order, so a reduction with it does not depend on the order it combines in."""
    (ya, ia), (yb, ib) = a, b
    take_b = (yb > ya) | ((yb == ya) & (ib < ia))
    return jnp.where(take_b, yb, ya), jnp.where(take_b, ib, ia)


def _max_pool_fwd(x, input_hw):
    # Index (0..8, row-major in the window) of the first maximum: where the gradient goes.
    # The first of equal maxima, as XLA's select-and-scatter and PyTorch choose (ties are
    # common after a ReLU: several zeros). Two select chains (taps 0-3 and 4-8) joined by a
    # reduction over a stacked axis of 2: XLA fuses an elementwise index into every consumer
    # in the backward pass and recomputes it there, which keeps the pool's input alive until
    # then (+17 MB in the ResNet-50 128x64 step), while a reduction's output is written
    # out; stacking all 9 taps for one argmax wrote 9 quarter-size copies first, 12x slower
    # (64x128x64x64: 408 -> 30 ms; docs/performance.md).
    x6, ho, wo = _pool_phases(x)
    firsts, lasts = _first_max(x6, ho, wo, range(0, 4)), _first_max(x6, ho, wo, range(4, 9))
    # (values, indices), each (N, Ho, Wo, C, 2), reduced over that last axis.
    pairs = jax.tree.map(lambda a, b: jnp.stack([a, b], axis=-1), firsts, lasts)
    init = (jnp.array(-jnp.inf, x.dtype), jnp.array(127, jnp.int8))
    return jax.lax.reduce(pairs, init, _better, (pairs[0].ndim - 1,))


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


def max_pool_3x3_s2(x: jax.Array) -> jax.Array:
    """(N, H, W, C) -> (N, ceil(H/2), ceil(W/2), C): 3x3 max pool, stride 2, padding 1; the
    gradient goes to the first maximum of each window in row-major order, as XLA's
    select-and-scatter does."""
    return _max_pool_3x3_s2(x, tuple(x.shape[1:3]))
