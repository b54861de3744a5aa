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
vectorised over chunks of rows. Memory is O(N k1^2 + Q G) instead of O(N^2).

Differences from the reference, all in degenerate cases: d is clipped at 0 (rounding can
make 2 - 2 cos slightly negative for an item and itself); a row whose items are all
identical (largest distance 0) is left un-normalised instead of becoming NaN; ties in the
neighbour order go to the lower index (the reference's unstable argsort leaves them to the
sort implementation).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ctl_jax.errors import OptionError
from ctl_jax.evaluation.neighbours import nearest_neighbours, normalized_rows

# Rows handled at once in the vectorised steps; bounds the (rows x k1^2) temporaries.
_ROWS = 1024
# Elements of the (rows x N) position map of `_reciprocal_weights` (int32: 32 MB).
_MAP_ELEMENTS = 8 * 1024 * 1024
# Elements of a dense (query chunk x gallery) block of the final distance.
_BLOCK_ELEMENTS = 4 * 1024 * 1024
# (query entry, gallery entry) pairs of the Jaccard join handled at once (~200 MB of
# temporaries).
_MAX_PAIRS = 8 * 1024 * 1024


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


def rerank_distances(
    query_emb: np.ndarray, gallery_emb: np.ndarray, params: RerankParams = RerankParams()
) -> np.ndarray:
    """The re-ranked query-gallery distance (lower is better).

    Args:
      query_emb: (Q, D) query embeddings (normalised here).
      gallery_emb: (G, D) gallery item embeddings, images or centroids (normalised here).
      params: k1, k2, lambda.

    Returns:
      (Q, G) float32 distances, the reference `re_ranking` output for d = 2 - 2 cos.
    """
    num_q, num_g = len(query_emb), len(gallery_emb)
    if num_q == 0 or num_g == 0:
        return np.zeros((num_q, num_g), np.float32)
    items = normalized_rows(query_emb, gallery_emb)  # (N, D): queries, then gallery items
    num = len(items)
    k = min(params.k1 + 1, num)
    k_half = min(int(np.around(params.k1 / 2.0)) + 1, num)
    # The query-gallery similarities are kept as the neighbour search computes them: they
    # become the final distances in place.
    nn = nearest_neighbours(items, k, keep=(num_q, num_q))
    row_max = _squared(nn.min_similarity)  # the farthest item's d^2
    row_max = np.where(row_max > 0, row_max, np.float32(1.0))

    v = _reciprocal_weights(items, nn, k, k_half, row_max)
    if params.k2 != 1:
        v = _expand(v, nn.index[:, : min(params.k2, num)])
    return _final_distance(nn.kept, v, row_max, float(params.lambda_value))


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


def _reciprocal_mask(index: np.ndarray, k: int) -> np.ndarray:
    """(N, k) bool: is neighbour a of item i (among its first k) a k-reciprocal one, i.e.
    is i among the first k neighbours of that neighbour."""
    nbr = index[:, :k]
    mask = np.empty(nbr.shape, bool)
    for s in range(0, len(nbr), _ROWS):
        rows = np.arange(s, min(s + _ROWS, len(nbr)))
        back = nbr[nbr[rows]]  # (rows, k, k) the neighbours' neighbour lists
        mask[rows] = (back == rows[:, None, None]).any(axis=-1)
    return mask


def _reciprocal_weights(items, nn, k, k_half, row_max) -> _Sparse:
    """V of steps 3-4: per row the expanded k-reciprocal set R*(i) and its weights."""
    index = nn.index
    num = len(index)
    recip = _reciprocal_mask(index, k)
    recip_half = _reciprocal_mask(index, k_half)
    nbr_half = index[:, :k_half]
    # Per chunk of rows, a dense map of each row's own neighbour list: column -> position
    # + 1 (0: not a neighbour). Membership tests and similarity look-ups become gathers.
    chunk = int(max(1, min(_ROWS, _MAP_ELEMENTS // num)))
    position = np.zeros((chunk, num), np.int32)
    row_parts, col_parts, sim_parts = [], [], []
    for s in range(0, num, chunk):
        rows = np.arange(s, min(s + chunk, num))
        local = np.arange(len(rows))[:, None]
        own, own_mask = index[rows, :k], recip[rows]  # N(i, k1 + 1) and R(i, k1) in it
        position[local, own] = np.arange(1, k + 1)
        cand = nbr_half[own]  # each neighbour's half-size list: (n, k, k_half)
        cand_mask = recip_half[own]  # ... its k1/2-reciprocal members
        # |R(c, k1/2) & R(i, k1)| for each candidate c = own[i, a].
        at = position[local[:, :, None], cand]  # (n, k, k_half) position + 1 in N(i, k1 + 1)
        in_own = np.take_along_axis(own_mask, np.maximum(at - 1, 0).reshape(len(rows), -1), 1)
        in_own = in_own.reshape(at.shape) & (at > 0)
        shared = (in_own & cand_mask).sum(-1)
        size = cand_mask.sum(-1)
        # `> 2/3 |R(c, k1/2)|` in integers (the reference's float test agrees for these sizes).
        accept = own_mask & (3 * shared > 2 * size)
        members = np.concatenate(
            [
                np.where(own_mask, own, -1),
                np.where(accept[..., None] & cand_mask, cand, -1).reshape(len(rows), -1),
            ],
            axis=1,
        )
        members.sort(axis=1)
        first = np.ones(members.shape, bool)
        first[:, 1:] = members[:, 1:] != members[:, :-1]
        keep = first & (members >= 0)
        # Most members are among the row's own neighbours, whose similarity is known.
        at = position[local, np.maximum(members, 0)]
        known = np.take_along_axis(nn.similarity[rows, :k], np.maximum(at - 1, 0), axis=1)
        row_parts.append(np.broadcast_to(rows[:, None], members.shape)[keep])
        col_parts.append(members[keep])
        sim_parts.append(np.where(at > 0, known, np.nan)[keep])
        position[local, own] = 0
    rows, cols = np.concatenate(row_parts), np.concatenate(col_parts)
    similarity = np.concatenate(sim_parts)
    missing = np.isnan(similarity)
    similarity[missing] = _pair_similarity(items, rows[missing], cols[missing])

    # exp(-o(i, j)), normalised per row.
    weight = np.exp(-(_squared(similarity) / row_max[rows]))
    counts = np.bincount(rows, minlength=num)
    indptr = np.concatenate([[0], np.cumsum(counts)])
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


def _expand(v: _Sparse, nearest: np.ndarray) -> _Sparse:
    """Step 5: row i becomes the mean of the rows of its `nearest` (N, k2) items."""
    num, k2 = nearest.shape
    lengths = np.diff(v.indptr)
    src = nearest.ravel()
    seg = lengths[src]  # entries contributed by each (i, a)
    total = int(seg.sum())
    starts = np.repeat(v.indptr[src], seg)
    offsets = np.arange(total) - np.repeat(np.cumsum(seg) - seg, seg)
    pos = starts + offsets
    rows = np.repeat(np.repeat(np.arange(num), k2), seg)
    keys = rows * num + v.cols[pos]
    order = np.argsort(keys, kind="stable")
    keys, values = keys[order], v.values[pos][order].astype(np.float64)
    first = np.ones(len(keys), bool)
    first[1:] = keys[1:] != keys[:-1]
    starts_u = np.flatnonzero(first)
    sums = np.add.reduceat(values, starts_u) if len(keys) else values
    ukeys = keys[starts_u]
    out_rows, out_cols = ukeys // num, ukeys % num
    indptr = np.concatenate([[0], np.cumsum(np.bincount(out_rows, minlength=num))])
    return _Sparse(indptr, out_cols, (sums / k2).astype(np.float32))


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
