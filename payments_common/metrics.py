"""The Prometheus endpoint that every process serves on a port of its own."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final

from prometheus_client import start_http_server

# The buckets of a delay along the change stream (from a source commit to the replicator's
# steps, from a change-stream entry's append to a history process's hand-over to its watch
# streams): the same buckets for all, so that a dashboard and the benchmark compare them
# bucket by bucket.
CHANGE_DELAY_BUCKETS: Final = (
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


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
