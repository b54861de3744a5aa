"""The search gallery of each evaluation mode: gallery images or identity centroids.

A centroid is the mean of the UN-normalised embeddings of some gallery images of one pid;
it is normalised later like any embedding (the original code does the same: it normalises
the concatenated [queries; centroids] features before ranking).

Every gallery item carries a camera bitmask (bit c set for each camera it was built from),
so that a single rule filters every mode (see `ranking.py`): item j is removed from query
q's ranking iff `pid_j == pid_q and (mask_j >> cam_q) & 1`.

Modes:
* `instance`: the gallery images as they are, mask = 1 << camid.
* `centroid`: one centroid per gallery pid; cameras off (queries count as camera 0,
  centroids have mask 1 << 1, so nothing is ever removed).
* `centroid_camera`: for each gallery pid that has queries and each camera c among its
  queries, one centroid of the pid's gallery images whose camera is not c (none if every
  image is from c; a camera set already built for the pid is not built twice). Pids
  without queries (distractors, pid 0 included) get one centroid of all their images.
* `centroid_camera_reference`: the original code (centroids-reid
  `validation_create_centroids`), slip included: gallery image j's camera is read at
  position j of the concatenated [query; gallery] camera list, and pids without queries
  get no centroid at all.

Centroids are listed by ascending pid, and within a pid by ascending query camera (the
original's order); ties in the ranking are broken by this order.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ctl_jax.errors import InvalidValueError

MAX_CAMERA = 62  # camera c is bit c of an int64 mask


@dataclasses.dataclass(frozen=True)
class SearchGallery:
    """What queries are ranked against in one mode.

    Attributes:
      embeddings: (K, D) float32, un-normalised (images or centroids).
      pids: (K,) int64 identity of each item.
      cam_masks: (K,) int64 bitmask of the cameras each item was built from.
      query_cams: (Q,) int64 camera ids of the queries as the filter sees them (all 0 in
        `centroid` mode, the real ones otherwise).
    """

    embeddings: np.ndarray
    pids: np.ndarray
    cam_masks: np.ndarray
    query_cams: np.ndarray

    def __len__(self) -> int:
        return len(self.pids)


def camera_masks(camids: np.ndarray) -> np.ndarray:
    """(N,) camera ids in 0..62 -> (N,) int64 bitmasks 1 << camid."""
    camids = check_cameras(camids, "camera")
    return np.left_shift(np.int64(1), camids)


def check_cameras(camids: np.ndarray, what: str) -> np.ndarray:
    camids = np.asarray(camids, dtype=np.int64)
    if camids.size and (camids.min() < 0 or camids.max() > MAX_CAMERA):
        bad = camids[(camids < 0) | (camids > MAX_CAMERA)]
        raise InvalidValueError(
            f"{what} ids must lie in 0..{MAX_CAMERA} for camera-aware evaluation; "
            f"got {np.unique(bad)[:5].tolist()} (use mode 'centroid' when cameras are unknown)"
        )
    return camids


def build_search_gallery(
    mode: str,
    gallery_emb: np.ndarray,
    gallery_pids: np.ndarray,
    gallery_camids: np.ndarray,
    query_pids: np.ndarray,
    query_camids: np.ndarray,
) -> SearchGallery:
    """Builds the search gallery of `mode` (see the module docstring).

    Args:
      mode: one of "instance", "centroid", "centroid_camera", "centroid_camera_reference".
      gallery_emb: (G, D) un-normalised gallery embeddings.
      gallery_pids, gallery_camids: (G,) int identities and 0-based cameras.
      query_pids, query_camids: (Q,) int identities and 0-based cameras of the queries.

    Returns:
      The SearchGallery of the mode.
    """
    g_emb = np.asarray(gallery_emb, dtype=np.float32)
    g_pids = np.asarray(gallery_pids, dtype=np.int64)
    q_pids = np.asarray(query_pids, dtype=np.int64)
    if mode == "centroid":
        uniq, sums, counts, _ = _group_sums(g_emb, g_pids, np.zeros_like(g_pids))
        return SearchGallery(
            embeddings=(sums / counts[:, None]).astype(np.float32),
            pids=uniq,
            cam_masks=np.full(len(uniq), 1 << 1, np.int64),
            query_cams=np.zeros(len(q_pids), np.int64),
        )
    q_cams = check_cameras(query_camids, "query camera")
    g_cams = check_cameras(gallery_camids, "gallery camera")
    if mode == "instance":
        return SearchGallery(g_emb, g_pids, camera_masks(g_cams), q_cams)
    if mode == "centroid_camera":
        return _camera_centroids(g_emb, g_pids, g_cams, q_pids, q_cams, distractors=True)
    if mode == "centroid_camera_reference":
        # The original indexes the concatenated [query; gallery] camera list with
        # gallery-relative indices: gallery image j "has" camera concat[j].
        slipped = np.concatenate([q_cams, g_cams])[: len(g_cams)]
        return _camera_centroids(g_emb, g_pids, slipped, q_pids, q_cams, distractors=False)
    raise ValueError(f"unknown evaluation mode {mode!r}")


def _group_sums(emb, pids, cams):
    """Sums of `emb` rows per (pid, cam) group, groups sorted by (pid, cam).

    Returns (group pids (K,), sums (K, D) float64, counts (K,), group cams (K,)).
    """
    order = np.lexsort((cams, pids))
    s_pids, s_cams = pids[order], cams[order]
    new = np.ones(len(order), bool)
    new[1:] = (s_pids[1:] != s_pids[:-1]) | (s_cams[1:] != s_cams[:-1])
    starts = np.flatnonzero(new)
    ends = np.append(starts[1:], len(order))
    sums = _segment_sums(emb, order, starts, ends)
    return s_pids[starts], sums, ends - starts, s_cams[starts]


def _segment_sums(x, order, starts, ends):
    """(K, D) float64 sums of the rows `x[order[s:e]]` for each segment (s, e).

    A loop over segments (identities or identity-camera pairs, not images) is ~10x faster
    here than `np.add.reduceat(x[order], starts, axis=0)` with its strided row access.
    """
    sums = np.empty((len(starts), x.shape[1]), np.float64)
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        np.add.reduce(x[order[s:e]], axis=0, dtype=np.float64, out=sums[i])
    return sums


def _camera_centroids(g_emb, g_pids, g_cams, q_pids, q_cams, distractors):
    """Camera-aware centroids; `distractors` adds one centroid per pid without queries."""
    # Per (pid, camera) sums, then per pid totals and camera masks.
    pc_pids, pc_sums, pc_counts, pc_cams = _group_sums(g_emb, g_pids, g_cams)
    pids, pid_start = np.unique(pc_pids, return_index=True)
    if len(pids) == 0:
        dim = g_emb.shape[1]
        return SearchGallery(np.zeros((0, dim), np.float32), pids, pids.copy(), q_cams)
    pid_end = np.append(pid_start[1:], len(pc_pids))
    pid_sums = _segment_sums(pc_sums, np.arange(len(pc_pids)), pid_start, pid_end)
    pid_counts = np.add.reduceat(pc_counts, pid_start)
    pid_masks = np.bitwise_or.reduceat(np.left_shift(np.int64(1), pc_cams), pid_start)
    pc_pid_idx = np.searchsorted(pids, pc_pids)
    pc_keys = pc_pid_idx * 64 + pc_cams  # sorted, since groups are sorted by (pid, cam)

    # Candidates: one per distinct (pid, query camera) among queries whose pid is in the
    # gallery, ordered by (pid, camera). Each leaves that camera out of the pid's images.
    q_in = np.isin(q_pids, pids)
    qk = np.unique(np.searchsorted(pids, q_pids[q_in]) * 64 + q_cams[q_in])
    cand_pid, cand_cam = qk // 64, qk % 64
    used = pid_masks[cand_pid] & ~np.left_shift(np.int64(1), cand_cam)
    keep = used != 0  # every image of the pid is from that camera: no centroid
    cand_pid, cand_cam, used, qk = cand_pid[keep], cand_cam[keep], used[keep], qk[keep]
    # A camera set already built for this pid is not built twice (keep the first).
    _, first = np.unique(np.stack([cand_pid, used], axis=1), axis=0, return_index=True)
    first = np.sort(first)
    cand_pid, cand_cam, used, qk = cand_pid[first], cand_cam[first], used[first], qk[first]
    # Sum of the left-out camera's images (zero if the pid has none from it).
    pos = np.minimum(np.searchsorted(pc_keys, qk), len(pc_keys) - 1)
    has = pc_keys[pos] == qk
    sums = pid_sums[cand_pid] - np.where(has[:, None], pc_sums[pos], 0.0)
    counts = pid_counts[cand_pid] - np.where(has, pc_counts[pos], 0)
    order_key = cand_cam

    if distractors:
        no_query = np.flatnonzero(~np.isin(pids, q_pids))
        cand_pid = np.concatenate([cand_pid, no_query])
        used = np.concatenate([used, pid_masks[no_query]])
        sums = np.concatenate([sums, pid_sums[no_query]])
        counts = np.concatenate([counts, pid_counts[no_query]])
        order_key = np.concatenate([order_key, np.full(len(no_query), -1)])

    order = np.lexsort((order_key, cand_pid))
    return SearchGallery(
        embeddings=(sums[order] / counts[order, None]).astype(np.float32),
        pids=pids[cand_pid[order]],
        cam_masks=used[order],
        query_cams=q_cams,
    )
