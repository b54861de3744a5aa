"""Retrieval evaluation on numpy arrays: centroid galleries per mode, CMC/mAP, reports.

Knows nothing about models or image files; the only file it touches is the metrics JSON
written by `write_metrics_json`.
"""

from ctl_jax.evaluation.centroids import SearchGallery, build_search_gallery
from ctl_jax.evaluation.protocol import DEFAULT_MODES, MODES, evaluate
from ctl_jax.evaluation.ranking import DEFAULT_RANKS, l2_normalize, rank_metrics
from ctl_jax.evaluation.report import format_table, write_metrics_json

__all__ = [
    "DEFAULT_MODES",
    "DEFAULT_RANKS",
    "MODES",
    "SearchGallery",
    "build_search_gallery",
    "evaluate",
    "format_table",
    "l2_normalize",
    "rank_metrics",
    "write_metrics_json",
]
