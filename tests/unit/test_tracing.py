"""Tracing's switch and its parsing: what the OTEL_* variables turn on, and which trace contexts are taken."""

from __future__ import annotations

import logging
import re
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import grpc
import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio
from opentelemetry.trace import TraceFlags

from history_svc.watcher import ChangeWatcher, TracedApply
from payments_common import logs, tracing
from payments_common.settings import SettingsError

ROOT = Path(__file__).resolve().parents[2]
PAYMENT = "00000000-0000-4000-8000-000000000001"


@pytest.fixture(autouse=True)
def _tracing_off_afterwards() -> Iterator[None]:
    yield
    tracing.shutdown()


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider, "tests")
    try:
        yield exporter
    finally:
        tracing.shutdown()


@pytest.mark.parametrize(
    ("environ", "on"),
    [
        ({}, False),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4317"}, False),
        ({"OTEL_TRACES_EXPORTER": "none"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp,console"}, True),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_SDK_DISABLED": "true"}, False),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, True),
    ],
)
def test_tracing_is_off_unless_an_exporter_is_named(environ: dict[str, str], on: bool) -> None:
    assert tracing.enabled_by(environ) is on


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_TRACES_EXPORTER": "jaeger"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"},
        {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/json"},
    ],
)
def test_an_exporter_or_protocol_it_cannot_follow_is_refused(environ: dict[str, str]) -> None:
    with pytest.raises(SettingsError):
        tracing.enabled_by(environ)


@pytest.mark.parametrize("ratio", ["2", "-0.1", "often"])
def test_a_sampling_ratio_out_of_range_is_refused(ratio: str) -> None:
    with pytest.raises(SettingsError, match="OTEL_TRACES_SAMPLER_ARG"):
        tracing.configure("tests", {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER_ARG": ratio})
    assert not tracing.active()


def test_the_default_sampler_follows_the_caller_and_samples_a_share_of_the_rest() -> None:
    assert tracing.configure("tests", {"OTEL_TRACES_EXPORTER": "console"})
    try:
        sampler = tracing._provider.sampler
        assert isinstance(sampler, ParentBasedTraceIdRatio)
        assert f"{float(tracing.DEFAULT_SAMPLE_RATIO)}" in sampler.get_description()  # type: ignore[no-untyped-call]
    finally:
        tracing.shutdown()
    assert not tracing.active()


@pytest.mark.parametrize(
    "text",
    [
        "",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
        "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01'; DROP TABLE payments; --",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    ],
)
def test_only_a_w3c_traceparent_is_taken(text: str) -> None:
    assert tracing.parse_traceparent(text) is None
    assert tracing.parse_traceparent(text.encode()) is None


def test_a_traceparent_round_trips() -> None:
    text = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    context = tracing.parse_traceparent(text)
    assert context is not None
    assert context.trace_flags.sampled
    assert tracing.traceparent(context) == text


def test_off_nothing_is_created_and_no_trace_context_is_offered_to_the_wal() -> None:
    assert not tracing.active()
    with tracing.span("commit") as span:
        assert span is None
        assert tracing.sampled_traceparent() is None
        assert tracing.current_ids() is None
    assert logs.trace_ids is None


def test_on_the_current_span_is_offered_to_the_wal_only_when_sampled(spans: InMemorySpanExporter) -> None:
    with tracing.span("commit") as span:
        assert span is not None
        parent = tracing.sampled_traceparent()
        assert parent == tracing.traceparent(span.get_span_context())
        assert logs.trace_ids is not None
        assert logs.trace_ids() == tracing.current_ids()
    assert [s.name for s in spans.get_finished_spans()] == ["commit"]
    unsampled = tracing.parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")
    assert unsampled is not None
    server = tracing.start_server_span(
        "/payments.approval.v1.ApprovalService/SubmitPayment",
        [("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00")],
    )
    assert not server.get_span_context().trace_flags.sampled


def test_a_server_span_carries_the_grpc_code_and_fails_only_on_the_servers_codes(
    spans: InMemorySpanExporter,
) -> None:
    for code in ("OK", "NOT_FOUND", "UNAVAILABLE"):
        span = tracing.start_server_span("/payments.history.v1.HistoryService/GetPayment", [])
        tracing.end_server_span(span, code)
    finished = spans.get_finished_spans()
    assert [s.attributes["rpc.grpc.status_code"] for s in finished if s.attributes] == [0, 5, 14]
    assert [s.status.is_ok for s in finished] == [True, True, False]
    assert finished[0].attributes is not None
    assert finished[0].attributes["rpc.method"] == "GetPayment"


def test_the_span_codes_are_grpcs_numbers() -> None:
    assert dict(tracing._GRPC_CODES) == {code.name: code.value[0] for code in grpc.StatusCode}


# -- settings: docs/tracing.md "a sampling ratio outside 0-1 stops it at start" ----------------


@pytest.mark.parametrize(("sampler", "ratio"), [("parentbased_traceidratio", "2"), ("traceidratio", "often")])
def test_a_ratio_out_of_range_stops_the_service_also_when_the_sampler_is_named(
    monkeypatch: pytest.MonkeyPatch, sampler: str, ratio: str
) -> None:
    """With OTEL_TRACES_SAMPLER set (even to the default's own name), the ratio is not checked:
    the SDK logs a warning and samples every trace (rate 1.0)."""
    environ = {
        "OTEL_TRACES_EXPORTER": "console",
        "OTEL_TRACES_SAMPLER": sampler,
        "OTEL_TRACES_SAMPLER_ARG": ratio,
    }
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    try:
        tracing.configure("tests", environ)
    except SettingsError:
        return  # refused at start, as documented
    description = tracing._provider.sampler.get_description()
    pytest.fail(f"OTEL_TRACES_SAMPLER_ARG={ratio!r} was accepted; the service samples with {description}")


# -- history: "for GetPayment, [a link] to the last one that changed the payment" -------------


def _context(trace_id: int, span_id: int) -> tracing.SpanContext:
    return tracing.SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(1))


def test_a_read_links_only_the_last_traced_change_of_its_payment() -> None:
    caller_trace, other_trace = 0xA, 0xB
    older = TracedApply(10, _context(other_trace, 1), (PAYMENT,))
    latest = TracedApply(20, _context(caller_trace, 2), (PAYMENT,))
    watcher = SimpleNamespace(traced=deque([older, latest]))
    links = ChangeWatcher.traced_up_to(watcher, 30, caller_trace, PAYMENT)  # type: ignore[arg-type]
    # The caller's own transaction is the payment's last change: the older change is not "the last one".
    assert links == [latest.context], links


# -- shutdown with a collector that does not answer ---------------------------------------------


class _HungExporter(SpanExporter):
    """A collector that never answers: every export waits until the test lets it go."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.exporting = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.exporting.set()
        self.release.wait()
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def test_a_stopping_process_does_not_wait_for_a_collector_that_never_answers() -> None:
    """approval and history first stop gRPC within their grace; a pod is killed soon after SIGTERM."""
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    exporter = _HungExporter()
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=10))
    tracing.install(provider, "tests")
    with tracing.span("commit"):
        pass
    assert exporter.exporting.wait(30), "the span was never handed to the exporter"
    try:
        # Returns although the export has not: the test would hang (pytest-timeout) otherwise.
        tracing.shutdown(timeout_seconds=0.1)
        assert not tracing.active()
        assert not exporter.release.is_set()
    finally:
        exporter.release.set()


# -- logs: a caller's header text is not logged at length -----------------------------------------


def test_a_callers_malformed_tracestate_is_not_logged_at_length(caplog: pytest.LogCaptureFixture) -> None:
    from opentelemetry.sdk.trace import TracerProvider

    tracing.install(TracerProvider(), "tests")
    member = "x" * 8000  # no '=': not a tracestate member
    with caplog.at_level(logging.WARNING):
        span = tracing.start_server_span(
            "/payments.history.v1.HistoryService/GetPayment",
            [
                ("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
                ("tracestate", member),
            ],
        )
        tracing.end_server_span(span, "UNAUTHENTICATED")
    longest = max((len(record.getMessage()) for record in caplog.records), default=0)
    caplog.clear()
    # logs.MAX_LOGGED_CHARS: "a request of megabytes must not become a log line of megabytes"
    assert longest <= 2 * logs.MAX_LOGGED_CHARS, f"a log line of {longest} characters of the caller's header"


# -- docs/tracing.md names what exists ------------------------------------------------------------


def test_the_places_docs_tracing_points_to_exist() -> None:
    text = (ROOT / "docs" / "tracing.md").read_text()
    problems = [
        f"{path} does not exist"
        for path in re.findall(r"`(deploy/[^`]+)`", text)
        if not (ROOT / path).exists()
    ]
    if "tracing" not in (ROOT / "deploy" / "k8s" / "README.md").read_text().lower():
        problems.append("deploy/k8s/README.md says nothing of tracing")
    if "tracing" not in (ROOT / "docs" / "benchmark.md").read_text().lower():
        problems.append("docs/benchmark.md measures no cost of tracing")
    assert problems == [], problems


def test_a_service_name_in_otel_resource_attributes_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/tracing.md: "the service name *defaults* to approval-svc, ..." — the standard variable is overridden."""
    monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", "service.name=approval-eu,deployment.environment=prod")
    assert tracing.configure("approval-svc", {"OTEL_TRACES_EXPORTER": "console"})
    attributes = dict(tracing._provider.resource.attributes)
    assert attributes["deployment.environment"] == "prod"
    assert attributes["service.name"] == "approval-eu", attributes["service.name"]
