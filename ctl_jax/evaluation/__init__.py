"""Retrieval evaluation on numpy arrays: centroid galleries per mode, CMC/mAP/mINP,
k-reciprocal re-ranking, query expansion, pair verification, reports and plots.

Knows nothing about models or image files; the only file it touches is the metrics JSON
written by `write_metrics_json`.
"""

from ctl_jax.evaluation.centroids import SearchGallery, build_search_gallery
from ctl_jax.evaluation.protocol import DEFAULT_MODES, MODES, VERIFICATION, evaluate
from ctl_jax.evaluation.query_expansion import QueryExpansionParams, expand_queries
from ctl_jax.evaluation.ranking import DEFAULT_RANKS, l2_normalize, rank_metrics, rank_scores
from ctl_jax.evaluation.report import format_table, format_verification, write_metrics_json
from ctl_jax.evaluation.rerank import RerankParams, rerank_distances
from ctl_jax.evaluation.verification import verification_metrics

__all__ = [
    "DEFAULT_MODES",
    "DEFAULT_RANKS",
    "MODES",
    "VERIFICATION",
    "QueryExpansionParams",
    "RerankParams",
    "SearchGallery",
    "build_search_gallery",
    "evaluate",
    "expand_queries",
    "format_table",
    "format_verification",
    "l2_normalize",
    "rank_metrics",
    "rank_scores",
    "rerank_distances",
    "verification_metrics",
    "write_metrics_json",
]
