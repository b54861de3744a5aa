"""Exact k nearest neighbours of every item of a set, by cosine similarity, in bounded memory.

Re-ranking and query expansion need, for each of N items (queries and gallery items
together), only its k most similar items, never the (N, N) similarity matrix. The items are
cut into blocks of B rows. For each block I one matrix product gives the strip of
similarities of its rows against the columns of blocks I, I+1, ... (the upper triangle:
half the matrix is computed). The strip updates the running top-k of the rows of I and,
the matrix being symmetric, of the rows of every later block J against the columns of I,
and each row's smallest similarity. One strip exists at a time (B x N floats, B chosen to
keep it near 128 MB) and the running state is (N, k). The products are NumPy's (BLAS): one
large product per strip ran 1.5-2x faster than many (B x B) block products, XLA's
included, on a 2-core CPU.

Selecting is cheap because few entries qualify: an entry can only enter a row's top-k if
it beats the row's current k-th best similarity, and after a row's first columns that is
rare (about k ln(N / B) entries per row in all for unordered data). So the strip is
filtered against the thresholds, a few thousand columns at a time, and only the surviving
entries are merged (a sort of each row's k entries and its candidates). XLA's `top_k` over
whole blocks cost 1.5x the matrix product; the filter costs a few percent of it.

Ties are broken by index, lowest first. Columns reach each row in ascending order (a row
of block J first sees the columns of blocks I < J, from their strips, in order, then its
own strip), so an entry equal to a row's current k-th best always has a higher index and
cannot enter; candidates are merged by (similarity descending, index ascending). This is
the order a stable sort of the distances gives. The similarity of (i, j) and (j, i) is the
same number.
"""

from __future__ import annotations

import dataclasses

import numpy as np

_BLOCK = 1024  # rows per block, at most
_STRIP_ELEMENTS = 32 * 1024 * 1024  # a strip of B x N similarities: 128 MB
_UPDATE_COLUMNS = 2048  # a strip's columns are merged this many at a time, ascending


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
      block: rows per block (default: up to 1024, fewer for very large N); for tests.
      keep: (r, c): also return the similarities of rows < r against columns >= c.

    Returns:
      `Neighbours` with (N, k) arrays.
    """
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    num = len(vectors)
    k = int(k)
    if not 1 <= k <= num:
        raise ValueError(f"k must lie in 1..{num} (the number of items), got {k}")
    size = block or max(1, min(_BLOCK, _STRIP_ELEMENTS // num))
    # Blocks of at most `size` rows (at least k), as even as possible.
    num_blocks = -(-num // max(size, k))
    size = max(k, -(-num // num_blocks))
    starts = list(range(0, num, size))

    top = _TopK(num, k)
    kept = None
    if keep is not None:
        keep_rows, keep_from = int(keep[0]), int(keep[1])
        kept = np.empty((keep_rows, num - keep_from), np.float32)
    for r0 in starts:
        r1 = min(r0 + size, num)
        strip = vectors[r0:r1] @ vectors[r0:].T  # rows of block I, columns from I on
        strip += np.float32(0)  # -0.0 becomes +0.0: equal values tie exactly
        for c0 in range(r0, num, _UPDATE_COLUMNS):  # ascending: the thresholds rise
            top.update(r0, c0, strip[:, c0 - r0 : c0 - r0 + _UPDATE_COLUMNS])
        if r1 < num:  # the rows of all later blocks against the columns of I
            top.update(r1, r0, strip[:, r1 - r0 :].T)
        if kept is not None:
            _keep_strip(kept, strip, r0, keep_rows, keep_from)
    return Neighbours(top.index, top.similarity, top.low, kept)


def normalized_rows(*arrays: np.ndarray) -> np.ndarray:
    """The rows of `arrays` stacked and L2-normalised, in one new float32 (N, D) array (as
    `ranking.l2_normalize` of the concatenation, without its temporaries)."""
    out = np.concatenate([np.asarray(a, np.float32) for a in arrays])
    norms = np.sqrt(np.einsum("ij,ij->i", out, out))[:, None]
    out /= np.maximum(norms, np.float32(1e-12))
    return out


class _TopK:
    """The running top-k of N rows over column blocks that arrive in ascending order.

    Attributes:
      similarity: (N, k) float32, best first; -inf where fewer than k columns were seen.
      index: (N, k) int64 column of each entry.
      low: (N,) float32 smallest similarity seen per row.
    """

    def __init__(self, num: int, k: int):
        self.k = k
        self.similarity = np.full((num, k), -np.inf, np.float32)
        self.index = np.full((num, k), -1, np.int64)
        self.low = np.full(num, np.inf, np.float32)

    def update(self, row0: int, col0: int, sim: np.ndarray) -> None:
        """Merges the block `sim` (rows row0.., columns col0..) into the running state."""
        sim = np.ascontiguousarray(sim)  # a transposed part: row-wise passes run faster
        n, m = sim.shape
        k = self.k
        rows = slice(row0, row0 + n)
        np.minimum(self.low[rows], sim.min(axis=1), out=self.low[rows])
        # Strictly better than the current k-th best (-inf until a row has seen k columns):
        # an equal value comes from a higher column and cannot enter.
        threshold = self.similarity[rows, -1]
        better = sim > threshold[:, None]
        flat = np.flatnonzero(better)  # (2-D np.nonzero is several times slower)
        many = np.flatnonzero(np.bincount(flat // m, minlength=n) > k)
        if len(many) and m >= k:
            # A row cannot take more than k entries of one block: anything below the
            # block's own k-th best cannot enter either (equal values stay candidates).
            kth = np.partition(sim[many], m - k, axis=1)[:, m - k]
            floor = np.maximum(threshold[many], np.nextafter(kth, np.float32(-np.inf)))
            better[many] = sim[many] > floor[:, None]
            flat = np.flatnonzero(better)
        if len(flat):
            self._merge(row0, flat // m, flat % m + col0, sim.reshape(-1)[flat])

    def _merge(self, row0, r, c, v):
        """Merges candidates (local row r, column c ascending within a row, similarity v)
        into their rows."""
        k = self.k
        touched = np.unique(r)
        all_r = np.concatenate([np.repeat(touched, k), r])
        all_c = np.concatenate([self.index[row0 + touched].ravel(), c])
        all_v = np.concatenate([self.similarity[row0 + touched].ravel(), v])
        # Per row, similarity descending, as one integer key (row, order-preserving bits of
        # -similarity). Equal keys keep their order here, which is column-ascending: a
        # row's current entries (sorted so, from lower columns) precede its candidates
        # (column-ascending).
        key = (all_r.astype(np.uint64) << np.uint64(32)) | _descending_bits(all_v)
        order = np.argsort(key, kind="stable")
        start = np.searchsorted(key[order], touched.astype(np.uint64) << np.uint64(32))
        take = order[(start[:, None] + np.arange(k)).ravel()]  # touched rows have >= k
        self.index[row0 + touched] = all_c[take].reshape(-1, k)
        self.similarity[row0 + touched] = all_v[take].reshape(-1, k)


def _descending_bits(values: np.ndarray) -> np.ndarray:
    """(E,) uint64 keys ordering float32 `values` descending (-inf last), ties equal."""
    neg = -values.astype(np.float32) + np.float32(0.0)  # +0.0 for zeros: equal values tie
    bits = neg.view(np.int32)
    flipped = bits ^ ((bits >> 31) | np.int32(-(2**31)))  # negative: all bits; else sign
    return flipped.view(np.uint32).astype(np.uint64)


def _keep_strip(kept, strip, row0, keep_rows, keep_from):
    """Copies the parts of a strip (rows row0.., columns row0..N-1) and of its transpose
    that `kept` (rows < keep_rows, columns >= keep_from) holds."""
    rows, width = strip.shape
    num = row0 + width
    # The strip itself: rows row0..row0+rows-1, columns row0..num-1.
    r1, cs = min(row0 + rows, keep_rows), max(row0, keep_from)
    if row0 < r1 and cs < num:
        kept[row0:r1, cs - keep_from :] = strip[: r1 - row0, cs - row0 :]
    # Its transpose: rows row0 + rows..keep_rows-1 against the strip's rows as columns.
    r0, c0, c1 = row0 + rows, max(row0, keep_from), row0 + rows
    if r0 < keep_rows and c0 < c1:
        kept[r0:keep_rows, c0 - keep_from : c1 - keep_from] = strip[
            c0 - row0 : c1 - row0, r0 - row0 : keep_rows - row0
        ].T
