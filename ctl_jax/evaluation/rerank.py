"""k-reciprocal re-ranking (Zhong et al., CVPR 2017) from nearest-neighbour lists.

Computes the same re-ranked distance as the `re_ranking(q_g_dist, q_q_dist, g_g_dist, k1,
k2, lambda_value)` that torchreid and fast-reid ship, fed (as torchreid's engine does) with
d = 2 - 2 cos, the squared Euclidean distance of the L2-normalised embeddings, for every
pair of the N = Q + G items (queries and the gallery items: images or centroids):

1. original distance o(i, j) = d(i, j)^2 / max_j' d(i, j')^2 (d squared again, then each
   row divided by its largest value over all N items);
2. N(i, k): the k items nearest to i (itself included, ties to the lower index);
   R(i, k) = {j in N(i, k + 1) : i in N(j, k + 1)}, the k-reciprocal neighbours;
3. R*(i) = R(i, k1) united with R(c, round(k1 / 2)) for each c in R(i, k1) whose set shares
   more than 2/3 of its items with R(i, k1);
4. V(i, j) = exp(-o(i, j)) / sum_{j' in R*(i)} exp(-o(i, j')) for j in R*(i), else 0;
5. local query expansion (k2 > 1): V(i) = mean of V(j) over the k2 items nearest to i;
6. Jaccard distance J(q, g) = 1 - m / (2 - m) with m = sum_l min(V(q, l), V(g, l));
7. final (Q, G) distance = (1 - lambda) J + lambda o.

The reference builds the dense (N, N) distance, its argsort, V and its expansion (several
N x N float matrices) and loops in Python over N. Here only each item's k1 + 1 nearest
neighbours and its farthest similarity are computed (`neighbours.nearest_neighbours`:
blocked, bounded memory), V is a sparse matrix of about N x |R*| entries, and every step is
vectorised over chunks of rows. Reciprocity is a binary search among the sorted (i, j)
neighbour keys (O(N k1) memory, where gathering every neighbour's own list took N k1^2),
and the chunks of the expansion of R* and of V are bounded in entries, not rows, so their
temporaries stay near a fixed size whatever k1. Memory is O(N k1 + |V| + Q G) instead of
O(N^2); |V| is at most N x min(N, k1 (1 + k1 / 2)) and in practice far less. Before each
step allocates, its memory is estimated (`ctl_jax.memory.require_memory`) and an estimate
above the available memory is a one-line error.

Differences from the reference, all in degenerate cases: d is clipped at 0 (rounding can
make 2 - 2 cos slightly negative for an item and itself); a row whose items are all
identical (largest distance 0) is left un-normalised instead of becoming NaN; ties in the
neighbour order go to the lower index (the reference's unstable argsort leaves them to the
sort implementation).
"""

from __future__ import annotations

import dataclasses
import sys

import numpy as np

from ctl_jax.errors import OptionError
from ctl_jax.evaluation.neighbours import _STRIP_ELEMENTS as _BLOCK_STRIP
from ctl_jax.evaluation.neighbours import nearest_neighbours, normalized_rows
from ctl_jax.memory import require_memory

# Entries handled at once by the chunked steps (a chunk's candidate members of R*, or its
# gathered entries of the expansion), whatever k1: the chunk temporaries stay near
# _CHUNK_BYTES_PER_ENTRY x this (~200 MB).
_CHUNK_ENTRIES = 4 * 1024 * 1024
_CHUNK_BYTES_PER_ENTRY = 48
# Bytes per entry of V while it is built (key, row, column, similarity, weight, value)
# and once expanded (column, value, and the inverted index of the Jaccard join).
_V_BYTES_PER_ENTRY = 64
_EXPANDED_BYTES_PER_ENTRY = 56
_ADVICE = "lower --rerank_k1 (and --rerank_k2), or evaluate fewer items"
# Elements of a dense (query chunk x gallery) block of the final distance.
_BLOCK_ELEMENTS = 4 * 1024 * 1024
# (query entry, gallery entry) pairs of the Jaccard join handled at once (~40 bytes of
# temporaries each: ~80 MB; 8M pairs raised the peak at k1 = 200 from 646 to 1008 MB).
_MAX_PAIRS = 2 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class RerankParams:
    """Parameters of k-reciprocal re-ranking (the paper's defaults).

    Attributes:
      k1: size of the k-reciprocal neighbourhood, >= 1.
      k2: neighbours averaged by the local query expansion of V, 1 <= k2 <= k1 (1: none).
      lambda_value: weight of the original distance in the final one, in [0, 1].
    """

    k1: int = 20
    k2: int = 6
    lambda_value: float = 0.3

    def __post_init__(self):
        if isinstance(self.k1, bool) or int(self.k1) != self.k1 or self.k1 < 1:
            raise OptionError(f"--rerank_k1 must be an integer >= 1, got {self.k1}")
        if isinstance(self.k2, bool) or int(self.k2) != self.k2 or self.k2 < 1:
            raise OptionError(f"--rerank_k2 must be an integer >= 1, got {self.k2}")
        if self.k2 > self.k1:
            raise OptionError(
                f"--rerank_k2 must not exceed --rerank_k1, got k2={self.k2} > k1={self.k1}"
            )
        if not 0.0 <= float(self.lambda_value) <= 1.0:
            raise OptionError(f"--rerank_lambda must lie in [0, 1], got {self.lambda_value}")

    def as_dict(self) -> dict:
        return {"k1": int(self.k1), "k2": int(self.k2), "lambda": float(self.lambda_value)}


def check_rerank_size(params: RerankParams, num_gallery: int, gallery: str = "gallery") -> None:
    """Refuses k1 (and so k2 <= k1) above the number of gallery items re-ranked.

    The reference accepts any k1, but beyond the gallery's size the neighbourhoods hold
    nearly every item and the work grows as N k1^2 for little; the command lines lower such
    a k1 (`fit_rerank_params`), the library refuses it. Raises `OptionError` naming the
    option.
    """
    if params.k1 > num_gallery:
        raise OptionError(
            f"--rerank_k1={params.k1} exceeds the {num_gallery} items of the {gallery} it "
            f"re-ranks: it must be at most {num_gallery}"
        )


def fit_rerank_params(
    params: RerankParams, num_gallery: int, gallery: str = "gallery"
) -> RerankParams:
    """`params` with k1 (and k2) lowered to the number of gallery items when above it,
    with a one-line note on stderr: a centroid gallery is often smaller than the default
    k1 = 20, and a k1 far above the gallery (a typo) would only cost memory. The result is
    the reference's at the lowered k1."""
    if num_gallery < 1 or params.k1 <= num_gallery:
        return params
    k1, k2 = num_gallery, min(params.k2, num_gallery)
    print(
        f"note: --rerank_k1={params.k1} is above the {num_gallery} items of the {gallery}: "
        f"re-ranking it with k1={k1}, k2={k2}",
        file=sys.stderr,
    )
    return dataclasses.replace(params, k1=k1, k2=k2)


def rerank_distances(
    query_emb: np.ndarray,
    gallery_emb: np.ndarray,
    params: RerankParams = RerankParams(),
    gallery: str = "gallery",
) -> np.ndarray:
    """The re-ranked query-gallery distance (lower is better).

    Args:
      query_emb: (Q, D) query embeddings (normalised here).
      gallery_emb: (G, D) gallery item embeddings, images or centroids (normalised here).
      params: k1 (at most G, `check_rerank_size`), k2, lambda.
      gallery: what the gallery is, for error messages (e.g. "centroid gallery").

    Returns:
      (Q, G) float32 distances, the reference `re_ranking` output for d = 2 - 2 cos.

    Raises:
      OptionError: k1 above G, or an estimate of the memory a step needs above what the
        machine has available (checked before the step allocates it).
    """
    num_q, num_g = len(query_emb), len(gallery_emb)
    if num_q == 0 or num_g == 0:
        return np.zeros((num_q, num_g), np.float32)
    check_rerank_size(params, num_g, gallery)
    num = num_q + num_g
    k = min(params.k1 + 1, num)
    k_half = min(int(np.around(params.k1 / 2.0)) + 1, num)
    what = (
        f"re-ranking {num_q} queries against {num_g} {gallery} items with "
        f"--rerank_k1={params.k1} --rerank_k2={params.k2}"
    )
    require_memory(_fixed_bytes(num_q, num_g, np.shape(query_emb)[1], k), what, _ADVICE)
    items = normalized_rows(query_emb, gallery_emb)  # (N, D): queries, then gallery items
    # The query-gallery similarities are kept as the neighbour search computes them: they
    # become the final distances in place.
    nn = nearest_neighbours(items, k, keep=(num_q, num_q))
    row_max = _squared(nn.min_similarity)  # the farthest item's d^2
    row_max = np.where(row_max > 0, row_max, np.float32(1.0))

    v = _reciprocal_weights(items, nn, k, k_half, row_max, what)
    if params.k2 != 1:
        v = _expand(v, nn.index[:, : min(params.k2, num)], what)
    return _final_distance(nn.kept, v, row_max, float(params.lambda_value))


def _fixed_bytes(num_q: int, num_g: int, dim: int, k: int) -> int:
    """Bytes re-ranking holds whatever the neighbourhoods turn out to be: the normalised
    items, the (Q, G) result, the neighbour lists with their search and reciprocity
    temporaries, and the bounded chunk temporaries."""
    num = num_q + num_g
    return (
        4 * num * dim
        + 4 * num_q * num_g
        + 48 * num * k  # (N, k) index and similarity, twice, and the reciprocity keys
        + 4 * min(_BLOCK_STRIP, num * num)  # one strip of the neighbour search
        + _CHUNK_BYTES_PER_ENTRY * _CHUNK_ENTRIES
        + 40 * _MAX_PAIRS
        + 8 * _BLOCK_ELEMENTS
    )


def _squared(similarity: np.ndarray) -> np.ndarray:
    """d^2 with d = max(2 - 2 cos, 0), in float32 as the reference computes it."""
    d = np.maximum(np.float32(2) - np.float32(2) * similarity.astype(np.float32), np.float32(0))
    return d * d


@dataclasses.dataclass(frozen=True)
class _Sparse:
    """An (N, N) sparse matrix, rows in order and columns ascending within each row.

    Attributes:
      indptr: (N + 1,) int64 row starts.
      cols: (E,) int64 column of each entry.
      values: (E,) float32.
    """

    indptr: np.ndarray
    cols: np.ndarray
    values: np.ndarray

    @property
    def rows(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.indptr) - 1), np.diff(self.indptr))


def _indptr(rows: np.ndarray, num: int) -> np.ndarray:
    """(num + 1,) int64 row starts of entries grouped by their (ascending) `rows`."""
    return np.concatenate([[0], np.cumsum(np.bincount(rows, minlength=num))]).astype(np.int64)


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The concatenation of arange(s, s + n) for each (s, n), without a Python loop."""
    lengths = np.asarray(lengths, np.int64)
    total = int(lengths.sum())
    return np.repeat(starts - (np.cumsum(lengths) - lengths), lengths) + np.arange(total)


def _contains(sorted_keys: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """(len(keys),) bool: is each key in `sorted_keys` (ascending)."""
    if len(sorted_keys) == 0:
        return np.zeros(len(keys), bool)
    pos = np.minimum(np.searchsorted(sorted_keys, keys), len(sorted_keys) - 1)
    return sorted_keys[pos] == keys


def _chunks(cost: np.ndarray, budget: int):
    """(start, end) row ranges whose summed `cost` stays within `budget` (one row at
    least): the chunks of a vectorised step whose temporaries grow with the cost."""
    cum = np.concatenate([[0], np.cumsum(cost)])
    s, num = 0, len(cost)
    while s < num:
        e = int(np.searchsorted(cum, cum[s] + budget, side="right")) - 1
        e = min(max(e, s + 1), num)
        yield s, e
        s = e


def _reciprocal(index: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """R(i, k - 1) for every i: the pairs (i, j), j among the first k neighbours of i and
    i among the first k of j, as (rows, cols) grouped by row in neighbour order.

    The test "is (j, i) a neighbour pair" is a binary search of the (N k,) sorted pair keys
    i N + j: memory O(N k), where gathering each neighbour's list costs O(N k^2)."""
    num = len(index)
    nbr = index[:, :k]
    rows = np.arange(num, dtype=np.int64)[:, None]
    keys = (rows * num + np.sort(nbr, axis=1)).ravel()  # ascending: rows, then columns
    mask = _contains(keys, (nbr * num + rows).ravel()).reshape(nbr.shape)
    return np.broadcast_to(rows, nbr.shape)[mask], nbr[mask]


def _reciprocal_weights(items, nn, k, k_half, row_max, what) -> _Sparse:
    """V of steps 3-4: per row the expanded k-reciprocal set R*(i) and its weights."""
    index = nn.index
    num = len(index)
    r_rows, r_cols = _reciprocal(index, k)  # R(i, k1)
    h_rows, h_cols = _reciprocal(index, k_half)  # R(c, k1/2)
    r_ptr, h_ptr = _indptr(r_rows, num), _indptr(h_rows, num)
    h_len = np.diff(h_ptr)
    r_keys = np.sort(r_rows * num + r_cols)
    # The candidates of row i: the members of R(c, k1/2) for each c in R(i, k1); their
    # count bounds both the work of a row and the size of R*(i).
    triples = np.bincount(r_rows, weights=h_len[r_cols], minlength=num).astype(np.int64)
    # The loop keeps only each row's unique member keys (8 bytes, at most this bound); the
    # rest of V is sized by the actual count once the loop is done.
    bound = np.minimum(np.diff(r_ptr) + triples, num)
    require_memory(8 * int(bound.sum()), what, _ADVICE)
    parts = []
    for s, e in _chunks(triples, _CHUNK_ENTRIES):
        p0, p1 = r_ptr[s], r_ptr[e]
        pair_rows, pair_cols = r_rows[p0:p1], r_cols[p0:p1]  # (i, c), c in R(i, k1)
        seg = h_len[pair_cols]
        cand = np.repeat(pair_rows * num, seg) + h_cols[_ranges(h_ptr[pair_cols], seg)]
        # |R(c, k1/2) & R(i, k1)|, compared in integers with 2/3 |R(c, k1/2)| (the
        # reference's float test agrees for these sizes).
        pair_of = np.repeat(np.arange(p1 - p0), seg)
        shared = np.bincount(pair_of, weights=_contains(r_keys, cand), minlength=p1 - p0)
        accept = 3 * shared > 2 * seg
        # Whole rows per chunk: the unique keys are the final entries of these rows.
        parts.append(
            np.unique(np.concatenate([pair_rows * num + pair_cols, cand[accept[pair_of]]]))
        )
        del cand, pair_of
    keys = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    del parts
    require_memory((_V_BYTES_PER_ENTRY - 8) * len(keys), what, _ADVICE)
    rows, cols = keys // num, keys % num

    # Most members are among the row's own neighbours, whose similarity is known: look
    # them up among the neighbour pairs sorted by key, compute the others.
    order = np.argsort(index, axis=1, kind="stable")
    own = np.arange(num, dtype=np.int64)[:, None] * num
    nbr_keys = (own + np.take_along_axis(index, order, 1)).ravel()
    nbr_sims = np.take_along_axis(nn.similarity, order, 1).ravel()
    del order
    pos = np.minimum(np.searchsorted(nbr_keys, keys), len(nbr_keys) - 1)
    known = nbr_keys[pos] == keys
    similarity = np.where(known, nbr_sims[pos], np.float32(0))
    del nbr_keys, nbr_sims, pos, keys
    missing = ~known
    similarity[missing] = _pair_similarity(items, rows[missing], cols[missing])

    # exp(-o(i, j)), normalised per row.
    weight = np.exp(-(_squared(similarity) / row_max[rows]))
    indptr = _indptr(rows, num)
    counts = np.diff(indptr)
    total = np.add.reduceat(weight.astype(np.float64), indptr[:-1][counts > 0])
    sums = np.zeros(num, np.float64)
    sums[counts > 0] = total
    values = (weight / sums[rows]).astype(np.float32)
    return _Sparse(indptr, cols, values)


def _pair_similarity(items: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """(E,) float32 inner products items[rows] . items[cols] (rows grouped, as built)."""
    out = np.empty(len(rows), np.float32)
    step = max(1, (16 * 1024 * 1024) // (4 * items.shape[1]))  # pairs per gather, ~16 MB
    for s in range(0, len(rows), step):
        r, c = rows[s : s + step], cols[s : s + step]
        out[s : s + step] = np.einsum("ij,ij->i", items[r], items[c])
    return out


def _expand(v: _Sparse, nearest: np.ndarray, what: str) -> _Sparse:
    """Step 5: row i becomes the mean of the rows of its `nearest` (N, k2) items, built in
    chunks of rows whose contributions stay within `_CHUNK_ENTRIES`."""
    num, k2 = nearest.shape
    lengths = np.diff(v.indptr)
    contributions = lengths[nearest].sum(axis=1)  # (N,) entries gathered per row
    bound = int(np.minimum(contributions, num).sum())
    require_memory(_EXPANDED_BYTES_PER_ENTRY * bound, what, _ADVICE)
    counts, col_parts, value_parts = [], [], []
    for s, e in _chunks(contributions, _CHUNK_ENTRIES):
        src = nearest[s:e].ravel()
        seg = lengths[src]  # entries contributed by each (i, a)
        pos = _ranges(v.indptr[src], seg)
        keys = np.repeat(np.repeat(np.arange(s, e), k2), seg) * num + v.cols[pos]
        order = np.argsort(keys, kind="stable")
        keys, values = keys[order], v.values[pos][order].astype(np.float64)
        first = np.ones(len(keys), bool)
        first[1:] = keys[1:] != keys[:-1]
        starts = np.flatnonzero(first)
        sums = np.add.reduceat(values, starts) if len(keys) else values
        unique = keys[starts]
        counts.append(np.bincount(unique // num - s, minlength=e - s))
        col_parts.append(unique % num)
        value_parts.append((sums / k2).astype(np.float32))
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(counts))]).astype(np.int64)
    return _Sparse(indptr, np.concatenate(col_parts), np.concatenate(value_parts))


def _final_distance(similarity, v: _Sparse, row_max, lam) -> np.ndarray:
    """Steps 6-7 for every query against every gallery item, written over `similarity`
    ((Q, G) float32 cosines), which is returned."""
    num_q, num_g = similarity.shape
    rows = v.rows
    # Gallery rows of V by column (an inverted index): column l -> gallery rows j, values.
    gal = rows >= num_q
    by_col = np.argsort(v.cols[gal], kind="stable")
    col_rows = rows[gal][by_col] - num_q
    col_vals = v.values[gal][by_col]
    num = len(v.indptr) - 1
    col_ptr = np.concatenate([[0], np.cumsum(np.bincount(v.cols[gal], minlength=num))])

    # Query chunks bounded both in dense elements and in joined pairs.
    q_end = v.indptr[num_q]
    q_seg = col_ptr[v.cols[:q_end] + 1] - col_ptr[v.cols[:q_end]]
    per_query = np.bincount(rows[:q_end], weights=q_seg, minlength=num_q)
    pairs = np.concatenate([[0], np.cumsum(per_query)])  # (Q + 1,) pairs before each query
    out = similarity
    max_rows = max(1, _BLOCK_ELEMENTS // num_g)
    s = 0
    while s < num_q:
        e = int(np.searchsorted(pairs, pairs[s] + _MAX_PAIRS, side="right")) - 1
        e = min(max(e, s + 1), s + max_rows, num_q)
        lo, hi = v.indptr[s], v.indptr[e]
        q_rows, q_cols, q_vals = rows[lo:hi] - s, v.cols[lo:hi], v.values[lo:hi]
        seg = col_ptr[q_cols + 1] - col_ptr[q_cols]
        total = int(seg.sum())
        pos = np.repeat(col_ptr[q_cols], seg) + (
            np.arange(total) - np.repeat(np.cumsum(seg) - seg, seg)
        )
        pair_min = np.minimum(np.repeat(q_vals, seg), col_vals[pos])
        flat = np.repeat(q_rows, seg) * num_g + col_rows[pos]
        overlap = np.bincount(flat, weights=pair_min, minlength=(e - s) * num_g)
        # Dense part, in place over the similarities: lambda o + (1 - lambda), i.e. the
        # final distance of pairs without shared neighbours (Jaccard distance 1).
        block = out[s:e]
        block *= np.float32(-2)
        block += np.float32(2)
        np.maximum(block, np.float32(0), out=block)
        block *= block
        block *= (np.float32(lam) / row_max[s:e])[:, None]
        block += np.float32(1 - lam)
        # Pairs with shared neighbours: the Jaccard distance 1 - m / (2 - m) replaces 1.
        shared = np.flatnonzero(overlap)
        m = overlap[shared].astype(np.float32)
        block.reshape(-1)[shared] -= np.float32(1 - lam) * (m / (np.float32(2) - m))
        s = e
    return out
