"""The search-results JSON (docs/formats.md, 'Search results JSON').

`{"queries": [{"path": str, "pid": int, "matches": [{"pid": int, "path": str or null,
"score": float}, ...]}, ...], "meta": {...}}`: queries in input order, matches best first,
`score` the cosine similarity (for an `ivf_pq` index, its compressed estimate). With a
centroid gallery each match is an identity and its `path` is null. `meta` (an extension)
names the gallery, index method, top_k and, when measured, the recall@k of an approximate
index against exact search. With a score threshold (`search --min_score`) each query also
has "known": false when no match reached it, true otherwise, and `meta.min_score` records
the threshold (and its calibration).
"""

from __future__ import annotations

import json
import os
import pathlib

import numpy as np

from ctl_jax import files
from ctl_jax.retrieval.gallery import GalleryItems


def results_document(
    query_paths: np.ndarray,
    query_pids: np.ndarray,
    scores: np.ndarray,
    indices: np.ndarray,
    items: GalleryItems,
    meta: dict | None = None,
    known: np.ndarray | None = None,
) -> dict:
    """The JSON-able results.

    Args:
      query_paths: (Q,) query image paths.
      query_pids: (Q,) query identities, -1 where unknown.
      scores: (Q, k) cosine similarities, best first.
      indices: (Q, k) gallery rows; -1 (an approximate index found fewer than k) is left out.
      items: the gallery the rows refer to.
      meta: stored under "meta" when given.
      known: (Q,) bool, stored per query as "known" when given.
    """
    indices = np.asarray(indices)
    found = indices >= 0
    rows = np.where(found, indices, 0)
    match_pids = np.where(found, items.pids[rows], -1).tolist()
    if items.kind == "centroid":
        match_paths = np.full(indices.shape, None, dtype=object).tolist()
    else:
        match_paths = items.paths[rows].tolist()
    # Six decimals: float32 similarities carry no more.
    rounded = np.round(np.asarray(scores, np.float64), 6).tolist()
    found = found.tolist()
    queries = [
        {
            "path": str(path),
            "pid": int(pid),
            "matches": [
                {"pid": p, "path": mp, "score": s}
                for p, mp, s, ok in zip(match_pids[q], match_paths[q], rounded[q], found[q])
                if ok
            ],
        }
        for q, (path, pid) in enumerate(zip(np.asarray(query_paths).tolist(), query_pids))
    ]
    if known is not None:
        for query, is_known in zip(queries, np.asarray(known, bool).tolist()):
            query["known"] = is_known
    document = {"queries": queries}
    if meta is not None:
        document["meta"] = meta
    return document


def write_json(path: str | os.PathLike, document: dict, overwrite: bool = False) -> pathlib.Path:
    """Writes `document` atomically. Raises FileExistsError unless `overwrite`."""
    path = files.refuse_overwrite(path, overwrite)
    with files.atomic_open(path, "w") as f:
        json.dump(document, f, indent=1)
        f.write("\n")
    return path
