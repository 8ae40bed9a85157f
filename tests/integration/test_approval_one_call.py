"""A submission in one call: the procedure `submit_payment` (migration 0006) decides, writes and commits.

It answers a retry from the request's record, locks the accounts, decides with the rules in
PostgreSQL and commits, in one round trip; what it refuses is decided again under the locks
in Python. tests/contract/test_approval_rules_in_sql.py holds its rules to the Python ones;
these tests hold its writes, waits and answers to the locked path's.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC
from types import TracebackType
from typing import Any, ClassVar, Self, TypeVar
from uuid import UUID, uuid4

import asyncpg
import psycopg2
import pytest
from prometheus_client.metrics import MetricWrapperBase
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from approval_svc import metrics
from approval_svc.adapters import unit_of_work
from approval_svc.adapters.unit_of_work import SqlSubmissionPath, SqlUnitOfWork, create_engine
from approval_svc.domain import commands
from approval_svc.domain.errors import AccountNotFound, DatabaseUnavailable, RequestIdReused
from approval_svc.domain.model import (
    Account,
    AccountStatus,
    DeclineReason,
    HoldReason,
    Payment,
    PaymentStatus,
)
from approval_svc.handlers import Handlers, Outcome, RequestKey
from approval_svc.migrate import downgrade, upgrade
from tests.support import ROOT
from tests.support.approval import async_url, engine_for, handlers_for, key, open_account, submission_key


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

    @classmethod
    async def flushed(cls) -> list[str]:
        """The statements sent so far: asyncpg calls a query logger with call_soon, in order, after the query."""
        loop = asyncio.get_running_loop()
        after = loop.create_future()
        loop.call_soon(after.set_result, None)
        await after
        return cls.statements


async def _balance(engine: AsyncEngine, account: Account) -> int:
    async with engine.connect() as connection:
        value = await connection.scalar(
            text("SELECT ledger_balance_minor FROM accounts WHERE account_id = :a"), {"a": account.account_id}
        )
    return int(value)


def _submission(payer: Account, payee: Account, amount: int, currency: str = "EUR") -> commands.SubmitPayment:
    return _pay(payer.account_id, payee.account_id, amount, currency)


def _pay(payer_id: UUID, payee_id: UUID, amount: int, currency: str = "EUR") -> commands.SubmitPayment:
    return commands.SubmitPayment(payer_id, payee_id, currency, amount, "")


def _outcomes() -> dict[str, float]:
    """approval_submissions_in_one_call_total by outcome, whatever outcomes it has."""
    return {
        sample.labels["outcome"]: sample.value
        for sample in next(iter(metrics.SUBMISSIONS_IN_ONE_CALL.collect())).samples
        if sample.name.endswith("_total")
    }


def _moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {
        label: after[label] - before.get(label, 0.0) for label in after if after[label] != before.get(label)
    }


async def _record(
    connection: asyncpg.Connection, request: RequestKey[Payment], fingerprint: bytes, response: bytes
) -> None:
    """A record of the request's key, as another request's commit would leave it."""
    await connection.execute(
        "INSERT INTO idempotency_keys (caller, request_id, method, request_fingerprint, response)"
        " VALUES ($1, $2, 'SubmitPayment', $3, $4)",
        request.caller,
        request.request_id,
        fingerprint,
        response,
    )


def _count_checkouts(monkeypatch: pytest.MonkeyPatch) -> list[None]:
    """One entry per wait for a pooled connection from now on."""
    checkouts: list[None] = []
    checkout = unit_of_work._checkout

    async def counted(engine: AsyncEngine) -> object:
        checkouts.append(None)
        return await checkout(engine)

    monkeypatch.setattr(unit_of_work, "_checkout", counted)
    return checkouts


async def test_a_payment_is_decided_in_one_round_trip(engine: AsyncEngine) -> None:
    handlers = Handlers(lambda: SqlUnitOfWork(engine), 10**9, submissions=lambda: _Logged(engine))
    payer, payee = await open_account(handlers, 10**6), await open_account(handlers, 0)
    # The connection's first call prepares the statement.
    await handlers.submit_payment(_submission(payer, payee, 10), key("SubmitPayment"))
    (await _Logged.flushed()).clear()
    before = _outcomes()
    outcome = await handlers.submit_payment(_submission(payer, payee, 10), key("SubmitPayment"))
    assert outcome.value is not None
    assert outcome.value.status is PaymentStatus.APPROVED
    assert await _Logged.flushed() == ["CALL"]
    assert _moved(before, _outcomes()) == {"committed": 1.0}
    assert await _balance(engine, payer) == 10**6 - 20


async def test_a_retry_is_answered_by_the_call_with_the_first_response_and_a_position_past_its_commit(
    engine: AsyncEngine, db: asyncpg.Connection
) -> None:
    handlers = handlers_for(engine, 10**9)
    payer, payee = await open_account(handlers, 10**6), await open_account(handlers, 0)
    request = submission_key()
    first = await handlers.submit_payment(_submission(payer, payee, 10), request)
    assert first.value is not None
    stored = await db.fetchval(
        "SELECT response FROM idempotency_keys WHERE caller = $1 AND request_id = $2",
        request.caller,
        request.request_id,
    )
    # What the procedure stored is what the servicer answered the first time.
    assert bytes(stored) == request.encode(first.value)
    again = await handlers.submit_payment(_submission(payer, payee, 10), request)
    assert (again.value, again.replay) == (None, bytes(stored))
    assert again.position >= first.position
    assert await _balance(engine, payer) == 10**6 - 10


async def test_a_call_queues_once_for_an_account_being_written_and_decides_on_what_was_committed(
    engine: AsyncEngine, migrated_dsn: str, db: asyncpg.Connection
) -> None:
    """The procedure reads the accounts after their locks are granted: a payment that queued behind a
    transaction that emptied the payer is declined for the funds it no longer has, and the call sent no
    statement but the CALL."""
    plain = handlers_for(engine, 10**9, locked_only=True)
    payer, payee = await open_account(plain, 100), await open_account(plain, 0)
    handlers = Handlers(lambda: SqlUnitOfWork(engine), 10**9, submissions=lambda: _Logged(engine))
    # The connection's first call prepares the statement.
    await handlers.submit_payment(_submission(payer, payee, 1), key("SubmitPayment"))
    (await _Logged.flushed()).clear()
    submission, waiting = await _behind_a_writer(
        migrated_dsn,
        db,
        lambda writer: writer.execute(
            "UPDATE accounts SET ledger_balance_minor = 5 WHERE account_id = $1", payer.account_id
        ),
        lambda: handlers.submit_payment(_submission(payer, payee, 10), key("SubmitPayment")),
    )
    outcome = submission.result()
    assert waiting.split("(", 1)[0].strip().upper() == "CALL SUBMIT_PAYMENT"
    assert outcome.value is not None
    assert outcome.value.decline_reason is DeclineReason.INSUFFICIENT_FUNDS
    assert await _Logged.flushed() == ["CALL"]


async def test_a_duplicate_committed_while_the_call_waited_for_the_locks_is_replayed_and_nothing_is_written(
    engine: AsyncEngine, migrated_dsn: str, db: asyncpg.Connection
) -> None:
    """The record is looked up before the locks (a retry waits for none), and the write finds the key once
    they are held: a duplicate that held them and committed meanwhile is this call's answer."""
    plain = handlers_for(engine, 10**9, locked_only=True)
    payer, payee = await open_account(plain, 100), await open_account(plain, 0)
    request = submission_key()
    handlers = handlers_for(engine, 10**9)

    async def hold(writer: asyncpg.Connection) -> None:
        await writer.execute("SELECT 1 FROM accounts WHERE account_id = $1 FOR UPDATE", payer.account_id)
        await _record(writer, request, request.fingerprint, b"the duplicate's answer")

    before = _outcomes()
    submission, _ = await _behind_a_writer(
        migrated_dsn, db, hold, lambda: handlers.submit_payment(_submission(payer, payee, 10), request)
    )
    outcome = submission.result()
    assert (outcome.value, outcome.replay) == (None, b"the duplicate's answer")
    assert _moved(before, _outcomes()) == {"replay": 1.0}
    assert (
        await db.fetchval("SELECT count(*) FROM payments WHERE payer_account_id = $1", payer.account_id) == 0
    )
    assert await _balance(engine, payer) == 100


async def test_every_submission_in_one_call_is_counted_by_its_outcome(engine: AsyncEngine) -> None:
    """A retry is a replay; what the rules refuse to decide (an unknown account) is refused, then decided
    again under the locks, which raise its error."""
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


async def test_a_retry_is_answered_without_waiting_for_the_accounts_locks(
    engine: AsyncEngine, migrated_dsn: str, db: asyncpg.Connection
) -> None:
    """The record is looked up before the locks: a retry of a recorded payment is answered while
    another transaction holds the payer's."""
    handlers = handlers_for(engine, 10**9)
    payer, payee = await open_account(handlers, 100), await open_account(handlers, 0)
    request = submission_key()
    first = await handlers.submit_payment(_submission(payer, payee, 10), request)
    assert first.value is not None
    writer = await asyncpg.connect(migrated_dsn)
    try:
        await writer.execute("BEGIN")
        await writer.execute("SELECT 1 FROM accounts WHERE account_id = $1 FOR UPDATE", payer.account_id)
        writer_pid = await writer.fetchval("SELECT pg_backend_pid()")
        retry = asyncio.ensure_future(handlers.submit_payment(_submission(payer, payee, 10), request))
        for _ in range(POLLS):
            if retry.done():
                break
            waiting = await db.fetchval(
                "SELECT query FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", writer_pid
            )
            assert waiting is None, f"the retry queued for the payer's lock: {waiting}"
            await asyncio.sleep(0.005)
        again = await retry
    finally:
        await writer.close()
    assert again.replay == request.encode(first.value)


async def test_a_key_committed_by_another_request_while_the_call_waited_for_it_leaves_nothing_written(
    engine: AsyncEngine, migrated_dsn: str, db: asyncpg.Connection
) -> None:
    """A request_id reused with other content, whose record commits while the call's write waits for
    the key: the call's payment is rolled back, and the locked path answers REQUEST_ID_REUSED."""
    handlers = handlers_for(engine, 10**9)
    payer, payee = await open_account(handlers, 100), await open_account(handlers, 0)
    request = submission_key(fingerprint=b"mine")
    before = _outcomes()
    submission, _ = await _behind_a_writer(
        migrated_dsn,
        db,
        lambda writer: _record(writer, request, b"theirs", b"their answer"),
        lambda: handlers.submit_payment(_submission(payer, payee, 10), request),
    )
    with pytest.raises(RequestIdReused):
        submission.result()
    assert _moved(before, _outcomes()) == {"refused": 1.0}
    assert await db.fetchval("SELECT count(*) FROM payments") == 0
    assert await _balance(engine, payer) == 100


async def test_a_payer_counted_for_a_later_day_is_refused_by_the_call_and_nothing_is_written(
    engine: AsyncEngine, db: asyncpg.Connection
) -> None:
    """A counter on a later UTC day than the transaction's clock: the call writes nothing and the locked
    path runs the transaction again (here the day never comes, so the call ends UNAVAILABLE)."""
    handlers = handlers_for(engine, 10**9)
    payer, payee = await open_account(handlers, 100), await open_account(handlers, 0)
    await db.execute(
        "UPDATE accounts SET daily_usage_day = (now() AT TIME ZONE 'UTC')::date + 1, daily_usage_minor = 7"
        " WHERE account_id = $1",
        payer.account_id,
    )
    before = _outcomes()
    with pytest.raises(DatabaseUnavailable):
        await handlers.submit_payment(_submission(payer, payee, 10), key("SubmitPayment"))
    assert _moved(before, _outcomes()) == {"refused": 1.0}
    assert await db.fetchval("SELECT count(*) FROM payments") == 0
    assert (
        await db.fetchval("SELECT daily_usage_minor FROM accounts WHERE account_id = $1", payer.account_id)
        == 7
    )


async def test_the_call_counts_a_payment_on_its_utc_day_whatever_the_sessions_time_zone(
    migrated_dsn: str, db: asyncpg.Connection
) -> None:
    """The daily limit counts UTC days: a session whose time zone is on another date still counts the
    payment on the UTC date of its time."""
    # A zone whose date differs from UTC's now: UTC+14 from 10:00 UTC, UTC-12 before 12:00 UTC.
    zone = (
        "Pacific/Kiritimati"
        if await db.fetchval("SELECT extract(hour FROM now() AT TIME ZONE 'UTC')") >= 12
        else "Etc/GMT+12"
    )
    await db.execute(
        f"ALTER ROLE CURRENT_USER IN DATABASE {await db.fetchval('SELECT current_database()')} SET TimeZone = '{zone}'"
    )
    async with engine_for(migrated_dsn) as engine:
        handlers = handlers_for(engine, 10**9)
        payer, payee = await open_account(handlers, 100), await open_account(handlers, 0)
        outcome = await handlers.submit_payment(_submission(payer, payee, 10), key("SubmitPayment"))
        assert outcome.value is not None
        async with engine.connect() as connection:
            local = await connection.scalar(text("SELECT now()::date"))
    row = await db.fetchrow(
        "SELECT daily_usage_day, daily_usage_minor FROM accounts WHERE account_id = $1", payer.account_id
    )
    assert (row["daily_usage_day"], row["daily_usage_minor"]) == (
        outcome.value.created_at.astimezone(UTC).date(),
        10,
    )
    assert local != row["daily_usage_day"], "the session's date is the UTC date: the case is not met"


async def test_a_review_threshold_above_any_amount_holds_no_payment(engine: AsyncEngine) -> None:
    """APPROVAL_REVIEW_THRESHOLD_MINOR may exceed any int64 amount (no payment is held); it does not fit
    the procedure's bigint, which takes it as NULL."""
    handlers = handlers_for(engine, 2**63)
    payer, payee = await open_account(handlers, 100), await open_account(handlers, 0)
    before = _outcomes()
    outcome = await handlers.submit_payment(_submission(payer, payee, 100), key("SubmitPayment"))
    assert outcome.value is not None
    assert outcome.value.status is PaymentStatus.APPROVED
    assert _moved(before, _outcomes()) == {"committed": 1.0}


async def test_a_call_the_database_does_not_answer_in_time_is_unavailable_and_not_decided_again(
    migrated_dsn: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CALL queued for a lock past the command timeout ends UNAVAILABLE: the locked path would queue
    for the same lock once more."""
    engine = create_async_engine(
        async_url(migrated_dsn), pool_size=2, max_overflow=0, connect_args={"command_timeout": 1}
    )
    try:
        handlers = Handlers(
            lambda: SqlUnitOfWork(engine), 10**9, submissions=lambda: SqlSubmissionPath(engine)
        )
        payer, payee = await open_account(handlers, 100), await open_account(handlers, 0)
        checkouts = _count_checkouts(monkeypatch)
        writer = await asyncpg.connect(migrated_dsn)
        try:
            await writer.execute("BEGIN")
            await writer.execute("SELECT 1 FROM accounts WHERE account_id = $1 FOR UPDATE", payer.account_id)
            before = _outcomes()
            with pytest.raises(DatabaseUnavailable):
                await handlers.submit_payment(_submission(payer, payee, 10), key("SubmitPayment"))
        finally:
            await writer.close()
        assert _moved(before, _outcomes()) == {"timeout": 1.0}
        assert len(checkouts) == 1, "the payment was decided again under the locks"
    finally:
        await engine.dispose()


# One payer's day of submissions that meets every rule: (payer, amount, currency); 'frozen' freezes
# the payee before the next one. The payers: 'a' opens with 1,000 (per payment 500, per day 800),
# 'b' with 50; the review threshold is 300.
_DAY = [
    ("a", 100, "EUR"),
    ("a", 300, "EUR"),
    ("a", 600, "EUR"),
    ("a", 450, "EUR"),
    ("a", 50, "USD"),
    ("b", 60, "EUR"),
    ("a", 400, "EUR"),
    ("b", 50, "EUR"),
    ("frozen", 0, ""),
    ("a", 10, "EUR"),
]

_ACCOUNT_STATE = """
    SELECT status, ledger_balance_minor, held_minor, total_sent_minor, total_received_minor,
           sent_approved, sent_declined, sent_pending_review, received_approved, received_declined,
           received_pending_review, daily_usage_day = (updated_at AT TIME ZONE 'UTC')::date AS usage_day_of_last_change,
           daily_usage_minor, updated_at = created_at AS untouched
    FROM accounts WHERE account_id = $1
"""
_PAYMENT_STATE = """
    SELECT p.status, p.decline_reason, p.hold_reason, p.amount_minor, p.currency_code, p.payer_name,
           p.payee_name, p.created_at = p.updated_at AS same_time, e.sequence, e.status AS event_status,
           e.decline_reason AS event_reason, e.actor, e.note, e.created_at = p.created_at AS event_time,
           (SELECT array_agg((l.kind, l.amount_minor, l.account_id = p.payer_account_id,
                              l.created_at = p.created_at)::text ORDER BY l.kind)
            FROM ledger_entries AS l WHERE l.payment_id = p.payment_id) AS ledger
    FROM payments AS p JOIN payment_events AS e ON e.payment_id = p.payment_id
    WHERE p.payment_id = $1
"""


async def _a_day(handlers: Handlers, db: asyncpg.Connection) -> tuple[list[Any], list[Any]]:
    """`_DAY` on accounts of its own: each decision with what it wrote, then the accounts."""
    a = await open_account(handlers, 1_000, per_payment_limit=500, daily_limit=800, owner="Payer A")
    b = await open_account(handlers, 50, owner="Payer B")
    payee = await open_account(handlers, 0, owner="Payee")
    decisions: list[Any] = []
    for who, amount, currency in _DAY:
        if who == "frozen":
            await handlers.set_account_status(
                commands.SetAccountStatus(payee.account_id, AccountStatus.FROZEN, ""), key("Freeze")
            )
            continue
        payer = a if who == "a" else b
        request = submission_key()
        outcome: Outcome[Payment] = await handlers.submit_payment(
            _submission(payer, payee, amount, currency), request
        )
        assert outcome.value is not None
        stored = await db.fetchval(
            "SELECT response FROM idempotency_keys WHERE caller = $1 AND request_id = $2",
            request.caller,
            request.request_id,
        )
        assert bytes(stored) == request.encode(outcome.value), "the stored response is not the servicer's"
        row = await db.fetchrow(_PAYMENT_STATE, outcome.value.payment_id)
        decisions.append(
            (outcome.value.status, outcome.value.decline_reason, outcome.value.hold_reason, dict(row))
        )
    accounts = [dict(await db.fetchrow(_ACCOUNT_STATE, account.account_id)) for account in (a, b, payee)]
    return decisions, accounts


async def test_a_submission_in_one_call_writes_and_answers_what_the_rules_in_python_do(
    engine: AsyncEngine, db: asyncpg.Connection
) -> None:
    """The same day of submissions, once in one call and once under the locks in Python: the same
    decisions, payments, events, ledger entries, accounts and stored responses."""
    one_call, in_python = handlers_for(engine, 300), handlers_for(engine, 300, locked_only=True)
    before = _outcomes()
    decided, accounts = await _a_day(one_call, db)
    assert _moved(before, _outcomes()) == {"committed": float(len(decided))}
    assert await _a_day(in_python, db) == (decided, accounts)
    assert {(status, reason, hold) for status, reason, hold, _ in decided} == {
        (PaymentStatus.APPROVED, None, None),
        (PaymentStatus.PENDING_REVIEW, None, HoldReason.AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD),
        *(
            (PaymentStatus.DECLINED, reason, None)
            for reason in DeclineReason
            if reason is not DeclineReason.DECLINED_BY_REVIEWER
        ),
    }


T = TypeVar("T")
POLLS = 4000  # of 5 ms: how long a test waits for PostgreSQL to reach a state before it gives up


async def _behind_a_writer(
    dsn: str,
    observer: asyncpg.Connection,
    hold: Callable[[asyncpg.Connection], Awaitable[object]],
    call: Callable[[], Awaitable[T]],
) -> tuple[asyncio.Future[T], str]:
    """Starts `call` while another transaction that ran `hold` is open, commits that transaction once
    the call waits for one of its locks, and gives back the call, finished, and the statement that waited."""
    writer = await asyncpg.connect(dsn)
    try:
        await writer.execute("BEGIN")
        await hold(writer)
        writer_pid = await writer.fetchval("SELECT pg_backend_pid()")
        called = asyncio.ensure_future(call())
        try:
            waiting = await _blocked_by(observer, writer_pid)
        finally:
            await writer.execute("COMMIT")
            await asyncio.wait([called])
    finally:
        await writer.close()
    return called, waiting


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
    the path of one call does not fall back to the locked path, which would wait for one again."""
    engine = create_engine(async_url(migrated_dsn), pool_size=1, pool_timeout=0.2)
    try:
        handlers = Handlers(
            lambda: SqlUnitOfWork(engine), 10**9, submissions=lambda: SqlSubmissionPath(engine)
        )
        payer, payee = await open_account(handlers, 100), await open_account(handlers, 0)
        waits = _count_checkouts(monkeypatch)
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


async def test_0006_adds_the_procedure_and_its_rules_and_takes_them_back(database_dsn: str) -> None:
    names = ("submit_payment", "payment_decision", "payment_daily_usage", "submitted_payment_response")

    def routines() -> set[str]:
        with psycopg2.connect(database_dsn) as connection, connection.cursor() as cursor:
            cursor.execute(
                "SELECT proname FROM pg_proc WHERE proname = ANY(%s) OR proname LIKE 'pb\\_%%'",
                (list(names),),
            )
            found = {str(row[0]) for row in cursor.fetchall()}
        connection.close()
        return found

    added = {
        *names,
        "pb_varint",
    }
    upgrade(database_dsn, "0006")
    assert routines() == added
    downgrade(database_dsn, "0005")
    assert routines() == set()
    upgrade(database_dsn, "0006")
    assert routines() == added
