"""What a search index holds: the gallery items (instances or identity centroids) and their
normalised vectors, and the checks every index applies to a query batch.

A gallery is built from an embeddings file (see `ctl_jax.retrieval.embedding_file`):

* `instance`: one item per gallery image.
* `centroid`: one item per identity: the mean of the identity's UN-normalised embeddings,
  normalised afterwards. The centroids come from
  `ctl_jax.evaluation.centroids.build_search_gallery("centroid", ...)`, the code evaluation
  uses, so search and evaluation agree. Images of unknown identity (pid < 0) cannot join a
  centroid and are left out (the count is reported).

Shared by the exact index (`index.py`) and the faiss indexes (`approximate.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Protocol

import numpy as np

from ctl_jax.errors import InvalidValueError, OptionError
from ctl_jax.evaluation.centroids import identity_sums
from ctl_jax.evaluation.ranking import l2_normalize
from ctl_jax.retrieval.embedding_file import Embeddings
from ctl_jax.retrieval.labels import labels_from_pids

KINDS = ("instance", "centroid")


@dataclasses.dataclass(frozen=True)
class GalleryItems:
    """What each of the N searchable items is.

    Attributes:
      kind: "instance" (gallery images) or "centroid" (one item per identity).
      pids: (N,) int64 identities, -1 where unknown.
      camids: (N,) int64 0-based cameras, -1 where unknown (always -1 for centroids).
      paths: (N,) str image path (instances) or representative image path (centroids).
      counts: (N,) int64 number of gallery images behind each item.
      source: the embeddings file the gallery was built from ("" if none).
      labels: (N,) str identity names, "" where unknown; None derives them from the pids.
    """

    kind: str
    pids: np.ndarray
    camids: np.ndarray
    paths: np.ndarray
    counts: np.ndarray
    source: str = ""
    labels: np.ndarray | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"gallery kind must be one of {KINDS}, got {self.kind!r}")
        arrays = {
            "pids": np.asarray(self.pids, np.int64),
            "camids": np.asarray(self.camids, np.int64),
            "paths": np.asarray(self.paths).astype(str),
            "counts": np.asarray(self.counts, np.int64),
        }
        arrays["labels"] = (
            labels_from_pids(arrays["pids"])
            if self.labels is None
            else np.asarray(self.labels).astype(str)
        )
        lengths = {key: len(value) for key, value in arrays.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"gallery item arrays differ in length: {lengths}")
        for key, value in arrays.items():
            object.__setattr__(self, key, value)

    def __len__(self) -> int:
        return len(self.pids)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.pids, self.camids, self.paths, self.counts, self.labels))

    def select(self, rows) -> GalleryItems:
        """The items `rows` (a mask, indices or slice), same kind and source."""
        return GalleryItems(
            self.kind,
            self.pids[rows],
            self.camids[rows],
            self.paths[rows],
            self.counts[rows],
            self.source,
            self.labels[rows],
        )

    def describe(self) -> str:
        """E.g. "1,204 centroids" or "15,913 images"."""
        unit = "centroid" if self.kind == "centroid" else "image"
        return f"{len(self):,} {unit}{'' if len(self) == 1 else 's'}"


class SearchIndex(Protocol):
    """What `search.py` needs from an exact or approximate index."""

    items: GalleryItems
    method: str

    @property
    def dim(self) -> int: ...

    @property
    def nbytes(self) -> int: ...

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def gallery_vectors(
    embeddings: Embeddings, centroids: bool, source: str = ""
) -> tuple[GalleryItems, np.ndarray, int]:
    """The items of a gallery and their L2-normalised vectors.

    Args:
      embeddings: the gallery's embeddings file contents (N images, un-normalised).
      centroids: one item per identity (mean of its un-normalised embeddings, normalised)
        instead of one per image.
      source: recorded as `GalleryItems.source`.

    Returns:
      (items, vectors (K, D) float32 normalised, number of images left out). Only centroid
      galleries leave images out: those of unknown identity (pid < 0).

    Raises:
      ValueError: empty gallery, or `centroids` without any known identity.
    """
    if centroids:
        items, _, vectors, dropped = centroid_gallery(embeddings, source)
        return items, vectors, dropped
    name = source or "the gallery"
    if len(embeddings) == 0:
        raise InvalidValueError(f"{name} holds no embeddings; nothing to search")
    items = GalleryItems(
        "instance",
        embeddings.pids,
        embeddings.camids,
        embeddings.paths,
        np.ones(len(embeddings), np.int64),
        source,
        embeddings.labels,
    )
    return items, l2_normalize(embeddings.embeddings), 0


def centroid_gallery(
    embeddings: Embeddings, source: str = "", require_known: bool = True
) -> tuple[GalleryItems, np.ndarray, np.ndarray, int]:
    """One item per identity: the mean of its un-normalised embeddings, normalised.

    The sums are those of `evaluation.centroids` (float64), the code evaluation uses, so
    search and evaluation agree. Identities are listed by ascending pid.

    Args:
      embeddings: N images, un-normalised; those of unknown identity (pid < 0) are left out.
      source: recorded as `GalleryItems.source`.
      require_known: raise when no image has a known identity (else return 0 items).

    Returns:
      (items, sums (K, D) float64, vectors (K, D) float32 normalised, images left out).
      Each item's path is its member image closest to the centroid (to draw it).
    """
    name = source or "the gallery"
    if require_known and len(embeddings) == 0:
        raise InvalidValueError(f"{name} holds no embeddings; nothing to search")
    known = embeddings.pids >= 0
    dropped = int((~known).sum())
    if require_known and not known.any():
        raise InvalidValueError(
            f"--centroids needs identities, but every pid in {name} is unknown (-1); "
            "name the images PPPP_cC*.jpg (Market-style), embed with --identity=folder or "
            "--identity=csv:FILE, or search without --centroids"
        )
    if dropped:
        embeddings = embeddings.select(known)
    pids, sums, counts, member_item = identity_sums(embeddings.embeddings, embeddings.pids)
    vectors = centroid_vectors(sums, counts)
    representative = _representatives(embeddings.embeddings, member_item, vectors)
    items = GalleryItems(
        "centroid",
        pids,
        np.full(len(pids), -1, np.int64),
        embeddings.paths[representative],
        counts,
        source,
        embeddings.labels[representative],
    )
    return items, sums, vectors, dropped


def centroid_vectors(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """(K, D) float32 normalised centroids of (K, D) float64 sums over (K,) counts, computed
    as evaluation computes them (mean in float64, cast to float32, normalised)."""
    sums = np.asarray(sums, np.float64).reshape(len(counts), -1)
    return l2_normalize((sums / np.asarray(counts)[:, None]).astype(np.float32))


def _representatives(
    embeddings: np.ndarray, member_item: np.ndarray, centroids: np.ndarray
) -> np.ndarray:
    """Per centroid, the index of its member image closest to it (cosine), lowest on ties.

    Args:
      embeddings: (N, D) un-normalised member embeddings.
      member_item: (N,) index of each image's centroid.
      centroids: (K, D) normalised centroids.

    Returns:
      (K,) int64 image indices.
    """
    cosine = np.empty(len(embeddings), np.float32)
    step = 65536  # rows at a time: the gathered centroids would double memory otherwise
    for start in range(0, len(embeddings), step):
        rows = slice(start, start + step)
        member = l2_normalize(embeddings[rows])
        cosine[rows] = np.einsum("ij,ij->i", member, centroids[member_item[rows]])
    order = np.lexsort((-cosine, member_item))  # by centroid, then best first (stable)
    first = np.ones(len(order), bool)
    first[1:] = member_item[order][1:] != member_item[order][:-1]
    return order[first]


def check_queries(queries: np.ndarray, dim: int, k: int, size: int, what: str) -> np.ndarray:
    """Validates a (Q, D) query array and `k` against an index; returns float32 queries."""
    queries = np.asarray(queries, np.float32)
    if queries.ndim != 2:
        raise InvalidValueError(f"{what} must be a 2-D (Q, D) array, got shape {queries.shape}")
    if queries.shape[1] != dim:
        raise InvalidValueError(
            f"{what} have dimension {queries.shape[1]} but the gallery index has {dim}; "
            "embed queries and gallery with the same model"
        )
    k = int(k)
    if k < 1:
        raise OptionError(f"--top_k must be >= 1, got {k}")
    if size == 0:
        raise InvalidValueError(
            "the gallery index is empty (every item was removed): nothing to search; add "
            "images to it first"
        )
    if k > size:
        raise OptionError(
            f"--top_k={k} is larger than the gallery ({size:,} items); use --top_k <= {size}"
        )
    return queries
