"""One payment followed across the three processes: submit → commit → the WAL → applied to Redis → read, delivered.

The services run as real subprocesses, configured only by the standard OTEL_* variables, and
export over OTLP/gRPC to a receiver in the test (tests/support/otlp.py). The client traces
with the OpenTelemetry SDK and its in-memory exporter, and propagates its context in the
calls' metadata, as an instrumented client does.
"""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from payments.approval.v1 import approval_service_pb2 as approval_pb
from payments.approval.v1 import approval_service_pb2_grpc as approval_grpc
from payments.history.v1 import history_service_pb2 as history_pb
from payments.history.v1 import history_service_pb2_grpc as history_grpc
from payments.type.v1 import money_pb2
from payments_common.tracing import WAL_MESSAGE_PREFIX
from stack.otlp import Collector, ReceivedSpan, collector
from stack.servers import free_port
from tests.support.auth import aio_channel
from tests.support.faults import approval_process, history_process, open_accounts
from tests.support.processes import ServiceProcess
from tests.support.replicator import ReplicatorProcess, slot_for
from tests.support.waiting import eventually, wait_until

SUBMIT = "payments.approval.v1.ApprovalService/SubmitPayment"
GET_PAYMENT = "payments.history.v1.HistoryService/GetPayment"
WATCH = "payments.history.v1.HistoryService/WatchPayments"
SPAN_KIND_SERVER, SPAN_KIND_PRODUCER, SPAN_KIND_CONSUMER = 2, 4, 5


@pytest.fixture
def receiver() -> Iterator[Collector]:
    yield from collector()


@pytest.fixture
def untraced_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OTEL_* variable reaches the services from the test's own environment."""
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)


def _watch_slot(dsn: str, name: str) -> None:
    """A test_decoding slot from now on: what the WAL receives, messages included."""
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (name,))
    connection.close()


def _wal_messages(dsn: str, slot: str) -> list[str]:
    """The logical messages the WAL received since the slot was made (test_decoding's lines), then drops it."""
    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT data FROM pg_logical_slot_get_changes(%s, NULL, NULL)", (slot,))
            lines = [row[0] for row in cursor.fetchall() if row[0].startswith("message:")]
            cursor.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    finally:
        connection.close()
    return lines


def _client_tracer() -> tuple[trace.Tracer, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("tests"), exporter


def _traced_metadata() -> list[tuple[str, str]]:
    carrier: dict[str, str] = {}
    TraceContextTextMapPropagator().inject(carrier)
    return list(carrier.items())


async def _pay_and_read(
    approval: str, history: str, payer: str, payee: str
) -> tuple[str, history_pb.GetPaymentResponse, list[str]]:
    """Watches the payee, submits a payment, reads it with its token: all with the current trace context."""
    metadata = _traced_metadata()
    async with aio_channel(approval) as approval_channel, aio_channel(history) as history_channel:
        history_stub = history_grpc.HistoryServiceStub(history_channel)
        watch = history_stub.WatchPayments(
            history_pb.WatchPaymentsRequest(account_id=payee), metadata=metadata, timeout=60
        )
        await watch.initial_metadata()
        submitted = await approval_grpc.ApprovalServiceStub(approval_channel).SubmitPayment(
            approval_pb.SubmitPaymentRequest(
                request_id=str(uuid.uuid4()),
                payer_account_id=payer,
                payee_account_id=payee,
                amount=money_pb2.Money(currency_code="EUR", amount_minor=1234),
                reference="traced",
            ),
            metadata=metadata,
            timeout=30,
        )
        payment_id = submitted.payment.payment_id
        read = await history_stub.GetPayment(
            history_pb.GetPaymentRequest(
                payment_id=payment_id, min_consistency_token=submitted.consistency_token
            ),
            metadata=metadata,
            timeout=30,
        )
        delivered = []
        async for change in watch:
            delivered.append(change.payment.payment_id)
            if change.payment.payment_id == payment_id:
                break
        watch.cancel()
    return payment_id, read, delivered


def _only(spans: list[ReceivedSpan], name: str, **where: object) -> ReceivedSpan:
    found = [s for s in spans if s.name == name and all(getattr(s, k) == v for k, v in where.items())]
    assert len(found) == 1, f"{name} {where}: {found}"
    return found[0]


def _log_lines(process_log: Path) -> list[dict[str, object]]:
    lines = []
    for text in process_log.read_text().splitlines():
        try:
            lines.append(json.loads(text))
        except ValueError:
            continue
    return lines


async def test_a_payment_is_one_trace_from_its_submission_to_the_read_that_waited_for_it(
    migrated_dsn: str, redis_url: str, tmp_path: Path, receiver: Collector
) -> None:
    slot = slot_for(migrated_dsn)
    approval = approval_process(migrated_dsn, free_port(), tmp_path / "approval.log")
    approval.env.update(receiver.env())
    replicator = ReplicatorProcess(
        migrated_dsn, redis_url, tmp_path / "replicator.log", slot=slot, extra_env=receiver.env()
    )
    history = history_process(redis_url, free_port(), tmp_path / "history.log", slot)
    history.env.update(receiver.env())
    wal_slot = f"wal_{slot}"[:63]
    processes: list[ServiceProcess | ReplicatorProcess] = [
        approval.start(),
        replicator.start(),
        history.start(),
    ]
    try:
        approval.wait_serving(60)
        history.wait_serving(60)
        payer, payee = await open_accounts(approval.address, 2, 10**6)
        await asyncio.to_thread(replicator.wait_caught_up, 60)
        _watch_slot(migrated_dsn, wal_slot)
        tracer, client_spans = _client_tracer()
        with tracer.start_as_current_span("pay and check") as root:
            payment_id, read, delivered = await _pay_and_read(approval.address, history.address, payer, payee)
        trace_id = f"{root.get_span_context().trace_id:032x}"
        root_id = f"{root.get_span_context().span_id:016x}"

        def the_trace() -> list[ReceivedSpan]:
            return [s for s in receiver.spans if s.trace_id == trace_id]

        names = {
            "commit",
            "replicate",
            "replication lag",
            "apply to Redis",
            "wait for consistency",
            "deliver",
        }
        await eventually(lambda: names <= {s.name for s in the_trace()}, 30, "the whole trace exported")
        spans = the_trace()
    finally:
        for process in processes:
            process.stop(20)

    assert read.payment.payment_id == payment_id
    assert payment_id in delivered
    assert [s.name for s in client_spans.get_finished_spans()] == ["pay and check"]
    # One connected trace: every span's parent is in it, up to the client's.
    by_id = {s.span_id: s for s in spans}
    for span in spans:
        assert span.parent_span_id == root_id or span.parent_span_id in by_id, span
    submit = _only(spans, SUBMIT, service="approval-svc", parent_span_id=root_id)
    assert submit.kind == SPAN_KIND_SERVER
    assert submit.attributes["payment.id"] == payment_id
    assert submit.attributes["rpc.grpc.status_code"] == 0
    commit = _only(spans, "commit", parent_span_id=submit.span_id)
    assert "db.consistency_lsn" in commit.attributes
    # Across the WAL: the replicator's span is the commit's child.
    replicate = _only(spans, "replicate", service="replicator")
    assert replicate.parent_span_id == commit.span_id
    assert replicate.kind == SPAN_KIND_CONSUMER
    assert replicate.attributes["payment.ids"] == [payment_id]
    assert replicate.attributes["replication.lag_seconds"] >= 0
    assert replicate.attributes["batch.changes"] >= 1
    assert "db.commit_lsn" in replicate.attributes
    lag = _only(spans, "replication lag", parent_span_id=replicate.span_id)
    assert lag.attributes["replication.lag_seconds"] == replicate.attributes["replication.lag_seconds"]
    applied = _only(spans, "apply to Redis", parent_span_id=replicate.span_id)
    assert applied.attributes["batch.changes"] == replicate.attributes["batch.changes"]
    assert replicate.start_ns <= lag.end_ns <= replicate.end_ns
    # The read that waited for the token links to the apply it waited for.
    get = _only(spans, GET_PAYMENT, service="history-svc", parent_span_id=root_id)
    assert get.attributes["payment.id"] == payment_id
    waited = _only(spans, "wait for consistency", parent_span_id=get.span_id)
    assert (trace_id, replicate.span_id) in waited.links
    # The watch delivered it in the same trace, linked to the watch's own span.
    watch = _only(spans, WATCH, service="history-svc", parent_span_id=root_id)
    deliver = _only(spans, "deliver", parent_span_id=replicate.span_id)
    assert deliver.kind == SPAN_KIND_PRODUCER
    assert deliver.attributes["payment.id"] == payment_id
    assert (trace_id, watch.span_id) in deliver.links
    # The trace context went through the WAL, once, in the payment's transaction.
    messages = _wal_messages(migrated_dsn, wal_slot)
    assert len(messages) == 1, messages
    assert f"prefix: {WAL_MESSAGE_PREFIX}" in messages[0]
    assert trace_id in messages[0]
    # Logs and traces join: the request's lines and the applied batch's carry the ids.
    # Every line logged within a call (the accounts' openings: audit lines and more) names the
    # call's span, which was exported.
    server_spans = {(s.trace_id, s.span_id): s.name for s in receiver.spans if s.kind == SPAN_KIND_SERVER}
    request_lines = [line for line in _log_lines(approval.log_path) if "method" in line]
    assert len(request_lines) >= 4
    for line in request_lines:
        assert server_spans.get((str(line["trace_id"]), str(line["span_id"]))) == str(line["method"])[1:], (
            line
        )
    applied_lines = [
        line
        for line in _log_lines(replicator.log_path)
        if line.get("message") == "applied a traced transaction" and line["trace_id"] == trace_id
    ]
    assert [(line["trace_id"], line["span_id"], line["payment_ids"]) for line in applied_lines] == [
        (trace_id, replicate.span_id, [payment_id])
    ]


async def test_with_tracing_off_nothing_is_written_to_the_wal_and_nothing_is_exported(
    migrated_dsn: str, redis_url: str, tmp_path: Path, receiver: Collector, untraced_environment: None
) -> None:
    slot = slot_for(migrated_dsn)
    # Where a collector would be, but OTEL_TRACES_EXPORTER is unset: tracing stays off.
    off = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}"}
    approval = approval_process(migrated_dsn, free_port(), tmp_path / "approval.log")
    approval.env.update(off)
    replicator = ReplicatorProcess(
        migrated_dsn, redis_url, tmp_path / "replicator.log", slot=slot, extra_env=off
    )
    history = history_process(redis_url, free_port(), tmp_path / "history.log", slot)
    history.env.update(off)
    wal_slot = f"wal_{slot}"[:63]
    processes: list[ServiceProcess | ReplicatorProcess] = [
        approval.start(),
        replicator.start(),
        history.start(),
    ]
    try:
        approval.wait_serving(60)
        history.wait_serving(60)
        payer, payee = await open_accounts(approval.address, 2, 10**6)
        await asyncio.to_thread(replicator.wait_caught_up, 60)
        _watch_slot(migrated_dsn, wal_slot)
        tracer, _ = _client_tracer()
        with tracer.start_as_current_span("pay and check"):
            payment_id, read, delivered = await _pay_and_read(approval.address, history.address, payer, payee)
    finally:
        for process in processes:
            process.stop(20)
    assert read.payment.payment_id == payment_id
    assert payment_id in delivered
    assert _wal_messages(migrated_dsn, wal_slot) == []
    # Every process has stopped, so whatever it would have exported is gone: none came.
    assert receiver.spans == []
    for process in (approval, history):
        assert all("trace_id" not in line for line in _log_lines(process.log_path))


@pytest.mark.parametrize(
    ("variable", "value"),
    [("OTEL_TRACES_EXPORTER", "zipkin"), ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")],
)
def test_a_tracing_setting_the_service_cannot_follow_stops_it_at_start(
    migrated_dsn: str, tmp_path: Path, variable: str, value: str
) -> None:
    approval = approval_process(migrated_dsn, free_port(), tmp_path / "approval.log")
    approval.env.update({"OTEL_TRACES_EXPORTER": "otlp", variable: value})
    approval.start()
    try:
        wait_until(lambda: not approval.alive, 60, "approval refused its settings")
    finally:
        approval.stop(5)
    assert approval.returncode == 2
    assert variable in approval.log_text()
