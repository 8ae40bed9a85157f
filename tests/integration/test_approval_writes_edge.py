"""An outside review of the write path (the daily counter, and SubmitPayment decided without locks).

Each test here failed on the code it was written against (b84dc1a): it names a defect, and
passes once that is fixed. None synchronises by sleeping or asserts a duration: a test that
needs another transaction to be at a given point waits for PostgreSQL to say so
(pg_stat_activity, pg_blocking_pids).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from uuid import UUID, uuid4

import asyncpg
import pytest
from prometheus_client.metrics import MetricWrapperBase
from sqlalchemy.ext.asyncio import AsyncEngine

from approval_svc import metrics
from approval_svc.adapters import unit_of_work
from approval_svc.adapters.repository import SavedRequest, Submitted
from approval_svc.adapters.unit_of_work import SqlSubmissionPath, SqlUnitOfWork, create_engine
from approval_svc.domain import commands
from approval_svc.domain.errors import AccountNotFound, DatabaseUnavailable
from approval_svc.domain.model import (
    SYSTEM_ACTOR,
    AccountChange,
    LedgerEntry,
    Payment,
    PaymentEvent,
    PaymentStatus,
)
from approval_svc.handlers import Handlers, RequestKey
from approval_svc.migrate import upgrade
from payments_common import logs
from stack.servers import running_postgres
from tests.support import ROOT
from tests.support.approval import async_url, engine_for, handlers_for, key, open_account

POLLS = 4000  # of 5 ms: how long a test waits for PostgreSQL to reach a state before it gives up


@pytest.fixture
async def engine(migrated_dsn: str) -> AsyncIterator[AsyncEngine]:
    async with engine_for(migrated_dsn) as created:
        yield created


@pytest.fixture
async def db(migrated_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(migrated_dsn)
    try:
        yield connection
    finally:
        await connection.close()


class _Between(SqlSubmissionPath):
    """The path without locks with `between` run after its read and before its write."""

    def __init__(self, engine: AsyncEngine, between: Callable[[], Awaitable[None]]) -> None:
        super().__init__(engine)
        self._between = between
        self.outcomes: list[str] = []

    async def commit(
        self,
        payment: Payment,
        event: PaymentEvent,
        changes: Sequence[AccountChange],
        entries: Sequence[LedgerEntry],
        request: SavedRequest,
        versions: dict[UUID, str],
    ) -> Submitted:
        await self._between()
        submitted = await super().commit(payment, event, changes, entries, request, versions)
        self.outcomes.append(submitted.outcome)
        return submitted


def _pay(payer_id: UUID, payee_id: UUID, amount: int) -> commands.SubmitPayment:
    return commands.SubmitPayment(payer_id, payee_id, "EUR", amount, "")


def _outcomes() -> dict[str, float]:
    """approval_submissions_without_locks_total by outcome, whatever outcomes it has."""
    return {
        sample.labels["outcome"]: sample.value
        for sample in next(iter(metrics.SUBMISSIONS_WITHOUT_LOCKS.collect())).samples
        if sample.name.endswith("_total")
    }


def _moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {
        label: after[label] - before.get(label, 0.0) for label in after if after[label] != before.get(label)
    }


async def _blocked_by(observer: asyncpg.Connection, blocker_pid: int) -> str:
    """The statement of the first backend that waits for a lock held by `blocker_pid`."""
    for _ in range(POLLS):
        query = await observer.fetchval(
            "SELECT query FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid)) LIMIT 1", blocker_pid
        )
        if query is not None:
            return str(query)
        await asyncio.sleep(0.005)
    raise AssertionError("nothing waited for the lock")


# 1. The pool's wait is doubled ------------------------------------------------------------


async def test_a_call_waits_for_a_pooled_connection_once_before_it_is_unavailable(
    migrated_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """docs/approval.md: APPROVAL_DB_POOL_TIMEOUT_SECONDS is how long a call waits for a free connection
    before it fails with UNAVAILABLE. The path without locks times out on the pool, counts it as a failed
    connection ("unavailable") and the locked path then waits the whole timeout again: 2x the setting."""
    engine = create_engine(async_url(migrated_dsn), pool_size=1, pool_timeout=0.2)
    try:
        handlers = Handlers(
            lambda: SqlUnitOfWork(engine), 10**9, submissions=lambda: SqlSubmissionPath(engine)
        )
        payer, payee = await open_account(handlers, 100), await open_account(handlers, 0)
        waits: list[None] = []
        checkout = unit_of_work._checkout

        async def counted(engine: AsyncEngine) -> object:
            waits.append(None)
            return await checkout(engine)

        monkeypatch.setattr(unit_of_work, "_checkout", counted)
        busy = await engine.connect()  # every pooled connection in use
        try:
            with pytest.raises(DatabaseUnavailable):
                await handlers.submit_payment(
                    _pay(payer.account_id, payee.account_id, 5), key("SubmitPayment")
                )
        finally:
            await busy.close()
        assert len(waits) == 1, f"the call waited for the pool {len(waits)} times before UNAVAILABLE"
    finally:
        await engine.dispose()


# 2. A busy account's lock is queued for twice --------------------------------------------


async def test_a_payment_to_an_account_being_written_queues_for_its_lock_only_once(
    engine: AsyncEngine, migrated_dsn: str, db: asyncpg.Connection
) -> None:
    """While another transaction writes the payee (a merchant's payments in flight), the version read
    without locks cannot be the one the write will find. submit_decided still queues for the payee's lock
    behind that writer, holding the payer's, only to answer 'conflict' and queue again under the locks:
    with many payments to one payee, ~95% conflict and each costs 7 round trips and two passes of the
    lock queue (measured: 186-190 of 200 payments of 40 payers to one payee)."""
    plain = handlers_for(engine, 10**9, locked_only=True)
    payer, payee = await open_account(plain, 100), await open_account(plain, 0)
    writer = await asyncpg.connect(migrated_dsn)
    try:
        await writer.execute("BEGIN")
        await writer.execute(
            "UPDATE accounts SET received_approved = received_approved + 1 WHERE account_id = $1",
            payee.account_id,
        )
        writer_pid = await writer.fetchval("SELECT pg_backend_pid()")
        handlers = handlers_for(engine, 10**9)
        submission = asyncio.ensure_future(
            handlers.submit_payment(_pay(payer.account_id, payee.account_id, 10), key("SubmitPayment"))
        )
        try:
            waiting = await _blocked_by(db, writer_pid)
        finally:
            await writer.execute("COMMIT")
            outcome = await submission
    finally:
        await writer.close()
    assert outcome.value is not None
    assert outcome.value.status is PaymentStatus.APPROVED
    statement = waiting.split("(", 1)[0].strip()
    assert not statement.upper().startswith("CALL"), (
        f"{statement} queued for a lock whose row it will find changed"
    )


# 3. The outcome counter misses outcomes --------------------------------------------------


async def test_every_submission_on_the_path_without_locks_is_counted_by_its_outcome(
    engine: AsyncEngine,
) -> None:
    """docs/approval.md: approval_submissions_without_locks_total{outcome} "counts each outcome", its help
    text lists replay ("answered with the stored response"). A retry answered by the read (the common
    replay) and a refusal (unknown account: decided again under the locks) are counted under no outcome."""
    handlers = handlers_for(engine, 10**9)
    payer, payee = await open_account(handlers, 100), await open_account(handlers, 0)
    request: RequestKey[Payment] = key("SubmitPayment")
    await handlers.submit_payment(_pay(payer.account_id, payee.account_id, 5), request)

    before = _outcomes()
    again = await handlers.submit_payment(_pay(payer.account_id, payee.account_id, 5), request)
    assert again.replay is not None
    replayed = _moved(before, _outcomes())

    before = _outcomes()
    with pytest.raises(AccountNotFound):
        await handlers.submit_payment(_pay(payer.account_id, uuid4(), 5), key("SubmitPayment"))
    refused = _moved(before, _outcomes())

    assert replayed == {"replay": 1.0}, replayed
    assert sum(refused.values()) == 1.0, f"a refusal moved {refused}"


async def test_a_decision_committed_before_its_connection_died_is_counted() -> None:
    """The connection of a CALL that committed dies before its answer (here: terminated while its COMMIT
    waits for a synchronous standby, after the local commit). The payment is made once and the caller gets
    it back as a replay (held up), but approval_payment_decisions_total never counts that decision: the
    fallback that found its record counts a replay instead."""
    with running_postgres() as server:
        dsn = server.dsn()
        await asyncio.to_thread(upgrade, dsn)
        admin = await asyncpg.connect(dsn)
        await admin.execute("SET synchronous_commit = local")
        async with engine_for(dsn, pool_size=4) as engine:
            handlers = handlers_for(engine, 10**9)
            payer, payee = await open_account(handlers, 100), await open_account(handlers, 0)
            decisions = metrics.DECISIONS.labels(PaymentStatus.APPROVED.value, "", SYSTEM_ACTOR)
            counted = decisions._value.get()
            try:
                await admin.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
                await admin.execute("SELECT pg_reload_conf()")
                submission = asyncio.ensure_future(
                    handlers.submit_payment(
                        _pay(payer.account_id, payee.account_id, 10), key("SubmitPayment")
                    )
                )
                pid = None
                for _ in range(POLLS):
                    pid = await admin.fetchval(
                        "SELECT pid FROM pg_stat_activity WHERE wait_event = 'SyncRep' AND query LIKE 'CALL%'"
                    )
                    if pid is not None:
                        break
                    await asyncio.sleep(0.005)
                assert pid is not None, "the CALL never waited after its local commit"
                await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
                outcome = await submission
            finally:
                await admin.execute("ALTER SYSTEM RESET synchronous_standby_names")
                await admin.execute("SELECT pg_reload_conf()")
            assert outcome.replay is not None  # its own first response, through the locked path
            assert await admin.fetchval("SELECT count(*) FROM payments") == 1
            assert decisions._value.get() == counted + 1, "the committed decision was never counted"
        await admin.close()


# 4. A replay names a payment that does not exist -----------------------------------------


async def test_a_submission_answered_by_a_replay_names_the_replayed_payment_not_its_discarded_decision(
    engine: AsyncEngine, db: asyncpg.Connection
) -> None:
    """A duplicate that commits between the read and the write sends this call to the locked path, which
    replays the duplicate's record. The call's log lines (logs.payment_id_var) and span (payment.id,
    payment.status) still name the decision made without locks, whose payment was never written."""
    plain = handlers_for(engine, 10**9, locked_only=True)
    payer, payee = await open_account(plain, 100), await open_account(plain, 0)
    request: RequestKey[Payment] = key("SubmitPayment")
    command = _pay(payer.account_id, payee.account_id, 10)

    async def duplicate_commits() -> None:
        # Another call (a task of its own, as gRPC runs each call) with the same request.
        await asyncio.ensure_future(plain.submit_payment(command, request))

    path = _Between(engine, duplicate_commits)
    handlers = Handlers(lambda: SqlUnitOfWork(engine), 10**9, submissions=lambda: path)
    logs.payment_id_var.set("")
    outcome = await handlers.submit_payment(command, request)
    assert path.outcomes == ["conflict"]
    assert outcome.replay is not None
    named = logs.payment_id_var.get()
    written = await db.fetchval("SELECT count(*) FROM payments WHERE payment_id = $1::uuid", named)
    assert written == 1, f"the call's logs name payment {named}, which does not exist"


# 5. Docs -----------------------------------------------------------------------------------


def test_the_metrics_section_names_every_approval_metric() -> None:
    """docs/approval.md, "Health, metrics, shutdown", lists the service's Prometheus metrics; the
    counter of the path without locks is named only in the Concurrency section."""
    text = (ROOT / "docs" / "approval.md").read_text()
    section = text.split("## Health, metrics, shutdown", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(approval_[a-z_]+)", section))
    exported = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            family = next(iter(value.collect()))
            exported.add(family.name + ("_total" if family.type == "counter" else ""))
    assert exported - listed == set()
