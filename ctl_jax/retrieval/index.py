"""The exact search index over a gallery of instances or identity centroids, and the index
file format (exact and faiss indexes).

The gallery (`GalleryItems` and their vectors) is built in `gallery.py`: one item per image,
or one per identity centroid, as evaluation computes them. Every item is searched by cosine
similarity: vectors are stored L2-normalised and queries are normalised before the inner
product.

`ExactIndex` is an exact search in NumPy: per chunk of queries it walks the gallery in
fixed-size chunks, a float32 BLAS matmul and `argpartition` per block, and keeps a running
top-k, never materialising more than a (query chunk x gallery chunk) similarity block, so
memory stays bounded whatever the gallery size. It was written in JAX (XLA's matmul is
faster on a 2-core CPU), but searching embedding files must not import JAX: its import is
~1 s, more than a Market-1501-sized search takes. Ties are broken by gallery position
(lowest first). The approximate faiss indexes live in `approximate.py`.

Index file (`.npz`, read with allow_pickle=False):
  format: str scalar "ctl_jax.index"; version: int scalar (2; version 1 files, written before
    labels and sums existed, are read too: labels from the pids, no sums).
  kind: "instance" or "centroid"; method: "exact" or a faiss method of `approximate.METHODS`.
  pids (N,) int64, -1 where unknown; camids (N,) int64, -1 where unknown or for centroids;
  paths (N,) str: the image of an instance; for a centroid its representative image (the
    member closest to the centroid), used only to draw it;
  counts (N,) int64: images behind each item (1 for instances);
  labels (N,) str: identity names, "" where unknown (version 2);
  sums (N, D) float64: centroid indexes only, each identity's sum of un-normalised
    embeddings, which lets `Index.add` update a centroid exactly (version 2);
  member_keys (M,) uint64 and member_pids (M,) int64: centroid indexes only, a 64-bit
    BLAKE2b key of the path of each image behind the centroids and its identity's pid, which
    let `Index.add` refuse an image it already holds (optional: files written before lack
    them and skip that check);
  source: str, the embeddings file the gallery came from;
  vectors (N, D) float32, L2-normalised (method "exact");
  faiss_index (B,) uint8, the serialised faiss index, and params: JSON str of its build and
    search parameters (faiss methods); faiss_ids (N,) int64, the faiss id of each row, only
    when they are not 0..N-1 (an IVF index after removals).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import zipfile

import numpy as np

from ctl_jax import files
from ctl_jax.errors import FileContentError, MissingFileError
from ctl_jax.evaluation.ranking import l2_normalize
from ctl_jax.progress import progress_bar
from ctl_jax.retrieval import approximate
from ctl_jax.retrieval.embedding_file import Embeddings
from ctl_jax.retrieval.gallery import GalleryItems, SearchIndex, check_queries, gallery_vectors
from ctl_jax.retrieval.labels import check_labels

FORMAT = "ctl_jax.index"
VERSION = 2
READABLE_VERSIONS = (1, 2)

# Bytes of the per-step working set of exact search: the (query chunk x gallery chunk)
# similarity block plus the gallery chunk XLA slices out. 64 MB keeps the matmul efficient
# (large blocks) while bounding memory independently of the gallery size.
_CHUNK_BYTES = 64 * 1024 * 1024
_MAX_QUERY_CHUNK = 256  # more queries per step no longer speed up the matmul on CPU


@dataclasses.dataclass(frozen=True)
class ExactIndex:
    """Exact cosine top-k over normalised vectors (see the module docstring).

    Attributes:
      items: what each row is.
      vectors: (N, D) float32, L2-normalised. On CPU a read-only view of the device array
        searched, so the index holds one copy of the gallery.
    """

    items: GalleryItems
    vectors: np.ndarray
    method: str = dataclasses.field(default="exact", init=False)

    def __post_init__(self):
        vectors = np.asarray(self.vectors, np.float32)
        if vectors.ndim != 2 or len(vectors) != len(self.items):
            raise ValueError(
                f"index vectors must be ({len(self.items)}, D), got shape {vectors.shape}"
            )
        vectors = vectors.view()
        vectors.flags.writeable = False  # searched as stored: no one changes it under us
        object.__setattr__(self, "vectors", vectors)

    @classmethod
    def from_embeddings(cls, embeddings: Embeddings, centroids: bool = False, source: str = ""):
        """(index, number of images left out) of an instance or centroid gallery."""
        items, vectors, dropped = gallery_vectors(embeddings, centroids, source)
        return cls(items, vectors), dropped

    def __len__(self) -> int:
        return len(self.items)

    @property
    def dim(self) -> int:
        return self.vectors.shape[1]

    @property
    def nbytes(self) -> int:
        """Bytes held: the normalised vectors and the item arrays."""
        return self.vectors.nbytes + self.items.nbytes

    def search(
        self,
        queries: np.ndarray,
        k: int,
        query_chunk: int | None = None,
        gallery_chunk: int | None = None,
        progress: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-k gallery items of each query by cosine similarity.

        Args:
          queries: (Q, D) query embeddings, normalised here (raw BNNeck output is fine).
          k: results per query, 1 <= k <= len(self).
          query_chunk, gallery_chunk: rows per step (defaults bound the working set to
            about 64 MB); exposed for tests and benchmarks.
          progress: show a progress bar over query chunks.

        Returns:
          scores (Q, k) float32 cosine similarities, best first; indices (Q, k) int64 rows
          of the gallery. Equal scores are ordered by gallery row.
        """
        queries = l2_normalize(check_queries(queries, self.dim, k, len(self), "query embeddings"))
        num_q, num_g = len(queries), len(self)
        k = int(k)
        if num_q == 0:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        qc = query_chunk or min(_MAX_QUERY_CHUNK, 1 << (num_q - 1).bit_length())
        gc = gallery_chunk or _CHUNK_BYTES // (4 * (qc + self.dim))
        gc = int(min(max(gc, k), num_g))

        scores = np.empty((num_q, k), np.float32)
        indices = np.empty((num_q, k), np.int64)
        starts = range(0, num_q, qc)
        bar = progress_bar(
            starts, desc="searching", enabled=progress and len(starts) > 1, leave=False
        )
        block = np.empty((qc, gc), np.float32)  # reused: fresh ones would be page-faulted
        for start in bar:
            rows = queries[start : start + qc]
            best_s = best_i = None
            for g0 in range(0, num_g, gc):
                gallery = self.vectors[g0 : g0 + gc]
                sim = block[: len(rows), : len(gallery)]
                np.matmul(rows, gallery.T, out=sim)
                s, i = _block_topk(sim, k)
                i += g0
                best_s, best_i = (s, i) if best_s is None else _merge_topk(best_s, best_i, s, i, k)
            scores[start : start + len(rows)] = best_s
            indices[start : start + len(rows)] = best_i
        return scores, indices


def _block_topk(sim: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The min(k, B) best columns of each row of `sim` (n, B), best first, equal scores
    ordered by column (lowest first): (scores (n, kk) float32, columns (n, kk) int64)."""
    n, width = sim.shape
    kk = min(k, width)
    if kk < width:
        part = np.argpartition(sim, width - kk, axis=1)[:, width - kk :]
        # argpartition picks among scores equal to the k-th best arbitrarily: rows where
        # such a tie straddles the cut are taken again, stably (rare with float scores).
        kth = np.take_along_axis(sim, part, axis=1).min(axis=1)
        ties = np.count_nonzero(sim == kth[:, None], axis=1) > 1
        for r in np.flatnonzero(ties):
            part[r] = np.argsort(-sim[r], kind="stable")[:kk]
    else:
        part = np.broadcast_to(np.arange(width), (n, width)).copy()
    values = np.take_along_axis(sim, part, axis=1)
    order = np.lexsort((part, -values), axis=1)
    return np.take_along_axis(values, order, axis=1), np.take_along_axis(part, order, axis=1)


def _merge_topk(s1, i1, s2, i2, k):
    """The k best of two top-k lists per row (scores, gallery rows), ties by lower row."""
    s = np.concatenate([s1, s2], axis=1)
    i = np.concatenate([i1, i2], axis=1)
    order = np.lexsort((i, -s), axis=1)[:, :k]
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


# --- files ---------------------------------------------------------------------------------


def save_index(
    index: SearchIndex,
    path: str | os.PathLike,
    overwrite: bool = False,
    sums: np.ndarray | None = None,
    members: tuple[np.ndarray, np.ndarray] | None = None,
):
    """Writes an exact or faiss index atomically (exactly at `path`, no suffix added).

    `sums` (K, D) float64: a centroid index's per-identity sums; `members` (paths (M,),
    labels (M,)): its member images (see the module docstring).

    Raises:
      FileExistsError: `path` exists and `overwrite` is False.
    """
    path = files.refuse_overwrite(path, overwrite, flag="--save_index")
    items = index.items
    arrays = {
        "format": np.asarray(FORMAT),
        "version": np.asarray(VERSION, np.int64),
        "kind": np.asarray(items.kind),
        "method": np.asarray(index.method),
        "pids": items.pids,
        "camids": items.camids,
        "paths": items.paths,
        "counts": items.counts,
        "labels": items.labels,
        "source": np.asarray(items.source),
    }
    if sums is not None:
        arrays["sums"] = np.asarray(sums, np.float64)
    if members is not None:
        arrays["member_keys"] = np.asarray(members[0], np.uint64)
        arrays["member_pids"] = np.asarray(members[1], np.int64)
    if index.method == "exact":
        arrays["vectors"] = index.vectors
    else:
        arrays["faiss_index"] = approximate.serialize(index)
        arrays["params"] = np.asarray(json.dumps(index.params, sort_keys=True))
        if index.ids is not None:
            arrays["faiss_ids"] = index.ids
    with files.atomic_open(path) as f:
        np.savez(f, **arrays)
    return path


def load_index(path: str | os.PathLike, search_params: dict | None = None) -> SearchIndex:
    """Reads an index written by `save_index` (see `read_index`)."""
    return read_index(path, search_params)[0]


def read_index(
    path: str | os.PathLike, search_params: dict | None = None
) -> tuple[SearchIndex, np.ndarray | None, tuple[np.ndarray, np.ndarray] | None]:
    """Reads an index written by `save_index`: (the index, its centroid sums or None, its
    centroid member (path keys, pids) or None).

    Args:
      path: the index file.
      search_params: faiss search-time settings to change (e.g. {"nprobe": 32}); ignored
        for exact indexes.

    Raises:
      MissingFileError: no such file (a FileNotFoundError).
      FileContentError: not an index file (or a damaged one; a ValueError); the message
        names the file.
      FaissUnavailableError: a faiss index while faiss is not installed (the message says
        how).
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise MissingFileError(f"index file {path} does not exist")
    files.require_numpy_file(path, "index file")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise FileContentError(f"index file {path} is not a readable .npz: {e}") from e
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise FileContentError(f"index file {path} is not an index .npz (it holds a single array)")
    with data:
        if "format" not in data.files or str(data["format"]) != FORMAT:
            hint = (
                " (it looks like an embeddings file: pass it as --gallery)"
                if "embeddings" in data.files
                else ""
            )
            raise FileContentError(f"{path} is not a ctl_jax index file{hint}")
        method = str(data["method"]) if "method" in data.files else ""
        needed = ["version", "kind", "method", "pids", "camids", "paths", "counts", "source"]
        needed += ["vectors"] if method == "exact" else ["faiss_index", "params"]
        missing = [key for key in needed if key not in data.files]
        if missing:
            raise FileContentError(
                f"index file {path} ({method or 'no method'}) is missing {missing}"
            )
        version = int(data["version"])
        if version not in READABLE_VERSIONS:
            raise FileContentError(
                f"index file {path} has format version {version}; this ctl_jax reads "
                f"versions {', '.join(map(str, READABLE_VERSIONS))}: rebuild it with --save_index"
            )
        try:
            pids = data["pids"]
            labels = None
            if "labels" in data.files:
                labels = check_labels(data["labels"], pids, f"index file {path}")
            items = GalleryItems(
                str(data["kind"]),
                pids,
                data["camids"],
                data["paths"],
                data["counts"],
                str(data["source"]),
                labels,
            )
            sums = data["sums"].astype(np.float64) if "sums" in data.files else None
            if sums is not None and (sums.ndim != 2 or len(sums) != len(items)):
                raise ValueError(f"'sums' has shape {sums.shape} for {len(items)} items")
            members = None
            if "member_keys" in data.files and "member_pids" in data.files:
                members = (
                    data["member_keys"].astype(np.uint64),
                    data["member_pids"].astype(np.int64),
                )
                if members[0].shape != members[1].shape or members[0].ndim != 1:
                    raise ValueError("'member_keys' and 'member_pids' differ in shape")
            if method == "exact":
                return ExactIndex(items, data["vectors"]), sums, members
            blob, params = data["faiss_index"], json.loads(str(data["params"]))
            ids = data["faiss_ids"].astype(np.int64) if "faiss_ids" in data.files else None
        except ValueError as e:  # a bad kind, arrays of different lengths, broken params
            raise FileContentError(f"index file {path} is damaged: {e}") from e
    index = approximate.deserialize(items, method, blob, params, search_params, path, ids)
    return index, sums, members
