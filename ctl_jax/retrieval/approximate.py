"""Approximate nearest-neighbour indexes for very large galleries, backed by faiss (optional).

The methods are those of the efficient-search notes: an inverted file (k-means cells; a
query scans only the `nprobe` closest cells), product quantisation (each vector stored as
`pq_m` one-byte codes of its sub-vectors) and a hierarchical navigable small-world graph.
All use the inner product on L2-normalised vectors, i.e. cosine similarity:

* `flat`: faiss's exact brute force (IndexFlatIP), the reference our exact search is
  compared with.
* `ivf_flat`: inverted file over full vectors (IndexIVFFlat): exact scores for the cells
  visited.
* `ivf_pq`: inverted file over PQ codes (IndexIVFPQ): 4 * D / pq_m times less memory
  (64x by default); scores are the compressed estimate of the cosine, not the exact one.
* `hnsw`: HNSW graph over full vectors (IndexHNSWFlat): exact scores for what it finds.

faiss is installed with `pip install -e '.[faiss]'`; everything else in ctl_jax works
without it. The index object mirrors `index.ExactIndex` (`items`, `method`, `dim`,
`nbytes`, `search`), so the search command treats both alike; `recall_at_k` measures an
approximate result against the exact one.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from ctl_jax.errors import FaissUnavailableError, FileContentError, InvalidValueError, OptionError
from ctl_jax.evaluation.ranking import l2_normalize
from ctl_jax.progress import progress_bar
from ctl_jax.retrieval.gallery import GalleryItems, check_queries

METHODS = ("flat", "ivf_flat", "ivf_pq", "hnsw")
# Build-time parameters of each method; 0 means "choose from the gallery size".
BUILD_PARAMS = {
    "flat": (),
    "ivf_flat": ("nlist",),
    "ivf_pq": ("nlist", "pq_m", "pq_bits"),
    "hnsw": ("hnsw_m", "ef_construction"),
}
SEARCH_PARAMS = {"flat": (), "ivf_flat": ("nprobe",), "ivf_pq": ("nprobe",), "hnsw": ("ef_search",)}
# k-means wants at least this many training points per centroid (faiss warns below 39).
_POINTS_PER_CENTROID = 39
_TRAIN_POINTS_PER_CENTROID = 64
_ADD_CHUNK = 65_536  # vectors added per step (progress bar granularity)


def require_faiss():
    """The faiss module, or `FaissUnavailableError` saying how to install it."""
    try:
        import faiss
    except ImportError as e:
        raise FaissUnavailableError(
            f"approximate search needs faiss, which is not installed ({e}); install it with "
            "`pip install -e '.[faiss]'` (or `pip install faiss-cpu`), or use --method=exact"
        ) from e
    return faiss


def default_params(method: str, num_vectors: int, dim: int, **given) -> dict:
    """Every build and search parameter of `method`, with 0 / missing ones chosen.

    Args:
      method: one of METHODS.
      num_vectors: gallery size N.
      dim: vector dimension D.
      given: nlist, nprobe, pq_m, pq_bits, hnsw_m, ef_construction, ef_search (0 = auto).

    Returns:
      {name: int} for the method's build and search parameters.

    Raises:
      ValueError: unknown method, or an explicit value that cannot work (named).
    """
    if method not in METHODS:
        raise OptionError(f"unknown approximate method {method!r}; valid: {', '.join(METHODS)}")
    allowed = set(BUILD_PARAMS[method]) | set(SEARCH_PARAMS[method])
    params = {key: int(value) for key, value in given.items() if key in allowed and value}
    if any(v < 0 for v in params.values()):
        raise OptionError(f"faiss parameters must be positive, got {params}")
    n = max(int(num_vectors), 1)
    if method in ("ivf_flat", "ivf_pq"):
        # ~sqrt(N) cells as a power of two (the usual starting point; faiss's guideline for
        # speed is 4-16 sqrt(N), at a higher build cost), each with enough points to train
        # k-means.
        auto_nlist = 1 << max(0, round(math.log2(max(1.0, math.sqrt(n)))))
        nlist = params.setdefault(
            "nlist", max(1, min(auto_nlist, _pow2_floor(n // _POINTS_PER_CENTROID)))
        )
        if nlist > n:
            raise OptionError(f"--nlist={nlist} is larger than the gallery ({n} vectors)")
        # Visiting 1/8 of the cells: recall@10 0.77-0.95 on the re-ID-like synthetic
        # embeddings of benchmarks/retrieval.py (same-identity cosine ~0.5, as our demo
        # model's) for ~1/8 of the exact search's work; raise --nprobe for more recall.
        params.setdefault("nprobe", max(1, nlist // 8))
        params["nprobe"] = min(params["nprobe"], nlist)
    if method == "ivf_pq":
        if "pq_m" not in params:
            # Sub-vectors of 16 dimensions: one byte codes 16 floats (64x less memory). With
            # 8 dimensions faiss's PQ training was 7x slower (13 s vs 2 s at 16k x 512).
            params["pq_m"] = max(m for m in range(1, max(1, dim // 16) + 1) if dim % m == 0)
        if dim % params["pq_m"]:
            raise OptionError(f"--pq_m={params['pq_m']} must divide the dimension {dim}")
        if "pq_bits" not in params:
            params["pq_bits"] = max(1, min(8, int(math.log2(max(2, n // _POINTS_PER_CENTROID)))))
        if params["pq_bits"] > 16:
            raise OptionError(f"--pq_bits must be at most 16, got {params['pq_bits']}")
    if method == "hnsw":
        params.setdefault("hnsw_m", 32)
        params.setdefault("ef_construction", 40)
        params.setdefault("ef_search", 64)
    return params


def _pow2_floor(x: int) -> int:
    return 1 << (max(1, int(x)).bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class FaissIndex:
    """A faiss index over a gallery's normalised vectors.

    Attributes:
      items: what each row is.
      method: one of METHODS.
      index: the faiss index (inner-product metric).
      params: the build and search parameters (see `default_params`).
      ids: (N,) int64 ascending faiss id of each row, or None when the ids are the rows
        (they stop being the rows when an IVF index has had vectors removed, see
        `remove_rows`).
    """

    items: GalleryItems
    method: str
    index: object
    params: dict
    ids: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.index.ntotal)

    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def nbytes(self) -> int:
        """Bytes held by the index structures (codes, ids, centroids, graph) and items."""
        index, n, d = self.index, len(self), self.dim
        if self.method == "flat":
            size = n * d * 4
        elif self.method in ("ivf_flat", "ivf_pq"):
            size = n * (index.code_size + 8) + index.nlist * d * 4  # codes, ids, cells
            if self.method == "ivf_pq":
                size += index.pq.M * index.pq.ksub * index.pq.dsub * 4  # PQ codebooks
        else:  # hnsw: full vectors + neighbour lists + per-node offsets and levels
            size = n * d * 4 + index.hnsw.neighbors.size() * 4 + n * 12
        return int(size) + self.items.nbytes

    def set_search_params(self, **params) -> None:
        """Changes nprobe (IVF) or ef_search (HNSW); other names are ignored."""
        for key in SEARCH_PARAMS[self.method]:
            if params.get(key):
                self.params[key] = int(params[key])
        if self.method in ("ivf_flat", "ivf_pq"):
            self.index.nprobe = min(self.params["nprobe"], self.index.nlist)

    def search(
        self, queries: np.ndarray, k: int, progress: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Approximate top-k by cosine similarity.

        Args:
          queries: (Q, D) query embeddings, normalised here.
          k: results per query, 1 <= k <= len(self).

        Returns:
          scores (Q, k) float32, best first; indices (Q, k) int64. When the cells or graph
          nodes visited hold fewer than k items the row ends with index -1 and score -inf.
        """
        queries = l2_normalize(check_queries(queries, self.dim, k, len(self), "query embeddings"))
        k = int(k)
        if self.method == "hnsw":
            # HNSW keeps ef_search candidates; fewer than k would truncate the result.
            self.index.hnsw.efSearch = max(self.params["ef_search"], k)
        scores = np.empty((len(queries), k), np.float32)
        indices = np.empty((len(queries), k), np.int64)
        step = 4096
        starts = range(0, len(queries), step)
        bar = progress_bar(
            starts, desc="searching", enabled=progress and len(starts) > 1, leave=False
        )
        for start in bar:
            rows = slice(start, start + step)
            scores[rows], indices[rows] = self.index.search(queries[rows], k)
        missing = indices < 0
        scores[missing] = -np.inf
        if self.ids is not None:  # faiss ids -> rows
            indices = np.where(missing, -1, np.searchsorted(self.ids, np.maximum(indices, 0)))
        return scores, indices


def build(
    items: GalleryItems,
    vectors: np.ndarray,
    method: str,
    seed: int = 0,
    progress: bool = False,
    **params,
) -> FaissIndex:
    """Builds a faiss index over normalised gallery vectors.

    Args:
      items: what each row is.
      vectors: (N, D) float32, L2-normalised.
      method: one of METHODS.
      seed: picks the k-means training sample (IVF, PQ) deterministically.
      progress: show a progress bar while adding vectors.
      params: see `default_params` (0 or missing = automatic).
    """
    faiss = require_faiss()
    vectors = np.ascontiguousarray(vectors, np.float32)
    n, d = vectors.shape
    params = default_params(method, n, d, **params)
    metric = faiss.METRIC_INNER_PRODUCT
    if method == "flat":
        index = faiss.IndexFlatIP(d)
    elif method == "hnsw":
        index = faiss.IndexHNSWFlat(d, params["hnsw_m"], metric)
        index.hnsw.efConstruction = params["ef_construction"]
    else:
        quantizer = faiss.IndexFlatIP(d)
        if method == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, d, params["nlist"], metric)
            needed = params["nlist"]
        else:
            index = faiss.IndexIVFPQ(
                quantizer, d, params["nlist"], params["pq_m"], params["pq_bits"], metric
            )
            needed = max(params["nlist"], 1 << params["pq_bits"])
            # One k-means per sub-quantizer: 10 iterations instead of 25 cut the training
            # time ~2x; the codebooks barely change after that.
            index.pq.cp.niter = 10
        # k-means on 64 points per centroid: more barely changes the cells but multiplies
        # the training time, which dominates the build of million-vector galleries.
        train_size = min(n, _TRAIN_POINTS_PER_CENTROID * needed)
        sample = np.random.default_rng(seed).choice(n, train_size, replace=False)
        index.train(vectors[np.sort(sample)])
        index.nprobe = params["nprobe"]
    bar = progress_bar(
        range(0, n, _ADD_CHUNK), desc=f"building {method}", enabled=progress, leave=False
    )
    for start in bar:
        index.add(vectors[start : start + _ADD_CHUNK])
    return FaissIndex(items, method, index, params)


# Methods whose faiss index can drop vectors (faiss's `remove_ids`); every method can add.
REMOVABLE_METHODS = ("flat", "ivf_flat", "ivf_pq")


def add_rows(index: FaissIndex, items: GalleryItems, vectors: np.ndarray) -> FaissIndex:
    """Appends normalised `vectors` (M, D) with faiss's own `add`; `items` lists the rows
    after the addition (the old ones, then the M new ones)."""
    vectors = np.ascontiguousarray(vectors, np.float32)
    if len(items) != len(index) + len(vectors):
        raise ValueError(f"{len(items)} items for {len(index)} + {len(vectors)} vectors")
    ids = index.ids
    if ids is None:
        index.index.add(vectors)  # ids continue from ntotal: they stay the rows
    else:
        new = np.arange(len(vectors), dtype=np.int64) + (int(ids.max()) + 1 if len(ids) else 0)
        index.index.add_with_ids(vectors, new)
        ids = np.concatenate([ids, new])
    return dataclasses.replace(index, items=items, ids=ids)


def remove_rows(index: FaissIndex, rows: np.ndarray) -> FaissIndex:
    """Drops `rows` with faiss's own `remove_ids` (methods in REMOVABLE_METHODS).

    A flat index closes the gap (the ids stay the rows); an IVF index keeps each vector's
    id, so the surviving ids are recorded in `FaissIndex.ids`.

    Raises:
      InvalidValueError: the method cannot remove vectors (HNSW graphs cannot).
    """
    if index.method not in REMOVABLE_METHODS:
        raise InvalidValueError(
            f"a faiss {index.method} index cannot remove vectors; rebuild it, or build the "
            f"index with a method that can: exact, {', '.join(REMOVABLE_METHODS)}"
        )
    rows = np.asarray(rows, np.int64)
    keep = np.ones(len(index), bool)
    keep[rows] = False
    ids = np.arange(len(index), dtype=np.int64) if index.ids is None else index.ids
    index.index.remove_ids(np.ascontiguousarray(ids[rows]))
    new_ids = None if index.method == "flat" else ids[keep]
    if new_ids is not None and np.array_equal(new_ids, np.arange(len(new_ids))):
        new_ids = None
    return dataclasses.replace(index, items=index.items.select(keep), ids=new_ids)


def serialize(index: FaissIndex) -> np.ndarray:
    """(B,) uint8 bytes of the faiss index (for the index file)."""
    return require_faiss().serialize_index(index.index)


def deserialize(
    items: GalleryItems,
    method: str,
    blob: np.ndarray,
    params: dict,
    search_params: dict | None = None,
    path=None,
    ids: np.ndarray | None = None,
) -> FaissIndex:
    """Rebuilds a `FaissIndex` from `serialize` output; `search_params` override nprobe /
    ef_search; `ids` as `FaissIndex.ids`. `path` only names the file in errors."""
    if method not in METHODS:
        raise FileContentError(f"index file {path}: unknown method {method!r}")
    faiss = require_faiss()
    try:
        index = faiss.deserialize_index(np.ascontiguousarray(blob, np.uint8))
    except RuntimeError as e:  # faiss reports a damaged blob as a RuntimeError
        raise FileContentError(f"index file {path}: the faiss index is damaged: {e}") from e
    if index.ntotal != len(items):
        raise FileContentError(
            f"index file {path}: the faiss index holds {index.ntotal} vectors but the file "
            f"lists {len(items)} items"
        )
    if ids is not None and (len(ids) != len(items) or np.any(np.diff(ids) <= 0)):
        raise FileContentError(f"index file {path}: faiss_ids must be {len(items)} ascending ids")
    result = FaissIndex(items, method, index, dict(params), ids)
    result.set_search_params(**(search_params or {}))
    return result


def recall_at_k(approx_indices: np.ndarray, exact_indices: np.ndarray) -> float:
    """Mean over queries of |approximate top-k  intersect  exact top-k| / k.

    Args:
      approx_indices, exact_indices: (Q, k) int gallery rows (-1 = no result).

    Returns:
      Recall in [0, 1] (NaN for no queries).
    """
    approx = np.asarray(approx_indices)
    exact = np.asarray(exact_indices)
    if approx.shape != exact.shape:
        raise ValueError(f"result shapes differ: {approx.shape} vs {exact.shape}")
    if approx.size == 0:
        return float("nan")
    # (Q, k, k) comparisons: fine for the k of a search result.
    hits = (approx[:, :, None] == exact[:, None, :]) & (approx[:, :, None] >= 0)
    return float(hits.any(axis=2).sum(axis=1).mean() / approx.shape[1])
