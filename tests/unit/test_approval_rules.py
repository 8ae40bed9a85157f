"""The business rules and request validation of the approval service, in pure Python."""

from __future__ import annotations

import dataclasses
import importlib
import uuid
from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from approval_svc.config import Settings
from approval_svc.domain import commands, rules
from approval_svc.domain.errors import InvalidRequest, TransactionConflict
from approval_svc.domain.model import (
    MAX_AMOUNT,
    Account,
    AccountChange,
    AccountStatus,
    DeclineReason,
    HoldReason,
    LedgerKind,
    Payment,
    PaymentStatus,
)
from payments_common.settings import SettingsError
from tests.support.auth import server_env

NOW = datetime(2026, 3, 4, 15, 30, tzinfo=UTC)
THRESHOLD = 1_000


def account(
    ledger: int = 10_000,
    held: int = 0,
    currency: str = "EUR",
    status: AccountStatus = AccountStatus.ACTIVE,
    per_payment_limit: int = 5_000,
    daily_limit: int = 8_000,
    total_received: int = 0,
) -> Account:
    return Account(
        account_id=uuid.uuid4(),
        owner_name="Ada",
        currency=currency,
        status=status,
        ledger_balance=ledger,
        held=held,
        per_payment_limit=per_payment_limit,
        daily_limit=daily_limit,
        created_at=NOW,
        updated_at=NOW,
        total_received=total_received,
    )


def payment(
    payer: Account, payee: Account, amount: int, status: PaymentStatus, at: datetime = NOW
) -> Payment:
    return Payment(
        payment_id=uuid.uuid4(),
        request_id="r",
        payer_account_id=payer.account_id,
        payee_account_id=payee.account_id,
        payer_name=payer.owner_name,
        payee_name=payee.owner_name,
        currency="EUR",
        amount=amount,
        reference="",
        status=status,
        decline_reason=None,
        created_at=at,
        updated_at=at,
    )


def test_a_payment_within_every_rule_is_approved() -> None:
    decision = rules.decide(account(), account(), "EUR", 999, 0, THRESHOLD)
    assert decision == rules.Decision(PaymentStatus.APPROVED)


def test_a_payment_at_the_review_threshold_is_held_and_says_why() -> None:
    decision = rules.decide(account(), account(), "EUR", THRESHOLD, 0, THRESHOLD)
    assert decision == rules.Decision(
        PaymentStatus.PENDING_REVIEW, hold_reason=HoldReason.AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD
    )
    # A payment that is not held has no hold reason.
    assert rules.decide(account(), account(), "EUR", THRESHOLD - 1, 0, THRESHOLD).hold_reason is None


def test_the_migration_that_adds_hold_reasons_knows_every_reason() -> None:
    """Migration 0003 writes the reasons out (a migration is a snapshot): its CHECK must admit each one."""
    migration = importlib.import_module("approval_svc.migrations.versions.0003_payment_hold_reason")
    assert set(migration.HOLD_REASONS) == {reason.value for reason in HoldReason}


@pytest.mark.parametrize(
    ("payer", "payee", "currency", "amount", "daily_used", "reason"),
    [
        (account(status=AccountStatus.FROZEN), account(), "EUR", 10, 0, DeclineReason.ACCOUNT_FROZEN),
        (account(), account(status=AccountStatus.FROZEN), "EUR", 10, 0, DeclineReason.ACCOUNT_FROZEN),
        (account(), account(currency="USD"), "EUR", 10, 0, DeclineReason.CURRENCY_MISMATCH),
        (account(currency="USD"), account(), "EUR", 10, 0, DeclineReason.CURRENCY_MISMATCH),
        (account(), account(), "USD", 10, 0, DeclineReason.CURRENCY_MISMATCH),
        (account(), account(), "EUR", 5_001, 0, DeclineReason.PER_PAYMENT_LIMIT_EXCEEDED),
        (account(), account(), "EUR", 500, 7_501, DeclineReason.DAILY_LIMIT_EXCEEDED),
        (account(ledger=400), account(), "EUR", 401, 0, DeclineReason.INSUFFICIENT_FUNDS),
        (account(ledger=1_000, held=700), account(), "EUR", 301, 0, DeclineReason.INSUFFICIENT_FUNDS),
    ],
)
def test_declines_name_the_first_broken_rule(
    payer: Account, payee: Account, currency: str, amount: int, daily_used: int, reason: DeclineReason
) -> None:
    decision = rules.decide(payer, payee, currency, amount, daily_used, THRESHOLD)
    assert decision == rules.Decision(PaymentStatus.DECLINED, reason)


def test_limits_and_balance_are_inclusive() -> None:
    payer = account(ledger=5_000, per_payment_limit=5_000, daily_limit=6_000)
    assert rules.decide(payer, account(), "EUR", 5_000, 1_000, 10_000).status is PaymentStatus.APPROVED


def test_a_frozen_account_wins_over_other_reasons() -> None:
    payer = account(ledger=0, status=AccountStatus.FROZEN, currency="USD")
    decision = rules.decide(payer, account(), "EUR", 10**9, 10**9, THRESHOLD)
    assert decision.decline_reason is DeclineReason.ACCOUNT_FROZEN


MIDNIGHT = datetime(2026, 3, 5, tzinfo=UTC)
BEFORE_MIDNIGHT = MIDNIGHT - timedelta(microseconds=1)


def test_the_day_starts_at_utc_midnight() -> None:
    late_in_tokyo = datetime(2026, 3, 5, 1, 0, tzinfo=timezone(timedelta(hours=9)))
    assert rules.utc_day(late_in_tokyo) == date(2026, 3, 4)
    assert rules.utc_day(BEFORE_MIDNIGHT) == date(2026, 3, 4)
    assert rules.utc_day(MIDNIGHT) == date(2026, 3, 5)


def test_the_counter_tells_only_its_own_days_usage() -> None:
    today = date(2026, 3, 5)
    assert rules.daily_usage(account(), today) == 0  # nothing counted yet
    counted = dataclasses.replace(account(), daily_usage_day=today, daily_usage=700)
    assert rules.daily_usage(counted, today) == 700
    assert rules.daily_usage(counted, today + timedelta(days=1)) == 0  # yesterday's usage
    # A transaction whose clock is before a midnight that a payment committed meanwhile
    # has passed runs again, with a later clock.
    with pytest.raises(TransactionConflict):
        rules.daily_usage(counted, today - timedelta(days=1))


def counter(payer: Account, *changes: AccountChange) -> tuple[date | None, int]:
    for change in changes:
        payer = payer.applied(change, NOW)
    return payer.daily_usage_day, payer.daily_usage


def test_the_counter_across_utc_midnight() -> None:
    """Payments just before and after midnight; a reviewer's decline of each, then an approval."""
    payer, payee = account(), account()
    held_before = payment(payer, payee, 1_000, PaymentStatus.PENDING_REVIEW, BEFORE_MIDNIGHT)
    approved_before = payment(payer, payee, 300, PaymentStatus.APPROVED, BEFORE_MIDNIGHT)
    held_after = payment(payer, payee, 2_000, PaymentStatus.PENDING_REVIEW, MIDNIGHT)
    declined_after = payment(payer, payee, 50, PaymentStatus.DECLINED, MIDNIGHT)
    approved_after = payment(payer, payee, 40, PaymentStatus.APPROVED, MIDNIGHT)
    yesterday, today = date(2026, 3, 4), date(2026, 3, 5)

    def submitted(p: Payment) -> AccountChange:
        return rules.submission_changes(p)[0]

    def reviewed(p: Payment, approve: bool) -> AccountChange:
        return rules.review_changes(p, approve)[0]

    before = (submitted(held_before), submitted(approved_before))
    assert counter(payer, *before) == (yesterday, 1_300)
    # The first payment counted after midnight starts the new day; a decline counts nothing.
    after = (*before, submitted(held_after), submitted(declined_after), submitted(approved_after))
    assert counter(payer, *after) == (today, 2_040)
    # Yesterday's held payment declined today gives nothing back to today's count; today's does.
    assert counter(payer, *after, reviewed(held_before, approve=False)) == (today, 2_040)
    assert counter(payer, *after, reviewed(held_after, approve=False)) == (today, 40)
    # An approval leaves the count as it is: the payment was counted when it was held.
    assert counter(payer, *after, reviewed(held_after, approve=True)) == (today, 2_040)
    # Yesterday's payments declined before midnight give back to yesterday's count.
    assert counter(payer, *before, reviewed(held_before, approve=False)) == (yesterday, 300)
    # The payee's counter is not the payer's: receiving counts nothing.
    assert counter(payee, *(rules.submission_changes(p)[1] for p in (held_after, approved_after))) == (
        None,
        0,
    )


def test_the_daily_limit_reads_the_counter_of_the_transactions_day() -> None:
    """Decided just after midnight, yesterday's usage does not count; just before, it does."""
    payer = dataclasses.replace(
        account(daily_limit=8_000), daily_usage_day=rules.utc_day(BEFORE_MIDNIGHT), daily_usage=7_500
    )
    late = rules.daily_usage(payer, rules.utc_day(BEFORE_MIDNIGHT))
    assert rules.decide(payer, account(), "EUR", 501, late, THRESHOLD).decline_reason is (
        DeclineReason.DAILY_LIMIT_EXCEEDED
    )
    early = rules.daily_usage(payer, rules.utc_day(MIDNIGHT))
    assert rules.decide(payer, account(), "EUR", 501, early, THRESHOLD).status is PaymentStatus.APPROVED


def test_a_credit_that_would_overflow_the_payee_is_rejected() -> None:
    with pytest.raises(InvalidRequest) as raised:
        rules.check_credit_fits(account(ledger=MAX_AMOUNT - 5), 6)
    assert raised.value.violations[0].field == "amount.amount_minor"
    with pytest.raises(InvalidRequest):
        rules.check_credit_fits(account(ledger=0, total_received=MAX_AMOUNT), 1)
    rules.check_credit_fits(account(ledger=MAX_AMOUNT - 5), 5)


@pytest.mark.parametrize("status", list(PaymentStatus))
def test_submission_and_review_conserve_money(status: PaymentStatus) -> None:
    payer, payee = account(ledger=1_000), account(ledger=0)
    held = payment(payer, payee, 300, status)
    changes = rules.submission_changes(held)
    after = {a.account_id: a for a in (payer, payee)}
    for change in changes:
        after[change.account_id] = after[change.account_id].applied(change, NOW)
    assert sum(a.ledger_balance for a in after.values()) == 1_000
    if status is PaymentStatus.APPROVED:
        assert after[payer.account_id].ledger_balance == 700
        assert after[payee.account_id].total_received == 300
    if status is PaymentStatus.PENDING_REVIEW:
        assert after[payer.account_id].ledger_balance == 1_000
        assert after[payer.account_id].available_balance == 700
        for approve in (True, False):
            reviewed = dict(after)
            for change in rules.review_changes(held, approve):
                reviewed[change.account_id] = reviewed[change.account_id].applied(change, NOW)
            assert reviewed[payer.account_id].held == 0
            assert reviewed[payer.account_id].sent_pending_review == 0
            assert reviewed[payee.account_id].received_pending_review == 0
            assert reviewed[payer.account_id].ledger_balance == (700 if approve else 1_000)
            assert sum(a.ledger_balance for a in reviewed.values()) == 1_000


def test_a_transfer_is_one_debit_and_one_credit() -> None:
    payer, payee = account(), account()
    entries = rules.transfer_entries(payment(payer, payee, 250, PaymentStatus.APPROVED))
    assert [(e.account_id, e.kind, e.amount) for e in entries] == [
        (payer.account_id, LedgerKind.DEBIT, -250),
        (payee.account_id, LedgerKind.CREDIT, 250),
    ]
    assert sum(e.amount for e in entries) == 0
    assert rules.opening_entries(account(ledger=0)) == []


def _fields(error: InvalidRequest) -> set[str]:
    return {v.field for v in error.violations}


def test_submit_payment_reports_every_malformed_field() -> None:
    with pytest.raises(InvalidRequest) as raised:
        commands.submit_payment("", "not-a-uuid", "", True, "eur", 0, "x" * 141)
    assert _fields(raised.value) == {
        "request_id",
        "payer_account_id",
        "payee_account_id",
        "amount.currency_code",
        "amount.amount_minor",
        "reference",
    }


def test_submit_payment_rejects_paying_oneself_and_a_missing_amount() -> None:
    same = str(uuid.uuid4())
    with pytest.raises(InvalidRequest) as raised:
        commands.submit_payment("r", same, same.upper(), False, "", 0, "")
    assert _fields(raised.value) == {"payee_account_id", "amount"}


@pytest.mark.parametrize("amount", [0, -1, -(2**63)])
def test_non_positive_amounts_are_rejected(amount: int) -> None:
    with pytest.raises(InvalidRequest) as raised:
        commands.submit_payment("r", str(uuid.uuid4()), str(uuid.uuid4()), True, "EUR", amount, "")
    assert _fields(raised.value) == {"amount.amount_minor"}


def test_create_account_validation() -> None:
    with pytest.raises(InvalidRequest) as raised:
        commands.create_account("r" * 65, "x" * 201, "XXX", -1, 0, -5)
    assert _fields(raised.value) == {
        "request_id",
        "owner_name",
        "currency_code",
        "opening_balance_minor",
        "per_payment_limit_minor",
        "daily_limit_minor",
    }
    made = commands.create_account("r", "Ada", "JPY", 0, 1, MAX_AMOUNT)
    assert made.daily_limit == MAX_AMOUNT


def test_text_with_nul_is_rejected() -> None:
    with pytest.raises(InvalidRequest) as raised:
        commands.review_payment("r", str(uuid.uuid4()), "bob\x00", "", approve=True)
    assert _fields(raised.value) == {"reviewer"}


def test_review_and_status_commands_validate_ids_and_lengths() -> None:
    with pytest.raises(InvalidRequest) as raised:
        commands.review_payment("r", "", " ", "n" * 501, approve=False)
    assert _fields(raised.value) == {"payment_id", "reviewer", "note"}
    with pytest.raises(InvalidRequest) as raised:
        commands.set_account_status("", "1234", "r" * 501, AccountStatus.FROZEN)
    assert _fields(raised.value) == {"request_id", "account_id", "reason"}
    with pytest.raises(InvalidRequest):
        commands.payment_id("0" * 100)


def test_settings_read_the_environment() -> None:
    settings = Settings.from_env(
        {
            **server_env("APPROVAL_"),
            "APPROVAL_DATABASE_URL": "postgresql://u:secret@db:5432/payments",
            "APPROVAL_PORT": "6000",
            "APPROVAL_METRICS_PORT": "0",
            "APPROVAL_REVIEW_THRESHOLD_MINOR": "500",
            "APPROVAL_LOG_LEVEL": "debug",
        }
    )
    assert settings.port == 6000
    assert settings.metrics_port == 0
    assert settings.review_threshold_minor == 500
    assert settings.log_level == "DEBUG"
    assert settings.db_pool_size == 10
    assert settings.async_database_url == "postgresql+asyncpg://u:secret@db:5432/payments"
    assert "secret" not in settings.redacted_database_url
    assert "secret" not in repr(settings)


@pytest.mark.parametrize(
    ("environ", "variable"),
    [
        ({}, "APPROVAL_DATABASE_URL"),
        ({"APPROVAL_DATABASE_URL": "mysql://x"}, "APPROVAL_DATABASE_URL"),
        ({"APPROVAL_DATABASE_URL": "postgresql://x", "APPROVAL_PORT": "http"}, "APPROVAL_PORT"),
        ({"APPROVAL_DATABASE_URL": "postgresql://x", "APPROVAL_PORT": "70000"}, "APPROVAL_PORT"),
        ({"APPROVAL_DATABASE_URL": "postgresql://x", "APPROVAL_DB_POOL_SIZE": "0"}, "APPROVAL_DB_POOL_SIZE"),
        ({"APPROVAL_DATABASE_URL": "postgresql://x", "APPROVAL_LOG_LEVEL": "loud"}, "APPROVAL_LOG_LEVEL"),
        (
            {"APPROVAL_DATABASE_URL": "postgresql://x", "APPROVAL_DB_POOL_TIMEOUT_SECONDS": "0"},
            "APPROVAL_DB_POOL_TIMEOUT_SECONDS",
        ),
    ],
)
def test_bad_settings_name_the_variable(environ: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({**server_env("APPROVAL_"), **environ})
