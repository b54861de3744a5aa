"""Multi-image queries (`search --query_centroids`): the images of one query identity (a
tracklet, several photos of one product) searched as one query, their centroid, as the
gallery side does (docs/method.md, 'Evaluation modes')."""

from __future__ import annotations

import numpy as np

from ctl_jax.evaluation.centroids import identity_sums
from ctl_jax.retrieval.embedding_file import Embeddings
from ctl_jax.retrieval.labels import UNKNOWN


def query_centroids(embeddings: Embeddings) -> tuple[Embeddings, list[list[str]]]:
    """One query per identity label: the mean of its images' un-normalised embeddings.

    Queries of unknown identity (label "") stay single-image queries. Groups are listed in
    the order of their first image.

    Args:
      embeddings: N query images.

    Returns:
      (Embeddings with one row per group: the centroid (not normalised), the group's pid
      and label, its first image's path, and its camera when all its images share one
      (-1 otherwise); per group the paths of its images, in input order).
    """
    labels = embeddings.labels
    # Unknown images get keys of their own ("\0" cannot start a label read from a file name).
    own = np.char.add("\0", np.arange(len(labels)).astype(str))
    keys = np.where(labels == UNKNOWN, own, labels)
    _, first, member = np.unique(keys, return_index=True, return_inverse=True)
    member = member.reshape(-1)
    _, sums, counts, _ = identity_sums(embeddings.embeddings, member)
    # A group's camera: the one camera all its images share, else -1.
    pairs = np.unique(np.stack([member, embeddings.camids], axis=1), axis=0)
    cameras_per_group = np.bincount(pairs[:, 0], minlength=len(first))
    cams = np.where(cameras_per_group == 1, embeddings.camids[first], -1)
    order = np.argsort(first, kind="stable")
    by_group = np.argsort(member, kind="stable")
    bounds = np.cumsum(np.bincount(member, minlength=len(first)))[:-1]
    members = np.split(embeddings.paths[by_group], bounds)
    grouped = Embeddings(
        (sums / counts[:, None]).astype(np.float32)[order],
        embeddings.pids[first][order],
        cams[order],
        embeddings.paths[first][order],
        labels[first][order],
    )
    return grouped, [members[g].tolist() for g in order]
