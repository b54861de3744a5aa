"""What the search service does, apart from HTTP (that is `app.py`): decode uploads within
limits, embed them in dynamic batches, search the current index, update it live.

    embedder = Embedder.load(model_dir, batch_size=32)      # 32: the largest batch
    service = SearchService(embedder, IndexStore("I.npz"), SearchSettings(top_k=10))
    service.compile()               # every batch size and the search, before serving
    await service.start()           # the batch worker and the index-file watcher
    images = await service.images(request)                  # [(decoded image, name)]
    document = await service.search(images[0][0], k=5)
    await service.stop()

Batches. `/search` and `/embed` requests become jobs of one `Batcher`: up to `max_batch`
images embedded in one call of the `Embedder`, whose batches are padded to sizes 1, 2, 4,
..., max_batch, then the batch's queries searched in one call padded to `max_batch` rows.
`compile` compiles all of these before serving, and the search again after every update
(for the default k), so requests do not wait for compilation. A request's answer is the
one it would get alone, up to float rounding: each image is embedded and searched
independently of the others in its batch (only padding is added), and the top-k of a
search for k' >= k starts with the top-k.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging

import numpy as np

from ctl_jax.deploy import uploads
from ctl_jax.deploy.batching import Batcher
from ctl_jax.deploy.gallery_files import GalleryFiles
from ctl_jax.deploy.index_store import IndexStore
from ctl_jax.deploy.uploads import RequestError, UploadLimits
from ctl_jax.errors import InvalidValueError
from ctl_jax.retrieval import results
from ctl_jax.retrieval.embedding_file import Embeddings

log = logging.getLogger("ctl_jax.serve")
IMAGE_ROUTE = "/image"
MAX_LABEL_CHARS = 200


@dataclasses.dataclass(frozen=True)
class SearchSettings:
    """How the service answers.

    Attributes:
      top_k: matches per search unless the request asks (?k=N).
      batch_wait_seconds: how long a batch waits for more requests.
      max_decodes: images decoded at once (each holds up to max_pixels x 3 bytes twice).
      limits: what one request may send.
      image_root: folder answers' paths are relative to (None: the index's common folder).
      absolute_paths: answers give absolute paths.
    """

    top_k: int = 10
    batch_wait_seconds: float = 0.005
    max_decodes: int = 2
    limits: UploadLimits = UploadLimits()
    image_root: str | None = None
    absolute_paths: bool = False


@dataclasses.dataclass(frozen=True)
class _Job:
    image: np.ndarray  # (H, W, 3) uint8 at the model's input size
    k: int  # matches wanted; 0 for an embedding only


def image_url(shown: str) -> str:
    import urllib.parse

    return f"{IMAGE_ROUTE}?{urllib.parse.urlencode({'path': shown})}"


class SearchService:
    """Embedding, searching and updating for the HTTP routes (see the module docstring).

    Args:
      embedder: a `ctl_jax.Embedder`; its batch size is the most images per model call
        (`Embedder.load(..., batch_size=max_batch)`; 1: no batching).
      store: the `IndexStore` of the index file, of the embedder's width.
      settings: `SearchSettings`.
      metrics: a `metrics.ServiceMetrics` or None.
    """

    def __init__(self, embedder, store: IndexStore, settings: SearchSettings, metrics=None):
        self.embedder = embedder
        self.store = store
        self.settings = settings
        self.metrics = metrics
        # The Embedder pads a batch to 1, 2, 4, ... up to its batch size (`Embedder._batches`).
        self.max_batch = int(embedder.batch_size)
        self.gallery = self._gallery_files(store.index)
        store.on_change = self._on_change
        self.batcher = Batcher(
            self._run_batch,
            self.max_batch,
            settings.batch_wait_seconds,
            on_batch=metrics.batch_size.observe if metrics else None,
            sizes=self.batch_sizes(),
        )
        self._decoder = concurrent.futures.ThreadPoolExecutor(
            settings.max_decodes, thread_name_prefix="decode"
        )
        self._watcher: asyncio.Task | None = None
        if metrics is not None:
            metrics.index_items.set(len(store.index))

    # --- life -----------------------------------------------------------------------------

    def batch_sizes(self) -> list[int]:
        """The padded batch sizes the Embedder runs: d, 2d, 4d, ..., max_batch (d devices)."""
        sizes, size = [], int(self.embedder.mesh.devices.size)
        while size < self.max_batch:
            sizes.append(size)
            size *= 2
        return [*sizes, self.max_batch]

    def compile(self) -> None:
        """Compiles every batch size and the search of the current index (before serving)."""
        height, width = self.embedder.input_size
        for size in self.batch_sizes():
            self.embedder(np.zeros((size, height, width, 3), np.uint8))
        self._warm_search(self.store.index)

    async def start(self) -> None:
        await self.batcher.start()
        self._watcher = asyncio.create_task(self._watch_file(), name="index-file")

    async def stop(self) -> None:
        self._watcher.cancel()
        await asyncio.gather(self._watcher, return_exceptions=True)
        await self.batcher.stop()
        self._decoder.shutdown(wait=True, cancel_futures=True)

    async def _watch_file(self) -> None:
        """Picks up a change another writer (`search --add`) made to the index file."""
        while True:
            await asyncio.sleep(1.0)
            try:
                await asyncio.to_thread(self.store.refresh)
            except Exception as e:  # a damaged file: keep serving the index we have
                log.warning("cannot reload %s: %s", self.store.path, e)

    def _warm_search(self, index) -> None:
        k = min(self.settings.top_k, len(index))
        if k >= 1:
            index.search_rows(np.ones((1, index.dim), np.float32), k, query_chunk=self.max_batch)

    def _gallery_files(self, index, previous: GalleryFiles | None = None) -> GalleryFiles:
        return GalleryFiles(
            index.items.paths.tolist(),
            root=self.settings.image_root if previous is None else previous.root,
            absolute=self.settings.absolute_paths,
            known=None if previous is None else previous.checked,
        )

    def _on_change(self, index) -> None:
        """A new index is about to become current (in the updating thread)."""
        self._warm_search(index)
        self.gallery = self._gallery_files(index, self.gallery)
        if self.metrics is not None:
            self.metrics.index_items.set(len(index))

    def health(self) -> dict:
        height, width = self.embedder.input_size
        index = self.store.index
        return {
            "status": "ok",
            "model": {
                "input_size": [height, width],
                "dim": self.embedder.dim,
                "step": self.embedder.step,
            },
            "index": {
                "kind": index.kind,
                "method": index.method,
                "items": len(index),
                "dim": index.dim,
            },
            "read_only": self.store.read_only,
            "max_batch": self.max_batch,
        }

    # --- images in ------------------------------------------------------------------------

    async def images(self, request, many: bool = False) -> list[tuple[np.ndarray, str]]:
        """The request's images decoded at the model's input size, with their names; at
        most `max_decodes` decodes run at once (the decoding threads), whatever the number
        of requests."""
        found = await uploads.uploaded_images(request, self.settings.limits, many)
        height, width = self.embedder.input_size
        decoded = []
        for data, name in found:
            image = await asyncio.get_running_loop().run_in_executor(
                self._decoder,
                uploads.decode_image,
                data,
                height,
                width,
                self.settings.limits.max_pixels,
            )
            decoded.append((image, name))
        return decoded

    # --- the batch ------------------------------------------------------------------------

    def _run_batch(self, jobs: list[_Job]) -> list[tuple]:
        """(embedding, scores, rows, index) per job, one model call and one search."""
        index = self.store.index
        embeddings = self.embedder(np.stack([job.image for job in jobs]))
        wanted = [row for row, job in enumerate(jobs) if job.k]
        found = {}
        if wanted:
            k = min(max(jobs[row].k for row in wanted), len(index))
            scores, rows = index.search_rows(embeddings[wanted], k, query_chunk=self.max_batch)
            found = {row: (scores[i], rows[i]) for i, row in enumerate(wanted)}
        out = []
        for row, job in enumerate(jobs):
            scores, rows = found.get(row, (None, None))
            if scores is not None:
                scores, rows = scores[: job.k], rows[: job.k]
            out.append((embeddings[row], scores, rows, index))
        return out

    async def embed(self, image: np.ndarray) -> np.ndarray:
        """(D,) float32 BNNeck embedding of one decoded image."""
        return (await self.batcher(_Job(image, 0)))[0]

    def check_k(self, k: int | None) -> int:
        """The matches a search returns: `k`, or the default top_k (at most the index size).

        Raises:
          RequestError 400: k outside 1..index size.
        """
        size = len(self.store.index)
        k = min(self.settings.top_k, size) if k is None else k
        if not 1 <= k <= size:
            raise RequestError(400, f"k must be in 1..{size}, got {k}")
        return k

    async def search(self, image: np.ndarray, k: int | None = None, name="upload") -> dict:
        """The search-results JSON of one decoded image (docs/formats.md), each match with
        "image": its picture's URL or null."""
        k = self.check_k(k)
        _, scores, rows, index = await self.batcher(_Job(image, k))
        # An update between the check and the search may have shrunk the index.
        scores, rows = scores[: len(index)], rows[: len(index)]
        return self.document(name, scores, rows, index)

    def document(self, name: str, scores, rows, index) -> dict:
        items = index.items
        document = results.results_document(
            [name],
            [-1],
            scores[None],
            rows[None],
            items,
            meta={
                "gallery": items.source or None,
                "kind": index.kind,
                "method": index.method,
                "num_gallery": len(index),
                "top_k": len(scores),
            },
        )
        gallery = self.gallery
        found = [int(r) for r in rows if r >= 0]
        for match, row in zip(document["queries"][0]["matches"], found):
            path = str(items.paths[row])
            match["path"] = gallery.shown(match["path"])
            match["image"] = image_url(gallery.shown(path)) if gallery.servable(path) else None
        return document

    # --- updates --------------------------------------------------------------------------

    async def add(self, label: str, images: list[np.ndarray]) -> dict:
        """Adds images to identity `label` (new or held); the new index is saved."""
        label = check_label(label)
        # Concurrently: the images of one request share batches.
        embeddings = np.stack(await asyncio.gather(*(self.embed(image) for image in images)))
        count = len(embeddings)
        added = Embeddings(
            embeddings,
            np.zeros(count, np.int64),
            np.full(count, -1, np.int64),
            np.full(count, ""),
            np.full(count, label),
        )
        index = await self._update(lambda index: index.add(added), "add")
        return {"label": label, "added": count, "items": len(index)}

    async def remove(self, label: str) -> dict:
        label = check_label(label)
        index = await self._update(lambda index: index.remove([label]), "remove")
        return {"label": label, "removed": True, "items": len(index)}

    async def _update(self, change, operation: str):
        try:
            index = await asyncio.to_thread(self.store.update, change)
        except InvalidValueError as e:
            status = 404 if "unknown label" in str(e) else 400
            raise RequestError(status, str(e)) from e
        if self.metrics is not None:
            self.metrics.updates.labels(operation).inc()
        return index


def check_label(label: str | None) -> str:
    """A label an update may use: 1..200 printable characters."""
    label = (label or "").strip()
    if not label:
        raise RequestError(400, "give the identity: ?label=NAME")
    if len(label) > MAX_LABEL_CHARS or not label.isprintable():
        raise RequestError(400, f"a label is 1..{MAX_LABEL_CHARS} printable characters")
    return label
