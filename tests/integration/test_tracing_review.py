"""Review of the tracing change, across real processes: each test states what should hold and fails on the reviewed commit."""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg2
import pytest

from payments.approval.v1 import approval_service_pb2 as approval_pb
from payments.approval.v1 import approval_service_pb2_grpc as approval_grpc
from payments.history.v1 import history_service_pb2 as history_pb
from payments.history.v1 import history_service_pb2_grpc as history_grpc
from payments.type.v1 import money_pb2
from stack.otlp import Collector, collector
from stack.servers import free_port
from tests.support.auth import aio_channel
from tests.support.faults import approval_process, history_process, open_accounts
from tests.support.processes import ServiceProcess
from tests.support.replicator import ReplicatorProcess, slot_for
from tests.support.waiting import eventually


@pytest.fixture
def receiver() -> Iterator[Collector]:
    yield from collector()


@pytest.fixture
def untraced_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("OTEL_")]:
        monkeypatch.delenv(name)


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
    history = history_process(redis_url, free_port(), tmp_path / "history.log", "rm_review_tracing")
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
            submitted = await approval_grpc.ApprovalServiceStub(channel).SubmitPayment(
                approval_pb.SubmitPaymentRequest(
                    request_id=str(uuid.uuid4()),
                    payer_account_id=payer,
                    payee_account_id=payee,
                    amount=money_pb2.Money(currency_code="EUR", amount_minor=1234),
                    reference="chunked",
                ),
                metadata=[("traceparent", parent)],
                timeout=30,
            )
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
