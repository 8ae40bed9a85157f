"""The whole platform under faults: processes killed, Redis emptied or stuck, PostgreSQL restarted.

Every service runs as a real subprocess on its own private PostgreSQL and Redis. A load
generator submits payments continuously and retries every failure with the same
request_id, as a well-behaved client does; readers query the history service and record
the version of every view they see. Where Kubernetes would restart a killed container,
the test starts the process again itself, on the same address.

At the end: every acknowledged payment is in PostgreSQL exactly once and in the read
models, `replicator reconcile` finds no difference, the sum of balances is unchanged, and
no reader saw a view move backwards or an acknowledged payment missing.

Authentication is on, as in production: the services trust the test session's token
authority and every client calls with its service token (tests/support/auth.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg2
import pytest
import redis

from approval_svc.migrate import upgrade
from payments.approval.v1 import approval_service_pb2 as approval_pb
from payments.approval.v1 import approval_service_pb2_grpc as approval_grpc
from payments.history.v1 import history_service_pb2 as history_pb
from payments.history.v1 import history_service_pb2_grpc as history_grpc
from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import money_pb2
from payments_common.grpcstatus import error_info
from payments_common.keys import DEFAULT_SCHEMA as KEYS
from stack.replication import run_reconcile
from stack.servers import PostgresServer, RedisServer, free_port
from tests.support.auth import aio_channel
from tests.support.faults import (
    FAST_RECONNECT,
    PaymentLoad,
    Readers,
    approval_process,
    history_process,
    open_accounts,
)
from tests.support.processes import ServiceProcess
from tests.support.replicator import ReplicatorProcess
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow

ACCOUNTS = 20
OPENING_BALANCE = 1_000_000
SLOT = "faults_read_model"


@dataclass
class Platform:
    """Private servers and every service, with the means to kill and restart each."""

    work: Path
    postgres: PostgresServer
    redis_server: RedisServer
    dsn: str
    approval: ServiceProcess
    histories: list[ServiceProcess]
    replicator: ReplicatorProcess
    replicator_starts: int = 1
    accounts: list[str] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return self.redis_server.url(0)

    @property
    def history_target(self) -> str:
        return "ipv4:" + ",".join(h.address for h in self.histories)

    def restart_replicator(self) -> None:
        """kill -9, then a new process, as Kubernetes restarts a crashed container."""
        self.replicator.kill()
        self.replicator_starts += 1
        self.replicator = ReplicatorProcess(
            self.dsn, self.redis_url, self.work / f"replicator-{self.replicator_starts}.log", slot=SLOT
        ).start()

    def logs(self) -> str:
        parts = [f"--- {p.name}\n{p.log_text()[-2000:]}" for p in (self.approval, *self.histories)]
        parts.append(f"--- replicator\n{self.replicator.log_tail()}")
        return "\n".join(parts)


@contextlib.contextmanager
def platform(work: Path) -> Iterator[Platform]:
    postgres = PostgresServer()
    # DEBUG SLEEP makes Redis slow on demand.
    redis_server = RedisServer(base_dir=work / "redis", extra_args=["--enable-debug-command", "yes"])
    processes: list[ServiceProcess] = []
    replicators: list[ReplicatorProcess] = []
    state: Platform | None = None
    try:
        postgres.start()
        redis_server.start()
        dsn = postgres.create_database("payments")
        upgrade(dsn)
        approval = approval_process(dsn, free_port(), work / "approval.log").start()
        histories = [
            history_process(redis_server.url(0), free_port(), work / f"history-{n}.log", SLOT).start()
            for n in range(2)
        ]
        processes += [approval, *histories]
        replicator = ReplicatorProcess(dsn, redis_server.url(0), work / "replicator-1.log", slot=SLOT).start()
        replicators.append(replicator)
        for process in processes:
            process.wait_serving(60)
        state = Platform(work, postgres, redis_server, dsn, approval, histories, replicator)
        yield state
    finally:
        if state is not None:
            replicators.append(state.replicator)
        for process in processes:
            process.stop(5)
        for replicator in replicators:
            with contextlib.suppress(Exception):
                replicator.resume()
            replicator.stop(10)
        redis_server.remove()
        postgres.remove()


@contextlib.asynccontextmanager
async def running(load: PaymentLoad, readers: Readers) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(load.run()), asyncio.create_task(readers.run())]
    try:
        yield
    finally:
        load.stopping.set()
        readers.stopping.set()
        await asyncio.gather(*tasks)


def source_payments(dsn: str) -> dict[str, str]:
    """request_id -> payment_id of every payment in PostgreSQL, failing on a request_id paid twice."""
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT request_id, payment_id::text FROM payments")
            rows = cursor.fetchall()
            cursor.execute("SELECT sum(ledger_balance_minor) FROM accounts")
            row = cursor.fetchone()
    finally:
        connection.close()
    paid: dict[str, str] = {}
    for request_id, payment_id in rows:
        assert request_id not in paid, f"request {request_id} paid twice"
        paid[request_id] = payment_id
    assert row is not None
    assert row[0] == ACCOUNTS * OPENING_BALANCE
    return paid


async def history_probes(target: str, account: str, count: int = 3) -> list[str]:
    """Calls the history service while Redis is stuck or slow; returns each call's outcome."""
    outcomes = []
    async with aio_channel(target, options=FAST_RECONNECT) as channel:
        stub: history_grpc.HistoryServiceAsyncStub = history_grpc.HistoryServiceStub(channel)
        for _ in range(count):
            try:
                reply = await stub.GetAccount(history_pb.GetAccountRequest(account_id=account), timeout=3)
                outcomes.append("OK" if reply.account.account_id == account else "WRONG")
            except grpc.aio.AioRpcError as error:
                info = error_info(error)
                outcomes.append(f"{error.code().name}/{info.reason if info else ''}")
    return outcomes


async def test_the_platform_keeps_working_and_loses_nothing_under_faults(tmp_path: Path) -> None:
    with platform(tmp_path) as p:
        p.accounts = await open_accounts(p.approval.address, ACCOUNTS, OPENING_BALANCE)
        load = PaymentLoad(p.approval.address, p.accounts)
        readers = Readers(p.history_target, p.accounts, load)
        async with running(load, readers):
            await load.wait_acks(100)

            # The replicator is killed three times under load; each new process resumes.
            for _ in range(3):
                p.restart_replicator()
                await load.wait_acks(len(load.acks) + 60)

            # Redis restarts with no data: the replicator rebuilds the read models by itself.
            p.redis_server.restart_empty()
            await load.wait_acks(len(load.acks) + 60)
            await asyncio.to_thread(p.replicator.wait_caught_up, 90)

            # Redis is stuck (a paused process): history fails cleanly, the replicator waits.
            p.redis_server.pause()
            try:
                stuck = await history_probes(p.history_target, p.accounts[0])
            finally:
                p.redis_server.resume()
            assert all(
                o.startswith(("UNAVAILABLE/READ_MODEL_UNAVAILABLE", "DEADLINE_EXCEEDED")) for o in stuck
            ), stuck
            await load.wait_acks(len(load.acks) + 60)
            await asyncio.to_thread(p.replicator.wait_caught_up, 90)

            # Redis is slow (one command blocks it for 2 s): history waits or fails within deadlines.
            slow_redis = asyncio.create_task(asyncio.to_thread(debug_sleep, p.redis_server.port, 2.0))
            slow = await history_probes(p.history_target, p.accounts[0], count=2)
            await slow_redis
            assert all(
                o in ("OK", "UNAVAILABLE/READ_MODEL_UNAVAILABLE", "DEADLINE_EXCEEDED/") for o in slow
            ), slow
            await load.wait_acks(len(load.acks) + 60)

            # PostgreSQL restarts: approval answers UNAVAILABLE meanwhile, the load retries.
            await asyncio.to_thread(p.postgres.restart)
            await load.wait_acks(len(load.acks) + 60)

            # One history process is killed: readers go on with the other; it comes back.
            p.histories[0].kill()
            await load.wait_acks(len(load.acks) + 30)
            p.histories[0].start()
            await asyncio.to_thread(p.histories[0].wait_serving, 30)

            # The approval service is killed twice in the middle of requests.
            for _ in range(2):
                await load.wait_acks(len(load.acks) + 30)
                p.approval.kill()
                p.approval.start()
                await load.wait_acks(len(load.acks) + 30, within_s=90)
            retried_before_end = load.retried_requests

        print(
            f"acknowledged {len(load.acks)} payments, {load.retries} retries of {load.retried_requests} requests; "
            f"readers: {readers.reads} reads, {readers.answered} answered, {readers.unavailable} unavailable"
        )
        assert load.unexpected == [], load.unexpected
        assert load.unresolved == [], p.logs()
        # Requests were in flight when approval died and were retried with their request_id.
        assert retried_before_end > 0
        assert p.replicator.alive, p.replicator.log_tail()
        for process in (p.approval, *p.histories):
            assert process.alive, process.log_text()[-3000:]
        await asyncio.to_thread(p.replicator.wait_caught_up, 90)

        # Every acknowledged payment is in PostgreSQL, once, with the acknowledged id; nothing else is.
        paid = source_payments(p.dsn)
        acked = {ack.request_id: ack.payment_id for ack in load.acks}
        assert len(acked) == len(load.acks)
        assert paid == acked

        # Every acknowledged payment is in the read models, as acknowledged.
        client = redis.Redis.from_url(p.redis_url)
        try:
            with client.pipeline(transaction=False) as pipe:
                for ack in load.acks:
                    pipe.hget(KEYS.payment(ack.payment_id), "view")
                views = pipe.execute()
            with client.pipeline(transaction=False) as pipe:
                for account in p.accounts:
                    pipe.hget(KEYS.account(account), "view")
                accounts = pipe.execute()
        finally:
            client.close()
        missing = [ack.payment_id for ack, raw in zip(load.acks, views, strict=True) if raw is None]
        assert missing == []
        for ack, raw in zip(load.acks, views, strict=True):
            assert read_model_pb2.PaymentView.FromString(raw).status == ack.status
        balances = [
            read_model_pb2.AccountView.FromString(raw).ledger_balance.amount_minor for raw in accounts
        ]
        assert sum(balances) == ACCOUNTS * OPENING_BALANCE

        # The oracle: every row of the source against the read models.
        result = await asyncio.to_thread(run_reconcile, p.dsn, p.redis_url, SLOT)
        assert result.returncode == 0, result.stdout + result.stderr

        # Readers saw data all along, never older than before, never wrong.
        assert readers.answered > 50
        assert readers.backwards == []
        assert readers.wrong == [], readers.wrong[:10]
        # Only losing Redis's data led to a rebuild; a stuck or slow Redis only delayed the replicator.
        rebuilds = sum(log.read_text().count("REBUILD:") for log in p.work.glob("replicator-*.log"))
        assert rebuilds == 1
        # The history service answered every read itself: no process needed a restart but the killed one.
        assert [h.starts for h in p.histories] == [2, 1]
        assert p.approval.starts == 3


async def test_a_retry_across_an_approval_crash_never_pays_twice(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """The crash lands before the commit (the request waits on a row lock) and after it (the reply was sent).

    Before the commit, the one call that the dead process sent goes on in PostgreSQL once the
    lock is free: it decides and commits by itself, and the retry answers with its payment.
    """
    name = f"f_{uuid.uuid4().hex[:12]}"
    dsn = postgres_server.create_database(name)
    approval = approval_process(dsn, free_port(), tmp_path / "approval.log")
    try:
        upgrade(dsn)
        approval.start()
        approval.wait_serving(60)
        payer, payee = await open_accounts(approval.address, 2, OPENING_BALANCE)
        request = approval_pb.SubmitPaymentRequest(
            request_id="pay-once",
            payer_account_id=payer,
            payee_account_id=payee,
            amount=money_pb2.Money(currency_code="EUR", amount_minor=250),
            reference="rent",
        )

        # 1. Before the commit: the payer's row is locked, the request waits, the service dies.
        blocker = psycopg2.connect(dsn)
        try:
            with blocker.cursor() as cursor:
                cursor.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR UPDATE", (payer,))
            async with aio_channel(approval.address) as channel:
                stub: approval_grpc.ApprovalServiceAsyncStub = approval_grpc.ApprovalServiceStub(channel)
                call = stub.SubmitPayment(request, timeout=30)
                await eventually(lambda: _waiting_on_lock(dsn), 20, "the payment waits on the row lock")
                approval.kill()
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await call
                assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        finally:
            blocker.rollback()
            blocker.close()
        orphaned = await eventually(
            lambda: _payments(dsn, "pay-once"), 20, "the call of the dead process commits by itself"
        )

        # The client retries with the same request_id once the service is back: the payment is that one.
        approval.start()
        approval.wait_serving(60)
        async with aio_channel(approval.address) as channel:
            stub = approval_grpc.ApprovalServiceStub(channel)
            first = await stub.SubmitPayment(request, timeout=10)
        assert [first.payment.payment_id] == orphaned

        # 2. After the commit: the service dies, the client did not trust the reply and retries.
        approval.kill()
        async with aio_channel(approval.address, options=FAST_RECONNECT) as channel:
            stub = approval_grpc.ApprovalServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await stub.SubmitPayment(request, timeout=5)
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE
            approval.start()
            approval.wait_serving(60)
            # The channel may still be backing off from the refused connection:
            # a retrying client waits for it to reconnect rather than fail at once.
            again = await stub.SubmitPayment(request, timeout=30, wait_for_ready=True)
        assert again.payment == first.payment
        assert _payments(dsn, "pay-once") == [first.payment.payment_id]
    finally:
        approval.stop(5)
        postgres_server.drop_database(name)


def debug_sleep(port: int, seconds: float) -> None:
    client = redis.Redis(port=port, socket_timeout=seconds + 10)
    try:
        client.execute_command("DEBUG", "SLEEP", str(seconds))  # type: ignore[no-untyped-call]
    finally:
        client.close()


def _waiting_on_lock(dsn: str) -> bool:
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )
            row = cursor.fetchone()
            return row is not None and row[0] > 0
    finally:
        connection.close()


def _payments(dsn: str, request_id: str) -> list[str]:
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT payment_id::text FROM payments WHERE request_id = %s", (request_id,))
            return [row[0] for row in cursor.fetchall()]
    finally:
        connection.close()


async def test_reads_with_a_token_never_answer_from_a_read_model_that_lost_its_data(
    tmp_path: Path, postgres_server: PostgresServer
) -> None:
    """Redis comes back empty and nothing rebuilds it yet: a read with a token must wait, not say NOT_FOUND."""
    from tests.support.history import source_writer

    name = f"f_{uuid.uuid4().hex[:12]}"
    dsn = postgres_server.create_database(name)
    redis_server = RedisServer(base_dir=tmp_path / "redis")
    history: ServiceProcess | None = None
    replicator: ReplicatorProcess | None = None
    writer = source_writer(dsn)
    try:
        upgrade(dsn)
        redis_server.start()
        replicator = ReplicatorProcess(
            dsn, redis_server.url(0), tmp_path / "replicator.log", slot=SLOT
        ).start()
        history = history_process(redis_server.url(0), free_port(), tmp_path / "history.log", SLOT).start()
        history.wait_serving(60)
        payer, payee = writer.open_account("Ada"), writer.open_account("Grace")
        payment_id, token = writer.pay(payer, payee, 100)
        request = history_pb.GetPaymentRequest(payment_id=payment_id, min_consistency_token=token)
        async with aio_channel(history.address, options=FAST_RECONNECT) as channel:
            stub: history_grpc.HistoryServiceAsyncStub = history_grpc.HistoryServiceStub(channel)
            assert (await stub.GetPayment(request, timeout=30)).payment.payment_id == payment_id

            replicator.stop()
            redis_server.restart_empty()
            outcomes = []
            for _ in range(20):
                try:
                    reply = await stub.GetPayment(request, timeout=1)
                    outcomes.append(f"OK/{reply.payment.payment_id == payment_id}")
                except grpc.aio.AioRpcError as error:
                    info = error_info(error)
                    outcomes.append(f"{error.code().name}/{info.reason if info else ''}")
            assert all(
                o.startswith(("UNAVAILABLE/CONSISTENCY_NOT_REACHED", "UNAVAILABLE/READ_MODEL_UNAVAILABLE"))
                or o == "DEADLINE_EXCEEDED/"
                for o in outcomes
            ), outcomes

            # The replicator comes back, rebuilds, and the same read succeeds.
            replicator = ReplicatorProcess(
                dsn, redis_server.url(0), tmp_path / "replicator-2.log", slot=SLOT
            ).start()

            codes = []

            async def found() -> bool:
                try:
                    return (await stub.GetPayment(request, timeout=3)).payment.payment_id == payment_id
                except grpc.aio.AioRpcError as error:
                    codes.append(error.code())
                    return False

            await eventually(found, 60, "the payment is read again once the read models are rebuilt")
            assert set(codes) <= {grpc.StatusCode.UNAVAILABLE}
    finally:
        writer.close()
        if history is not None:
            history.stop(5)
        if replicator is not None:
            replicator.stop()
        redis_server.remove()
        postgres_server.drop_database(name)
