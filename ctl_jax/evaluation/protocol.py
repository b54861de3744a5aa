"""`evaluate`: the search gallery of each mode, then CMC/mAP/mINP of the queries against
it, optionally after query expansion and re-ranking, and pair verification metrics."""

from __future__ import annotations

import numpy as np

from ctl_jax.errors import InvalidValueError
from ctl_jax.evaluation.centroids import build_search_gallery
from ctl_jax.evaluation.query_expansion import QueryExpansionParams, expand_queries
from ctl_jax.evaluation.ranking import DEFAULT_RANKS, rank_metrics, rank_scores
from ctl_jax.evaluation.rerank import RerankParams, fit_rerank_params, rerank_distances
from ctl_jax.evaluation.verification import MAX_PAIRS, VerificationPairs, verification_metrics

MODES = ("instance", "centroid", "centroid_camera", "centroid_camera_reference")
DEFAULT_MODES = ("instance", "centroid_camera")
VERIFICATION = "verification"  # the results key of the verification blocks
CMC_CURVE_RANKS = 50  # length of the CMC curve `return_curves` gives


def evaluate(
    query_emb: np.ndarray,
    query_pids: np.ndarray,
    query_camids: np.ndarray,
    gallery_emb: np.ndarray,
    gallery_pids: np.ndarray,
    gallery_camids: np.ndarray,
    modes: tuple[str, ...] | list[str] | str = DEFAULT_MODES,
    ranks: tuple[int, ...] = DEFAULT_RANKS,
    *,
    query_expansion: QueryExpansionParams | None = None,
    rerank: RerankParams | None = None,
    verification: bool = False,
    return_curves: bool = False,
):
    """Evaluates query embeddings against a gallery in each of `modes`.

    Per mode: the mode's gallery items (images or centroids, `build_search_gallery`); with
    `query_expansion` the queries and those items are expanded (`expand_queries`); with
    `rerank` they are ranked by the k-reciprocal distance (`rerank_distances`) instead of
    the cosine; the same protocol (camera filter, junk removal) then ranks them.

    Args:
      query_emb: (Q, D) query embeddings (BNNeck output, normalised or not).
      query_pids, query_camids: (Q,) int identities and 0-based cameras.
      gallery_emb: (G, D) un-normalised gallery embeddings (centroids are means of these).
      gallery_pids, gallery_camids: (G,) int identities and 0-based cameras.
      modes: names from `MODES` (a comma-separated string is accepted too).
      ranks: the k of the reported CMC@k.
      query_expansion: alpha-QE parameters, or None.
      rerank: k-reciprocal re-ranking parameters, or None (applied after the expansion).
      verification: also compute pair verification metrics per mode (on the plain cosine
        of the embeddings given, which is what `ctl_jax.search` thresholds).
      return_curves: also return the curves `plots.write_plots` draws.

    Returns:
      {mode: {"mAP", "mINP", "rank<k>"..., "num_query", "num_gallery"}} in the order of
      `modes` (see `rank_metrics`), plus {"verification": {mode: {...}}} with
      `verification` (see `verification_metrics`). With `return_curves`, the pair
      (results, {mode: {"cmc": (50,) CMC@1..50, "roc": RocCurve or None}}).
    """
    modes = _check_modes(modes)
    q_emb = _check_embeddings(query_emb, "query")
    g_emb = _check_embeddings(gallery_emb, "gallery")
    if q_emb.shape[1] != g_emb.shape[1]:
        raise InvalidValueError(
            f"query and gallery embeddings differ in dimension: {q_emb.shape[1]} vs "
            f"{g_emb.shape[1]}"
        )
    q_pids = _check_labels(query_pids, len(q_emb), "query pids")
    q_cams = _check_labels(query_camids, len(q_emb), "query camids")
    g_pids = _check_labels(gallery_pids, len(g_emb), "gallery pids")
    g_cams = _check_labels(gallery_camids, len(g_emb), "gallery camids")

    results, verified, curves = {}, {}, {}
    curve_ranks = CMC_CURVE_RANKS if return_curves else 0
    for mode in modes:
        gallery = build_search_gallery(mode, g_emb, g_pids, g_cams, q_pids, q_cams)
        queries, items = q_emb, gallery.embeddings
        if query_expansion is not None:
            queries, items = expand_queries(queries, items, query_expansion)
        q_cams_seen, g_pids_mode, g_masks = gallery.query_cams, gallery.pids, gallery.cam_masks
        pairs = None
        if rerank is not None:
            params = fit_rerank_params(rerank, len(items), f"{mode} gallery")
            scores = rerank_distances(queries, items, params, gallery=f"{mode} gallery")
            np.negative(scores, out=scores)  # in place: (Q, G) can be large
            metrics = rank_scores(
                scores,
                q_pids,
                q_cams_seen,
                g_pids_mode,
                g_masks,
                ranks=ranks,
                cmc_curve=curve_ranks,
            )
        else:
            # Verification scores the plain cosine of these same embeddings: the ranking's
            # similarity blocks serve it, one matmul for both.
            if verification and query_expansion is None:
                pairs = VerificationPairs(q_pids, q_cams_seen, g_pids_mode, g_masks, MAX_PAIRS)
            metrics = rank_metrics(
                queries,
                q_pids,
                q_cams_seen,
                items,
                g_pids_mode,
                g_masks,
                ranks=ranks,
                cmc_curve=curve_ranks,
                on_scores=pairs.add if pairs is not None else None,
            )
        metrics["num_gallery"] = len(gallery)
        curves[mode] = {"cmc": metrics.pop("cmc", None), "roc": None}
        results[mode] = metrics
        if verification and pairs is not None:
            verified[mode], curves[mode]["roc"] = pairs.finish()
        elif verification:
            verified[mode], curves[mode]["roc"] = verification_metrics(
                q_emb, q_pids, q_cams_seen, gallery.embeddings, g_pids_mode, g_masks
            )
    if verification:
        results[VERIFICATION] = verified
    return (results, curves) if return_curves else results


def _check_modes(modes) -> tuple[str, ...]:
    if isinstance(modes, str):
        modes = [m.strip() for m in modes.split(",") if m.strip()]
    modes = tuple(modes)
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise InvalidValueError(
            f"unknown evaluation mode(s) {unknown or list(modes)}; valid modes: {', '.join(MODES)}"
        )
    if len(set(modes)) != len(modes):
        raise InvalidValueError(f"evaluation modes repeated: {list(modes)}")
    return modes


def _check_embeddings(emb, what) -> np.ndarray:
    emb = np.asarray(emb)
    if emb.ndim != 2:
        raise InvalidValueError(f"{what} embeddings must be 2-D (N, D), got shape {emb.shape}")
    if not np.issubdtype(emb.dtype, np.floating):
        raise InvalidValueError(f"{what} embeddings must be floating point, got {emb.dtype}")
    if not np.isfinite(emb).all():
        raise InvalidValueError(f"{what} embeddings contain NaN or infinite values")
    return emb.astype(np.float32, copy=False)


def _check_labels(labels, n, what) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n:
        raise InvalidValueError(
            f"{what} must be a 1-D array of length {n} (one per embedding), got shape "
            f"{labels.shape}"
        )
    integral = np.issubdtype(labels.dtype, np.integer) or (
        np.issubdtype(labels.dtype, np.floating) and np.array_equal(labels, np.round(labels))
    )
    if labels.size and not integral:
        raise InvalidValueError(f"{what} must be integers, got dtype {labels.dtype}")
    return labels.astype(np.int64)
