"""Global pooling of a feature map (N, H, W, C) -> (N, C): average, max (MAC), GeM, R-MAC.

Pure functions, plus the `Pooling` module that holds GeM's exponent when it is trained. Every
function works on static shapes under `jax.jit`; R-MAC's region grid depends only on (H, W),
so it is computed in Python once per shape and the pooling itself is a few array operations
over the whole batch.

References: Radenović, Tolias, Chum, *Fine-tuning CNN image retrieval with no human
annotation*, TPAMI 2018 (GeM); Tolias, Sicre, Jégou, *Particular object retrieval with
integral max-pooling of CNN activations*, ICLR 2016 (MAC, R-MAC).
"""

from __future__ import annotations

import functools
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ctl_jax.errors import ConfigError, InvalidValueError

POOLINGS = ("avg", "max", "gem", "rmac")

# R-MAC: desired overlap of neighbouring regions, and the candidate numbers of regions along
# the long side at the finest level (Tolias et al., as in their reference code).
# Float32, as the reference computes them, so that near-ties resolve the same way.
_RMAC_OVERLAP = np.float32(0.4)
_RMAC_STEPS = np.array([2, 3, 4, 5, 6, 7], np.float32)
_TINY_SQ_NORM = 1e-30


def check_pooling(kind: str, gem_p: float = 3.0, rmac_levels: int = 3) -> None:
    """Raises a one-line ConfigError for an unknown pooling or a bad GeM p / R-MAC level count."""
    if kind not in POOLINGS:
        raise ConfigError(f"model.pooling={kind!r} is not one of {', '.join(POOLINGS)}")
    if kind == "gem" and not (isinstance(gem_p, (int, float)) and gem_p > 0):
        raise ConfigError(f"model.gem_p must be > 0 for GeM pooling, got {gem_p!r}")
    if kind == "rmac" and not (isinstance(rmac_levels, int) and rmac_levels >= 1):
        raise ConfigError(f"model.rmac_levels must be an integer >= 1, got {rmac_levels!r}")


def avg(x: jax.Array) -> jax.Array:
    """Global average pooling (SPoC): (N, H, W, C) -> (N, C)."""
    return jnp.mean(x, axis=(1, 2))


def mac(x: jax.Array) -> jax.Array:
    """Global max pooling (MAC): (N, H, W, C) -> (N, C).

    Read at the argmax rather than with `jnp.max`, whose gradient divides by the number of
    positions equal to the maximum: a ResNet-18 step with R-MAC compiled at XLA CPU's
    optimisation level 0 had NaN gradients that way (presumably that count came out 0, the
    map being recomputed with other rounding), and none with the gather, which has no
    division. The gradient goes to one position, as in PyTorch's max pooling.
    """
    n, h, w, c = x.shape
    flat = x.reshape(n, h * w, c)
    index = jnp.argmax(flat, axis=1)
    return jnp.take_along_axis(flat, index[:, None, :], axis=1)[:, 0, :]


def gem(x: jax.Array, p: float | jax.Array = 3.0, eps: float = 1e-6) -> jax.Array:
    """Generalised mean pooling: (mean over H, W of clamp(x, eps)^p)^(1/p).

    Args:
      x: (N, H, W, C) feature map.
      p: exponent > 0, a Python float or a traced scalar (learnable p); p = 1 is average
        pooling of the clamped map, p -> inf tends to max pooling.
      eps: lower clamp, which keeps the power and its gradient finite at zero activations.

    Returns:
      (N, C) in x's dtype.
    """
    if isinstance(p, (int, float)) and p <= 0:
        raise InvalidValueError(f"GeM exponent p must be > 0, got {p}")
    clamped = jnp.maximum(x, eps)
    return jnp.mean(clamped**p, axis=(1, 2)) ** (1.0 / p)


@functools.lru_cache(maxsize=64)
def rmac_regions(height: int, width: int, levels: int = 3) -> tuple[tuple[int, int, int], ...]:
    """The square regions of R-MAC on an H x W map, as (top, left, side), whole map excluded.

    At level l = 1..levels the side is floor(2 min(H, W) / (l + 1)); regions are spread evenly
    along each axis, the long axis getting `extra` more of them than the short one, `extra`
    chosen from 1..6 so that neighbouring regions overlap by about 40% (0 for a square map).
    Coordinates are those of the reference implementation (floored centres), duplicates
    included; a level whose side is 0 (maps of side 1) has no region.
    """
    if levels < 1:
        raise InvalidValueError(f"R-MAC levels must be >= 1, got {levels}")
    short = min(height, width)
    step_size = np.float32(max(height, width) - short) / (_RMAC_STEPS - np.float32(1))
    area = np.float32(short**2)
    overlap_error = np.abs((area - np.float32(short) * step_size) / area - _RMAC_OVERLAP)
    extra = int(np.argmin(overlap_error)) + 1  # the first minimum
    extra_w = extra if height < width else 0
    extra_h = extra if height > width else 0

    regions = []
    for level in range(1, levels + 1):
        side = math.floor(2 * short / (level + 1))
        if side == 0:
            continue
        tops = _region_starts(height, side, level + extra_h)
        lefts = _region_starts(width, side, level + extra_w)
        regions += [(top, left, side) for top in tops for left in lefts]
    return tuple(regions)


def _region_starts(length: int, side: int, count: int) -> list[int]:
    """First indices of `count` regions of size `side` spread evenly over `length` cells."""
    half = math.floor(side / 2 - 1)
    spacing = 0.0 if count == 1 else (length - side) / (count - 1)
    # Floored centres, computed in float32 as the reference does so that the floors agree.
    centres = np.float32(half) + np.arange(count, dtype=np.float32) * np.float32(spacing)
    return [int(np.floor(c)) - half for c in centres]


def _l2_normalise(v: jax.Array, eps: float) -> jax.Array:
    """v / (|v| + eps). The squared norm is clamped at a tiny value before the square root:
    the value is unchanged (eps dominates there), but the gradient at a zero vector (an
    all-zero region after the ReLU, a padded image) is finite instead of 0/0."""
    sq_norm = jnp.sum(v * v, axis=-1, keepdims=True)
    return v / (jnp.sqrt(jnp.maximum(sq_norm, _TINY_SQ_NORM)) + eps)


def rmac(x: jax.Array, levels: int = 3, eps: float = 1e-6) -> jax.Array:
    """Regional maximum activations of convolutions (Tolias et al., ICLR 2016).

    The max over the whole map plus the max over each region of `rmac_regions`, each vector
    L2-normalised (v / (|v| + eps)), summed. Not normalised afterwards.

    The regions of one level share a side s, so their maxima are read from one sliding-window
    max (stride 1, s x s windows, computed as a max over rows then over columns) at the
    regions' corners: a few array operations over the whole batch whatever the region count.

    Args:
      x: (N, H, W, C) feature map (static H, W).
      levels: number of region scales, >= 1.
      eps: added to each region vector's norm.

    Returns:
      (N, C) in x's dtype.
    """
    _, height, width, _ = x.shape
    regions = rmac_regions(height, width, levels)
    total = _l2_normalise(mac(x), eps)
    by_side: dict[int, list[tuple[int, int]]] = {}
    for top, left, side in regions:
        by_side.setdefault(side, []).append((top, left))
    for side, corners in by_side.items():
        window_max = _sliding_max(x, side)  # (N, H - s + 1, W - s + 1, C)
        tops = np.array([c[0] for c in corners])
        lefts = np.array([c[1] for c in corners])
        region_max = window_max[:, tops, lefts, :]  # (N, R, C)
        total = total + jnp.sum(_l2_normalise(region_max, eps), axis=1)
    return total


def _sliding_max(x: jax.Array, side: int) -> jax.Array:
    """Max over every side x side window at stride 1: (N, H, W, C) -> (N, H-s+1, W-s+1, C)."""
    if side == 1:
        return x
    # A Python -inf (not an array) lets lax recognise the max monoid, whose reduce_window has
    # a reverse-mode rule; with an array init the gradient fails to linearise under jit.
    init = -float("inf")
    rows = jax.lax.reduce_window(x, init, jax.lax.max, (1, side, 1, 1), (1, 1, 1, 1), "VALID")
    return jax.lax.reduce_window(rows, init, jax.lax.max, (1, 1, side, 1), (1, 1, 1, 1), "VALID")


def pool(x: jax.Array, kind: str, p: float | jax.Array = 3.0, levels: int = 3) -> jax.Array:
    """Dispatches to the pooling named `kind` (one of `POOLINGS`)."""
    if kind == "avg":
        return avg(x)
    if kind == "max":
        return mac(x)
    if kind == "gem":
        return gem(x, p)
    if kind == "rmac":
        return rmac(x, levels)
    raise ConfigError(f"model.pooling={kind!r} is not one of {', '.join(POOLINGS)}")


class Pooling(nn.Module):
    """Global pooling of a feature map, with GeM's exponent as a parameter when learnable.

    Attributes:
      kind: one of `POOLINGS`.
      gem_p: GeM exponent (the initial value when learnable).
      gem_learnable: GeM's p is a trained parameter `p` of shape (1,), as in cirtorch's GeM
        layer; otherwise a constant and the module has no parameter.
      rmac_levels: R-MAC region scales.
    """

    kind: str = "avg"
    gem_p: float = 3.0
    gem_learnable: bool = False
    rmac_levels: int = 3

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(N, H, W, C) -> (N, C)."""
        p = self.gem_p
        if self.kind == "gem" and self.gem_learnable:
            p = self.param("p", nn.initializers.constant(self.gem_p), (1,), jnp.float32)[0]
        return pool(x, self.kind, p, self.rmac_levels)
