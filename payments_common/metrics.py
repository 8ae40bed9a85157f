"""The Prometheus endpoint that every process serves on a port of its own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import start_http_server


@contextmanager
def metrics_served(port: int) -> Iterator[None]:
    """Serves `/metrics` on `port` until the block ends; 0 serves nothing."""
    if not port:
        yield
        return
    server, _ = start_http_server(port)
    try:
        yield
    finally:
        server.shutdown()
