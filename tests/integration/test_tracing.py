"""One payment followed across the three processes: submit → commit → the WAL → applied to Redis → read, delivered.

The services run as real subprocesses, configured only by the standard OTEL_* variables, and
export over OTLP/gRPC to a receiver in the test (tests/support/otlp.py). The client traces
with the OpenTelemetry SDK and its in-memory exporter, and propagates its context in the
calls' metadata, as an instrumented client does.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
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


async def _submit(
    channel: grpc.aio.Channel, payer: str, payee: str, reference: str, metadata: list[tuple[str, str]]
) -> approval_pb.SubmitPaymentResponse:
    """A payment of 12.34 EUR, the call carrying `metadata`."""
    response: approval_pb.SubmitPaymentResponse = await approval_grpc.ApprovalServiceStub(
        channel
    ).SubmitPayment(
        approval_pb.SubmitPaymentRequest(
            request_id=str(uuid.uuid4()),
            payer_account_id=payer,
            payee_account_id=payee,
            amount=money_pb2.Money(currency_code="EUR", amount_minor=1234),
            reference=reference,
        ),
        metadata=metadata,
        timeout=30,
    )
    return response


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
        submitted = await _submit(approval_channel, payer, payee, "traced", metadata)
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


@dataclass
class Platform:
    approval: ServiceProcess
    replicator: ReplicatorProcess
    history: ServiceProcess
    payer: str
    payee: str
    # A test_decoding slot made once the accounts were replicated: what the WAL received since.
    wal_slot: str


@contextlib.asynccontextmanager
async def _platform(dsn: str, redis_url: str, tmp_path: Path, env: dict[str, str]) -> AsyncIterator[Platform]:
    """The three services, each with `env`, two accounts replicated, and a slot that watches the WAL from then on."""
    slot = slot_for(dsn)
    approval = approval_process(dsn, free_port(), tmp_path / "approval.log")
    approval.env.update(env)
    replicator = ReplicatorProcess(dsn, redis_url, tmp_path / "replicator.log", slot=slot, extra_env=env)
    history = history_process(redis_url, free_port(), tmp_path / "history.log", slot)
    history.env.update(env)
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
        wal_slot = f"wal_{slot}"[:63]
        _watch_slot(dsn, wal_slot)
        yield Platform(approval, replicator, history, payer, payee, wal_slot)
    finally:
        for process in processes:
            process.stop(20)


async def test_a_payment_is_one_trace_from_its_submission_to_the_read_that_waited_for_it(
    migrated_dsn: str, redis_url: str, tmp_path: Path, receiver: Collector
) -> None:
    async with _platform(migrated_dsn, redis_url, tmp_path, receiver.env()) as platform:
        approval, replicator, wal_slot = platform.approval, platform.replicator, platform.wal_slot
        tracer, client_spans = _client_tracer()
        with tracer.start_as_current_span("pay and check") as root:
            payment_id, read, delivered = await _pay_and_read(
                approval.address, platform.history.address, platform.payer, platform.payee
            )
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
            # The server spans end last (after their children): waited for too, or a loaded
            # machine exports a child before its parent is in.
            SUBMIT,
            GET_PAYMENT,
            WATCH,
        }
        await eventually(lambda: names <= {s.name for s in the_trace()}, 30, "the whole trace exported")
        spans = the_trace()

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
    assert commit.attributes["db.outcome"] == "committed"  # decided in one call
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
    # Where a collector would be, but OTEL_TRACES_EXPORTER is unset: tracing stays off.
    off = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver.port}"}
    async with _platform(migrated_dsn, redis_url, tmp_path, off) as platform:
        approval, history, wal_slot = platform.approval, platform.history, platform.wal_slot
        tracer, _ = _client_tracer()
        with tracer.start_as_current_span("pay and check"):
            payment_id, read, delivered = await _pay_and_read(
                approval.address, history.address, platform.payer, platform.payee
            )
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


def _sampled_traceparent() -> tuple[str, str]:
    """A caller's sampled W3C traceparent, and its trace id."""
    trace_id = uuid.uuid4().hex
    return f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01", trace_id


# -- a caller's payment_id goes into the span before it is validated, unbounded -----------------


async def test_a_callers_oversized_payment_id_does_not_cost_other_calls_their_spans(
    redis_url: str, tmp_path: Path, receiver: Collector
) -> None:
    """Any caller allowed GetPayment sends a payment_id of megabytes with a sampled traceparent.

    The server copies it into the span's `payment.id` before the handler refuses it as not a
    UUID (no attribute length limit is set); the export batch it lands in is larger than a
    collector accepts (4 MiB, gRPC's and the OpenTelemetry Collector's default), and every
    span in that batch is lost, the well-formed call's too.
    """
    history = history_process(redis_url, free_port(), tmp_path / "history.log", "rm_tracing_limits")
    history.env.update(receiver.env())
    # One batch: everything is exported at shutdown.
    history.env["OTEL_BSP_SCHEDULE_DELAY"] = "60000"
    history.start()
    try:
        history.wait_serving(60, service="liveness")
        async with aio_channel(history.address) as channel:
            stub = history_grpc.HistoryServiceStub(channel)
            for _ in range(2):
                parent, _ = _sampled_traceparent()
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await stub.GetPayment(
                        history_pb.GetPaymentRequest(payment_id="x" * 3_000_000),
                        metadata=[("traceparent", parent)],
                        timeout=30,
                    )
                assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            parent, honest_trace = _sampled_traceparent()
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await stub.GetPayment(
                    history_pb.GetPaymentRequest(payment_id=str(uuid.uuid4())),
                    metadata=[("traceparent", parent)],
                    timeout=30,
                )
            assert missing.value.code() in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
    finally:
        history.stop(30)
    export_errors = [line for line in history.log_text().splitlines() if "Failed to export" in line]
    longest = max((len(str(s.attributes.get("payment.id", ""))) for s in receiver.spans), default=0)
    assert [s.name for s in receiver.spans if s.trace_id == honest_trace], (
        f"the well-formed call's span was not exported; longest payment.id received: {longest}; "
        f"history logged: {[line[:300] for line in export_errors]}"
    )


# -- a traced transaction applied in chunks names none of its payments ---------------------------


async def test_a_traced_transaction_applied_in_chunks_names_its_payments(
    migrated_dsn: str, redis_url: str, tmp_path: Path, receiver: Collector
) -> None:
    slot = slot_for(migrated_dsn)
    approval = approval_process(migrated_dsn, free_port(), tmp_path / "approval.log")
    approval.env.update(receiver.env())
    replicator = ReplicatorProcess(
        migrated_dsn,
        redis_url,
        tmp_path / "replicator.log",
        slot=slot,
        extra_env={**receiver.env(), "REPLICATOR_TRANSACTION_CHUNK_CHANGES": "2"},
    )
    processes: list[ServiceProcess | ReplicatorProcess] = [approval.start(), replicator.start()]
    try:
        approval.wait_serving(60)
        payer, payee = await open_accounts(approval.address, 2, 10**6)
        parent, trace_id = _sampled_traceparent()
        async with aio_channel(approval.address) as channel:
            submitted = await _submit(channel, payer, payee, "chunked", [("traceparent", parent)])
        payment_id = submitted.payment.payment_id

        def replicate() -> list[dict[str, object]]:
            return [s.attributes for s in receiver.spans if s.trace_id == trace_id and s.name == "replicate"]

        await eventually(lambda: bool(replicate()), 30, "the replicate span exported")
    finally:
        for process in processes:
            process.stop(20)
    [attributes] = replicate()
    assert int(str(attributes["replication.changes"])) > 2  # it was applied in chunks
    assert (attributes["payment.ids"], attributes["payment.ids_cut"]) == ([payment_id], False), attributes


# -- the replicator takes in every role's logical messages, tracing off ---------------------------


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


async def test_with_tracing_off_the_replicator_does_not_take_in_other_roles_messages(
    migrated_dsn: str, redis_url: str, tmp_path: Path, untraced_environment: None
) -> None:
    """A role with no privilege on any table (pg_logical_emit_message is PUBLIC) emits one 64 MiB message.

    Before the change pgoutput dropped it (`messages` off); now the replicator asks for every
    message, of any prefix, whether or not it traces, and holds it (more than once) in memory.
    """
    size_mib = 64
    role = f"nobody_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(migrated_dsn)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(f"CREATE ROLE {role} LOGIN")
    admin.close()
    replicator = ReplicatorProcess(
        migrated_dsn, redis_url, tmp_path / "replicator.log", slot=slot_for(migrated_dsn)
    )
    replicator.start()
    try:
        replicator.wait_for_log("streaming slot", 60)
        assert replicator.process is not None
        before = _peak_rss_kib(replicator.process.pid)
        stranger = psycopg2.connect(migrated_dsn, user=role)
        with stranger, stranger.cursor() as cursor:
            cursor.execute(
                "SELECT pg_logical_emit_message(true, 'someone.else', repeat('x', %s))", (size_mib * 2**20,)
            )
        stranger.close()
        await asyncio.to_thread(replicator.wait_caught_up, 60)
        grew_mib = (_peak_rss_kib(replicator.process.pid) - before) / 1024
    finally:
        replicator.stop(20)
        admin = psycopg2.connect(migrated_dsn)
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(f"DROP ROLE {role}")
        admin.close()
    assert grew_mib < size_mib / 2, f"the replicator's peak memory grew by {grew_mib:.0f} MiB"
