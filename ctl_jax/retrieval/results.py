"""The search-results JSON (docs/formats.md, 'Search results JSON').

`{"queries": [{"path": str, "label": str or null, "pid": int, "matches": [{"label": str or
null, "pid": int, "path": str or null, "score": float}, ...]}, ...], "meta": {...}}`: queries
in input order (with `search --query_centroids`, one per query identity, with its images
under "paths"), matches best first,
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
from ctl_jax.retrieval.labels import labels_from_pids


def matches(scores: np.ndarray, indices: np.ndarray, items: GalleryItems) -> list[list[dict]]:
    """Per query its matches, best first: `{"label", "pid", "path", "score"}` each.

    Args:
      scores: (Q, k) cosine similarities, best first.
      indices: (Q, k) gallery rows; -1 (an approximate index found fewer than k, or a match
        below a score threshold) is left out.
      items: the gallery the rows refer to.

    `label` is the identity's name (null where unknown), `pid` its number (-1 where
    unknown), `path` the gallery image (null for a centroid, which is an identity).
    """
    indices = np.asarray(indices).reshape(len(scores), -1)
    found = indices >= 0
    rows = np.where(found, indices, 0)
    match_pids = np.where(found, items.pids[rows], -1).tolist()
    match_labels = items.labels[rows].tolist()
    if items.kind == "centroid":
        match_paths = np.full(indices.shape, None, dtype=object).tolist()
    else:
        match_paths = items.paths[rows].tolist()
    # Six decimals: float32 similarities carry no more.
    rounded = np.round(np.asarray(scores, np.float64), 6).tolist()
    found = found.tolist()
    return [
        [
            {"label": label or None, "pid": p, "path": mp, "score": s}
            for label, p, mp, s, ok in zip(
                match_labels[q], match_pids[q], match_paths[q], rounded[q], found[q]
            )
            if ok
        ]
        for q in range(len(found))
    ]


def results_document(
    query_paths: np.ndarray,
    query_pids: np.ndarray,
    scores: np.ndarray,
    indices: np.ndarray,
    items: GalleryItems,
    meta: dict | None = None,
    known: np.ndarray | None = None,
    query_labels: np.ndarray | None = None,
    query_members: list[list[str]] | None = None,
) -> dict:
    """The JSON-able results.

    Args:
      query_paths: (Q,) query image paths (for a query centroid, its first image).
      query_pids: (Q,) query identities, -1 where unknown.
      scores: (Q, k) cosine similarities, best first.
      indices: (Q, k) gallery rows; -1 (an approximate index found fewer than k) is left out.
      items: the gallery the rows refer to.
      meta: stored under "meta" when given.
      known: (Q,) bool, stored per query as "known" when given.
      query_labels: (Q,) query identity names ("" where unknown); default from the pids.
      query_members: per query centroid the paths of its images, stored as "paths".
    """
    query_pids = np.asarray(query_pids, np.int64)
    if query_labels is None:
        query_labels = labels_from_pids(query_pids)
    found = matches(scores, indices, items)
    queries = [
        {"path": str(path), "label": label or None, "pid": int(pid), "matches": hits}
        for path, label, pid, hits in zip(
            np.asarray(query_paths).tolist(),
            np.asarray(query_labels).astype(str).tolist(),
            query_pids.tolist(),
            found,
        )
    ]
    if query_members is not None:
        for query, members in zip(queries, query_members):
            query["paths"] = [str(m) for m in members]
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


def format_table(document: dict) -> str:
    """The matches of a results document as a compact text table per query, for the
    terminal (`search` without `--output`): rank, score, label and path of each match."""
    lines = []
    queries = document["queries"]
    for number, query in enumerate(queries, 1):
        who = f" ({query['label']})" if query.get("label") else ""
        members = query.get("paths")
        images = f", {len(members)} images" if members and len(members) > 1 else ""
        unknown = "; no match above --min_score" if query.get("known") is False else ""
        lines.append(f"query {number}/{len(queries)}: {query['path']}{who}{images}{unknown}")
        matches = query["matches"]
        if not matches:
            continue
        width = max(5, *(len(m["label"] or "-") for m in matches))
        lines.append(f"  rank   score  {'label':<{width}}  path")
        for rank, match in enumerate(matches, 1):
            path = match["path"] if match["path"] is not None else "(centroid)"
            label = match["label"] or "-"
            lines.append(f"  {rank:>4}  {match['score']:6.4f}  {label:<{width}}  {path}")
    return "\n".join(lines)
