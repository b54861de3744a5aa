"""Resampling a ViT's position embeddings to another patch grid, as timm does when it loads
weights for another image size (`timm.layers.resample_abs_pos_embed`, called by its
`checkpoint_filter_fn` with bicubic interpolation, align_corners=False and antialias=True).

`torch.nn.functional.interpolate` is reproduced in NumPy as one weight matrix per axis (it is
separable): with `antialias=False` the classic bicubic (Keys' kernel with a = -0.75, source
indices clamped at the border); with `antialias=True` PyTorch's antialiased bicubic (PIL's
kernel, a = -0.5, widened by the scale when shrinking and normalised to sum 1). The class
token is kept as it is. No torch needed.
"""

from __future__ import annotations

import math

import numpy as np


def _keys_cubic(x: np.ndarray, a: float) -> np.ndarray:
    """Keys' cubic convolution kernel at distances `x` (0 beyond 2)."""
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = ((x - 5.0) * x + 8.0) * x * a - 4.0 * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def bicubic_matrix(size_in: int, size_out: int, antialias: bool) -> np.ndarray:
    """(size_out, size_in) float64 matrix M with `out = M @ in` along one axis, equal to
    `F.interpolate(mode="bicubic", align_corners=False, antialias=antialias)`."""
    scale = size_in / size_out
    matrix = np.zeros((size_out, size_in), np.float64)
    if not antialias:
        for i in range(size_out):
            source = scale * (i + 0.5) - 0.5  # not clamped at 0: PyTorch's cubic rule
            base = math.floor(source)
            t = source - base
            for offset in range(-1, 3):
                j = min(max(base + offset, 0), size_in - 1)
                matrix[i, j] += _keys_cubic(np.asarray(t - offset), -0.75)
        return matrix
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inverse = 1.0 / scale if scale >= 1.0 else 1.0
    for i in range(size_out):
        center = scale * (i + 0.5)
        start = max(int(center - support + 0.5), 0)  # int() truncates, as PyTorch's cast
        stop = min(int(center + support + 0.5), size_in)
        j = np.arange(start, stop)
        weights = _keys_cubic((j - center + 0.5) * inverse, -0.5)
        total = weights.sum()
        matrix[i, start:stop] = weights / total if total != 0 else weights
    return matrix


def source_grid(num_tokens: int) -> tuple[int, int] | None:
    """The square grid of a position embedding of `num_tokens` (class token included), as
    timm assumes for a checkpoint; None when `num_tokens - 1` is not a square."""
    side = math.isqrt(num_tokens - 1)
    return (side, side) if side * side == num_tokens - 1 else None


def resample_pos_embed(
    pos_embed: np.ndarray,
    grid_in: tuple[int, int],
    grid_out: tuple[int, int],
    antialias: bool = True,
) -> np.ndarray:
    """Resamples (1, 1 + rows * columns, D) position embeddings to another grid.

    Args:
      pos_embed: class token first, then the grid in row-major order.
      grid_in, grid_out: (rows, columns) of the stored and of the wanted grid.
      antialias: as timm's loading (True) or plain bicubic (False).

    Returns:
      (1, 1 + rows_out * columns_out, D) float32; the input itself when the grids are equal.
    """
    if tuple(grid_in) == tuple(grid_out):
        return np.asarray(pos_embed, np.float32)
    width = pos_embed.shape[-1]
    cls, grid = pos_embed[:, :1], np.asarray(pos_embed[0, 1:], np.float64)
    grid = grid.reshape(grid_in[0], grid_in[1], width)
    rows = bicubic_matrix(grid_in[0], grid_out[0], antialias)
    cols = bicubic_matrix(grid_in[1], grid_out[1], antialias)
    out = np.einsum("ah,hwd,bw->abd", rows, grid, cols).reshape(1, -1, width)
    return np.concatenate([cls, out], axis=1).astype(np.float32)
