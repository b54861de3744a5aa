"""Search service: `python -m ctl_jax.serve --index=I.npz (--checkpoint=DIR | --workdir=DIR)
[--host=127.0.0.1] [--port=8080] [--token=T] [--read_only] ...` (docs/serving.md).

Serves the index (`python -m ctl_jax.search --save_index` or `ctl_jax.Index.save`) with the
model that embedded it, on uvicorn: `GET /` a page to drop a photo on and see the ranked
gallery (and add or remove identities), `POST /search` and `POST /embed` with an image,
`POST /identities?label=L` and `DELETE /identities/L` to change the index live (saved to
the --index file), `GET /health`, `/metrics`, `/openapi.json` (routes: `ctl_jax.deploy.app`).
`--port=0` picks a free port; the line ending "on http://HOST:PORT" says which, once every
batch size is compiled and the service is ready. SIGTERM or Ctrl-C: requests in progress
get up to --shutdown_timeout seconds, then it exits with 143 (SIGTERM) or 130 (Ctrl-C).
"""

from __future__ import annotations

import ipaddress
import os
import sys

from absl import flags

from ctl_jax import cli

_INDEX = flags.DEFINE_string("index", None, "Index .npz to search (search --save_index).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training work directory holding checkpoints/.")
_CHECKPOINT = flags.DEFINE_string(
    "checkpoint", None, "Converted checkpoint directory (ctl_jax.convert output)."
)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_HOST = flags.DEFINE_string("host", "127.0.0.1", "Address to listen on.")
_PORT = flags.DEFINE_integer("port", 8080, "Port to listen on (0: a free one).")
_TOP_K = flags.DEFINE_integer("top_k", 10, "Matches per search unless ?k=N is given.")
_MAX_UPLOAD_MB = flags.DEFINE_float("max_upload_mb", 16.0, "Largest request body (MB).")
_LOG = flags.DEFINE_bool("log", True, "Access log: one line per request on stderr.")
_MAX_BATCH = flags.DEFINE_integer(
    "max_batch", 32, "Most images embedded in one model call (1: no batching)."
)
_BATCH_WAIT_MS = flags.DEFINE_float(
    "batch_wait_ms", 5.0, "How long a batch waits for more requests (milliseconds)."
)
_READ_ONLY = flags.DEFINE_bool("read_only", False, "Refuse live updates (405).")
_MAX_PIXELS = flags.DEFINE_integer(
    "max_pixels", 16_000_000, "Largest width x height of an uploaded image (from its header)."
)
_MAX_DECODES = flags.DEFINE_integer("max_decodes", 2, "Images decoded at once.")
_MAX_PARTS = flags.DEFINE_integer("max_parts", 16, "Most multipart/form-data parts.")
_REQUEST_TIMEOUT = flags.DEFINE_float(
    "request_timeout", 30.0, "Seconds a request may take, its upload included (then 503)."
)
_SHUTDOWN_TIMEOUT = flags.DEFINE_float(
    "shutdown_timeout", 10.0, "Seconds requests in progress get after SIGTERM / Ctrl-C."
)
_TOKEN = flags.DEFINE_string(
    "token",
    None,
    "Bearer token required on every route but / and /health "
    "(default: $CTL_JAX_TOKEN; none if unset).",
)
_ALLOWED_HOSTS = flags.DEFINE_list(
    "allowed_hosts",
    None,
    "Host header names accepted (default: the loopback names when "
    "bound to a loopback address, else any: '*').",
)
_ABSOLUTE_PATHS = flags.DEFINE_bool(
    "absolute_paths",
    False,
    "Answers give absolute gallery paths (default: relative to --image_root).",
)
_IMAGE_ROOT = flags.DEFINE_string(
    "image_root",
    None,
    "Folder answers' paths are relative to (default: the deepest folder "
    "holding every indexed image).",
)
_MAX_IN_FLIGHT = flags.DEFINE_integer("max_in_flight", 256, "Requests handled at once (503).")
_MAX_CONNECTIONS = flags.DEFINE_integer("max_connections", 1024, "Open connections at most.")
_LOCK_WAIT = flags.DEFINE_float(
    "lock_wait", 10.0, "Seconds an update waits for another writer of the index file."
)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_flags() -> None:
    checks = [
        (_TOP_K.value >= 1, f"--top_k must be >= 1, got {_TOP_K.value}"),
        (0 <= _PORT.value < 65536, f"--port must be in 0..65535, got {_PORT.value}"),
        (_MAX_UPLOAD_MB.value > 0, f"--max_upload_mb must be > 0, got {_MAX_UPLOAD_MB.value}"),
        (_MAX_BATCH.value >= 1, f"--max_batch must be >= 1, got {_MAX_BATCH.value}"),
        (_BATCH_WAIT_MS.value >= 0, f"--batch_wait_ms must be >= 0, got {_BATCH_WAIT_MS.value}"),
        (_MAX_PIXELS.value >= 1, f"--max_pixels must be >= 1, got {_MAX_PIXELS.value}"),
        (_MAX_DECODES.value >= 1, f"--max_decodes must be >= 1, got {_MAX_DECODES.value}"),
        (_MAX_PARTS.value >= 1, f"--max_parts must be >= 1, got {_MAX_PARTS.value}"),
        (_REQUEST_TIMEOUT.value > 0, "--request_timeout must be > 0"),
        (_SHUTDOWN_TIMEOUT.value >= 0, "--shutdown_timeout must be >= 0"),
        (_MAX_IN_FLIGHT.value >= 1, "--max_in_flight must be >= 1"),
        (_MAX_CONNECTIONS.value >= 1, "--max_connections must be >= 1"),
        (_LOCK_WAIT.value >= 0, "--lock_wait must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            cli.fail(message)
    if not _INDEX.value:
        cli.fail("give --index=I.npz (python -m ctl_jax.search --save_index builds one)")


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    from ctl_jax.retrieval.images import model_directory

    directory = model_directory(_WORKDIR.value, _CHECKPOINT.value)
    _check_flags()
    token = _TOKEN.value if _TOKEN.value is not None else os.environ.get("CTL_JAX_TOKEN", "")
    hosts = _ALLOWED_HOSTS.value
    if hosts is None:
        from ctl_jax.deploy.app import LOOPBACK_HOSTS

        hosts = list(LOOPBACK_HOSTS) if _loopback(_HOST.value) else ["*"]

    import warnings

    from PIL import Image

    from ctl_jax.deploy import server
    from ctl_jax.deploy.app import AccessSettings, create_app
    from ctl_jax.deploy.index_store import IndexStore
    from ctl_jax.deploy.metrics import ServiceMetrics
    from ctl_jax.deploy.service import SearchService, SearchSettings
    from ctl_jax.deploy.uploads import UploadLimits
    from ctl_jax.embedder import Embedder
    from ctl_jax.errors import InvalidValueError

    # Pillow warns from ~89 M pixels; uploads are refused far earlier (--max_pixels), from
    # the same header, so its warning would only repeat that in the log.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    store = IndexStore(_INDEX.value, read_only=_READ_ONLY.value, lock_wait=_LOCK_WAIT.value)
    embedder = Embedder.load(directory, step=_STEP.value, batch_size=_MAX_BATCH.value)
    if embedder.dim != store.index.dim:
        raise InvalidValueError(
            f"--index={_INDEX.value} holds {store.index.dim}-d vectors but the model at "
            f"{directory} gives {embedder.dim}-d embeddings; serve the index with the model "
            "that built it"
        )
    settings = SearchSettings(
        top_k=_TOP_K.value,
        batch_wait_seconds=_BATCH_WAIT_MS.value / 1000,
        max_decodes=_MAX_DECODES.value,
        limits=UploadLimits(
            max_bytes=int(_MAX_UPLOAD_MB.value * 1024 * 1024),
            max_pixels=_MAX_PIXELS.value,
            max_parts=_MAX_PARTS.value,
        ),
        image_root=_IMAGE_ROOT.value,
        absolute_paths=_ABSOLUTE_PATHS.value,
    )
    metrics = ServiceMetrics()
    service = SearchService(embedder, store, settings, metrics)
    service.compile()  # every batch size and the search, before the first request
    access = AccessSettings(
        token=token,
        allowed_hosts=tuple(hosts),
        max_in_flight=_MAX_IN_FLIGHT.value,
        request_timeout=_REQUEST_TIMEOUT.value,
        access_log=_LOG.value,
    )
    app = create_app(service, access, metrics)
    try:
        sock = server.bind(_HOST.value, _PORT.value)
    except OSError as e:
        raise InvalidValueError(
            f"cannot listen on {_HOST.value}:{_PORT.value}: {e.strerror or e}"
        ) from e
    server.configure_logging(_LOG.value)
    host, port = sock.getsockname()[:2]
    shown_host = f"[{host}]" if ":" in host else host

    def announce():
        print(
            f"serving {store.index!r} with {directory} (step {embedder.step}, batches up to "
            f"{service.max_batch}) on http://{shown_host}:{port}",
            flush=True,
        )

    code = server.serve(
        app,
        sock,
        announce,
        shutdown_timeout=_SHUTDOWN_TIMEOUT.value,
        max_connections=_MAX_CONNECTIONS.value,
    )
    sys.exit(code)


if __name__ == "__main__":
    cli.run(main)
