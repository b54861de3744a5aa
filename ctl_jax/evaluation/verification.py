"""Verification: "is this the same identity?" as a score threshold over query-gallery pairs.

Ranking metrics say how well the right match is ordered; a deployment that must decide
whether a person is in the database at all needs a threshold on the score. Over every
query-gallery item pair except those the ranking protocol removes (same identity and a
camera the item was built from; see `ranking.py`), with score = cosine similarity of the
L2-normalised embeddings and "match" meaning score >= threshold:

* `pairs`, `positives` (same identity), the rest are negatives;
* `auc`: area under the ROC curve, P(positive score > negative score) with ties counting
  one half (the Mann-Whitney statistic);
* for each target false-positive rate f: `tpr_at_fpr[f]`, the largest true-positive rate
  whose false-positive rate is at most f, and `threshold_at_fpr[f]`, the score threshold
  that gives it (the lowest positive score above the floor(f * negatives) + 1-th highest
  negative score). A query is then accepted as "known" iff its best match scores at least
  the threshold (`python -m ctl_jax.search --min_score=auto:f --calibration=metrics.json`).

The scores are those a plain cosine search gives (`ctl_jax.search`), so they ignore
re-ranking and query expansion. All negatives are kept and sorted once (4 bytes a pair:
214 MB at Market-1501 size); similarities are computed in chunks of queries. Beyond
`max_pairs` pairs (1 GB of scores) an evenly spaced subset of the queries is used and the
block says how many (`queries_used`).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ctl_jax.evaluation.chunking import query_chunk_rows
from ctl_jax.evaluation.ranking import l2_normalize

FPR_TARGETS = (1e-4, 1e-3, 1e-2)
_CURVE_POINTS = 200
MAX_PAIRS = 2**28


@dataclasses.dataclass(frozen=True)
class RocCurve:
    """TPR at log-spaced FPRs from 1 / negatives to 1, for plotting.

    Attributes:
      fpr: (P,) float64 false-positive rates.
      tpr: (P,) float64 largest true-positive rate at each (FPR at most fpr).
    """

    fpr: np.ndarray
    tpr: np.ndarray


def fpr_key(fpr: float) -> str:
    """The JSON key of a target FPR: "0.0001", "0.001", "0.01"."""
    return str(float(fpr))


def verification_metrics(
    query_emb: np.ndarray,
    query_pids: np.ndarray,
    query_cams: np.ndarray,
    gallery_emb: np.ndarray,
    gallery_pids: np.ndarray,
    gallery_cam_masks: np.ndarray,
    fpr_targets: tuple[float, ...] = FPR_TARGETS,
    max_pairs: int = MAX_PAIRS,
) -> tuple[dict, RocCurve]:
    """Pair verification metrics of queries against a gallery (see the module docstring).

    Args:
      query_emb: (Q, D) query embeddings (normalised here).
      query_pids, query_cams: (Q,) identities and camera ids as the filter sees them.
      gallery_emb: (G, D) gallery item embeddings, images or centroids (normalised here).
      gallery_pids, gallery_cam_masks: (G,) identities and camera bitmasks.
      fpr_targets: the false-positive rates to report.
      max_pairs: above Q * G = max_pairs, every s-th query is used (s = ceil(Q G / max_pairs)).

    Returns:
      ({"pairs", "positives", "auc", "tpr_at_fpr": {key: tpr}, "threshold_at_fpr":
      {key: threshold}} plus "queries_used" when sampled, RocCurve). AUC, TPRs and
      thresholds are NaN without positives or negatives.
    """
    check_fpr_targets(fpr_targets)
    q = l2_normalize(query_emb)
    g = l2_normalize(gallery_emb)
    pairs = VerificationPairs(query_pids, query_cams, gallery_pids, gallery_cam_masks, max_pairs)
    q = q[:: pairs.stride]  # only the sampled queries' similarities are computed
    chunk = query_chunk_rows(len(g), 4)  # one float32 block
    block = np.empty((min(chunk, len(q)), len(g)), np.float32)
    for s in range(0, len(q), chunk):
        rows = block[: min(chunk, len(q) - s)]
        np.matmul(q[s : s + len(rows)], g.T, out=rows)
        pairs.add_sampled(s, rows)
    return pairs.finish(fpr_targets)


def check_fpr_targets(fpr_targets) -> None:
    for target in fpr_targets:
        if not 0 < target < 1:
            raise ValueError(f"FPR targets must lie in (0, 1), got {target}")


class VerificationPairs:
    """The scores of every query-gallery pair, given block by block (`add`), then the
    metrics (`finish`). `evaluate` feeds it the similarity blocks the ranking computes
    anyway, so the (Q, G) matmul runs once for both.

    Args:
      query_pids, query_cams: (Q,) identities and camera ids as the filter sees them.
      gallery_pids, gallery_cam_masks: (G,) identities and camera bitmasks.
      max_pairs: above Q * G = max_pairs, every s-th query is used.
    """

    def __init__(self, query_pids, query_cams, gallery_pids, gallery_cam_masks, max_pairs):
        q_pids = np.asarray(query_pids, np.int64)
        q_cams = np.asarray(query_cams, np.int64)
        g_pids = np.asarray(gallery_pids, np.int64)
        g_masks = np.asarray(gallery_cam_masks, np.int64)
        num_q, num_g = len(q_pids), len(g_pids)
        self.stride = stride = max(1, -(-num_q * num_g // max_pairs))
        q_pids, q_cams = q_pids[::stride], q_cams[::stride]
        self.num_q, self.num_g = len(q_pids), num_g

        # Same-pid pairs (sparse): positives, or removed by the camera rule.
        by_pid = np.argsort(g_pids, kind="stable")
        sorted_pids = g_pids[by_pid]
        lo = np.searchsorted(sorted_pids, q_pids, side="left")
        hi = np.searchsorted(sorted_pids, q_pids, side="right")
        counts = hi - lo
        self.pair_q = np.repeat(np.arange(self.num_q), counts)
        offsets = np.arange(len(self.pair_q)) - np.repeat(np.cumsum(counts) - counts, counts)
        self.pair_g = by_pid[np.repeat(lo, counts) + offsets]
        self.removed = ((g_masks[self.pair_g] >> q_cams[self.pair_q]) & 1).astype(bool)
        # All scores; same-pid pairs set to +inf, so that after one sort the negatives are
        # the first `num_neg` entries.
        self.all_scores = np.empty(self.num_q * num_g, np.float32)
        self.positives = np.empty(int((~self.removed).sum()), np.float32)
        self.pos_seen = 0

    def add(self, start: int, block: np.ndarray) -> None:
        """Scores (n, G) of queries start .. start + n - 1 (the queries' own numbering;
        blocks in increasing order; the rows the sampling skips are ignored). `block` is
        not changed."""
        first = -(-start // self.stride)  # first used query at or after `start`
        if first * self.stride < start + len(block):
            self.add_sampled(first, block[first * self.stride - start :: self.stride])

    def add_sampled(self, first: int, block: np.ndarray) -> None:
        """Scores (n, G) of the sampled queries first .. first + n - 1 (every stride-th)."""
        last = first + len(block)
        scores = self.all_scores[first * self.num_g : last * self.num_g].reshape(-1, self.num_g)
        np.copyto(scores, block)
        in_chunk = slice(*np.searchsorted(self.pair_q, [first, last]))
        rows, cols = self.pair_q[in_chunk] - first, self.pair_g[in_chunk]
        gone = self.removed[in_chunk]
        n_pos = int((~gone).sum())
        self.positives[self.pos_seen : self.pos_seen + n_pos] = scores[rows[~gone], cols[~gone]]
        self.pos_seen += n_pos
        scores[rows, cols] = np.inf

    def finish(self, fpr_targets=FPR_TARGETS) -> tuple[dict, RocCurve]:
        """The metrics of `verification_metrics`, once every query's block was added."""
        check_fpr_targets(fpr_targets)
        positives = self.positives
        num_pos = len(positives)
        num_neg = self.num_q * self.num_g - len(self.pair_q)
        all_scores = self.all_scores
        all_scores.sort()
        negatives = all_scores[:num_neg]
        positives.sort()

        summary = {"pairs": num_pos + num_neg, "positives": num_pos}
        if self.stride > 1:
            summary["queries_used"] = self.num_q
        nan = float("nan")
        if num_pos and num_neg:
            # Per positive: negatives strictly below it plus half of those equal to it.
            below = np.searchsorted(negatives, positives, side="left")
            equal = np.searchsorted(negatives, positives, side="right") - below
            summary["auc"] = float((below.sum() + 0.5 * equal.sum()) / (num_pos * num_neg))
        else:
            summary["auc"] = nan
        tpr, threshold = _tpr_at_fpr(positives, negatives, np.asarray(fpr_targets, np.float64))
        summary["tpr_at_fpr"] = {fpr_key(f): float(t) for f, t in zip(fpr_targets, tpr)}
        summary["threshold_at_fpr"] = {fpr_key(f): float(t) for f, t in zip(fpr_targets, threshold)}

        if num_pos and num_neg:
            grid = np.logspace(math.log10(1.0 / num_neg), 0.0, _CURVE_POINTS)
            curve = RocCurve(grid, _tpr_at_fpr(positives, negatives, grid)[0])
        else:
            curve = RocCurve(np.zeros(0), np.zeros(0))
        self.all_scores = self.positives = None  # the memory goes with the caller's reference
        return summary, curve


def _tpr_at_fpr(positives, negatives, targets) -> tuple[np.ndarray, np.ndarray]:
    """Largest TPR with FPR <= each target, and its threshold (accept score >= threshold).

    Args:
      positives, negatives: sorted ascending float32 scores.
      targets: (T,) false-positive rates.

    Returns:
      (T,) TPRs and (T,) float thresholds; NaN without positives or negatives.
    """
    num_pos, num_neg = len(positives), len(negatives)
    if not (num_pos and num_neg):
        return np.full(len(targets), np.nan), np.full(len(targets), np.nan)
    # At most m = floor(f * negatives) false positives: the threshold must lie above the
    # (m + 1)-th highest negative score (every threshold at or below it accepts m + 1).
    allowed = np.floor(targets * num_neg + 1e-9).astype(np.int64)
    bound = np.where(
        allowed < num_neg, negatives[np.maximum(num_neg - 1 - allowed, 0)], -np.inf
    ).astype(np.float32)
    first_above = np.searchsorted(positives, bound, side="right")
    tpr = (num_pos - first_above) / num_pos
    # The lowest positive score above the bound; with none, just above the bound.
    threshold = np.where(
        first_above < num_pos,
        positives[np.minimum(first_above, num_pos - 1)],
        np.nextafter(bound, np.float32(np.inf)),
    ).astype(np.float64)
    return tpr, threshold
