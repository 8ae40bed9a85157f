"""A submission decided without locks: two round trips, and nothing written unless its inputs are as it read them.

The handlers read the request's record and the accounts (with their row versions) without
locks, decide, then CALL `submit_decided` (migration 0005), which writes and commits only
if the accounts are still those versions. Anything else is decided again under the locks.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, ClassVar, Self
from uuid import UUID, uuid4

import asyncpg
import psycopg2
import pytest
from prometheus_client.metrics import MetricWrapperBase
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from approval_svc import metrics
from approval_svc.adapters import unit_of_work
from approval_svc.adapters.repository import IdempotencyKey, Peek, SavedRequest, Submitted
from approval_svc.adapters.unit_of_work import SqlSubmissionPath, SqlUnitOfWork, create_engine
from approval_svc.domain import commands
from approval_svc.domain.errors import AccountNotFound, DatabaseUnavailable
from approval_svc.domain.model import (
    Account,
    AccountChange,
    DeclineReason,
    LedgerEntry,
    Payment,
    PaymentEvent,
    PaymentStatus,
)
from approval_svc.handlers import Handlers, RequestKey
from approval_svc.migrate import downgrade, upgrade
from payments_common import logs
from tests.support import ROOT
from tests.support.approval import async_url, engine_for, handlers_for, key, open_account


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


class _Interleaved(SqlSubmissionPath):
    """The path with `between` run after the read and before the write: what another call did meanwhile."""

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


class _Logged(SqlSubmissionPath):
    """The path, recording the first word of every statement it sends."""

    statements: ClassVar[list[str]] = []

    async def __aenter__(self) -> Self:
        entered = await super().__aenter__()
        self._require().add_query_logger(self._log)
        return entered

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._require().remove_query_logger(self._log)
        await super().__aexit__(exc_type, exc, tb)

    @classmethod
    def _log(cls, record: Any) -> None:
        cls.statements.append(record.query.split()[0].upper())


async def _balance(engine: AsyncEngine, account: Account) -> int:
    async with engine.connect() as connection:
        value = await connection.scalar(
            text("SELECT ledger_balance_minor FROM accounts WHERE account_id = :a"), {"a": account.account_id}
        )
    return int(value)


def _submission(payer: Account, payee: Account, amount: int) -> commands.SubmitPayment:
    return _pay(payer.account_id, payee.account_id, amount)


def _pay(payer_id: UUID, payee_id: UUID, amount: int) -> commands.SubmitPayment:
    return commands.SubmitPayment(payer_id, payee_id, "EUR", amount, "")


async def test_a_payment_is_decided_in_two_round_trips(engine: AsyncEngine) -> None:
    handlers = Handlers(lambda: SqlUnitOfWork(engine), 10**9, submissions=lambda: _Logged(engine))
    payer, payee = await open_account(handlers, 10**6), await open_account(handlers, 0)
    # The connection's first call prepares the statements.
    await handlers.submit_payment(_submission(payer, payee, 10), key("SubmitPayment"))
    _Logged.statements.clear()
    before = metrics.SUBMISSIONS_WITHOUT_LOCKS.labels("committed")._value.get()
    outcome = await handlers.submit_payment(_submission(payer, payee, 10), key("SubmitPayment"))
    assert outcome.value is not None
    assert outcome.value.status is PaymentStatus.APPROVED
    # The read without locks and the write that commits (asyncpg may report them in either order).
    assert sorted(_Logged.statements) == ["CALL", "SELECT"]
    assert metrics.SUBMISSIONS_WITHOUT_LOCKS.labels("committed")._value.get() == before + 1
    assert await _balance(engine, payer) == 10**6 - 20


async def test_a_decision_on_an_account_that_changed_since_it_was_read_is_made_again_under_the_locks(
    engine: AsyncEngine,
) -> None:
    plain = handlers_for(engine, 10**9)
    payer, payee = await open_account(plain, 100), await open_account(plain, 0)

    async def another_payment_takes_the_balance() -> None:
        taken = await plain.submit_payment(_submission(payer, payee, 80), key("SubmitPayment"))
        assert taken.value is not None
        assert taken.value.status is PaymentStatus.APPROVED

    paths: list[_Interleaved] = []

    def path() -> _Interleaved:
        # Only the first submission has another one come in between.
        made = _Interleaved(engine, another_payment_takes_the_balance if not paths else _nothing)
        paths.append(made)
        return made

    handlers = Handlers(lambda: SqlUnitOfWork(engine), 10**9, submissions=path)
    # Read with 100 available, 50 would be approved; by its write only 20 are left.
    outcome = await handlers.submit_payment(_submission(payer, payee, 50), key("SubmitPayment"))
    assert paths[0].outcomes == ["conflict"]
    assert outcome.value is not None
    assert (outcome.value.status, outcome.value.decline_reason) == (
        PaymentStatus.DECLINED,
        DeclineReason.INSUFFICIENT_FUNDS,
    )
    assert await _balance(engine, payer) == 20
    async with engine.connect() as connection:
        written = await connection.scalar(
            text("SELECT count(*) FROM payments WHERE payer_account_id = :a"), {"a": payer.account_id}
        )
    assert written == 2  # the one that came in between, and this one's decline: nothing twice


async def _nothing() -> None:
    return None


async def test_a_request_recorded_between_the_read_and_the_write_is_replayed_and_nothing_is_written(
    engine: AsyncEngine, migrated_dsn: str
) -> None:
    handlers = handlers_for(engine, 10**9)
    payer, payee = await open_account(handlers, 10**6), await open_account(handlers, 0)
    request: RequestKey[Payment] = key("SubmitPayment", fingerprint=b"same")

    async def recorded_meanwhile() -> None:
        # Another call with the same key committed its record, and touched no account of this one.
        connection = await asyncpg.connect(migrated_dsn)
        try:
            await connection.execute(
                "INSERT INTO idempotency_keys (caller, request_id, method, request_fingerprint, response)"
                " VALUES ($1, $2, $3, $4, $5)",
                request.caller,
                request.request_id,
                request.method,
                b"same",
                b"the first answer",
            )
        finally:
            await connection.close()

    path = _Interleaved(engine, recorded_meanwhile)
    quick = Handlers(lambda: SqlUnitOfWork(engine), 10**9, submissions=lambda: path)
    outcome = await quick.submit_payment(_submission(payer, payee, 10), request)
    assert path.outcomes == ["replay"]
    assert (outcome.value, outcome.replay) == (None, b"the first answer")
    assert await _balance(engine, payer) == 10**6
    async with engine.connect() as connection:
        assert await connection.scalar(text("SELECT count(*) FROM payments")) == 0


async def test_the_read_answers_a_recorded_request_with_its_record_and_a_position_past_its_commit(
    engine: AsyncEngine,
) -> None:
    handlers = handlers_for(engine, 10**9)
    payer, payee = await open_account(handlers, 10**6), await open_account(handlers, 0)
    request: RequestKey[Payment] = key("SubmitPayment")
    first = await handlers.submit_payment(_submission(payer, payee, 10), request)
    async with SqlSubmissionPath(engine) as path:
        peek: Peek = await path.peek(IdempotencyKey(request.caller, request.request_id), [payer.account_id])
    assert peek.stored is not None
    assert peek.stored.response == b"stored"
    assert peek.position >= first.position
    again = await handlers.submit_payment(_submission(payer, payee, 10), request)
    assert (again.value, again.replay) == (None, b"stored")
    assert again.position >= first.position
    assert await _balance(engine, payer) == 10**6 - 10


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


POLLS = 4000  # of 5 ms: how long a test waits for PostgreSQL to reach a state before it gives up


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


async def test_a_call_waits_for_a_pooled_connection_once_before_it_is_unavailable(
    migrated_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """APPROVAL_DB_POOL_TIMEOUT_SECONDS is how long a call waits for a free connection before UNAVAILABLE:
    the path without locks does not fall back to the locked path, which would wait for one again."""
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


async def test_a_payment_to_an_account_being_written_queues_for_its_lock_only_once(
    engine: AsyncEngine, migrated_dsn: str, db: asyncpg.Connection
) -> None:
    """While another transaction writes the payee (a merchant's payments in flight), the version read
    without locks cannot be the one the write will find: submit_decided does not queue for the lock (it
    would hold the payer's meanwhile, only to find the row changed); the locked path queues, once."""
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


async def test_every_submission_on_the_path_without_locks_is_counted_by_its_outcome(
    engine: AsyncEngine,
) -> None:
    """A retry answered by the read is a replay; a refusal of what was read (an unknown account) is refused."""
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
    assert refused == {"refused": 1.0}, refused


async def test_a_submission_answered_by_a_replay_names_the_replayed_payment_not_its_discarded_decision(
    engine: AsyncEngine, db: asyncpg.Connection
) -> None:
    """A duplicate that commits between the read and the write sends this call to the locked path, which
    replays the duplicate's record: the call's log lines (logs.payment_id_var) and span never name the
    decision made without locks, whose payment was not written."""
    plain = handlers_for(engine, 10**9, locked_only=True)
    payer, payee = await open_account(plain, 100), await open_account(plain, 0)
    request: RequestKey[Payment] = key("SubmitPayment")
    command = _pay(payer.account_id, payee.account_id, 10)

    async def duplicate_commits() -> None:
        # Another call (a task of its own, as gRPC runs each call) with the same request.
        await asyncio.ensure_future(plain.submit_payment(command, request))

    path = _Interleaved(engine, duplicate_commits)
    handlers = Handlers(lambda: SqlUnitOfWork(engine), 10**9, submissions=lambda: path)
    logs.payment_id_var.set("")
    outcome = await handlers.submit_payment(command, request)
    assert path.outcomes == ["conflict"]
    assert outcome.replay is not None
    named = logs.payment_id_var.get()
    if named:
        written = await db.fetchval("SELECT count(*) FROM payments WHERE payment_id = $1::uuid", named)
        assert written == 1, f"the call's logs name payment {named}, which does not exist"


def test_the_metrics_section_names_every_approval_metric() -> None:
    """docs/approval.md, "Health, metrics, shutdown", lists every Prometheus metric of the service."""
    text = (ROOT / "docs" / "approval.md").read_text()
    section = text.split("## Health, metrics, shutdown", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(approval_[a-z_]+)", section))
    exported = set()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            family = next(iter(value.collect()))
            exported.add(family.name + ("_total" if family.type == "counter" else ""))
    assert exported - listed == set()


async def test_0005_adds_the_decisions_function_and_procedure_and_takes_them_back(database_dsn: str) -> None:
    def routines() -> set[str]:
        with psycopg2.connect(database_dsn) as connection, connection.cursor() as cursor:
            cursor.execute(
                "SELECT proname FROM pg_proc WHERE proname IN ('apply_decision', 'submit_decided')"
            )
            found = {str(row[0]) for row in cursor.fetchall()}
        connection.close()
        return found

    upgrade(database_dsn, "0005")
    assert routines() == {"apply_decision", "submit_decided"}
    downgrade(database_dsn, "0004")
    assert routines() == set()
    upgrade(database_dsn, "0005")
    assert routines() == {"apply_decision", "submit_decided"}
