"""Migration 0004 against a private PostgreSQL: each payer's usage of the day, counted from its payments, and the way back."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from datetime import date, datetime, timedelta

import psycopg2
import psycopg2.errors
import pytest
import sqlalchemy.exc
from psycopg2.extensions import connection as Connection

from approval_svc.domain import commands
from approval_svc.domain.model import DeclineReason, PaymentStatus
from approval_svc.migrate import current, downgrade, upgrade
from payments_common.keys import KeySchema
from replicator.changes import ACCOUNTS, RowChange
from replicator.projector import Projector
from tests.support.approval import engine_for, handlers_for, key
from tests.support.waiting import wait_until

COUNTER_COLUMNS = ("daily_usage_day", "daily_usage_minor")


@pytest.fixture
def db(database_dsn: str) -> Iterator[Connection]:
    connection = psycopg2.connect(database_dsn)
    connection.autocommit = True
    try:
        yield connection
    finally:
        connection.close()


def rows(db: Connection, query: str, *args: object) -> list[tuple[object, ...]]:
    with db.cursor() as cursor:
        cursor.execute(query, args)
        return list(cursor.fetchall()) if cursor.description else []


def midnight(db: Connection) -> datetime:
    """The start of the database's current UTC day."""
    ((start,),) = rows(db, "SELECT date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'")
    assert isinstance(start, datetime)
    return start


def account(db: Connection, daily_limit: int = 100_000) -> str:
    account_id = str(uuid.uuid4())
    rows(
        db,
        "INSERT INTO accounts (account_id, owner_name, currency_code, status, ledger_balance_minor,"
        " per_payment_limit_minor, daily_limit_minor) VALUES (%s, 'Ada', 'EUR', 'ACTIVE', 100000, 100000, %s)",
        account_id,
        daily_limit,
    )
    return account_id


def payment(db: Connection, payer: str, payee: str, amount: int, status: str, at: datetime) -> str:
    """A payment as a server before 0004 wrote it, created at `at` (its event and balances left out)."""
    payment_id = str(uuid.uuid4())
    rows(
        db,
        "INSERT INTO payments (payment_id, request_id, payer_account_id, payee_account_id, payer_name,"
        " payee_name, currency_code, amount_minor, status, decline_reason, created_at, updated_at)"
        " VALUES (%s, %s, %s, %s, 'Ada', 'Ada', 'EUR', %s, %s, %s, %s, %s)",
        payment_id,
        payment_id,
        payer,
        payee,
        amount,
        status,
        "INSUFFICIENT_FUNDS" if status == "DECLINED" else None,
        at,
        at,
    )
    if status == "PENDING_REVIEW":
        rows(
            db,
            "UPDATE accounts SET held_minor = held_minor + %s, sent_pending_review = sent_pending_review + 1"
            " WHERE account_id = %s",
            amount,
            payer,
        )
    rows(
        db,
        "INSERT INTO payment_events (payment_id, sequence, status, decline_reason, actor, created_at)"
        " SELECT payment_id, 1, status, decline_reason, 'system', created_at FROM payments WHERE payment_id = %s",
        payment_id,
    )
    return payment_id


def counters(db: Connection) -> dict[str, tuple[object, object]]:
    found = rows(db, "SELECT account_id, daily_usage_day, daily_usage_minor FROM accounts")
    return {str(a): (day, used) for a, day, used in found}


def columns(db: Connection) -> set[str]:
    found = rows(db, "SELECT column_name FROM information_schema.columns WHERE table_name = 'accounts'")
    return {str(c) for (c,) in found}


def same_day_or_skip(db: Connection, start: datetime) -> date:
    """The day the test ran in; a test that ran across UTC midnight proves nothing about one day."""
    if midnight(db) != start:
        pytest.skip("the UTC day ended while the test ran")
    return start.date()


async def test_0004_counts_each_payers_approved_and_held_payments_of_the_utc_day(
    database_dsn: str, db: Connection
) -> None:
    upgrade(database_dsn, "0003")
    ada, bob, cy = account(db, daily_limit=1_000), account(db), account(db)
    start = midnight(db)
    just_before = start - timedelta(microseconds=1)
    payment(db, ada, bob, 100, "APPROVED", start)  # counted: at midnight
    payment(db, ada, bob, 20, "PENDING_REVIEW", start + timedelta(seconds=1))
    payment(db, ada, bob, 3, "DECLINED", start + timedelta(seconds=2))
    payment(db, ada, bob, 4_000, "APPROVED", just_before)  # yesterday's
    held_yesterday = payment(db, ada, bob, 900, "PENDING_REVIEW", just_before)
    payment(db, bob, ada, 70, "APPROVED", start + timedelta(seconds=3))
    payment(db, bob, ada, 500, "APPROVED", just_before)
    payment(db, cy, ada, 5, "DECLINED", start + timedelta(seconds=4))  # cy only declined or was paid
    ((filenode,),) = rows(db, "SELECT pg_relation_filenode('accounts')")

    assert upgrade(database_dsn, "0004") == "0004"

    today = same_day_or_skip(db, start)
    assert counters(db) == {ada: (today, 120), bob: (today, 70), cy: (None, 0)}
    # The columns came without a rewrite of the table.
    assert rows(db, "SELECT pg_relation_filenode('accounts')") == [(filenode,)]

    # The service decides by the counters: 880 of ada's 1,000 are left today.
    upgrade(database_dsn)
    async with engine_for(database_dsn, pool_size=2) as engine:
        handlers = handlers_for(engine, review_threshold=10**6)

        async def pay(amount: int) -> tuple[PaymentStatus, DeclineReason | None]:
            command = commands.SubmitPayment(uuid.UUID(ada), uuid.UUID(bob), "EUR", amount, "")
            outcome = await handlers.submit_payment(command, key("SubmitPayment"))
            assert outcome.value is not None
            return outcome.value.status, outcome.value.decline_reason

        assert await pay(881) == (PaymentStatus.DECLINED, DeclineReason.DAILY_LIMIT_EXCEEDED)
        # Yesterday's held payment, declined today, frees nothing of today's limit.
        decline = commands.ReviewPayment(uuid.UUID(held_yesterday), "eve", "", approve=False)
        await handlers.review_payment(decline, key("DeclinePayment"))
        assert await pay(881) == (PaymentStatus.DECLINED, DeclineReason.DAILY_LIMIT_EXCEEDED)
        assert await pay(880) == (PaymentStatus.APPROVED, None)
    same_day_or_skip(db, start)
    assert counters(db)[ada] == (today, 1_000)


def wait_for_lock_wait(db: Connection, table: str) -> None:
    """Returns once a transaction waits for a lock on `table` (the migration's)."""
    query = "SELECT 1 FROM pg_locks WHERE NOT granted AND locktype = 'relation' AND relation = %s::regclass"
    wait_until(lambda: rows(db, query, table), what=f"a transaction waits for {table}")


def test_payments_written_while_0004_waits_for_its_locks_are_counted(
    database_dsn: str, db: Connection
) -> None:
    upgrade(database_dsn, "0003")
    payer, payee = account(db), account(db)
    start = midnight(db)
    corrected = payment(db, payer, payee, 40, "APPROVED", start)
    # A submission of the release before, in flight: its payer locked, its payment written.
    submission = psycopg2.connect(database_dsn)
    # A correction of a payment's status alone (no account touched), in flight.
    correction = psycopg2.connect(database_dsn)
    migrated: list[object] = []
    try:
        with submission.cursor() as cursor:
            cursor.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR NO KEY UPDATE", (payer,))
        payment(submission, payer, payee, 250, "APPROVED", start + timedelta(seconds=1))
        with correction.cursor() as cursor:
            cursor.execute(
                "UPDATE payments SET status = 'DECLINED', decline_reason = 'INSUFFICIENT_FUNDS'"
                " WHERE payment_id = %s",
                (corrected,),
            )
        thread = threading.Thread(target=lambda: migrated.append(upgrade(database_dsn, "0004")))
        thread.start()
        # The columns wait for the submission (every account write does), the count for
        # every write of payments: each is counted as it commits.
        wait_for_lock_wait(db, "accounts")
        submission.commit()
        wait_for_lock_wait(db, "payments")
        correction.commit()
        thread.join(timeout=60)
    finally:
        submission.close()
        correction.close()
    assert migrated == ["0004"]
    today = same_day_or_skip(db, start)
    assert counters(db)[payer] == (today, 250)


def test_0004_gives_up_on_a_long_transaction_and_leaves_nothing_to_undo(
    database_dsn: str, db: Connection
) -> None:
    upgrade(database_dsn, "0003")
    payer, payee = account(db), account(db)
    start = midnight(db)
    payment(db, payer, payee, 30, "APPROVED", start)
    blocker = psycopg2.connect(database_dsn)
    try:
        with blocker.cursor() as cursor:
            cursor.execute("SELECT 1 FROM accounts WHERE account_id = %s FOR NO KEY UPDATE", (payer,))
        # Waited for longer than its lock_timeout (5 s): the migration fails and changes nothing.
        with pytest.raises(sqlalchemy.exc.OperationalError) as raised:
            upgrade(database_dsn, "0004")
        assert isinstance(raised.value.orig, psycopg2.errors.LockNotAvailable)
        assert current(database_dsn) == "0003"
        assert not columns(db) & set(COUNTER_COLUMNS)
    finally:
        blocker.close()
    assert upgrade(database_dsn, "0004") == "0004"
    assert counters(db)[payer] == (same_day_or_skip(db, start), 30)


async def test_0004_goes_back_down_and_counts_again_on_the_way_up(database_dsn: str, db: Connection) -> None:
    upgrade(database_dsn)
    payer, payee = account(db), account(db)
    start = midnight(db)
    async with engine_for(database_dsn, pool_size=2) as engine:
        handlers = handlers_for(engine)
        command = commands.SubmitPayment(uuid.UUID(payer), uuid.UUID(payee), "EUR", 60, "")
        await handlers.submit_payment(command, key("SubmitPayment"))
    assert counters(db)[payer][1] == 60

    assert downgrade(database_dsn, "0003") == "0003"
    assert not columns(db) & set(COUNTER_COLUMNS)
    # The release before writes a payment and moves no counter (it has none).
    payment(db, payer, payee, 15, "PENDING_REVIEW", start + timedelta(seconds=1))

    assert upgrade(database_dsn, "0004") == "0004"
    assert counters(db)[payer] == (same_day_or_skip(db, start), 75)


def test_the_counter_columns_change_no_read_model(database_dsn: str, db: Connection) -> None:
    """The replicator publishes accounts: a row with the counters projects as it did without them."""
    upgrade(database_dsn, "0003")
    payer, payee = account(db), account(db)
    payment(db, payer, payee, 25, "APPROVED", midnight(db))
    upgrade(database_dsn, "0004")
    names = [
        str(n)
        for (n,) in rows(
            db,
            "SELECT attname FROM pg_attribute WHERE attrelid = 'accounts'::regclass AND attnum > 0"
            " AND NOT attisdropped ORDER BY attnum",
        )
    ]
    assert set(COUNTER_COLUMNS) <= set(names)
    # As the replicator reads a row (logical decoding and its reconciliation): every column as text.
    with db.cursor() as cursor:
        cursor.execute(
            f"SELECT {', '.join(f'{n}::text' for n in names)} FROM accounts WHERE account_id = %s", (payer,)
        )
        values = cursor.fetchone()
    assert values is not None
    row: dict[str, str | None] = dict(zip(names, values, strict=True))
    assert row["daily_usage_minor"] == "25"
    without = {n: v for n, v in row.items() if n not in COUNTER_COLUMNS}
    projector = Projector(KeySchema())
    projected = projector.project(RowChange(ACCOUNTS, "update", row, 1))
    assert projected == projector.project(RowChange(ACCOUNTS, "update", without, 1))
    assert len(projected) == 1
