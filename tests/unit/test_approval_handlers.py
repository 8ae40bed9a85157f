"""The approval use cases against an in-memory store: idempotency, transitions, not-found paths.

The store is tests/support/fakes.py, held to SqlRepository by tests/contract.
"""

from __future__ import annotations

import dataclasses
import uuid
from datetime import UTC, date, datetime, timedelta
from typing import TypeVar

import pytest

from approval_svc.adapters.repository import IdempotencyKey, StoredRequest
from approval_svc.domain import commands
from approval_svc.domain.errors import (
    AccountNotFound,
    DatabaseUnavailable,
    InvalidRequest,
    PaymentNotFound,
    PaymentNotUnderReview,
    RequestIdReused,
)
from approval_svc.domain.model import (
    MAX_AMOUNT,
    Account,
    AccountStatus,
    DeclineReason,
    HoldReason,
    Payment,
    PaymentStatus,
)
from approval_svc.handlers import Handlers, RequestKey
from tests.support.fakes import START, FakeUnitOfWork, Store

T = TypeVar("T")


@pytest.fixture
def store() -> Store:
    return Store()


@pytest.fixture
def handlers(store: Store) -> Handlers:
    return Handlers(lambda: FakeUnitOfWork(store), review_threshold=1_000)


CALLER = "token:ada"


def key(
    method: str, request_id: str | None = None, fingerprint: bytes = b"f", caller: str = CALLER
) -> RequestKey[T]:
    return RequestKey(
        caller, request_id or uuid.uuid4().hex, method, fingerprint, lambda value: repr(value).encode()
    )


async def open_account(
    handlers: Handlers, opening: int, currency: str = "EUR", daily: int = 5_000
) -> Account:
    command = commands.CreateAccount("Ada", currency, opening, 2_000, daily)
    outcome = await handlers.create_account(command, key("CreateAccount"))
    assert outcome.value is not None
    return outcome.value


async def pay(
    handlers: Handlers, payer: Account, payee: Account, amount: int, request_id: str | None = None
) -> Payment:
    command = commands.SubmitPayment(payer.account_id, payee.account_id, "EUR", amount, "")
    outcome = await handlers.submit_payment(command, key("SubmitPayment", request_id))
    assert outcome.value is not None
    return outcome.value


async def test_an_approved_payment_moves_funds_with_double_entry(handlers: Handlers, store: Store) -> None:
    payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 0)
    payment = await pay(handlers, payer, payee, 400)
    assert payment.status is PaymentStatus.APPROVED
    assert payment.payer_name == "Ada"
    assert store.accounts[payer.account_id].ledger_balance == 600
    assert store.accounts[payee.account_id].ledger_balance == 400
    assert store.accounts[payer.account_id].sent_approved == 1
    assert store.accounts[payee.account_id].received_approved == 1
    assert [e.amount for e in store.ledger if e.payment_id == payment.payment_id] == [-400, 400]
    assert [(e.sequence, e.actor) for e in store.events] == [(1, "system")]


async def test_a_decline_is_recorded_and_moves_nothing(handlers: Handlers, store: Store) -> None:
    payer, payee = await open_account(handlers, 100), await open_account(handlers, 0)
    payment = await pay(handlers, payer, payee, 101)
    assert payment.status is PaymentStatus.DECLINED
    assert payment.decline_reason is DeclineReason.INSUFFICIENT_FUNDS
    assert store.accounts[payer.account_id].ledger_balance == 100
    assert store.accounts[payer.account_id].sent_declined == 1
    assert store.accounts[payee.account_id].received_declined == 1
    assert store.payments[payment.payment_id].decline_reason is DeclineReason.INSUFFICIENT_FUNDS


async def test_the_daily_limit_counts_approved_and_held_payments_of_the_utc_day(
    handlers: Handlers, store: Store
) -> None:
    payer, payee = await open_account(handlers, 10_000, daily=2_500), await open_account(handlers, 0)
    assert (await pay(handlers, payer, payee, 1_200)).status is PaymentStatus.PENDING_REVIEW
    assert (await pay(handlers, payer, payee, 900)).status is PaymentStatus.APPROVED
    declined = await pay(handlers, payer, payee, 401)
    assert declined.decline_reason is DeclineReason.DAILY_LIMIT_EXCEEDED
    assert (await pay(handlers, payer, payee, 400)).status is PaymentStatus.APPROVED
    store.now = START + timedelta(days=1)
    assert (await pay(handlers, payer, payee, 900)).status is PaymentStatus.APPROVED


async def test_review_approves_or_releases_held_funds(handlers: Handlers, store: Store) -> None:
    payer, payee = await open_account(handlers, 5_000), await open_account(handlers, 0)
    first, second = await pay(handlers, payer, payee, 1_500), await pay(handlers, payer, payee, 1_000)
    assert first.hold_reason is HoldReason.AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD
    assert store.accounts[payer.account_id].held == 2_500
    assert store.accounts[payer.account_id].available_balance == 2_500
    store.now = START + timedelta(minutes=5)

    approve = commands.ReviewPayment(first.payment_id, "bob", "checked", approve=True)
    approved = (await handlers.review_payment(approve, key("ApprovePayment"))).value
    decline = commands.ReviewPayment(second.payment_id, "eve", "", approve=False)
    declined = (await handlers.review_payment(decline, key("DeclinePayment"))).value

    assert approved is not None
    assert declined is not None
    assert approved.status is PaymentStatus.APPROVED
    assert approved.updated_at == store.now
    assert declined.decline_reason is DeclineReason.DECLINED_BY_REVIEWER
    # The reason it was held stays with the payment once it is decided.
    assert approved.hold_reason is declined.hold_reason is HoldReason.AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD
    after_payer, after_payee = store.accounts[payer.account_id], store.accounts[payee.account_id]
    assert (after_payer.ledger_balance, after_payer.held) == (3_500, 0)
    assert after_payee.ledger_balance == 1_500
    assert (after_payer.sent_pending_review, after_payer.sent_approved, after_payer.sent_declined) == (
        0,
        1,
        1,
    )
    _, timeline = await handlers.get_payment(first.payment_id)
    assert [(e.sequence, e.status, e.actor, e.note) for e in timeline] == [
        (1, PaymentStatus.PENDING_REVIEW, "system", ""),
        (2, PaymentStatus.APPROVED, "bob", "checked"),
    ]

    with pytest.raises(PaymentNotUnderReview):
        await handlers.review_payment(approve, key("ApprovePayment"))


async def test_unknown_accounts_and_payments_are_not_found(handlers: Handlers) -> None:
    known = await open_account(handlers, 10)
    unknown = dataclasses.replace(known, account_id=uuid.uuid4())
    with pytest.raises(AccountNotFound) as raised:
        await pay(handlers, unknown, known, 1)
    assert raised.value.metadata["field"] == "payer_account_id"
    with pytest.raises(AccountNotFound) as raised:
        await pay(handlers, known, unknown, 1)
    assert raised.value.metadata["field"] == "payee_account_id"
    with pytest.raises(PaymentNotFound):
        await handlers.get_payment(uuid.uuid4())
    review = commands.ReviewPayment(uuid.uuid4(), "bob", "", approve=True)
    with pytest.raises(PaymentNotFound):
        await handlers.review_payment(review, key("ApprovePayment"))
    freeze = commands.SetAccountStatus(uuid.uuid4(), AccountStatus.FROZEN, "")
    with pytest.raises(AccountNotFound):
        await handlers.set_account_status(freeze, key("FreezeAccount"))


async def test_a_retry_replays_and_a_reuse_is_rejected(handlers: Handlers, store: Store) -> None:
    payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 0)
    command = commands.SubmitPayment(payer.account_id, payee.account_id, "EUR", 100, "")
    first = await handlers.submit_payment(command, key("SubmitPayment", "same"))
    again = await handlers.submit_payment(command, key("SubmitPayment", "same"))
    assert first.value is not None
    assert again.value is None
    assert again.replay == repr(first.value).encode()
    assert again.position >= first.position
    assert len(store.payments) == 1
    assert store.accounts[payer.account_id].ledger_balance == 900

    with pytest.raises(RequestIdReused):
        await handlers.submit_payment(command, key("SubmitPayment", "same", b"other"))
    freeze = commands.SetAccountStatus(payer.account_id, AccountStatus.FROZEN, "")
    with pytest.raises(RequestIdReused):
        await handlers.set_account_status(freeze, key("FreezeAccount", "same"))


async def test_a_request_id_is_its_callers_own(handlers: Handlers, store: Store) -> None:
    payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 0)
    command = commands.SubmitPayment(payer.account_id, payee.account_id, "EUR", 100, "")
    ada = await handlers.submit_payment(command, key("SubmitPayment", "same"))
    # The same request from another caller is another request: carried out, with its own response.
    bob = await handlers.submit_payment(command, key("SubmitPayment", "same", caller="token:bob"))
    assert ada.value is not None
    assert bob.value is not None
    assert bob.value.payment_id != ada.value.payment_id
    assert bob.value.request_id == ada.value.request_id == "same"
    assert store.accounts[payer.account_id].ledger_balance == 800
    again = await handlers.submit_payment(command, key("SubmitPayment", "same", caller="token:bob"))
    assert again.replay == repr(bob.value).encode()
    # Each caller's reuse is refused, and a freeze under the same request_id by a third caller runs.
    with pytest.raises(RequestIdReused):
        await handlers.submit_payment(command, key("SubmitPayment", "same", b"other", caller="token:bob"))
    freeze = commands.SetAccountStatus(payee.account_id, AccountStatus.FROZEN, "")
    frozen = await handlers.set_account_status(freeze, key("FreezeAccount", "same", caller="token:carol"))
    assert frozen.value is not None
    assert {k for k in store.requests if k.request_id == "same"} == {
        IdempotencyKey(caller, "same") for caller in (CALLER, "token:bob", "token:carol")
    }


async def test_freezing_is_idempotent_and_declines_payments(handlers: Handlers, store: Store) -> None:
    payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 0)
    freeze = commands.SetAccountStatus(payee.account_id, AccountStatus.FROZEN, "fraud check")
    frozen = (await handlers.set_account_status(freeze, key("FreezeAccount"))).value
    assert frozen is not None
    assert frozen.status is AccountStatus.FROZEN
    store.now = START + timedelta(hours=1)
    again = (await handlers.set_account_status(freeze, key("FreezeAccount"))).value
    assert again == frozen
    assert (await pay(handlers, payer, payee, 10)).decline_reason is DeclineReason.ACCOUNT_FROZEN
    unfreeze = commands.SetAccountStatus(payee.account_id, AccountStatus.ACTIVE, "")
    await handlers.set_account_status(unfreeze, key("UnfreezeAccount"))
    assert (await pay(handlers, payer, payee, 10)).status is PaymentStatus.APPROVED


async def test_conflicts_are_retried_with_a_bound(store: Store) -> None:
    handlers = Handlers(lambda: FakeUnitOfWork(store), review_threshold=1_000, max_attempts=3)
    payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 0)
    store.conflicts_to_raise = 2
    assert (await pay(handlers, payer, payee, 1)).status is PaymentStatus.APPROVED
    assert len(store.payments) == 1
    store.conflicts_to_raise = 3
    with pytest.raises(DatabaseUnavailable):
        await pay(handlers, payer, payee, 1)
    assert len(store.payments) == 1


async def test_a_duplicate_committed_while_a_submission_waited_for_its_locks_is_replayed(
    handlers: Handlers, store: Store
) -> None:
    payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 0)
    store.committed_elsewhere[IdempotencyKey(CALLER, "dup")] = StoredRequest(
        "SubmitPayment", b"f", b"the first response"
    )
    command = commands.SubmitPayment(payer.account_id, payee.account_id, "EUR", 100, "")
    outcome = await handlers.submit_payment(command, key("SubmitPayment", "dup"))
    assert outcome.value is None
    assert outcome.replay == b"the first response"
    assert store.payments == {}
    assert store.accounts[payer.account_id].ledger_balance == 1_000
    with pytest.raises(RequestIdReused):
        await handlers.submit_payment(command, key("SubmitPayment", "dup", b"other"))


async def test_a_duplicate_committed_while_waiting_is_replayed_rather_than_refused(
    handlers: Handlers, store: Store
) -> None:
    """The duplicate's credit is what no longer fits the payee: the answer is still the duplicate's."""
    payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 0)
    store.accounts[payee.account_id] = dataclasses.replace(
        store.accounts[payee.account_id], ledger_balance=MAX_AMOUNT - 50
    )
    store.committed_elsewhere[IdempotencyKey(CALLER, "dup")] = StoredRequest(
        "SubmitPayment", b"f", b"the first response"
    )
    command = commands.SubmitPayment(payer.account_id, payee.account_id, "EUR", 100, "")
    outcome = await handlers.submit_payment(command, key("SubmitPayment", "dup"))
    assert outcome.replay == b"the first response"
    with pytest.raises(InvalidRequest):
        await pay(handlers, payer, payee, 100)


async def test_a_reviewers_decline_gives_back_to_the_day_the_payment_was_counted(
    handlers: Handlers, store: Store
) -> None:
    payer, payee = await open_account(handlers, 10_000, daily=2_500), await open_account(handlers, 0)

    async def review(payment: Payment, approve: bool) -> None:
        command = commands.ReviewPayment(payment.payment_id, "eve", "", approve)
        await handlers.review_payment(command, key("ApprovePayment" if approve else "DeclinePayment"))

    def counter() -> tuple[date | None, int]:
        account = store.accounts[payer.account_id]
        return account.daily_usage_day, account.daily_usage

    held_yesterday = await pay(handlers, payer, payee, 1_500)
    store.now = START + timedelta(days=1)
    today = store.now.date()
    first, second = await pay(handlers, payer, payee, 1_200), await pay(handlers, payer, payee, 1_000)
    assert first.status is second.status is PaymentStatus.PENDING_REVIEW
    assert counter() == (today, 2_200)
    # Yesterday's payment counted towards yesterday's limit: declining it frees nothing today.
    await review(held_yesterday, approve=False)
    assert counter() == (today, 2_200)
    assert store.accounts[payer.account_id].held == 2_200
    assert (await pay(handlers, payer, payee, 301)).decline_reason is DeclineReason.DAILY_LIMIT_EXCEEDED
    # An approval leaves the usage as it is; a decline of today's payment gives its amount back.
    await review(first, approve=True)
    assert counter() == (today, 2_200)
    await review(second, approve=False)
    assert counter() == (today, 1_200)
    assert (await pay(handlers, payer, payee, 1_300)).status is PaymentStatus.PENDING_REVIEW
    assert (await pay(handlers, payer, payee, 1)).decline_reason is DeclineReason.DAILY_LIMIT_EXCEEDED
    assert counter() == (today, 2_500)


async def test_a_submission_whose_clock_is_behind_the_counters_day_runs_again(
    handlers: Handlers, store: Store
) -> None:
    """A payment that started before midnight waited for one that started after it and committed first."""
    payer, payee = await open_account(handlers, 10_000), await open_account(handlers, 0)
    before, after = datetime(2026, 3, 4, 23, 59, 59, tzinfo=UTC), datetime(2026, 3, 5, 0, 0, 1, tzinfo=UTC)
    # What the payment that started later left: the payer's counter is of the next day.
    store.accounts[payer.account_id] = dataclasses.replace(
        store.accounts[payer.account_id], daily_usage_day=after.date(), daily_usage=4_000
    )
    clocks = [before, after]

    def unit_of_work() -> FakeUnitOfWork:
        # Each transaction's clock is its start: the second attempt starts after midnight.
        store.now = clocks.pop(0) if clocks else store.now
        return FakeUnitOfWork(store)

    retried = Handlers(unit_of_work, review_threshold=1_000)
    declined = await pay(retried, payer, payee, 1_001)
    assert (declined.created_at, declined.decline_reason) == (after, DeclineReason.DAILY_LIMIT_EXCEEDED)
    assert (await pay(retried, payer, payee, 999)).status is PaymentStatus.APPROVED
