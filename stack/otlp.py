"""An OTLP/gRPC trace receiver: what the services export when tracing is on, kept to be read (tests) or counted (the benchmark).

The services export with the OpenTelemetry SDK's own OTLP exporter, configured only by the
standard OTEL_* variables (`collector_env`), so a test sees exactly what a collector would.
`python -m stack.otlp --port N --counts FILE` is the counting receiver in a process of its
own, as the benchmark runs it: it keeps no span, only how many each service sent.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2


@dataclass(frozen=True)
class ReceivedSpan:
    service: str
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    # (trace id, span id) of each link
    links: tuple[tuple[str, str], ...]


def _value(value: common_pb2.AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    return getattr(value, kind) if kind else None


def _attributes(items: Any) -> dict[str, Any]:
    return {item.key: _value(item.value) for item in items}


class _Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[ReceivedSpan] = []

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received = []
        for resource_spans in request.resource_spans:
            service = str(_attributes(resource_spans.resource.attributes).get("service.name", ""))
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    received.append(
                        ReceivedSpan(
                            service,
                            span.name,
                            span.trace_id.hex(),
                            span.span_id.hex(),
                            span.parent_span_id.hex(),
                            span.kind,
                            span.start_time_unix_nano,
                            span.end_time_unix_nano,
                            _attributes(span.attributes),
                            tuple((link.trace_id.hex(), link.span_id.hex()) for link in span.links),
                        )
                    )
        with self.lock:
            self.spans.extend(received)
        return trace_service_pb2.ExportTraceServiceResponse()


class Collector:
    """A running receiver on 127.0.0.1:`port`."""

    def __init__(self, server: grpc.Server, receiver: _Receiver, port: int) -> None:
        self._server = server
        self._receiver = receiver
        self.port = port

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._receiver.lock:
            return list(self._receiver.spans)

    def env(self, service_name: str = "") -> dict[str, str]:
        """The OTEL_* variables that make a service export here, every span sampled, exported within 100 ms."""
        env = {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{self.port}",
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_TRACES_SAMPLER": "parentbased_always_on",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        if service_name:
            env["OTEL_SERVICE_NAME"] = service_name
        return env


def collector() -> Iterator[Collector]:
    """A receiver for the length of a fixture."""
    receiver = _Receiver()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)  # type: ignore[no-untyped-call]
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield Collector(server, receiver, port)
    finally:
        server.stop(0)


class SpanCounter(trace_service_pb2_grpc.TraceServiceServicer):
    """Counts the spans of each service (`service.name`), keeping none; `path` holds the counts after each export."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        received: Counter[str] = Counter()
        for resource_spans in request.resource_spans:
            service = next(
                (a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"),
                "",
            )
            received[service] += sum(len(scope_spans.spans) for scope_spans in resource_spans.scope_spans)
        with self.lock:
            self.counts.update(received)
            self.write()
        return trace_service_pb2.ExportTraceServiceResponse()

    def write(self) -> None:
        """Replaces the counts file in one step, so that a reader never sees half of it."""
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(dict(self.counts), sort_keys=True))
        os.replace(partial, self.path)


def read_counts(path: Path) -> dict[str, int]:
    """The spans received so far by a counting receiver, by service; empty before it serves."""
    try:
        raw: dict[str, int] = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    return raw


def main(argv: Sequence[str] | None = None) -> int:
    """Counts the spans exported to 127.0.0.1:PORT until SIGTERM; FILE appears once it serves."""
    parser = argparse.ArgumentParser(prog="python -m stack.otlp", description=main.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--counts", type=Path, required=True, help="where the counts are kept, as JSON")
    args = parser.parse_args(argv)
    args.counts.unlink(missing_ok=True)
    counter = SpanCounter(args.counts)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(counter, server)  # type: ignore[no-untyped-call]
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    with counter.lock:
        counter.write()
    stopping = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopping.set())
    stopping.wait()
    # The exports already under way are answered and counted.
    server.stop(grace=5).wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
