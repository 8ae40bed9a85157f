"""Migration 0003 against a private PostgreSQL: the hold reason of payments held before it, and the way back."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg2
import psycopg2.errors
import pytest
from psycopg2.extensions import connection as Connection

from approval_svc.migrate import downgrade, upgrade

THRESHOLD_REASON = "AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD"


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


def account(db: Connection) -> str:
    account_id = str(uuid.uuid4())
    rows(
        db,
        "INSERT INTO accounts (account_id, owner_name, currency_code, status, ledger_balance_minor,"
        " per_payment_limit_minor, daily_limit_minor) VALUES (%s, 'Ada', 'EUR', 'ACTIVE', 100000, 100000, 100000)",
        account_id,
    )
    return account_id


def payment(db: Connection, payer: str, payee: str, timeline: list[str]) -> str:
    """A payment as a server before 0003 wrote it (no hold reason), with one event per status of `timeline`."""
    payment_id = str(uuid.uuid4())
    status = timeline[-1]
    reason = {"DECLINED": "DECLINED_BY_REVIEWER" if len(timeline) > 1 else "INSUFFICIENT_FUNDS"}.get(status)
    rows(
        db,
        "INSERT INTO payments (payment_id, request_id, payer_account_id, payee_account_id, payer_name,"
        " payee_name, currency_code, amount_minor, status, decline_reason)"
        " VALUES (%s, %s, %s, %s, 'Ada', 'Ada', 'EUR', 10, %s, %s)",
        payment_id,
        payment_id,
        payer,
        payee,
        status,
        reason,
    )
    for sequence, entered in enumerate(timeline, start=1):
        rows(
            db,
            "INSERT INTO payment_events (payment_id, sequence, status, decline_reason, actor)"
            " VALUES (%s, %s, %s, %s, 'system')",
            payment_id,
            sequence,
            entered,
            reason if entered == "DECLINED" else None,
        )
    return payment_id


def hold_reasons(db: Connection) -> dict[str, object]:
    return {str(p): r for p, r in rows(db, "SELECT payment_id, hold_reason FROM payments")}


def test_payments_held_before_0003_are_held_for_their_amount_and_others_have_no_reason(
    database_dsn: str, db: Connection
) -> None:
    upgrade(database_dsn, "0002")
    payer, payee = account(db), account(db)
    held = payment(db, payer, payee, ["PENDING_REVIEW"])
    approved_after_review = payment(db, payer, payee, ["PENDING_REVIEW", "APPROVED"])
    declined_after_review = payment(db, payer, payee, ["PENDING_REVIEW", "DECLINED"])
    approved = payment(db, payer, payee, ["APPROVED"])
    declined = payment(db, payer, payee, ["DECLINED"])
    (updated_before,) = rows(db, "SELECT array_agg(updated_at ORDER BY payment_id) FROM payments")

    assert upgrade(database_dsn, "0003") == "0003"

    # Until 0003 the rules held a payment for its amount only: every payment ever held was.
    assert hold_reasons(db) == {
        held: THRESHOLD_REASON,
        approved_after_review: THRESHOLD_REASON,
        declined_after_review: THRESHOLD_REASON,
        approved: None,
        declined: None,
    }
    # Recording the reason changed no status: the time of the last change stays.
    assert rows(db, "SELECT array_agg(updated_at ORDER BY payment_id) FROM payments") == [updated_before]
    # The column admits the known reasons and NULL only, and the constraint is validated.
    with pytest.raises(psycopg2.errors.CheckViolation):
        rows(db, "UPDATE payments SET hold_reason = 'GUT_FEELING' WHERE payment_id = %s", approved)
    assert rows(
        db, "SELECT convalidated FROM pg_constraint WHERE conname = 'payments_hold_reason_check'"
    ) == [(True,)]


def test_0003_runs_again_after_an_interrupted_upgrade_and_goes_back_down(
    database_dsn: str, db: Connection
) -> None:
    upgrade(database_dsn, "0002")
    payer, payee = account(db), account(db)
    held = payment(db, payer, payee, ["PENDING_REVIEW"])
    # What a run stopped after its first transaction leaves: the column and the unvalidated check.
    rows(db, "ALTER TABLE payments ADD COLUMN hold_reason text")
    rows(
        db,
        "ALTER TABLE payments ADD CONSTRAINT payments_hold_reason_check"
        f" CHECK (hold_reason IN ('{THRESHOLD_REASON}')) NOT VALID",
    )
    assert upgrade(database_dsn, "0003") == "0003"
    assert hold_reasons(db) == {held: THRESHOLD_REASON}

    assert downgrade(database_dsn, "0002") == "0002"
    columns = rows(db, "SELECT column_name FROM information_schema.columns WHERE table_name = 'payments'")
    assert ("hold_reason",) not in columns
    upgrade(database_dsn)
    assert hold_reasons(db) == {held: THRESHOLD_REASON}
