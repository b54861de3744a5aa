"""Mean average precision with junk items, as the landmark benchmarks define it.

The AP of one query is the area under its precision-recall curve by the trapezoidal rule
(the `compute_ap` of revisitop and the `score_ap_from_ranks_1` of the Holidays package):
with the positives at 0-based ranks r_0 < r_1 < ... among the non-junk items,

    AP = 1/n * sum_j ( p0_j + p1_j ) / 2,   p0_j = j / r_j (1 if r_j == 0),
                                            p1_j = (j + 1) / (r_j + 1),

where n is the number of positives. Junk items are removed from the ranking before the
ranks are counted (revisitop's `compute_map`); a query without positives is left out of
the mean. Mean precision at k (mP@k): per query, with kq = min(k, rank of its last
positive), the fraction of the first kq non-junk items that are positives.

Ranking is by cosine similarity, ties broken by gallery order (a stable sort), computed
for chunks of queries so that memory stays bounded for a million-image gallery.
"""

from __future__ import annotations

import numpy as np

from ctl_jax.evaluation.chunking import query_chunk_rows
from ctl_jax.evaluation.ranking import l2_normalize


def ranked_positions(
    query_emb: np.ndarray,
    gallery_emb: np.ndarray,
    rows: np.ndarray,
    items: np.ndarray,
    chunk_size: int | None = None,
) -> np.ndarray:
    """0-based positions of gallery items in queries' rankings.

    Args:
      query_emb: (Q, D) query embeddings, not necessarily normalised.
      gallery_emb: (G, D) gallery embeddings.
      rows: (P,) int query index of each pair.
      items: (P,) int gallery index of each pair.
      chunk_size: queries ranked at once (default: chunk x G around 4M elements).

    Returns:
      (P,) int64: the position of `items[p]` in the ranking of query `rows[p]` (by
      decreasing cosine similarity, ties in gallery order).
    """
    q = l2_normalize(query_emb)
    g = l2_normalize(gallery_emb)
    rows = np.asarray(rows, np.int64)
    items = np.asarray(items, np.int64)
    out = np.zeros(len(rows), np.int64)
    num_q, num_g = len(q), len(g)
    if not len(rows) or not num_g:
        return out
    if chunk_size is None:
        # float32 similarities, int64 order and inverse
        chunk_size = query_chunk_rows(num_g, 20)
    by_row = np.argsort(rows, kind="stable")
    bounds = np.searchsorted(rows[by_row], np.arange(0, num_q + chunk_size, chunk_size))
    g_t = g.T
    for c, start in enumerate(range(0, num_q, chunk_size)):
        pairs = by_row[bounds[c] : bounds[c + 1]]
        if not len(pairs):
            continue
        sim = q[start : start + chunk_size] @ g_t
        order = np.argsort(-sim, axis=1, kind="stable")
        inverse = np.empty_like(order)
        np.put_along_axis(inverse, order, np.arange(num_g)[None, :], axis=1)
        out[pairs] = inverse[rows[pairs] - start, items[pairs]]
    return out


def average_precision(
    num_queries: int,
    ok_rows: np.ndarray,
    ok_positions: np.ndarray,
    num_ok: np.ndarray,
    junk_rows: np.ndarray,
    junk_positions: np.ndarray,
    ks: tuple[int, ...] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """AP and precision at k of each query from the ranking positions of its items.

    Args:
      num_queries: Q.
      ok_rows, ok_positions: (P,) query and 0-based ranking position of each positive
        (each positive once).
      num_ok: (Q,) number of positives of each query (revisitop's `len(gnd[i]['ok'])`).
      junk_rows, junk_positions: (J,) the same for junk items.
      ks: the k of precision at k.

    Returns:
      ap (Q,) float64 and precision at k (Q, len(ks)) float64, NaN for queries without
      positives.
    """
    ok_rows = np.asarray(ok_rows, np.int64)
    ok_positions = np.asarray(ok_positions, np.int64)
    order = np.lexsort((ok_positions, ok_rows))
    rows, pos = ok_rows[order], ok_positions[order]
    span = int(max(pos.max(initial=0), np.max(junk_positions, initial=0))) + 1
    junk_keys = np.sort(np.asarray(junk_rows, np.int64) * span + junk_positions)
    keys = rows * span + pos
    # Junk ranked above each positive, in the same query.
    junk_before = np.searchsorted(junk_keys, keys) - np.searchsorted(junk_keys, rows * span)
    rank = (pos - junk_before).astype(np.float64)  # 0-based among non-junk items
    found = np.bincount(rows, minlength=num_queries)
    j = (np.arange(len(rows)) - (np.cumsum(found) - found)[rows]).astype(np.float64)
    precision_0 = np.where(rank == 0, 1.0, j / np.maximum(rank, 1.0))
    precision_1 = (j + 1.0) / (rank + 1.0)
    area = np.bincount(rows, weights=(precision_0 + precision_1) / 2.0, minlength=num_queries)
    num_ok = np.asarray(num_ok, np.float64)
    valid = num_ok > 0
    ap = np.full(num_queries, np.nan)
    ap[valid] = area[valid] / num_ok[valid]

    precision = np.full((num_queries, len(ks)), np.nan)
    last = np.zeros(num_queries)  # 1-based rank of the last positive
    np.maximum.at(last, rows, rank + 1.0)
    for i, k in enumerate(ks):
        kq = np.minimum(last, float(k))
        hits = np.bincount(rows, weights=(rank + 1.0 <= kq[rows]), minlength=num_queries)
        with np.errstate(invalid="ignore", divide="ignore"):
            precision[valid, i] = hits[valid] / kq[valid]
    return ap, precision


def mean_over_valid(values: np.ndarray) -> float:
    """Mean over the queries that have positives (non-NaN), NaN when there are none."""
    values = np.asarray(values, np.float64)
    valid = ~np.isnan(values)
    return float(values[valid].mean()) if valid.any() else float("nan")


def same_pid_pairs(query_pids: np.ndarray, gallery_pids: np.ndarray):
    """(rows, items): every (query, gallery item) pair with equal pids, by query."""
    q_pids = np.asarray(query_pids, np.int64)
    by_pid = np.argsort(np.asarray(gallery_pids, np.int64), kind="stable")
    sorted_pids = np.asarray(gallery_pids, np.int64)[by_pid]
    lo = np.searchsorted(sorted_pids, q_pids, side="left")
    counts = np.searchsorted(sorted_pids, q_pids, side="right") - lo
    rows = np.repeat(np.arange(len(q_pids)), counts)
    offsets = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
    return rows, by_pid[np.repeat(lo, counts) + offsets]


def same_path_pairs(query_paths, gallery_paths):
    """(rows, items): every (query, gallery item) pair that is the same image (path)."""
    index = {}
    for j, path in enumerate(gallery_paths):
        index.setdefault(str(path), []).append(j)
    rows, items = [], []
    for i, path in enumerate(query_paths):
        for j in index.get(str(path), ()):
            rows.append(i)
            items.append(j)
    return np.asarray(rows, np.int64), np.asarray(items, np.int64)


def holidays_metrics(
    query_emb: np.ndarray,
    query_pids: np.ndarray,
    query_paths,
    gallery_emb: np.ndarray,
    gallery_pids: np.ndarray,
    gallery_paths,
) -> dict:
    """The INRIA Holidays protocol: mAP over queries, the positives of a query being the
    other images of its group (same pid), the query itself excluded from its ranking.

    Returns:
      {"mAP", "num_query" (queries with positives), "num_gallery"}.
    """
    rows, items = same_pid_pairs(query_pids, gallery_pids)
    self_rows, self_items = same_path_pairs(query_paths, gallery_paths)
    is_self = np.isin(rows * len(gallery_pids) + items, self_rows * len(gallery_pids) + self_items)
    ok_rows, ok_items = rows[~is_self], items[~is_self]
    all_rows = np.concatenate([ok_rows, self_rows])
    all_pos = ranked_positions(
        query_emb, gallery_emb, all_rows, np.concatenate([ok_items, self_items])
    )
    num_q = len(query_pids)
    ap, _ = average_precision(
        num_q,
        ok_rows,
        all_pos[: len(ok_rows)],
        np.bincount(ok_rows, minlength=num_q),
        self_rows,
        all_pos[len(ok_rows) :],
    )
    return {
        "mAP": mean_over_valid(ap),
        "num_query": int((~np.isnan(ap)).sum()),
        "num_gallery": len(gallery_pids),
    }
