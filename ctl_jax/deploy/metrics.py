"""The service's Prometheus metrics (prometheus-client), in a registry of their own so that
several services in one process (tests) do not collide.

  ctl_jax_requests_total{route, method, status}   requests answered
  ctl_jax_request_seconds{route}                   latency histogram (request in, answer out)
  ctl_jax_batch_size                               images per model call
  ctl_jax_index_items                              items in the current index
  ctl_jax_index_updates_total{operation}           live updates applied (add, remove)
  ctl_jax_requests_in_flight                       requests being handled

`route` is the route's template (`/identities/{label}`), or "other" for unknown paths, so a
scan of random paths cannot grow the series without bound.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class ServiceMetrics:
    """The metrics above; `render()` gives the exposition text and its content type."""

    def __init__(self):
        self.registry = CollectorRegistry()
        kw = {"registry": self.registry, "namespace": "ctl_jax"}
        self.requests = Counter(
            "requests", "Requests answered.", ["route", "method", "status"], **kw
        )
        self.latency = Histogram(
            "request_seconds",
            "Seconds from request to answer.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            **kw,
        )
        self.batch_size = Histogram(
            "batch_size", "Images per model call.", buckets=BATCH_BUCKETS, **kw
        )
        self.index_items = Gauge("index_items", "Items in the current index.", **kw)
        self.updates = Counter("index_updates", "Live index updates applied.", ["operation"], **kw)
        self.in_flight = Gauge("requests_in_flight", "Requests being handled.", **kw)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
