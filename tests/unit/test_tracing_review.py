"""Review of the tracing change: behaviours that contradict docs/tracing.md or an operator's expectations.

Each test states what should hold; each fails on the reviewed commit.
"""

from __future__ import annotations

import logging
import re
import threading
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import SimpleNamespace

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
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
