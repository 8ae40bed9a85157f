"""Tracing's switch and its parsing: what the OTEL_* variables turn on, and which trace contexts are taken."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio

from payments_common import logs, tracing
from payments_common.settings import SettingsError


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
