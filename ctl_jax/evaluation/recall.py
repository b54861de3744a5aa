"""The Recall@K protocol of metric learning (Stanford Online Products, DeepFashion In-Shop).

Recall@K is the fraction of queries with at least one image of their class among the K
gallery items most similar to them (cosine similarity; ties in gallery order). A gallery
item that is the query's own image (same path) is not a candidate: on Stanford Online
Products query and gallery are the same test images, so every image queries all the
others; on In-Shop the query and gallery splits are disjoint and nothing is left out.
Queries with no other image of their class in the gallery are not counted (`num_query`).

Modes:
* `instance`: the gallery images.
* `centroid`: one centroid per gallery class (mean of its un-normalised embeddings), the
  query's own image left out of its class's centroid (a class reduced to nothing has no
  centroid for that query).
"""

from __future__ import annotations

import numpy as np

from ctl_jax.errors import OptionError
from ctl_jax.evaluation.average_precision import same_path_pairs
from ctl_jax.evaluation.chunking import query_chunk_rows
from ctl_jax.evaluation.ranking import l2_normalize

RECALL_MODES = ("instance", "centroid")
DEFAULT_RECALL_KS = (1, 10, 20, 30, 40, 50, 100, 1000)


def recall_at_k(
    query_emb: np.ndarray,
    query_pids: np.ndarray,
    query_paths,
    gallery_emb: np.ndarray,
    gallery_pids: np.ndarray,
    gallery_paths,
    ks: tuple[int, ...] = DEFAULT_RECALL_KS,
    mode: str = "instance",
    chunk_size: int | None = None,
) -> dict:
    """Recall@K of queries against a gallery (see the module docstring).

    Args:
      query_emb: (Q, D) query embeddings, not necessarily normalised.
      query_pids: (Q,) int classes.
      query_paths: (Q,) image paths (to recognise a query's own image in the gallery).
      gallery_emb: (G, D) un-normalised gallery embeddings (centroids are means of these).
      gallery_pids: (G,) int classes.
      gallery_paths: (G,) image paths.
      ks: the K of the reported Recall@K.
      mode: "instance" or "centroid".

    Returns:
      {"recall@<k>": fraction for k in ks, "num_query", "num_gallery"} (NaN when no
      query is counted).
    """
    if mode not in RECALL_MODES:
        raise OptionError(f"unknown Recall@K mode {mode!r}; valid: {', '.join(RECALL_MODES)}")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise OptionError(f"Recall@K needs ks >= 1, got {ks}")
    q_pids = np.asarray(query_pids, np.int64)
    g_pids = np.asarray(gallery_pids, np.int64)
    g_emb = np.asarray(gallery_emb, np.float32)
    self_rows, self_items = same_path_pairs(query_paths, gallery_paths)
    if mode == "instance":
        position, counted = _instance_positions(
            query_emb, q_pids, g_emb, g_pids, self_rows, self_items, chunk_size
        )
        num_gallery = len(g_pids)
    else:
        position, counted, num_gallery = _centroid_positions(
            query_emb, q_pids, g_emb, g_pids, self_rows, self_items, chunk_size
        )
    num = int(counted.sum())
    metrics = {
        f"recall@{k}": float((position[counted] < k).mean()) if num else float("nan") for k in ks
    }
    metrics["num_query"] = num
    metrics["num_gallery"] = num_gallery
    return metrics


def _first_positive_positions(sim, positive, excluded):
    """0-based position of the first positive of each row of `sim` (n, G) in its ranking
    by decreasing similarity, ties in column order, `excluded` columns not ranked; and
    whether the row has a positive.

    Everything ranked above the best positive is a negative, so its position is the number
    of candidates more similar than it, plus those as similar with a smaller column.
    """
    sim = np.where(excluded, -np.inf, sim)
    pos_sim = np.where(positive & ~excluded, sim, -np.inf)
    best = pos_sim.max(axis=1)
    has = np.isfinite(best)
    best_col = np.argmax(pos_sim == best[:, None], axis=1)  # first column reaching the best
    ahead = (sim > best[:, None]).sum(axis=1)
    cols = np.arange(sim.shape[1])[None, :]
    ties = ((sim == best[:, None]) & (cols < best_col[:, None])).sum(axis=1)
    return ahead + ties, has


def _chunks(num_q, num_g, chunk_size):
    if chunk_size is None:
        chunk_size = query_chunk_rows(num_g, 8)  # similarities and comparisons
    return [slice(s, min(s + chunk_size, num_q)) for s in range(0, num_q, chunk_size)]


def _instance_positions(q_emb, q_pids, g_emb, g_pids, self_rows, self_items, chunk_size):
    q, g = l2_normalize(q_emb), l2_normalize(g_emb)
    position = np.zeros(len(q), np.int64)
    counted = np.zeros(len(q), bool)
    for sl in _chunks(len(q), len(g), chunk_size):
        sim = q[sl] @ g.T
        excluded = np.zeros(sim.shape, bool)
        in_chunk = (self_rows >= sl.start) & (self_rows < sl.stop)
        excluded[self_rows[in_chunk] - sl.start, self_items[in_chunk]] = True
        positive = q_pids[sl, None] == g_pids[None, :]
        position[sl], counted[sl] = _first_positive_positions(sim, positive, excluded)
    return position, counted


def _group_sums(x: np.ndarray, group: np.ndarray, num_groups: int) -> np.ndarray:
    """(num_groups, D) float64 sums of the rows of `x` (N, D) per `group` (N,) in
    0..num_groups-1 (every group non-empty); sorted segments, not the slow `np.add.at`."""
    order = np.argsort(group, kind="stable")
    starts = np.searchsorted(group[order], np.arange(num_groups))
    if not len(order):
        return np.zeros((num_groups, x.shape[1]), np.float64)
    return np.add.reduceat(x[order].astype(np.float64), starts, axis=0)


def _centroid_positions(q_emb, q_pids, g_emb, g_pids, self_rows, self_items, chunk_size):
    classes, class_of = np.unique(g_pids, return_inverse=True)
    sums = _group_sums(g_emb, class_of, len(classes))
    counts = np.bincount(class_of, minlength=len(classes)).astype(np.float64)
    centroids = l2_normalize(sums / np.maximum(counts, 1.0)[:, None])
    q = l2_normalize(q_emb)

    # A query's own image(s) left out of their class's centroid: (query, class) groups.
    keys, inverse = np.unique(self_rows * len(classes) + class_of[self_items], return_inverse=True)
    adj_rows, adj_classes = keys // len(classes), keys % len(classes)
    removed = _group_sums(g_emb[self_items], inverse, len(keys))
    left = counts[adj_classes] - np.bincount(inverse, minlength=len(keys))
    adjusted = l2_normalize((sums[adj_classes] - removed) / np.maximum(left, 1.0)[:, None])
    adj_sim = np.einsum("ij,ij->i", q[adj_rows], adjusted)

    position = np.zeros(len(q), np.int64)
    counted = np.zeros(len(q), bool)
    for sl in _chunks(len(q), len(classes), chunk_size):
        sim = q[sl] @ centroids.T
        excluded = np.zeros(sim.shape, bool)
        in_chunk = (adj_rows >= sl.start) & (adj_rows < sl.stop)
        r, c = adj_rows[in_chunk] - sl.start, adj_classes[in_chunk]
        sim[r, c] = adj_sim[in_chunk]
        excluded[r, c] = left[in_chunk] == 0
        positive = q_pids[sl, None] == classes[None, :]
        position[sl], counted[sl] = _first_positive_positions(sim, positive, excluded)
    return position, counted, len(classes)
