"""The HTTP side of the search service: a Starlette application over a `SearchService`.

Routes (the OpenAPI document, `openapi.py`, describes each):
  GET  /                 the search page (`page.py`)
  GET  /health           {"status": "ok", "model": {...}, "index": {...}, ...}
  POST /search[?k=N]     one image -> the search-results JSON of `python -m ctl_jax.search`
                         (docs/formats.md), each match also with "image": its picture's URL
  POST /embed            one image -> {"embedding": [D floats], "dim": D, "input_size": [H, W]}
  POST /identities?label=L    images (raw body or multipart parts) added to identity L
  DELETE /identities/{label}  identity removed; both answer {"label", ..., "items": N}
  GET  /image?path=P     a gallery picture named by an answer (checks: `gallery_files.py`)
  GET  /metrics          Prometheus text; GET /openapi.json, GET /docs
HEAD works on every GET route. Every error is JSON {"error": "..."}.

`Guard`, around everything, refuses before any route runs: a Host not allowed (400), a
missing or wrong bearer token (401; `/` and `/health` are open: the page holds no data and
asks for the token), more requests in flight than allowed (503); it puts a deadline on each
request (503 when it passes), counts metrics and writes the one-line access log.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import time

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from ctl_jax.deploy import openapi
from ctl_jax.deploy.uploads import RequestError

log = logging.getLogger("ctl_jax.serve")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")
OPEN_ROUTES = ("/", "/health")


@dataclasses.dataclass(frozen=True)
class AccessSettings:
    """Who may call and how much.

    Attributes:
      token: the bearer token every route but `/` and `/health` needs ("" = none).
      allowed_hosts: Host header names accepted (without port); ("*",) accepts any.
      max_in_flight: requests handled at once; more get 503.
      request_timeout: seconds a request may take (reading its body included).
      access_log: one line per request on the "ctl_jax.serve" logger.
    """

    token: str = ""
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    max_in_flight: int = 256
    request_timeout: float = 30.0
    access_log: bool = True


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status, headers=headers)


def host_name(value: str) -> str:
    """The name of a Host header value: "[::1]:8080" -> "::1", "Example.com:80" -> "example.com"."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """The checks, limits, metrics and log around every request (module docstring)."""

    def __init__(self, app, access: AccessSettings, metrics=None):
        self.app = app
        self.access = access
        self.metrics = metrics
        self.in_flight = 0
        self.hosts = {h.lower() for h in access.allowed_hosts}
        self.token = access.token.encode()

    def refusal(self, scope) -> JSONResponse | None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        if "*" not in self.hosts and host_name(headers.get("host", "")) not in self.hosts:
            return error(400, "Host header not allowed (see --allowed_hosts)")
        if self.token and scope["path"] not in OPEN_ROUTES:
            given = headers.get("authorization", "")
            scheme, _, credential = given.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                credential.strip().encode(), self.token
            ):
                return error(
                    401, "send Authorization: Bearer <token>", {"WWW-Authenticate": "Bearer"}
                )
        if self.in_flight >= self.access.max_in_flight:
            return error(503, "too many requests in flight; try again", {"Retry-After": "1"})
        return None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        state = {"status": 0, "bytes": 0}

        async def sending(message):
            if message["type"] == "http.response.start":
                state["status"] = message["status"]
            elif message["type"] == "http.response.body":
                state["bytes"] += len(message.get("body", b""))
            await send(message)

        refused = self.refusal(scope)
        self.in_flight += 1
        if self.metrics is not None:
            self.metrics.in_flight.inc()
        try:
            if refused is not None:
                await refused(scope, receive, sending)
            else:
                await asyncio.wait_for(
                    self.app(scope, receive, sending), self.access.request_timeout
                )
        except asyncio.TimeoutError:
            if not state["status"]:
                message = f"the request took over {self.access.request_timeout:g} s"
                await error(503, message)(scope, receive, sending)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs when the shutdown window ends: answer if we
            # still can, and end here rather than hand uvicorn a traceback to log.
            if not state["status"]:
                with contextlib.suppress(Exception):
                    await error(503, "the service is shutting down")(scope, receive, sending)
        finally:
            self.in_flight -= 1
            self._record(scope, state, time.perf_counter() - start)

    def _record(self, scope, state, seconds: float) -> None:
        route = scope.get("route")
        name = getattr(route, "path", None) or "other"
        status = state["status"] or 499  # nothing sent: the client went away
        if self.metrics is not None:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(name, scope["method"], str(status)).inc()
            self.metrics.latency.labels(name).observe(seconds)
        if self.access.access_log:
            client = scope.get("client") or ("-", 0)
            query = scope.get("query_string", b"").decode("latin-1")
            target = scope["path"] + (f"?{query[:200]}" if query else "")
            log.info(
                '%s "%s %s" %d %d %.1f ms',
                client[0],
                scope["method"],
                target,
                status,
                state["bytes"],
                seconds * 1000,
            )


def _int_param(request: Request, name: str) -> int | None:
    value = request.query_params.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise RequestError(400, f"{name} must be an integer, got {value[:40]!r}") from None


def create_app(service, access: AccessSettings = AccessSettings(), metrics=None):
    """The ASGI application (a `Guard` around a Starlette app) serving `service`."""
    from ctl_jax.deploy.page import PAGE

    spec = openapi.document()
    docs = openapi.docs_page(spec)

    async def page(request):
        return HTMLResponse(PAGE, headers={"Cache-Control": "no-store"})

    async def health(request):
        return JSONResponse(service.health())

    async def search(request):
        k = service.check_k(_int_param(request, "k"))  # before the upload is read
        ((image, name),) = await service.images(request)
        return JSONResponse(await service.search(image, k, name))

    async def embed(request):
        ((image, _),) = await service.images(request)
        embedding = await service.embed(image)
        height, width = service.embedder.input_size
        return JSONResponse(
            {
                "embedding": embedding.tolist(),
                "dim": int(embedding.shape[0]),
                "input_size": [height, width],
            }
        )

    async def add_identity(request):
        if service.store.read_only:
            raise RequestError(405, "this service is read-only (--read_only): updates are off")
        from ctl_jax.deploy.service import check_label

        label = check_label(request.query_params.get("label"))
        images = await service.images(request, many=True)
        return JSONResponse(await service.add(label, [image for image, _ in images]))

    async def remove_identity(request):
        return JSONResponse(await service.remove(request.path_params["label"]))

    async def image(request):
        path = request.query_params.get("path", "")
        data, kind = await asyncio.to_thread(service.gallery.read, path)
        return Response(data, media_type=kind, headers={"Cache-Control": "no-store"})

    async def metrics_text(request):
        if metrics is None:
            raise RequestError(404, "metrics are off")
        body, kind = metrics.render()
        return Response(body, media_type=kind)

    async def openapi_json(request):
        return JSONResponse(spec)

    async def docs_html(request):
        return HTMLResponse(docs)

    async def request_error(request, e: RequestError):
        headers = dict(e.headers)
        if e.status in (400, 411, 413, 415) and request.method in ("POST", "PUT", "PATCH"):
            # The body may be left unread: close rather than read the rest of it.
            headers["Connection"] = "close"
        return error(e.status, str(e), headers)

    async def http_error(request, e: HTTPException):
        message = e.detail
        if e.status_code == 404:
            message = f"no such page: {request.url.path}"
        elif e.status_code == 405:
            allowed = (e.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {request.url.path} (use {allowed})"
        return error(e.status_code, message, e.headers)

    async def disconnected(request, e: ClientDisconnect):
        return Response(status_code=499)  # not sent: nobody is listening

    async def internal(request, e: Exception):
        log.error("error answering %s %s", request.method, request.url.path, exc_info=e)
        return error(500, "internal error (logged by the service)")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.start()
        try:
            yield
        finally:
            await service.stop()

    routes = [
        Route("/", page, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/search", search, methods=["POST"]),
        Route("/embed", embed, methods=["POST"]),
        Route("/identities", add_identity, methods=["POST"]),
        Route("/identities/{label:path}", remove_identity, methods=["DELETE"]),
        Route("/image", image, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
        Route("/openapi.json", openapi_json, methods=["GET"]),
        Route("/docs", docs_html, methods=["GET"]),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            RequestError: request_error,
            HTTPException: http_error,
            ClientDisconnect: disconnected,
            Exception: internal,
        },
        lifespan=lifespan,
    )
    return Guard(app, access, metrics)
