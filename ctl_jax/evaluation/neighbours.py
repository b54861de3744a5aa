"""Exact k nearest neighbours of every item of a set, by cosine similarity, in bounded memory.

Re-ranking and query expansion need, for each of N items (queries and gallery items
together), only its k most similar items, never the (N, N) similarity matrix. One jitted
XLA program handles a fixed-size chunk of rows: it walks the N columns in blocks
(`lax.fori_loop`), keeps a running top-k (`lax.top_k`, merged block by block) and the row's
smallest similarity, so at most a (row chunk x column block) block of similarities exists at
a time whatever N is. Chunks are dispatched asynchronously: XLA computes the next one while
the host copies the last one out.

Ties are broken by index, lowest first: `lax.top_k` keeps the lower position on ties and the
running top-k (earlier, lower columns) precedes each new block in the merge. This is the
order a stable sort of the distances gives.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

# Bytes of a (row chunk x column block) similarity block: large enough for an efficient
# matmul, small enough to stay bounded whatever N is.
_BLOCK_BYTES = 16 * 1024 * 1024
_ROW_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class Neighbours:
    """The k nearest neighbours of each of N items, best first.

    Attributes:
      index: (N, k) int64 neighbour indices (an item is usually its own first neighbour).
      similarity: (N, k) float32 cosine similarities, non-increasing along each row.
      min_similarity: (N,) float32 smallest similarity of each row over all N items (the
        farthest item), which re-ranking needs for its per-row distance normalisation.
    """

    index: np.ndarray
    similarity: np.ndarray
    min_similarity: np.ndarray


def nearest_neighbours(vectors: np.ndarray, k: int, row_chunk: int | None = None) -> Neighbours:
    """The k most similar items of every item (itself included), by inner product.

    Args:
      vectors: (N, D) float32, L2-normalised (so the inner product is the cosine).
      k: neighbours per item, 1 <= k <= N.
      row_chunk: rows per compiled step (default 256, fewer for small N); for tests.

    Returns:
      `Neighbours` with (N, k) arrays.
    """
    import jax

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    num, dim = vectors.shape
    k = int(k)
    if not 1 <= k <= num:
        raise ValueError(f"k must lie in 1..{num} (the number of items), got {k}")
    rows = int(row_chunk or min(_ROW_CHUNK, 1 << (num - 1).bit_length()))
    block = int(min(num, max(k, _BLOCK_BYTES // (4 * (rows + dim)))))
    fn = _neighbours_fn(k, block)
    device = jax.device_put(vectors)

    index = np.empty((num, k), np.int64)
    similarity = np.empty((num, k), np.float32)
    min_similarity = np.empty(num, np.float32)
    starts = list(range(0, num, rows))

    def dispatch(start):
        chunk = vectors[start : start + rows]
        padded = np.zeros((rows, dim), np.float32)  # one shape for every chunk: compiled once
        padded[: len(chunk)] = chunk
        return start, len(chunk), fn(padded, device)

    pending = dispatch(starts[0])
    for i in range(len(starts)):
        start, n, result = pending
        if i + 1 < len(starts):
            pending = dispatch(starts[i + 1])
        s, j, low = (np.asarray(a)[:n] for a in result)
        similarity[start : start + n] = s
        index[start : start + n] = j
        min_similarity[start : start + n] = low
    return Neighbours(index, similarity, min_similarity)


@functools.cache
def _neighbours_fn(k: int, block: int):
    """Jitted (rows (r, D), items (N, D)) -> (top-k similarities (r, k), their indices
    (r, k) int32, smallest similarity (r,)). The items are walked in `block`-row blocks,
    plus a remainder block; requires k <= N."""
    import jax
    import jax.numpy as jnp

    def block_topk(q, items, offset):
        sim = jnp.matmul(q, items.T, precision=jax.lax.Precision.HIGHEST)
        sim = jnp.where(sim == 0, jnp.float32(0), sim)  # no -0.0: equal values tie exactly
        kk = min(k, items.shape[0])
        s, i = jax.lax.top_k(sim, kk)
        if kk < k:  # a remainder block smaller than k: pad with never-chosen entries
            s = jnp.pad(s, ((0, 0), (0, k - kk)), constant_values=-jnp.inf)
            i = jnp.pad(i, ((0, 0), (0, k - kk)), constant_values=-1)
        return s, i + offset, sim.min(axis=1)

    def merge(best, new):
        s = jnp.concatenate([best[0], new[0]], axis=1)
        i = jnp.concatenate([best[1], new[1]], axis=1)
        top, pos = jax.lax.top_k(s, k)
        return top, jnp.take_along_axis(i, pos, axis=1), jnp.minimum(best[2], new[2])

    @jax.jit
    def fn(q, items):
        num = items.shape[0]
        full = num // block

        def body(c, best):
            chunk = jax.lax.dynamic_slice_in_dim(items, c * block, block)
            return merge(best, block_topk(q, chunk, c * block))

        best = block_topk(q, items[:block], 0)
        best = jax.lax.fori_loop(1, full, body, best)
        if num % block:
            tail = full * block
            best = merge(best, block_topk(q, items[tail:], tail))
        return best

    return fn
