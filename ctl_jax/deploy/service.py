"""The HTTP search service behind `python -m ctl_jax.serve`: an `Embedder` and a
`ctl_jax.Index` answering over the standard library's `ThreadingHTTPServer`.

Routes:
  GET  /            the search page (`page.py`: self-contained HTML, no external resources)
  GET  /health      {"status": "ok", "model": {...}, "index": {...}}
  GET  /image?path=P  a gallery image, only for a path the index holds (else 404), so no
                    other file can be read whatever P is
  POST /search[?k=N]  one image -> the search-results JSON of `python -m ctl_jax.search`
                    (docs/formats.md), one query; each match also has "image": the URL of its
                    picture (for a centroid, its representative image) or null
  POST /embed       one image -> {"embedding": [D floats], "dim": D, "input_size": [H, W]}

An image is posted as the raw request body (Content-Type image/* or
application/octet-stream) or as multipart/form-data (the part named "image", else the first
file). Errors are JSON `{"error": "..."}`: 400 for a body that is not a decodable image or a
bad parameter, 404, 405, 411 without Content-Length, 413 over the size limit (the body is
not read), 415 for another content type.

Concurrency: requests are handled on threads; the model and the index are called under one
lock, so concurrent requests are answered one model call at a time, each with its own image
(decoding and JSON encoding run in parallel outside the lock).
"""

from __future__ import annotations

import email.parser
import email.policy
import http.server
import json
import mimetypes
import threading
import urllib.parse

import numpy as np

from ctl_jax.data import image_io
from ctl_jax.errors import UnreadableImageError
from ctl_jax.retrieval import results

DEFAULT_MAX_BYTES = 16 * 1024 * 1024
IMAGE_ROUTE = "/image"


class RequestError(Exception):
    """A request the service refuses: HTTP `status` and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class SearchService:
    """What the handlers call: embed an image, search the index; thread-safe.

    Args:
      embedder: a `ctl_jax.Embedder`.
      index: a `ctl_jax.Index` of the same embedding width.
      top_k: default number of matches.
      max_bytes: the largest request body accepted.
    """

    def __init__(self, embedder, index, top_k: int = 10, max_bytes: int = DEFAULT_MAX_BYTES):
        from ctl_jax.deploy.page import PAGE

        self.embedder = embedder
        self.index = index
        self.top_k = int(top_k)
        self.max_bytes = int(max_bytes)
        self.page = PAGE.encode()
        self._lock = threading.Lock()
        # Only these files are served by /image: the index's own (a set: no path tricks).
        self.images = {str(p) for p in index.items.paths.tolist() if p}

    def health(self) -> dict:
        height, width = self.embedder.input_size
        return {
            "status": "ok",
            "model": {
                "input_size": [height, width],
                "dim": self.embedder.dim,
                "step": self.embedder.step,
            },
            "index": {
                "kind": self.index.kind,
                "method": self.index.method,
                "items": len(self.index),
                "dim": self.index.dim,
            },
        }

    def embed(self, data: bytes) -> np.ndarray:
        """(D,) float32 BNNeck embedding of encoded image bytes.

        Raises:
          RequestError 400: the bytes are not a decodable image.
        """
        try:
            image = image_io.decode_pil(data, "the request body")
        except UnreadableImageError as e:
            raise RequestError(400, f"not a readable image: {e}") from e
        with self._lock:
            return self.embedder([image])[0]

    def search(self, data: bytes, k: int | None = None, name: str = "upload") -> dict:
        """The search-results JSON of one posted image."""
        k = self.top_k if k is None else k
        if not 1 <= k <= len(self.index):
            raise RequestError(400, f"k must be in 1..{len(self.index)}, got {k}")
        embedding = self.embed(data)
        with self._lock:
            scores, rows = self.index.search_rows(embedding[None], k)
        items = self.index.items
        document = results.results_document(
            [name],
            [-1],
            scores,
            rows,
            items,
            meta={
                "gallery": items.source or None,
                "kind": self.index.kind,
                "method": self.index.method,
                "num_gallery": len(self.index),
                "top_k": k,
            },
        )
        found = [int(r) for r in rows[0] if r >= 0]
        for match, row in zip(document["queries"][0]["matches"], found):
            path = str(items.paths[row]) if items.paths[row] else ""
            match["image"] = image_url(path) if path in self.images else None
        return document


def image_url(path: str) -> str:
    return f"{IMAGE_ROUTE}?{urllib.parse.urlencode({'path': path})}"


def image_from_body(content_type: str, body: bytes) -> tuple[bytes, str]:
    """(image bytes, file name) of a raw or multipart/form-data request body.

    Raises:
      RequestError 415: another content type; 400: a multipart body without a file.
    """
    kind = content_type.split(";")[0].strip().lower()
    if kind.startswith("image/") or kind == "application/octet-stream":
        return body, "upload"
    if kind != "multipart/form-data":
        raise RequestError(
            415,
            f"Content-Type {kind or '(none)'} is not accepted: post the image as the raw body "
            "(image/* or application/octet-stream) or as multipart/form-data",
        )
    header = f"Content-Type: {content_type}\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(header + body)
    if not message.is_multipart():
        raise RequestError(400, "malformed multipart/form-data body")
    parts = [p for p in message.iter_parts() if p.get_content_disposition() == "form-data"]
    chosen = next(
        (p for p in parts if p.get_param("name", header="content-disposition") == "image"), None
    )
    chosen = chosen or next((p for p in parts if p.get_filename()), None)
    if chosen is None:
        raise RequestError(400, "the multipart/form-data body has no file (field 'image')")
    return chosen.get_payload(decode=True) or b"", chosen.get_filename() or "upload"


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes requests to `self.server.service` (a `SearchService`)."""

    server_version = "ctl_jax"
    protocol_version = "HTTP/1.1"
    timeout = 10  # seconds a keep-alive connection may stay idle (or a body take to arrive)

    @property
    def service(self) -> SearchService:
        return self.server.service

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    def send_bytes(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, document: dict) -> None:
        self.send_bytes(status, json.dumps(document).encode(), "application/json")

    def send_error_json(self, error: RequestError) -> None:
        self.send_json(error.status, {"error": str(error)})

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        try:
            if url.path == "/":
                self.send_bytes(200, self.service.page, "text/html; charset=utf-8")
            elif url.path == "/health":
                self.send_json(200, self.service.health())
            elif url.path == IMAGE_ROUTE:
                self._send_image(url.query)
            elif url.path in ("/search", "/embed"):
                raise RequestError(405, f"{url.path} takes POST with an image")
            else:
                raise RequestError(404, f"no such page: {url.path}")
        except RequestError as e:
            self.send_error_json(e)

    def _send_image(self, query: str) -> None:
        path = urllib.parse.parse_qs(query).get("path", [""])[0]
        if path not in self.service.images:
            raise RequestError(404, "not an image of the index")
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise RequestError(404, f"the index's image cannot be read: {e.strerror}") from e
        kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
        self.send_bytes(200, data, kind)

    def do_POST(self):
        url = urllib.parse.urlsplit(self.path)
        try:
            if url.path not in ("/search", "/embed"):
                raise RequestError(404 if url.path != "/" else 405, f"cannot POST {url.path}")
            data, name = image_from_body(self.headers.get("Content-Type", ""), self._body())
            if url.path == "/embed":
                embedding = self.service.embed(data)
                height, width = self.service.embedder.input_size
                self.send_json(
                    200,
                    {
                        "embedding": embedding.tolist(),
                        "dim": int(embedding.shape[0]),
                        "input_size": [height, width],
                    },
                )
            else:
                self.send_json(200, self.service.search(data, self._k(url.query), name))
        except RequestError as e:
            self.send_error_json(e)

    def _k(self, query: str) -> int | None:
        value = urllib.parse.parse_qs(query).get("k", [None])[0]
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise RequestError(400, f"k must be an integer, got {value!r}") from None

    def _body(self) -> bytes:
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError(411, "send the image with a Content-Length header")
        try:
            size = int(length)
        except ValueError:
            self.close_connection = True
            raise RequestError(400, f"bad Content-Length {length!r}") from None
        if size > self.service.max_bytes:
            # The body is left unread: close the connection after the answer.
            self.close_connection = True
            raise RequestError(
                413, f"the body has {size:,} bytes; the limit is {self.service.max_bytes:,}"
            )
        if size == 0:
            raise RequestError(400, "empty body: post an image")
        return self.rfile.read(size)


class Server(http.server.ThreadingHTTPServer):
    """`ThreadingHTTPServer` holding the service its handlers use.

    `server_close` waits for the request threads (not daemons): a daemon thread still
    running when the interpreter shuts down can make the process abort. An idle keep-alive
    connection ends after `Handler.timeout`, which bounds that wait.
    """

    daemon_threads = False
    block_on_close = True

    def __init__(self, address, service: SearchService, verbose: bool = False):
        super().__init__(address, Handler)
        self.service = service
        self.verbose = verbose


def make_server(service: SearchService, host: str = "127.0.0.1", port: int = 8080, **kw):
    """A bound (not yet serving) `Server`; port 0 picks a free one (`server.server_port`)."""
    return Server((host, port), service, **kw)
