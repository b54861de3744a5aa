"""CMC, mAP and mINP under the Market-1501 protocol, vectorised over chunks of queries.

Every query is ranked against the whole search gallery by cosine similarity of L2-normalised
embeddings (the same order as Euclidean distance between them). Gallery item j is removed
from query q's ranking iff it has q's pid and its camera bitmask contains q's camera:
`pid_j == pid_q and (mask_j >> cam_q) & 1`. One rule thus serves plain images
(mask = 1 << camid) and centroids built from several cameras (mask = OR of their cameras).

There is no Python loop over gallery items. Queries are processed in chunks (bounded
memory); inside a chunk the work is a float32 BLAS matmul, one sort per row and sparse
bookkeeping over the few same-pid items of each query (correct matches and removed items,
the only ones the metrics depend on). At Market-1501 size the matmul (3,368 x 15,913 x
2,048) is most of the time. The computation is NumPy only: evaluating embedding files must
not import JAX (its import alone is ~1 s of a command that should take about that long).

* Each row of similarities is copied and sorted (float32, which NumPy sorts with AVX-512);
  the rank of a same-pid item is then two binary searches of its score in its sorted row:
  the scores above it, plus the equal scores at a lower gallery index (counted in the
  unsorted row, only for the rare scores that are not unique). So equal scores are ordered
  by gallery index, lowest first, deterministically.
* Only those ranks are needed: the sorted rows are never gathered or argsorted.

`rank_scores` ranks by a precomputed (Q, G) score matrix instead (e.g. re-ranked distances,
negated), with the same keys, filter and metrics.
"""

from __future__ import annotations

import functools

import numpy as np

from ctl_jax.evaluation.chunking import query_chunk_rows

DEFAULT_RANKS = (1, 5, 10, 20, 50)

# Bytes per (query, gallery) element of a chunk: the float32 similarities and their sorted copy.
_CHUNK_BYTES_PER_ELEMENT = 8


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows of `x` (N, D) divided by max(norm, eps), as float32 (like torch F.normalize)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))[:, None]
    return x / np.maximum(norms, np.float32(eps))


def rank_metrics(
    query_emb: np.ndarray,
    query_pids: np.ndarray,
    query_cams: np.ndarray,
    gallery_emb: np.ndarray,
    gallery_pids: np.ndarray,
    gallery_cam_masks: np.ndarray,
    ranks: tuple[int, ...] = DEFAULT_RANKS,
    chunk_size: int | None = None,
    backend: str = "auto",
    cmc_curve: int = 0,
    on_scores=None,
) -> dict:
    """mAP and CMC of queries against a gallery (Market-1501 protocol).

    Args:
      query_emb: (Q, D) query embeddings, not necessarily normalised.
      query_pids: (Q,) int identities.
      query_cams: (Q,) int camera ids in 0..62.
      gallery_emb: (G, D) gallery embeddings (images or centroids), not necessarily
        normalised.
      gallery_pids: (G,) int identities.
      gallery_cam_masks: (G,) int64 bitmasks of the cameras each gallery item comes from.
      ranks: the k of the reported CMC@k.
      chunk_size: queries per chunk; default `chunking.query_chunk_rows`.
      backend: where the similarities are computed: "numpy" (BLAS) or "jax" (XLA, on the
        default device, full float32 precision); "auto" is numpy, so that evaluating
        embedding files never imports JAX (~1 s of start-up, more than XLA's faster matmul
        saves).
      cmc_curve: also return the CMC curve up to this rank (0: no).
      on_scores: called as on_scores(start, sim) with each chunk's (n, G) float32 cosine
        similarities of queries start .. start + n - 1, in order (e.g.
        `verification.VerificationPairs.add`, so that the matmul serves both); the buffer
        is reused after the call returns.

    Returns:
      {"mAP": float, "mINP": float, "rank<k>": float for k in ranks, "num_query": int}.
      Metrics are fractions in [0, 1] over the counted queries (those with at least one
      correct match left after removal); NaN when no query is counted. CMC@k looks at the
      first k kept items, or all kept items when fewer than k are left. mINP (Ye et al.,
      TPAMI 2021) is the mean over queries of (correct matches) / (kept position of the
      last one). With `cmc_curve` > 0 also "cmc": (cmc_curve,) float64 CMC@1..cmc_curve.
    """
    q_emb = l2_normalize(query_emb)
    g_emb = l2_normalize(gallery_emb)
    num_q, num_g = len(q_emb), len(g_emb)
    q_pids, q_cams, g_pids, g_masks = _check_labels(
        num_q, num_g, query_pids, query_cams, gallery_pids, gallery_cam_masks, "embeddings"
    )
    if num_q and num_g and q_emb.shape[1] != g_emb.shape[1]:
        raise ValueError(
            f"query and gallery embeddings differ in dimension: {q_emb.shape[1]} vs "
            f"{g_emb.shape[1]}"
        )
    if backend not in ("auto", "numpy", "jax"):
        raise ValueError(f"backend must be 'auto', 'numpy' or 'jax', got {backend!r}")
    use_jax = backend == "jax"

    def make_ranker(chunk):
        return _ChunkRanker(g_emb, g_pids, g_masks, chunk, use_jax)

    return _rank(make_ranker, q_emb, q_pids, q_cams, num_g, ranks, chunk_size, cmc_curve, on_scores)


def rank_scores(
    scores: np.ndarray,
    query_pids: np.ndarray,
    query_cams: np.ndarray,
    gallery_pids: np.ndarray,
    gallery_cam_masks: np.ndarray,
    ranks: tuple[int, ...] = DEFAULT_RANKS,
    chunk_size: int | None = None,
    cmc_curve: int = 0,
) -> dict:
    """`rank_metrics` for a precomputed score matrix (higher is better).

    Args:
      scores: (Q, G) float32 scores, e.g. cosine similarities or negated distances.
      query_pids, query_cams, gallery_pids, gallery_cam_masks, ranks, chunk_size,
        cmc_curve: as for `rank_metrics`.

    Returns:
      The metrics of `rank_metrics`. Equal scores are ordered by gallery index.
    """
    scores = np.asarray(scores, np.float32)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-D (Q, G) array, got shape {scores.shape}")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or infinite values")
    num_q, num_g = scores.shape
    q_pids, q_cams, g_pids, g_masks = _check_labels(
        num_q, num_g, query_pids, query_cams, gallery_pids, gallery_cam_masks, "scores"
    )

    def make_ranker(chunk):
        return _ChunkRanker(None, g_pids, g_masks, chunk, use_jax=False)

    return _rank(make_ranker, scores, q_pids, q_cams, num_g, ranks, chunk_size, cmc_curve)


def _check_labels(num_q, num_g, query_pids, query_cams, gallery_pids, gallery_masks, what):
    q_pids = np.asarray(query_pids, dtype=np.int64)
    q_cams = np.asarray(query_cams, dtype=np.int64)
    g_pids = np.asarray(gallery_pids, dtype=np.int64)
    g_masks = np.asarray(gallery_masks, dtype=np.int64)
    if not (len(q_pids) == len(q_cams) == num_q):
        raise ValueError(
            f"query arrays differ in length: {what} {num_q}, pids {len(q_pids)}, "
            f"cameras {len(q_cams)}"
        )
    if not (len(g_pids) == len(g_masks) == num_g):
        raise ValueError(
            f"gallery arrays differ in length: {what} {num_g}, pids {len(g_pids)}, "
            f"camera masks {len(g_masks)}"
        )
    if num_q and (q_cams.min() < 0 or q_cams.max() > 62):
        raise ValueError("query camera ids must lie in 0..62")
    return q_pids, q_cams, g_pids, g_masks


def _rank(
    make_ranker, rows, q_pids, q_cams, num_g, ranks, chunk_size, cmc_curve, on_scores=None
) -> dict:
    """The metrics of queries whose (Q, ...) `rows` (embeddings or scores) a ranker takes."""
    ranks = tuple(int(k) for k in ranks)
    if any(k < 1 for k in ranks):
        raise ValueError(f"ranks must be >= 1, got {ranks}")
    num_q = len(q_pids)
    ap = np.zeros(num_q, np.float64)
    inp = np.zeros(num_q, np.float64)
    first_pos = np.zeros(num_q, np.int64)  # 1-based kept position of the first correct match
    counted = np.zeros(num_q, bool)
    if num_q and num_g:
        if chunk_size is None:
            chunk_size = query_chunk_rows(num_g, _CHUNK_BYTES_PER_ELEMENT)
        chunk_size = int(min(max(1, chunk_size), num_q))
        ranker = make_ranker(chunk_size)
        chunks = [slice(s, min(s + chunk_size, num_q)) for s in range(0, num_q, chunk_size)]
        pending = ranker.start(rows[chunks[0]])
        for i, sl in enumerate(chunks):
            # With XLA the next chunk's similarities are computed while this one is ranked.
            upcoming = ranker.start(rows[chunks[i + 1]]) if i + 1 < len(chunks) else None
            ap[sl], inp[sl], first_pos[sl], counted[sl] = ranker.finish(
                pending, q_pids[sl], q_cams[sl]
            )
            if on_scores is not None:
                on_scores(sl.start, ranker.sim[: sl.stop - sl.start])
            pending = upcoming

    num_counted = int(counted.sum())
    nan = float("nan")
    metrics = {}
    metrics["mAP"] = float(ap[counted].sum() / num_counted) if num_counted else nan
    metrics["mINP"] = float(inp[counted].sum() / num_counted) if num_counted else nan
    for k in ranks:
        hits = int((first_pos[counted] <= k).sum())
        metrics[f"rank{k}"] = hits / num_counted if num_counted else nan
    metrics["num_query"] = num_counted
    if cmc_curve:
        hits = np.bincount(np.minimum(first_pos[counted], cmc_curve + 1), minlength=cmc_curve + 2)
        cmc = np.cumsum(hits[1 : cmc_curve + 1]) / num_counted if num_counted else None
        metrics["cmc"] = cmc if cmc is not None else np.full(cmc_curve, np.nan)
    return metrics


@functools.cache
def _jax_similarities():
    """Jitted (q (chunk, D), g (G, D)) -> (chunk, G) float32 q @ g.T at full precision
    (`backend="jax"` only: the default is NumPy, so that evaluation never imports JAX)."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda q, g: jnp.matmul(q, g.T, precision=jax.lax.Precision.HIGHEST))


class _ChunkRanker:
    """Ranks chunks of queries against a fixed gallery, reusing its buffers.

    Reusing the (chunk, G) buffers matters: fresh allocations of this size are mmapped and
    page-faulted on every chunk, which costs as much as the sort itself.
    """

    def __init__(self, g_emb, g_pids, g_masks, chunk_size, use_jax):
        """`g_emb` (G, D) normalised, or None when `start` is given rows of scores."""
        num_g = len(g_pids)
        self.num_g, self.chunk_size = num_g, chunk_size
        self.g_masks = g_masks
        # Gallery grouped by pid: the same-pid items of a query are one contiguous range.
        self.by_pid = np.argsort(g_pids, kind="stable")
        self.sorted_pids = g_pids[self.by_pid]
        self.sim = np.empty((chunk_size, num_g), np.float32)
        self.sorted = np.empty((chunk_size, num_g), np.float32)
        if use_jax:
            import jax

            self.jax_fn = _jax_similarities()
            self.g_emb_device = jax.device_put(g_emb)
        else:
            self.jax_fn = None
            self.g_emb_t = None if g_emb is None else g_emb.T  # BLAS reads it in place

    def start(self, q_emb):
        """Starts the similarities of a chunk of queries; returns what `finish` takes.

        XLA runs asynchronously, so with jax this returns at once. The NumPy path reuses one
        buffer, so its work is deferred to `finish`. Without gallery embeddings `q_emb`
        is a chunk of precomputed scores.
        """
        if self.jax_fn is None:
            return q_emb
        padded = np.zeros((self.chunk_size, q_emb.shape[1]), np.float32)
        padded[: len(q_emb)] = q_emb  # one shape for every chunk: compiled once
        return len(q_emb), self.jax_fn(padded, self.g_emb_device)

    def similarities(self, pending) -> np.ndarray:
        """The (n, G) float32 scores of a chunk, in the reusable buffer."""
        if self.jax_fn is not None:
            n, result = pending
            sim = self.sim[:n]
            np.copyto(sim, np.asarray(result)[:n])
            return sim
        q_emb = pending
        sim = self.sim[: len(q_emb)]
        if self.g_emb_t is None:
            np.copyto(sim, q_emb)  # precomputed scores
        else:
            np.matmul(q_emb, self.g_emb_t, out=sim)
        return sim

    def finish(self, pending, q_pids, q_cams):
        """(AP (n,), INP (n,), 1-based kept position of the first correct match (n,),
        counted (n,))."""
        sim = self.similarities(pending)
        n, num_g = len(sim), self.num_g

        # Same-pid items of each query (sparse): rows, gallery items, removed flags.
        lo = np.searchsorted(self.sorted_pids, q_pids, side="left")
        hi = np.searchsorted(self.sorted_pids, q_pids, side="right")
        counts = hi - lo
        rows = np.repeat(np.arange(n), counts)
        offsets = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        items = self.by_pid[np.repeat(lo, counts) + offsets]
        is_removed = ((self.g_masks[items] >> q_cams[rows]) & 1).astype(bool)

        rank = _ranks_in_rows(sim, self.sorted[:n], rows, items)
        # Items in rank order within each row (ranks in a row are distinct).
        order = np.argsort(rows * np.int64(num_g) + rank, kind="stable")
        rows, is_removed, rank = rows[order], is_removed[order], rank[order]

        # Kept position (1-based) of each correct match: rank + 1 minus removed items above.
        row_start = np.searchsorted(rows, rows, side="left")
        removed_before = np.cumsum(is_removed) - is_removed
        removed_before = removed_before - removed_before[row_start]
        good = ~is_removed
        g_rows = rows[good]
        kept_pos = (rank[good] + 1 - removed_before[good]).astype(np.float64)
        good_rank = np.arange(len(g_rows)) - np.searchsorted(g_rows, g_rows, side="left") + 1

        num_good = np.bincount(g_rows, minlength=n)
        counted = num_good > 0
        precision_sum = np.bincount(g_rows, weights=good_rank / kept_pos, minlength=n)
        ap = np.zeros(n, np.float64)
        ap[counted] = precision_sum[counted] / num_good[counted]
        first_pos = np.zeros(n, np.int64)
        first = good_rank == 1
        first_pos[g_rows[first]] = kept_pos[first].astype(np.int64)
        # INP: correct matches over the kept position of the last one (rows are grouped and
        # ascending in rank, so a row's last entry is its hardest match).
        last = np.ones(len(g_rows), bool)
        last[:-1] = g_rows[1:] != g_rows[:-1]
        inp = np.zeros(n, np.float64)
        inp[g_rows[last]] = num_good[g_rows[last]] / kept_pos[last]
        return ap, inp, first_pos, counted


def _ranks_in_rows(sim, sorted_buffer, rows, items) -> np.ndarray:
    """0-based rank of gallery item `items[i]` in row `rows[i]` of `sim`, ordered by score
    descending with equal scores ordered by gallery index (lowest first).

    Args:
      sim: (n, G) float32 scores (finite); left unchanged.
      sorted_buffer: (n, G) float32 scratch space.
      rows, items: (M,) int, rows ascending (the few same-pid items of each query).

    Returns:
      (M,) int64 ranks.

    Only these M ranks are needed, so each row is sorted (float32: AVX-512 sorts 16 at a
    time) and searched, instead of ordering every item: rank = (scores above) + (equal
    scores at a lower index), the latter counted in the unsorted row only where an item's
    score is not unique (rare).
    """
    num_g = sim.shape[1]
    np.copyto(sorted_buffer, sim)
    sorted_buffer.sort(axis=1)
    values = sim[rows, items]
    above = np.empty(len(rows), np.int64)
    equal = np.empty(len(rows), np.int64)
    bounds = np.searchsorted(rows, np.arange(len(sim) + 1))
    for r in np.flatnonzero(np.diff(bounds)):  # rows with items: a few calls per query
        b, e = bounds[r], bounds[r + 1]
        right = np.searchsorted(sorted_buffer[r], values[b:e], side="right")
        above[b:e] = num_g - right
        equal[b:e] = right - np.searchsorted(sorted_buffer[r], values[b:e], side="left")
    rank = above
    for i in np.flatnonzero(equal > 1):  # ties: the equal ones at lower gallery indices
        rank[i] += np.count_nonzero(sim[rows[i], : items[i]] == values[i])
    return rank
