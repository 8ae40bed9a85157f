"""Calls that end before their answer (a short deadline, a client's cancel) against the real server process.

The server runs as `python -m approval_svc serve`, so its whole output (JSON logs, Python
warnings on stderr) can be checked: no traceback, no pooled connection left to the garbage
collector. Its metrics and pool gauge are read from its Prometheus port.
"""

from __future__ import annotations

import random
import threading
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg2
import pytest
from prometheus_client.parser import text_string_to_metric_families

from payments.approval.v1 import approval_service_pb2 as pb
from payments.approval.v1 import approval_service_pb2_grpc as pb_grpc
from payments.type.v1 import money_pb2, payment_pb2
from stack.servers import free_port
from tests.support.auth import sync_channel
from tests.support.faults import approval_process
from tests.support.processes import ServiceProcess
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

SUBMIT = "/payments.approval.v1.ApprovalService/SubmitPayment"
POOL_SIZE = 5


@pytest.fixture
def server(migrated_dsn: str, tmp_path: Path) -> Iterator[tuple[ServiceProcess, int]]:
    metrics_port = free_port()
    process = approval_process(
        migrated_dsn,
        free_port(),
        tmp_path / "approval.log",
        metrics_port=str(metrics_port),
        db_pool_size=str(POOL_SIZE),
    ).start()
    try:
        process.wait_serving()
        yield process, metrics_port
    finally:
        process.stop()


def metrics(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
        text = page.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def handled(port: int, code: str) -> float:
    key = ("grpc_server_handled_total", (("grpc_code", code), ("grpc_method", SUBMIT)))
    return metrics(port).get(key, 0.0)


def checked_out(port: int) -> float:
    return metrics(port)[("approval_db_pool_checked_out", ())]


def open_accounts(stub: pb_grpc.ApprovalServiceStub, count: int) -> list[pb.Account]:
    return [
        stub.CreateAccount(
            pb.CreateAccountRequest(
                request_id=uuid.uuid4().hex,
                owner_name=f"owner {n}",
                currency_code="EUR",
                opening_balance_minor=10**9,
                per_payment_limit_minor=10**9,
                daily_limit_minor=10**12,
            ),
            timeout=30,
        ).account
        for n in range(count)
    ]


def payment(payer: pb.Account, payee: pb.Account) -> pb.SubmitPaymentRequest:
    return pb.SubmitPaymentRequest(
        request_id=uuid.uuid4().hex,
        payer_account_id=payer.account_id,
        payee_account_id=payee.account_id,
        amount=money_pb2.Money(currency_code="EUR", amount_minor=1),
    )


def check_output(process: ServiceProcess) -> None:
    output = process.log_text()
    assert "garbage collector" not in output
    at = output.find("Traceback")
    assert at < 0, output[max(0, at - 2000) : at + 3000]
    assert "ExecuteBatchError" not in output


def test_short_deadlines_leak_no_connection_and_are_counted_as_deadline_exceeded(
    server: tuple[ServiceProcess, int],
) -> None:
    process, metrics_port = server
    with sync_channel(process.address) as channel:
        stub = pb_grpc.ApprovalServiceStub(channel)
        accounts = open_accounts(stub, 4)
        seen: Counter[str] = Counter()
        lock = threading.Lock()

        def client(seed: int) -> None:
            rng = random.Random(seed)
            for _ in range(100):
                payer, payee = rng.sample(accounts, 2)
                try:
                    stub.SubmitPayment(payment(payer, payee), timeout=rng.uniform(0.002, 0.02))
                    code = "OK"
                except grpc.RpcError as error:
                    code = error.code().name
                with lock:
                    seen[code] += 1

        threads = [threading.Thread(target=client, args=(seed,)) for seed in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sum(seen.values()) == 400
        assert set(seen) <= {"OK", "DEADLINE_EXCEEDED"}, seen

        # Once every cancelled call has let go of its connection, the server's count says why they ended.
        wait_until(lambda: checked_out(metrics_port) == 0, 30, "every connection is back in the pool")
        assert handled(metrics_port, "DEADLINE_EXCEEDED") > 0
        assert handled(metrics_port, "UNAVAILABLE") == 0
        assert handled(metrics_port, "INTERNAL") == 0

        # Still serving, with every pooled connection usable: more calls at once than the pool holds.
        futures = [
            stub.SubmitPayment.future(payment(accounts[0], accounts[1]), timeout=30) for _ in range(20)
        ]
        assert all(f.result().payment.status == payment_pb2.PAYMENT_STATUS_APPROVED for f in futures)
        wait_until(lambda: checked_out(metrics_port) == 0, 30, "every connection is back in the pool")
    process.stop()
    check_output(process)


@pytest.mark.parametrize("ending", ["deadline", "cancel"])
def test_a_call_ended_mid_statement_gives_its_connection_back_at_once(
    server: tuple[ServiceProcess, int], migrated_dsn: str, ending: str
) -> None:
    process, metrics_port = server
    code = "DEADLINE_EXCEEDED" if ending == "deadline" else "CANCELLED"
    with sync_channel(process.address) as channel:
        stub = pb_grpc.ApprovalServiceStub(channel)
        payer, payee = open_accounts(stub, 2)
        before = handled(metrics_port, code)
        blocker = psycopg2.connect(migrated_dsn)
        try:
            with blocker.cursor() as cursor:
                # Holds the payer's row: the payment's first statement waits for it.
                cursor.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", (payer.account_id,))
            waiting = (
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'approval-svc'"
                " AND wait_event_type = 'Lock'"
            )
            observer = psycopg2.connect(migrated_dsn)
            observer.autocommit = True

            def statement_waits() -> bool:
                with observer.cursor() as cursor:
                    cursor.execute(waiting)
                    row = cursor.fetchone()
                return row is not None and row[0] == 1

            call: grpc.Future[pb.SubmitPaymentResponse] = stub.SubmitPayment.future(
                payment(payer, payee), timeout=3 if ending == "deadline" else 60
            )
            try:
                wait_until(statement_waits, 30, "the payment's statement waits for the row lock")
                if ending == "cancel":
                    call.cancel()
                with pytest.raises(grpc.FutureCancelledError if ending == "cancel" else grpc.RpcError):
                    call.result()
                # The server ended the statement and gave the connection back while the row
                # is still locked: nothing waits for the lock any more.
                wait_until(
                    lambda: handled(metrics_port, code) == before + 1, 30, f"the server counted {code}"
                )
                wait_until(lambda: checked_out(metrics_port) == 0, 30, "the connection is back in the pool")
                wait_until(lambda: not statement_waits(), 30, "the statement was cancelled")
            finally:
                observer.close()
        finally:
            blocker.rollback()
            blocker.close()
        # The payment was not made, and the service goes on serving.
        assert stub.SubmitPayment(payment(payer, payee), timeout=30).payment.status == (
            payment_pb2.PAYMENT_STATUS_APPROVED
        )
        with psycopg2.connect(migrated_dsn) as check, check.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM payments")
            assert cursor.fetchone() == (1,)
        check.close()
    process.stop()
    check_output(process)
