"""`ctl_jax.Index`: a gallery index to build, update, search and save from Python; the
`search` command uses it too, so both take one code path.

    from ctl_jax import Index
    index = Index.build("gallery.npz", kind="centroid")        # or an Embeddings object
    index.add("new_products.npz")                               # in place
    index.remove(["sku_123"])
    hits = index.search(queries, k=5)   # per query: [{"label", "pid", "path", "score"}, ...]
    index.save("index.npz")
    index = Index.load("index.npz")

Kinds: `instance` (one item per image) or `centroid` (one per identity: the mean of its
un-normalised embeddings, normalised; images of unknown identity are left out). Methods:
`exact` (`index.ExactIndex`) or a faiss method of `approximate.METHODS`.

Updates. A centroid index keeps each identity's float64 sum of embeddings and its image count,
so adding images to an identity, adding identities and removing identities give the index
`build` gives on all the images (the same identities with vectors equal to float rounding, the
same search results; the pids and the order of items may differ, see below). The item drawn for
a centroid (its `path`, used only by the result pictures) is chosen when the identity first
enters the index and kept when images are added to it. An instance index appends and drops
rows. Identities are keyed by label, and an identity keeps its pid across updates: new
identities get new numbers (`_numbered`), so a pid in earlier results never names another
identity of the same index. A rebuild may number them differently (`labels.pids_for_labels`):
across indexes, only the label is the key. Images are keyed by path: adding one the index
already holds is refused (a centroid index keeps a 64-bit key of each member image's path and
its pid for that, `path_keys`). faiss indexes are changed with faiss's own add / remove
(`approximate.add_rows`, `remove_rows`): every method can add, HNSW cannot remove (nor change
an existing centroid, which is a removal and an addition). A change is checked completely
before anything is modified, so a failed call leaves the index as it was.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Sequence

import numpy as np

from ctl_jax.errors import InvalidValueError
from ctl_jax.evaluation.centroids import identity_sums
from ctl_jax.retrieval import approximate, results
from ctl_jax.retrieval.embedding_file import Embeddings
from ctl_jax.retrieval.gallery import (
    KINDS,
    GalleryItems,
    centroid_gallery,
    centroid_vectors,
    gallery_vectors,
)
from ctl_jax.retrieval.index import ExactIndex, read_index, save_index
from ctl_jax.retrieval.labels import UNKNOWN, is_plain_integer, pids_for_labels

METHODS = ("exact", *approximate.METHODS)


def _as_embeddings(embeddings: Embeddings | str | os.PathLike) -> tuple[Embeddings, str]:
    if isinstance(embeddings, Embeddings):
        return embeddings, ""
    return Embeddings.load(embeddings), str(embeddings)


def _numbered(items: GalleryItems, before: GalleryItems) -> GalleryItems:
    """`items` with the pid of every identity `before` held kept, and new numbers for the
    identities new in `items`.

    New identities are numbered as `build` would number them (their integer label) when the
    index so far is numbered that way and the new labels are plain integers too; otherwise
    they get the numbers after the largest pid in use, in label order. So a pid in earlier
    search results never comes to name another identity of this index.
    """
    known = before.labels != UNKNOWN
    kept = dict(zip(before.labels[known].tolist(), before.pids[known].tolist()))
    new = sorted(set(items.labels.tolist()) - set(kept) - {UNKNOWN})
    if new:
        as_built = pids_for_labels(np.asarray(list(kept) + new))
        held_as_built = all(kept[label] == pid for label, pid in zip(kept, as_built.tolist()))
        if held_as_built and all(is_plain_integer(label) for label in new):
            kept.update(zip(new, as_built[len(kept) :].tolist()))
        else:
            start = max(kept.values(), default=-1) + 1
            kept.update((label, start + i) for i, label in enumerate(new))
    pids = np.asarray([kept.get(label, -1) for label in items.labels.tolist()], np.int64)
    return dataclasses.replace(items, pids=pids.reshape(len(items)))


def path_keys(paths: np.ndarray) -> np.ndarray:
    """(N,) uint64 keys of (N,) str image paths: a 64-bit BLAKE2b digest of each. A centroid
    index keeps these for its member images rather than the paths (8 bytes an image, not 4
    a character); two of a million paths share a key with probability about 3e-8."""
    digests = b"".join(
        hashlib.blake2b(str(p).encode(), digest_size=8).digest() for p in np.asarray(paths)
    )
    return np.frombuffer(digests, "<u8").astype(np.uint64)


def _duplicates(paths: np.ndarray, held_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct non-empty paths of `paths` whose key `held_keys` has, those `paths`
    lists twice that are not held)."""
    paths = paths[paths != ""]
    distinct, counts = np.unique(paths, return_counts=True)
    keys = path_keys(distinct)
    # Sorted keys and a binary search: np.isin took 3-4 s for 1,000 keys against 1M uint64
    # (numpy 2, under load), this 30-40 ms.
    held = np.sort(np.asarray(held_keys, np.uint64))
    in_held = np.zeros(len(keys), bool)
    if len(held):
        at = np.minimum(np.searchsorted(held, keys), len(held) - 1)
        in_held = held[at] == keys
    return distinct[in_held], distinct[(counts > 1) & ~in_held]


class Index:
    """A searchable gallery of instances or identity centroids (see the module docstring).

    Attributes:
      kind: "instance" or "centroid".
      method: "exact" or a faiss method.
      items: `GalleryItems`, what each row is (labels, pids, paths, counts).
    """

    def __init__(
        self,
        searcher,
        sums: np.ndarray | None = None,
        members: tuple[np.ndarray, np.ndarray] | None = None,
    ):
        """Wraps an `ExactIndex` or `approximate.FaissIndex`; `sums` (K, D) float64 are the
        per-identity sums of a centroid index (None: it cannot be updated by `add`);
        `members` (keys (M,) uint64 of their paths, see `path_keys`; pids (M,) int64) the
        images behind a centroid index's identities (None: `add` cannot tell images it
        already holds). Use `build` or `load`
        rather than this."""
        self._searcher = searcher
        self._sums = sums
        self._members = members

    # --- building and files -------------------------------------------------------------

    @classmethod
    def build(
        cls,
        embeddings: Embeddings | str | os.PathLike,
        kind: str = "centroid",
        method: str = "exact",
        progress: bool = False,
        source: str | None = None,
        **faiss_options,
    ) -> Index:
        """An index over the images of `embeddings` (an `Embeddings` or an embeddings .npz).

        Args:
          kind: "centroid" (one item per identity) or "instance" (one per image).
          method: "exact", or a faiss method: flat, ivf_flat, ivf_pq, hnsw (the faiss extra).
          progress: progress bar while adding vectors to a faiss index.
          source: the gallery's name recorded in the index (default: the file's path).
          faiss_options: nlist, nprobe, pq_m, pq_bits, hnsw_m, ef_construction, ef_search
            (see `approximate.default_params`; 0 or missing = automatic).

        Raises:
          InvalidValueError: unknown kind or method, no embeddings, a centroid index without
            any known identity; FileContentError/MissingFileError for a bad file.
        """
        if kind not in KINDS:
            raise InvalidValueError(f"index kind must be one of {', '.join(KINDS)}, not {kind!r}")
        if method not in METHODS:
            raise InvalidValueError(
                f"index method must be one of {', '.join(METHODS)}, not {method!r}"
            )
        known = {p for params in approximate.BUILD_PARAMS.values() for p in params}
        known |= {p for params in approximate.SEARCH_PARAMS.values() for p in params}
        unknown = sorted(set(faiss_options) - known)
        if unknown:
            raise InvalidValueError(f"unknown faiss options {unknown}")
        embeddings, path = _as_embeddings(embeddings)
        source = path if source is None else source
        embeddings = dataclasses.replace(embeddings, pids=pids_for_labels(embeddings.labels))
        sums = members = None
        if kind == "centroid":
            items, sums, vectors, _ = centroid_gallery(embeddings, source)
            known = embeddings.labels != UNKNOWN
            pid_of = dict(zip(items.labels.tolist(), items.pids.tolist()))
            member_pids = [pid_of[label] for label in embeddings.labels[known].tolist()]
            members = (path_keys(embeddings.paths[known]), np.asarray(member_pids, np.int64))
        else:
            items, vectors, _ = gallery_vectors(embeddings, False, source)
        if method == "exact":
            return cls(ExactIndex(items, vectors), sums, members)
        searcher = approximate.build(items, vectors, method, progress=progress, **faiss_options)
        return cls(searcher, sums, members)

    @classmethod
    def load(cls, path: str | os.PathLike, **search_params) -> Index:
        """Reads an index file (`save`, or `search --save_index`); `search_params` change
        a faiss index's nprobe / ef_search. Files of format version 1 load too (labels from
        their pids; a version-1 centroid index cannot take `add`: rebuild it)."""
        searcher, sums, members = read_index(path, search_params)
        return cls(searcher, sums, members)

    def save(self, path: str | os.PathLike, overwrite: bool = False) -> os.PathLike:
        """Writes the index atomically to `path` (a temporary file renamed when complete).

        Raises:
          OutputExistsError: `path` exists and `overwrite` is False.
        """
        return save_index(
            self._searcher, path, overwrite=overwrite, sums=self._sums, members=self._members
        )

    # --- what it holds ------------------------------------------------------------------

    @property
    def items(self) -> GalleryItems:
        return self._searcher.items

    @property
    def kind(self) -> str:
        return self.items.kind

    @property
    def method(self) -> str:
        return self._searcher.method

    @property
    def params(self) -> dict:
        """A faiss index's build and search parameters ({} for exact)."""
        return dict(getattr(self._searcher, "params", {}))

    @property
    def dim(self) -> int:
        return self._searcher.dim

    @property
    def nbytes(self) -> int:
        members = 0 if self._members is None else sum(a.nbytes for a in self._members)
        return self._searcher.nbytes + (0 if self._sums is None else self._sums.nbytes) + members

    @property
    def labels(self) -> np.ndarray:
        """(N,) str label of each item ("" where unknown)."""
        return self.items.labels

    def _held_keys(self) -> np.ndarray | None:
        """(M,) uint64 `path_keys` of the images the index holds (for a centroid index, those
        behind its centroids); None for a centroid index from a file without them."""
        if self.kind == "instance":
            return path_keys(self.items.paths[self.items.paths != ""])
        return None if self._members is None else self._members[0]

    @property
    def updatable(self) -> bool:
        """False for a centroid index read from a version-1 file (it lacks the sums)."""
        return self.kind == "instance" or self._sums is not None

    @property
    def vectors(self) -> np.ndarray:
        """(N, D) float32 normalised item vectors (exact indexes only)."""
        if self.method != "exact":
            raise InvalidValueError(f"a faiss {self.method} index does not keep its vectors")
        return self._searcher.vectors

    def __len__(self) -> int:
        return len(self._searcher)

    def __repr__(self) -> str:
        return f"Index({self.items.describe()}, {self.dim}-d, {self.method})"

    # --- searching ----------------------------------------------------------------------

    def search_rows(
        self, queries: np.ndarray, k: int, progress: bool = False, query_chunk: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores (Q, k) float32 cosine best first, rows (Q, k) int64 of `items`; -1 where a
        faiss index found fewer than k). `queries` (Q, D) are normalised here.

        `query_chunk` (exact indexes): queries per compiled step, every step padded to it,
        so any Q up to it runs one compiled program (the service passes its largest batch).
        """
        if query_chunk is not None and self.method == "exact":
            return self._searcher.search(queries, k, query_chunk=query_chunk, progress=progress)
        return self._searcher.search(queries, k, progress=progress)

    def search(
        self, queries: np.ndarray, k: int = 10, min_score: float | None = None
    ) -> list[list[dict]]:
        """The top-k items of each query, as the search-results JSON lists its matches.

        Args:
          queries: (Q, D) float embeddings (raw BNNeck output is fine), or one (D,) vector.
          k: matches per query, 1 <= k <= len(self).
          min_score: drop matches whose cosine is below it (open-set search).

        Returns:
          One list per query of `{"label": str or None, "pid": int, "path": str or None
          (None for a centroid), "score": float}`, best first.
        """
        queries = np.asarray(queries, np.float32)
        if queries.ndim == 1:
            queries = queries[None]
        scores, rows = self.search_rows(queries, k)
        if min_score is not None:
            rows = np.where(scores >= np.float32(min_score), rows, -1)
        return results.matches(scores, rows, self.items)

    # --- updating -----------------------------------------------------------------------

    def add(self, embeddings: Embeddings | str | os.PathLike, name: str | None = None) -> None:
        """Adds the images of `embeddings` (an `Embeddings` or an .npz path) in place; `name`
        names them in messages (default: the path).

        Instance index: one row per image, appended. Centroid index: each image joins its
        identity's centroid (new identities get one); images of unknown identity are left
        out.

        Images are told apart by path: adding an image the index already holds (or one
        listed twice) is refused, since it would count twice in a centroid and come back
        twice from an instance index. To update images, remove their identities and add
        them again.

        Raises:
          InvalidValueError: embeddings of another dimension; images the index already
            holds (how many, the first few named); a version-1 centroid index (no sums);
            changing a centroid of an HNSW index. Nothing is changed then.
        """
        embeddings, source = _as_embeddings(embeddings)
        name = name or source or "the added embeddings"
        if len(embeddings) == 0:
            return
        if embeddings.dim != self.dim:
            raise InvalidValueError(
                f"{name} have dimension {embeddings.dim} but the index has {self.dim}; "
                "embed them with the model the index was built with"
            )
        held = self._held_keys()
        if held is not None:
            counted = embeddings.paths
            if self.kind == "centroid":  # images of unknown identity are not added
                counted = counted[embeddings.labels != UNKNOWN]
            again, twice = _duplicates(counted, held)
            if len(again) or len(twice):
                both = np.concatenate([again, twice])
                shown = ", ".join(both[:3].tolist()) + (", ..." if len(both) > 3 else "")
                what = [f"{len(again):,} image(s) already in the index"] if len(again) else []
                what += [f"{len(twice):,} image(s) listed twice"] if len(twice) else []
                raise InvalidValueError(
                    f"{name}: {' and '.join(what)} ({shown}); each image counts once. Leave "
                    "them out, or remove their identities first and add all their images again"
                )
        if self.kind == "instance":
            self._add_instances(embeddings)
        else:
            self._add_to_centroids(embeddings, name)

    def remove(self, labels: Sequence[str]) -> None:
        """Removes every item of the identities `labels` in place (all its images from an
        instance index, its centroid from a centroid index).

        Raises:
          InvalidValueError: a label the index does not hold (named), or a faiss HNSW
            index (it cannot remove). Nothing is changed then.
        """
        if isinstance(labels, str):
            labels = [labels]
        wanted = list(dict.fromkeys(str(label) for label in labels))
        held = set(self.labels.tolist()) - {UNKNOWN}
        missing = [label for label in wanted if label not in held]
        if missing:
            shown = ", ".join(sorted(held)[:5]) + (", ..." if len(held) > 5 else "")
            raise InvalidValueError(
                f"cannot remove unknown label(s) {', '.join(map(repr, missing))}: the index "
                f"holds {len(held):,} identities ({shown})"
            )
        rows = np.flatnonzero(np.isin(self.labels, wanted))
        removed_pids = self.items.pids[rows]
        self._remove_rows(rows)
        if self._members is not None:
            stay = ~np.isin(self._members[1], removed_pids)
            self._members = (self._members[0][stay], self._members[1][stay])

    # --- internals ----------------------------------------------------------------------

    def _replace(self, items: GalleryItems, vectors: np.ndarray, sums=None) -> None:
        """Exact index: the new items (numbered), vectors and sums; a centroid index's rows
        sorted by pid, as `build` lists identities."""
        if self.kind == "centroid":
            order = np.argsort(items.pids, kind="stable")
            items, vectors, sums = items.select(order), vectors[order], sums[order]
        self._searcher = ExactIndex(items, vectors)
        self._sums = sums

    def _add_instances(self, embeddings: Embeddings) -> None:
        new_items, vectors, _ = gallery_vectors(embeddings, False, self.items.source)
        items = _numbered(_concatenate(self.items, new_items), self.items)
        if self.method == "exact":
            self._replace(items, np.concatenate([self._searcher.vectors, vectors]))
        else:
            self._searcher = approximate.add_rows(self._searcher, items, vectors)

    def _add_to_centroids(self, embeddings: Embeddings, name: str) -> None:
        if self._sums is None:
            raise InvalidValueError(
                "this centroid index was written by an older ctl_jax (index format version 1) "
                "without the per-identity sums an update needs; rebuild it from the "
                "embeddings (search --gallery=G.npz --centroids --save_index=I.npz)"
            )
        embeddings = embeddings.select(embeddings.labels != UNKNOWN)
        if len(embeddings) == 0:
            return
        row_of = {label: row for row, label in enumerate(self.labels.tolist())}
        rows = np.asarray([row_of.get(label, -1) for label in embeddings.labels.tolist()])
        joining = rows >= 0
        if joining.any() and self.method == "hnsw":
            raise InvalidValueError(
                f"a faiss hnsw index cannot change the centroid of an identity it holds "
                f"({str(embeddings.labels[joining][0])!r} in {name}): HNSW cannot remove vectors; "
                "rebuild it, or use a method that can: exact, "
                f"{', '.join(approximate.REMOVABLE_METHODS)}"
            )
        # Images of identities the index holds join their sums...
        sums, counts = self._sums.copy(), self.items.counts.copy()
        changed = np.unique(rows[joining])
        if len(changed):
            part = embeddings.select(joining)
            group_rows, part_sums, part_counts, _ = identity_sums(part.embeddings, rows[joining])
            sums[group_rows] += part_sums
            counts[group_rows] += part_counts
        items = dataclasses.replace(self.items, counts=counts)
        # ... the others make new identities, drawn by their member closest to the centroid.
        if not joining.all():
            fresh_items, fresh_sums, _, _ = centroid_gallery(
                embeddings.select(~joining), self.items.source
            )
            items = _concatenate(items, fresh_items)
            sums = np.concatenate([sums, fresh_sums])
        items = _numbered(items, self.items)
        members = self._members
        if members is not None:  # the pids are stable (`_numbered`): they key the members
            pid_of = dict(zip(items.labels.tolist(), items.pids.tolist()))
            member_pids = [pid_of[label] for label in embeddings.labels.tolist()]
            members = (
                np.concatenate([members[0], path_keys(embeddings.paths)]),
                np.concatenate([members[1], np.asarray(member_pids, np.int64)]),
            )
        if self.method == "exact":
            self._replace(items, centroid_vectors(sums, items.counts), sums)
            self._members = members
            return
        # faiss: a changed centroid is removed and added again at the end, new ones added.
        stay = np.ones(len(items), bool)
        stay[changed] = False
        order = np.concatenate([np.flatnonzero(stay), changed])
        searcher = (
            approximate.remove_rows(self._searcher, changed) if len(changed) else self._searcher
        )
        items, sums = items.select(order), sums[order]
        start = len(searcher.items)  # the rows kept; those after it are (re-)added
        self._searcher = approximate.add_rows(
            searcher, items, centroid_vectors(sums[start:], items.counts[start:])
        )
        self._sums = sums
        self._members = members

    def _remove_rows(self, rows: np.ndarray) -> None:
        if not len(rows):
            return
        keep = np.ones(len(self), bool)
        keep[rows] = False
        sums = None if self._sums is None else self._sums[keep]
        if self.method == "exact":
            vectors = self._searcher.vectors[keep]
            if self.kind == "centroid" and sums is None:  # a version-1 file: no sums to sort
                self._searcher = ExactIndex(self.items.select(keep), vectors)
            else:
                self._replace(self.items.select(keep), vectors, sums)
            return
        self._searcher = approximate.remove_rows(self._searcher, rows)
        self._sums = sums


def _concatenate(first: GalleryItems, second: GalleryItems) -> GalleryItems:
    return GalleryItems(
        first.kind,
        np.concatenate([first.pids, second.pids]),
        np.concatenate([first.camids, second.camids]),
        np.concatenate([first.paths, second.paths]),
        np.concatenate([first.counts, second.counts]),
        first.source,
        np.concatenate([first.labels, second.labels]),
    )
