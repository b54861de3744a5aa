"""Multi-image queries in evaluation (`evaluate --query_centroids`): the queries of one
identity are replaced by their centroid (mean of the un-normalised embeddings), as the
gallery side of the `centroid` modes is.

Which queries form a group depends on the mode, so that the same-camera rule keeps its
meaning: in `centroid` mode (no camera filtering) all queries of an identity form one
group; in the camera-aware modes (`instance`, `centroid_camera`,
`centroid_camera_reference`) the queries of one identity *and camera* do (a tracklet), since
a query built from several cameras would have no single camera to filter by. Queries of
unknown identity (pid < 0) stay single.
"""

from __future__ import annotations

import numpy as np

from ctl_jax.evaluation.centroids import identity_sums
from ctl_jax.evaluation.protocol import VERIFICATION, evaluate

CAMERA_FREE_MODES = ("centroid",)


def group_queries(
    embeddings: np.ndarray, pids: np.ndarray, camids: np.ndarray, by_camera: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Query centroids.

    Args:
      embeddings: (Q, D) un-normalised query embeddings.
      pids, camids: (Q,) int identities (-1 unknown) and cameras.
      by_camera: group by (identity, camera) instead of identity.

    Returns:
      (embeddings (G, D) float32 means, pids (G,), camids (G,)): groups in the order of
      their first query; a group's camera is its first query's (the only one when
      `by_camera`).
    """
    pids = np.asarray(pids, np.int64)
    camids = np.asarray(camids, np.int64)
    single = np.where(pids < 0, np.arange(len(pids)), -1)  # unknown identity: its own group
    keys = np.stack([pids, camids if by_camera else np.zeros_like(camids), single], axis=1)
    _, first, member = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    member = member.reshape(-1)
    _, sums, counts, _ = identity_sums(embeddings, member)
    order = np.argsort(first, kind="stable")
    means = (sums / counts[:, None]).astype(np.float32)
    return means[order], pids[first][order], camids[first][order]


def evaluate_query_centroids(
    query_emb,
    query_pids,
    query_camids,
    gallery_emb,
    gallery_pids,
    gallery_camids,
    modes,
    **options,
):
    """`evaluation.evaluate` with query centroids (see the module docstring): the same
    arguments and return value; each mode's `num_query` counts query groups."""
    modes = [modes] if isinstance(modes, str) else list(modes)
    parts = [
        ([m for m in modes if m in CAMERA_FREE_MODES], False),
        ([m for m in modes if m not in CAMERA_FREE_MODES], True),
    ]
    merged, curves = {}, {}
    for part_modes, by_camera in parts:
        if not part_modes:
            continue
        q_emb, q_pids, q_cams = group_queries(query_emb, query_pids, query_camids, by_camera)
        out = evaluate(
            q_emb,
            q_pids,
            q_cams,
            gallery_emb,
            gallery_pids,
            gallery_camids,
            modes=tuple(part_modes),
            **options,
        )
        if options.get("return_curves"):
            out, part_curves = out
            curves.update(part_curves)
        for key, value in out.items():
            if key == VERIFICATION:
                merged.setdefault(VERIFICATION, {}).update(value)
            else:
                merged[key] = value
    results = {mode: merged[mode] for mode in modes}
    if VERIFICATION in merged:
        results[VERIFICATION] = {m: merged[VERIFICATION][m] for m in modes}
    return (results, curves) if options.get("return_curves") else results
