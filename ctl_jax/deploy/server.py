"""Running the service's ASGI application on uvicorn, with the socket, shutdown and exit
codes of a ctl_jax command.

- The listening socket is bound here (port 0 picks a free one) with a deep backlog (2048),
  so bursts of connections queue instead of being reset.
- HTTP parsing is uvicorn's h11 protocol; a request it cannot parse (a negative or
  non-numeric Content-Length, a bad request line, headers over the size limit) gets a JSON
  400 (`JsonErrorsH11Protocol`), never reaching the application.
- SIGTERM or Ctrl-C: uvicorn stops accepting, closes idle connections (and those still
  sending their headers), lets requests in progress finish for up to `shutdown_timeout`
  seconds, then cancels them. A watchdog ends the process a few seconds after that whatever
  the clients do. The exit code is 128 + the signal: 143 for SIGTERM, 130 for Ctrl-C.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

# Seconds past the graceful window before the watchdog ends the process.
_WATCHDOG_MARGIN = 5.0


class JsonErrorsH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, answering an unparsable request with a JSON error."""

    def send_400_response(self, msg: str) -> None:
        body = json.dumps(
            {"error": "malformed HTTP request (request line, a header, or Content-Length)"}
        ).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        try:
            for event in (
                h11.Response(status_code=400, headers=headers, reason=b"Bad Request"),
                h11.Data(data=body),
                h11.EndOfMessage(),
            ):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # a response had already started
            pass
        self.transport.close()


def bind(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on host:port (IPv6 if host has a colon).

    Raises:
      OSError: the address cannot be bound (in use, not local, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, announcing readiness and arming the watchdog on a signal."""

    def __init__(self, config, announce, shutdown_timeout: float):
        super().__init__(config)
        self.announce = announce
        self.shutdown_timeout = shutdown_timeout
        self.signal_number: int | None = None

    async def startup(self, sockets=None):
        await super().startup(sockets=sockets)
        if not self.should_exit:
            self.announce()

    def handle_exit(self, sig, frame):
        if self.signal_number is None:
            self.signal_number = sig
            # os.write, not print: the handler may interrupt a write to stderr (the access
            # log), and a buffered stream would refuse the reentrant call.
            os.write(sys.stderr.fileno(), b"shutting down\n")
            watchdog = threading.Timer(
                self.shutdown_timeout + _WATCHDOG_MARGIN, os._exit, (128 + sig,)
            )
            watchdog.daemon = True
            watchdog.start()
        super().handle_exit(sig, frame)


def serve(
    app,
    sock: socket.socket,
    announce,
    *,
    shutdown_timeout: float = 10.0,
    max_connections: int = 1024,
    keep_alive_seconds: int = 5,
    max_header_bytes: int = 16 * 1024,
    backlog: int = 2048,
) -> int:
    """Serves `app` on the bound `sock` until SIGTERM or Ctrl-C; returns the exit code
    (128 + the signal, 0 if the server stopped by itself)."""
    config = uvicorn.Config(
        app,
        http=JsonErrorsH11Protocol,
        loop="asyncio",
        lifespan="on",
        log_config=None,
        access_log=False,  # the application writes its own one-line access log
        proxy_headers=False,
        server_header=False,
        backlog=backlog,
        limit_concurrency=max_connections,
        timeout_keep_alive=keep_alive_seconds,
        timeout_graceful_shutdown=max(1, round(shutdown_timeout)),
        h11_max_incomplete_event_size=max_header_bytes,
    )
    server = _Server(config, announce, shutdown_timeout)
    # uvicorn re-raises the signal after its graceful shutdown with the handlers it found:
    # ignore it then, and exit with the code below.
    previous = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[sock])
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if server.signal_number is not None:
        return 128 + server.signal_number
    return 0


def configure_logging(verbose: bool) -> None:
    """One line per request (ctl_jax.serve) and uvicorn's warnings, to stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    for name, level in (
        ("ctl_jax.serve", logging.INFO if verbose else logging.WARNING),
        ("uvicorn.error", logging.WARNING),
    ):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(level)
        logger.propagate = False
