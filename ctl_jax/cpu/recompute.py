"""Recomputing a layer's intermediates in the backward pass, after its incoming gradient.

XLA's CPU runtime allocates one buffer for all of a training step's temporaries, sized by
the most memory live at once, which is at the turn from the forward to the backward pass:
everything the backward pass reads from the forward pass. The CPU layers' convolutions
produce large intermediates (Winograd's transformed tiles and kernels, 16/4 = 4x the input
and 16/9 of the kernel; im2col patches, 9x the input) that autodiff keeps for the backward
pass, and parts of the backward pass that depend only on forward values (the stem's
kernel-gradient patches, a strided convolution's kernel-gradient taps, a Winograd kernel
gradient's transformed input) that XLA's scheduler computes early, right after the forward
pass, and keeps until used; identical computations of the forward and the backward pass
are also merged by XLA (common-subexpression elimination), which keeps the forward's copy.

`recomputed(fn, *args)` returns `fn(*args)` but keeps only `args` for the backward pass, and
its backward pass first makes `args` depend on the incoming gradient (`after`): the
recomputation then cannot start before the gradient exists (so the scheduler cannot hoist
it into the forward pass) and is no longer the same expression as the forward pass (so it
cannot be merged with it). `jax.checkpoint` relies on `lax.optimization_barrier` for that,
which XLA's CPU compiler removes before scheduling: that is why rematerialising with it
made the buffer grow (docs/performance.md). Only what `fn`'s backward pass needs is
recomputed: XLA drops the unused forward result (`fn`'s products are not recomputed, only
its transforms).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp


def after(g, values):
    """`values` (a pytree of float arrays) unchanged, but computed from `g` as far as XLA
    can tell: anything computed from them waits for `g` and is not the same expression as
    the forward pass's, so XLA neither hoists it into the forward pass nor merges it.

    XLA's CPU compiler removes `lax.optimization_barrier` before scheduling (with no
    ordering left in its place), so the dependency is made of data: `v + 0 * f(g)`, f(g)
    1.0 if the first element of any row of g is NaN, else 0.0. The added term is always
    +0.0 (the factor is 0 or 1, never NaN or infinite), so every value is unchanged (-0.0
    becomes +0.0); XLA does not fold it away, as it does not fold float products with 0.
    It reads one element per row of g (a batch sharded over devices stays sharded: one
    scalar is reduced across them) and the addition fuses into the recomputation's first
    pass over each array.
    """
    g = jax.tree.leaves(g)[0]
    firsts = g[(slice(None),) + (0,) * (g.ndim - 1)] if g.ndim else g
    zero = jnp.any(jnp.isnan(firsts)).astype(jnp.float32) * 0.0
    return jax.tree.map(lambda v: v + zero.astype(v.dtype), values)


def recomputed(fn: Callable, *args, untied: tuple[int, ...] = ()):
    """`fn(*args)`, whose backward pass recomputes `fn`'s intermediates from `args` once the
    output's gradient is there, instead of keeping them from the forward pass.

    Args:
      fn: a function of arrays, differentiable by `jax.vjp` (may contain custom VJPs);
        static (hashable), e.g. a `functools.partial` binding its non-array arguments.
      args: the arrays `fn` is differentiated with respect to.
      untied: positions of `args` that the backward pass reads as they are, without making
        them depend on the gradient: arguments from which nothing is recomputed (a patch
        product's kernel, used directly by the input gradient). Tying one costs a copy of it
        (`after`'s addition has nothing to fuse into when a product reads the array).

    Returns:
      `fn(*args)`; its gradient is `jax.vjp(fn, *args)`'s, the same operations.
    """
    return _recomputed(fn, tuple(untied), *args)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _recomputed(fn: Callable, untied: tuple[int, ...], *args):
    return fn(*args)


def _recomputed_fwd(fn, untied, *args):
    return fn(*args), args


def _recomputed_bwd(fn, untied, args, g):
    return vjp_after(fn, args, g, untied)


def vjp_after(fn: Callable, args, g, untied: tuple[int, ...] = ()):
    """`jax.vjp(fn, *args)` applied to `g`, with `args` (but those at the positions in
    `untied`) tied to `g` first (`after`): `recomputed`'s backward pass, for custom VJPs
    whose forward pass differs from `fn` (`layers._winograd_forward_patches_backward`)."""
    tied = iter(after(g, [a for i, a in enumerate(args) if i not in untied]))
    args = [a if i in untied else next(tied) for i, a in enumerate(args)]
    _, vjp = jax.vjp(fn, *args)
    return vjp(g)


_recomputed.defvjp(_recomputed_fwd, _recomputed_bwd)
