"""The rules in PostgreSQL (migration 0006) are the rules in Python: the same inputs, the same answers.

`approval_svc.domain.rules` defines the rules; the procedure `submit_payment` runs their SQL
twins so that a payment is decided in one round trip. Each case here gives both the same
generated accounts and amounts, on a migrated database of a private PostgreSQL, and the
stored response encoded in SQL is the servicer's SubmitPaymentResponse byte for byte.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from approval_svc.domain import rules
from approval_svc.domain.errors import TransactionConflict
from approval_svc.domain.model import (
    MAX_AMOUNT,
    Account,
    AccountStatus,
    DeclineReason,
    HoldReason,
    Payment,
    PaymentStatus,
)
from approval_svc.servicer import submit_payment_response
from tests.support.fuzzing import fuzz_settings

# Reproducible (derandomized, no example database); the fixture's database serves every example.
CASES = settings(
    fuzz_settings(300), suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
MOMENT = datetime(2026, 3, 29, 23, 59, 59, 999999, tzinfo=UTC)

# Small values meet each rule's edge often; any bigint meets the arithmetic's.
amounts = st.one_of(st.integers(1, 2_000), st.integers(1, MAX_AMOUNT))


@pytest.fixture
def db(migrated_dsn: str) -> Iterator[Any]:
    connection = psycopg2.connect(migrated_dsn)
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            yield cursor
    finally:
        connection.close()


@st.composite
def accounts(draw: st.DrawFn) -> Account:
    ledger = draw(st.one_of(st.integers(0, 2_000), st.integers(0, MAX_AMOUNT)))
    usage_day = draw(st.sampled_from([None, date(2026, 3, 28), date(2026, 3, 29), date(2026, 3, 30)]))
    return Account(
        account_id=uuid.uuid4(),
        owner_name="Ada",
        currency=draw(st.sampled_from(["EUR", "USD"])),
        status=draw(st.sampled_from([AccountStatus.ACTIVE] * 4 + [AccountStatus.FROZEN])),
        ledger_balance=ledger,
        held=draw(st.integers(0, ledger)),
        per_payment_limit=draw(amounts),
        daily_limit=draw(amounts),
        created_at=MOMENT,
        updated_at=MOMENT,
        daily_usage_day=usage_day,
        daily_usage=0 if usage_day is None else draw(st.integers(0, 2_500)),
    )


def _row(account: Account) -> str:
    """The account as a JSON object of `accounts`' columns, for json_populate_record."""
    return json.dumps(
        {
            "account_id": str(account.account_id),
            "owner_name": account.owner_name,
            "currency_code": account.currency,
            "status": account.status.value,
            "ledger_balance_minor": account.ledger_balance,
            "held_minor": account.held,
            "per_payment_limit_minor": account.per_payment_limit,
            "daily_limit_minor": account.daily_limit,
            "daily_usage_day": account.daily_usage_day.isoformat() if account.daily_usage_day else None,
            "daily_usage_minor": account.daily_usage,
        }
    )


_ACCOUNT = "json_populate_record(NULL::accounts, %s::json)"


# A decision's inputs; a threshold above any amount holds no payment.
DECISIONS = {
    "payer": accounts(),
    "payee": accounts(),
    "currency": st.sampled_from(["EUR", "USD"]),
    "amount": amounts,
    "used": st.integers(0, 2_500),
    "threshold": st.one_of(amounts, st.integers(MAX_AMOUNT + 1, 2**64)),
}


@CASES
@given(**DECISIONS)
def test_a_payment_is_decided_as_the_python_rules_decide_it(
    db: Any, payer: Account, payee: Account, currency: str, amount: int, used: int, threshold: int
) -> None:
    db.execute(
        f"SELECT status, decline_reason, hold_reason FROM payment_decision({_ACCOUNT}, {_ACCOUNT}, %s, %s, %s, %s)",
        # A threshold above any amount does not fit a bigint: the procedure passes NULL.
        (_row(payer), _row(payee), currency, amount, used, threshold if threshold <= MAX_AMOUNT else None),
    )
    status, reason, hold = db.fetchone()
    decision = rules.decide(payer, payee, currency, amount, used, threshold)
    assert (status, reason, hold) == (
        decision.status.value,
        decision.decline_reason.value if decision.decline_reason else None,
        decision.hold_reason.value if decision.hold_reason else None,
    )


@CASES
@given(payer=accounts())
def test_the_daily_usage_is_counted_as_the_python_rules_count_it(db: Any, payer: Account) -> None:
    today = rules.utc_day(MOMENT)
    db.execute(f"SELECT payment_daily_usage({_ACCOUNT}, %s)", (_row(payer), today))
    (counted,) = db.fetchone()
    try:
        expected: int | None = rules.daily_usage(payer, today)
    except TransactionConflict:
        expected = None  # a later day: the procedure refuses, the locked path runs again
    assert counted == expected


def test_the_generated_cases_reach_every_answer_of_the_rules() -> None:
    """The cases above reach every answer: each decline reason but the reviewer's, a hold, an approval."""
    reached: set[tuple[str, str | None]] = set()

    @fuzz_settings(300)
    @given(**DECISIONS)
    def decide(payer: Account, payee: Account, currency: str, amount: int, used: int, threshold: int) -> None:
        decision = rules.decide(payer, payee, currency, amount, used, threshold)
        reached.add(
            (decision.status.value, decision.decline_reason.value if decision.decline_reason else None)
        )

    decide()
    assert reached == {
        ("APPROVED", None),
        ("PENDING_REVIEW", None),
        *(("DECLINED", r.value) for r in DeclineReason if r is not DeclineReason.DECLINED_BY_REVIEWER),
    }


_OUTCOMES = [
    (PaymentStatus.APPROVED, None, None),
    (PaymentStatus.APPROVED, None, HoldReason.AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD),
    (PaymentStatus.PENDING_REVIEW, None, HoldReason.AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD),
    *((PaymentStatus.DECLINED, reason, None) for reason in DeclineReason),
    (
        PaymentStatus.DECLINED,
        DeclineReason.DECLINED_BY_REVIEWER,
        HoldReason.AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD,
    ),
]


@st.composite
def payments(draw: st.DrawFn) -> Payment:
    status, reason, hold = draw(st.sampled_from(_OUTCOMES))
    moment = draw(
        st.one_of(
            st.datetimes(datetime(1970, 1, 1), datetime(9999, 12, 31), timezones=st.just(UTC)),
            st.just(datetime(1970, 1, 1, tzinfo=UTC)),
            st.just(MOMENT.replace(microsecond=0)),
        )
    )
    return Payment(
        payment_id=uuid.UUID(int=draw(st.integers(0, 2**128 - 1))),
        request_id="r",
        payer_account_id=uuid.uuid4(),
        payee_account_id=uuid.uuid4(),
        payer_name="Ada",
        payee_name="Bob",
        currency=draw(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=3, max_size=3)),
        amount=draw(amounts),
        # Any text PostgreSQL can hold: no NUL, no lone surrogate.
        reference=draw(
            st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"), max_size=300)
        ),
        status=status,
        decline_reason=reason,
        created_at=moment,
        updated_at=moment,
        hold_reason=hold,
    )


def _encoded(db: Any, payment: Payment) -> bytes:
    """The payment's SubmitPaymentResponse as `submitted_payment_response` encodes it."""
    db.execute(
        "SELECT submitted_payment_response(%s::uuid, %s::uuid, %s::uuid, %s, %s, %s, %s, %s, %s, %s)",
        (
            str(payment.payment_id),
            str(payment.payer_account_id),
            str(payment.payee_account_id),
            payment.currency,
            payment.amount,
            payment.reference,
            payment.status.value,
            payment.decline_reason.value if payment.decline_reason else None,
            payment.created_at,
            payment.hold_reason.value if payment.hold_reason else None,
        ),
    )
    (encoded,) = db.fetchone()
    return bytes(encoded)


@CASES
@given(payment=payments())
def test_the_stored_response_is_the_servicers_byte_for_byte(db: Any, payment: Payment) -> None:
    assert _encoded(db, payment) == submit_payment_response(payment).SerializeToString(deterministic=True)


def test_a_timestamp_is_encoded_to_the_microsecond(db: Any) -> None:
    """The moments the generator may miss: the epoch itself, whole seconds, one microsecond on either side."""
    for moment in (
        datetime(1970, 1, 1, tzinfo=UTC),
        datetime(1970, 1, 1, 0, 0, 0, 1, tzinfo=UTC),
        MOMENT,
        MOMENT + timedelta(microseconds=1),
        MOMENT.replace(microsecond=0),
    ):
        payment = Payment(
            uuid.uuid4(),
            "r",
            uuid.uuid4(),
            uuid.uuid4(),
            "Ada",
            "Bob",
            "EUR",
            1,
            "",
            PaymentStatus.APPROVED,
            None,
            moment,
            moment,
        )
        assert _encoded(db, payment) == submit_payment_response(payment).SerializeToString(
            deterministic=True
        ), moment
