"""Search service: `python -m ctl_jax.serve --index=I.npz (--checkpoint=DIR | --workdir=DIR)
[--host=127.0.0.1] [--port=8080] [--top_k=10] [--max_upload_mb=16] [--step=N] [--log]`.

Serves the index (`python -m ctl_jax.search --save_index` or `ctl_jax.Index.save`) with the
model that embedded it: `GET /` a page to drop a photo on and see the ranked gallery,
`POST /search` and `POST /embed` with an image (raw body or multipart/form-data),
`GET /health` (routes and errors: `ctl_jax.deploy.service`). `--port=0` picks a free port;
the line ending "on http://HOST:PORT" says which, once the model is compiled and ready.
Ctrl-C or SIGTERM stops it: requests in progress are answered (an idle keep-alive
connection is dropped after 10 s), then it exits with code 0.
"""

from __future__ import annotations

import signal
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
_LOG = flags.DEFINE_bool("log", False, "Log every request to stderr.")


def _stop(signum, frame):
    """SIGTERM stops the server as Ctrl-C does; `cli.run` then exits with 128 + signum (143),
    the conventional code every ctl_jax command gives."""
    stop = KeyboardInterrupt(f"stopped by signal {signum}")
    stop.signal_number = signum
    raise stop


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    from ctl_jax.retrieval.images import model_directory

    directory = model_directory(_WORKDIR.value, _CHECKPOINT.value)
    if not _INDEX.value:
        cli.fail("give --index=I.npz (python -m ctl_jax.search --save_index builds one)")
    if _TOP_K.value < 1:
        cli.fail(f"--top_k must be >= 1, got {_TOP_K.value}")
    if not 0 <= _PORT.value < 65536:
        cli.fail(f"--port must be in 0..65535, got {_PORT.value}")
    if _MAX_UPLOAD_MB.value <= 0:
        cli.fail(f"--max_upload_mb must be > 0, got {_MAX_UPLOAD_MB.value}")

    import numpy as np

    from ctl_jax.deploy.service import SearchService, make_server
    from ctl_jax.embedder import Embedder
    from ctl_jax.errors import InvalidValueError
    from ctl_jax.retrieval.updatable_index import Index

    index = Index.load(_INDEX.value)
    # One image per request: batches of one (the devices' count) compile once.
    embedder = Embedder.load(directory, step=_STEP.value, batch_size=1)
    if embedder.dim != index.dim:
        raise InvalidValueError(
            f"--index={_INDEX.value} holds {index.dim}-d vectors but the model at {directory} "
            f"gives {embedder.dim}-d embeddings; serve the index with the model that built it"
        )
    height, width = embedder.input_size
    embedder(np.zeros((1, height, width, 3), np.uint8))  # compile before the first request
    service = SearchService(
        embedder,
        index,
        top_k=min(_TOP_K.value, len(index)),
        max_bytes=int(_MAX_UPLOAD_MB.value * 1024 * 1024),
    )
    try:
        server = make_server(service, _HOST.value, _PORT.value, verbose=_LOG.value)
    except OSError as e:
        raise InvalidValueError(
            f"cannot listen on {_HOST.value}:{_PORT.value}: {e.strerror or e}"
        ) from e
    signal.signal(signal.SIGTERM, _stop)
    host, port = server.server_address[:2]
    print(
        f"serving {index!r} with {directory} (step {embedder.step}) on http://{host}:{port}",
        flush=True,
    )
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("shutting down", file=sys.stderr, flush=True)
        raise  # after `finally`: the exit code says which signal stopped it (130 or 143)
    finally:
        server.server_close()


if __name__ == "__main__":
    cli.run(main)
