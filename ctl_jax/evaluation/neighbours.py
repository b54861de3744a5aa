"""Exact k nearest neighbours of every item of a set, by cosine similarity, in bounded memory.

Re-ranking and query expansion need, for each of N items (queries and gallery items
together), only its k most similar items, never the (N, N) similarity matrix. The items are
cut into blocks of B rows; for every pair of blocks (I, J) with J >= I one jitted XLA step
computes the (B, B) similarity block once and merges it into the running top-k of the rows
of I (its rows) and of J (its columns, the matrix being symmetric), and into each row's
smallest similarity. Half the similarity matrix is computed, at most one block exists at a
time, and the running state is (N, k).

Ties are broken by index, lowest first: column blocks reach each row block in ascending
order (pairs are visited I-major, and a row block's earlier columns come from pairs (J', I),
J' < I, visited before), `lax.top_k` keeps the lower position on ties, and the running top-k
precedes each new block in the merge. This is the order a stable sort of the distances
gives. The similarity of (i, j) and (j, i) is the same number.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

_BLOCK = 1024  # rows per block: (1024 x D) @ (D x 1024) products keep the matmul efficient


@dataclasses.dataclass(frozen=True)
class Neighbours:
    """The k nearest neighbours of each of N items, best first.

    Attributes:
      index: (N, k) int64 neighbour indices (an item is usually its own first neighbour).
      similarity: (N, k) float32 cosine similarities, non-increasing along each row.
      min_similarity: (N,) float32 smallest similarity of each row over all N items (the
        farthest item), which re-ranking needs for its per-row distance normalisation.
      kept: with `keep=(r, c)`, the (r, N - c) float32 similarities of rows 0..r-1 against
        columns c..N-1 (e.g. queries against the gallery), taken from the blocks as they
        are computed; None otherwise.
    """

    index: np.ndarray
    similarity: np.ndarray
    min_similarity: np.ndarray
    kept: np.ndarray | None = None


def nearest_neighbours(
    vectors: np.ndarray,
    k: int,
    block: int | None = None,
    keep: tuple[int, int] | None = None,
) -> Neighbours:
    """The k most similar items of every item (itself included), by inner product.

    Args:
      vectors: (N, D) float32, L2-normalised (so the inner product is the cosine).
      k: neighbours per item, 1 <= k <= N.
      block: rows per block (default 1024, or N when smaller); for tests.
      keep: (r, c): also return the similarities of rows < r against columns >= c.

    Returns:
      `Neighbours` with (N, k) arrays.
    """
    import jax
    import jax.numpy as jnp

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    num, dim = vectors.shape
    k = int(k)
    if not 1 <= k <= num:
        raise ValueError(f"k must lie in 1..{num} (the number of items), got {k}")
    size = int(min(num, max(block or _BLOCK, k)))
    num_blocks = -(-num // size)
    padded = np.zeros((num_blocks * size, dim), np.float32)
    padded[:num] = vectors
    items = jax.device_put(padded)
    step = _pair_step(num, size, k)
    rows = num_blocks * size
    state = (
        jnp.full((rows, k), -jnp.inf, jnp.float32),
        jnp.full((rows, k), -1, jnp.int32),
        jnp.full((rows,), jnp.inf, jnp.float32),
    )
    kept = None
    if keep is not None:
        keep_rows, keep_from = int(keep[0]), int(keep[1])
        kept = np.empty((keep_rows, num - keep_from), np.float32)
    for i in range(num_blocks):
        for j in range(i, num_blocks):
            state, sim = step(state, items, np.int32(i), np.int32(j))
            if kept is not None:
                _keep_block(kept, sim, i * size, j * size, keep_rows, keep_from, num, i == j)
    similarity, index, low = (np.asarray(a)[:num] for a in state)
    return Neighbours(index.astype(np.int64), similarity, low, kept)


def _keep_block(kept, sim, row0, col0, keep_rows, keep_from, num, diagonal):
    """Copies the parts of block (row0, col0) and of its transpose that `kept` holds."""
    host = None
    size = sim.shape[0]
    parts = [(row0, col0, False)] + ([] if diagonal else [(col0, row0, True)])
    for r0, c0, transposed in parts:
        r1, c1 = min(r0 + size, keep_rows, num), min(c0 + size, num)
        cs = max(c0, keep_from)
        if r0 >= r1 or cs >= c1:
            continue
        if host is None:
            host = np.asarray(sim)
        block = host.T if transposed else host
        kept[r0:r1, cs - keep_from : c1 - keep_from] = block[: r1 - r0, cs - c0 : c1 - c0]


@functools.cache
def _pair_step(num: int, size: int, k: int):
    """Jitted (state, items (R, D), i, j) -> (state, similarity block (size, size)),
    merging similarity block (i, j) into the running top-k of the rows of blocks i and j.
    State: top-k similarities (R, k), their indices (R, k) int32, smallest similarities
    (R,); R = blocks x size, rows >= num are padding (their similarities never enter a
    top-k)."""
    import jax
    import jax.numpy as jnp

    def merge(state, start, sims, idx, low, apply=True):
        best_s, best_i, best_low = state
        cur_s = jax.lax.dynamic_slice_in_dim(best_s, start, size)
        cur_i = jax.lax.dynamic_slice_in_dim(best_i, start, size)
        cur_low = jax.lax.dynamic_slice_in_dim(best_low, start, size)
        top, pos = jax.lax.top_k(jnp.concatenate([cur_s, sims], axis=1), k)
        new_i = jnp.take_along_axis(jnp.concatenate([cur_i, idx], axis=1), pos, axis=1)
        new_low = jnp.minimum(cur_low, low)
        top, new_i, new_low = (
            jnp.where(apply, new, cur)
            for new, cur in ((top, cur_s), (new_i, cur_i), (new_low, cur_low))
        )
        return (
            jax.lax.dynamic_update_slice_in_dim(best_s, top, start, 0),
            jax.lax.dynamic_update_slice_in_dim(best_i, new_i, start, 0),
            jax.lax.dynamic_update_slice_in_dim(best_low, new_low, start, 0),
        )

    def block_topk(sim, offset):
        s, i = jax.lax.top_k(sim, k)  # size >= k
        return s, i + offset

    @functools.partial(jax.jit, donate_argnums=0)
    def step(state, items, i, j):
        row0, col0 = i * size, j * size
        a = jax.lax.dynamic_slice_in_dim(items, row0, size)
        b = jax.lax.dynamic_slice_in_dim(items, col0, size)
        sim = jnp.matmul(a, b.T, precision=jax.lax.Precision.HIGHEST)
        sim = jnp.where(sim == 0, jnp.float32(0), sim)  # no -0.0: equal values tie exactly
        rows_ok = (row0 + jnp.arange(size)) < num
        cols_ok = (col0 + jnp.arange(size)) < num
        # Rows of block i against the columns of block j...
        s, idx = block_topk(jnp.where(cols_ok[None, :], sim, -jnp.inf), col0)
        low = jnp.where(cols_ok[None, :], sim, jnp.inf).min(axis=1)
        state = merge(state, row0, s, idx, low)
        # ... and rows of block j against the columns of block i (once on the diagonal).
        sim_t = sim.T
        s, idx = block_topk(jnp.where(rows_ok[None, :], sim_t, -jnp.inf), row0)
        low = jnp.where(rows_ok[None, :], sim_t, jnp.inf).min(axis=1)
        return merge(state, col0, s, idx, low, apply=i != j), sim

    return step
