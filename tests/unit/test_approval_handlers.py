"""The approval use cases against an in-memory store: idempotency, transitions, not-found paths."""

from __future__ import annotations

import copy
import dataclasses
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Self
from uuid import UUID

import pytest

from approval_svc.adapters.repository import DailyUsage, RequestLookup, SavedRequest, StoredRequest
from approval_svc.domain import commands
from approval_svc.domain.errors import (
    AccountNotFound,
    DatabaseUnavailable,
    PaymentNotFound,
    PaymentNotUnderReview,
    RequestIdReused,
    TransactionConflict,
)
from approval_svc.domain.model import (
    Account,
    AccountChange,
    AccountStatus,
    DeclineReason,
    LedgerEntry,
    Payment,
    PaymentEvent,
    PaymentStatus,
)
from approval_svc.handlers import Handlers, RequestKey

START = datetime(2026, 3, 4, 9, 0, tzinfo=UTC)


@dataclass
class Store:
    """The committed state; each unit of work edits a copy and publishes it on commit."""

    accounts: dict[UUID, Account] = field(default_factory=dict)
    payments: dict[UUID, Payment] = field(default_factory=dict)
    events: list[PaymentEvent] = field(default_factory=list)
    ledger: list[LedgerEntry] = field(default_factory=list)
    requests: dict[str, StoredRequest] = field(default_factory=dict)
    now: datetime = START
    position: int = 100
    conflicts_to_raise: int = 0
    # Requests a duplicate commits while a submission waits for its locks: the lookup
    # before the locks misses them, the statement after the locks sees them.
    committed_elsewhere: dict[str, StoredRequest] = field(default_factory=dict)


class FakeRepository:
    def __init__(self, state: Store, shared: Store | None = None) -> None:
        self.state = state
        # Simulated conflicts are counted on the committed state: a conflict rolls back.
        self.shared = shared or state

    async def claim_request(self, request_id: str, method: str, fingerprint: bytes) -> RequestLookup:
        stored = self.state.requests.get(request_id)
        if stored is None:
            self.state.requests[request_id] = StoredRequest(method, fingerprint, b"")
        return RequestLookup(self.state.now, stored)

    async def save_response(self, request_id: str, response: bytes) -> None:
        self._maybe_conflict()
        claimed = self.state.requests[request_id]
        self.state.requests[request_id] = dataclasses.replace(claimed, response=response)

    def _maybe_conflict(self) -> None:
        if self.shared.conflicts_to_raise:
            self.shared.conflicts_to_raise -= 1
            raise TransactionConflict("simulated")

    async def now(self) -> datetime:
        return self.state.now

    async def add_account(self, account: Account, entries: Sequence[LedgerEntry]) -> None:
        self.state.accounts[account.account_id] = account
        self.state.ledger.extend(entries)

    async def lock_accounts(self, account_ids: Sequence[UUID]) -> dict[UUID, Account]:
        return {i: self.state.accounts[i] for i in account_ids if i in self.state.accounts}

    async def begin_submission(
        self, request_id: str, account_ids: Sequence[UUID]
    ) -> tuple[RequestLookup, dict[UUID, Account]]:
        lookup = RequestLookup(self.state.now, self.state.requests.get(request_id))
        return lookup, await self.lock_accounts(account_ids)

    async def daily_usage(self, payer_account_id: UUID, since: datetime, request_id: str) -> DailyUsage:
        used = sum(
            p.amount
            for p in self.state.payments.values()
            if p.payer_account_id == payer_account_id
            and p.created_at >= since
            and p.status in (PaymentStatus.APPROVED, PaymentStatus.PENDING_REVIEW)
        )
        # What a duplicate committed while this transaction waited for the locks.
        return DailyUsage(
            used, self.state.requests.get(request_id) or self.shared.committed_elsewhere.get(request_id)
        )

    async def add_payment(self, payment: Payment, event: PaymentEvent) -> None:
        self.state.payments[payment.payment_id] = payment
        self.state.events.append(event)

    async def add_decision(
        self,
        payment: Payment,
        event: PaymentEvent,
        changes: Sequence[AccountChange],
        entries: Sequence[LedgerEntry],
        request: SavedRequest,
    ) -> None:
        self._maybe_conflict()
        if request.request_id in self.state.requests:
            raise TransactionConflict("a concurrent request with the same request_id committed first")
        await self.add_payment(payment, event)
        await self.apply_changes(changes, entries, payment.created_at)
        self.state.requests[request.request_id] = StoredRequest(
            request.method, request.fingerprint, request.response
        )

    async def update_payment(self, payment: Payment, event: PaymentEvent) -> None:
        self.state.payments[payment.payment_id] = payment
        self.state.events.append(event)

    async def apply_changes(
        self, changes: Sequence[AccountChange], entries: Sequence[LedgerEntry], at: datetime
    ) -> None:
        for change in changes:
            account = self.state.accounts[change.account_id].applied(change, at)
            # The same invariants as the table's CHECK constraints.
            assert 0 <= account.held <= account.ledger_balance
            self.state.accounts[change.account_id] = account
        self.state.ledger.extend(entries)

    async def lock_payment(self, payment_id: UUID) -> Payment | None:
        return self.state.payments.get(payment_id)

    async def get_payment(self, payment_id: UUID) -> Payment | None:
        return self.state.payments.get(payment_id)

    async def get_payment_with_events(self, payment_id: UUID) -> tuple[Payment, list[PaymentEvent]] | None:
        payment = self.state.payments.get(payment_id)
        if payment is None:
            return None
        events = sorted(
            (e for e in self.state.events if e.payment_id == payment_id), key=lambda e: e.sequence
        )
        return payment, events

    async def set_account_status(self, account_id: UUID, status: AccountStatus, at: datetime) -> None:
        account = self.state.accounts[account_id]
        self.state.accounts[account_id] = dataclasses.replace(account, status=status, updated_at=at)


class FakeUnitOfWork:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.committed = False

    async def __aenter__(self) -> Self:
        self.repo = FakeRepository(copy.deepcopy(self.store), self.store)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None

    async def commit(self) -> int:
        state = self.repo.state
        state.position += 10
        for name in ("accounts", "payments", "events", "ledger", "requests", "position"):
            setattr(self.store, name, getattr(state, name))
        self.committed = True
        return self.store.position

    async def position(self) -> int:
        return self.store.position


@pytest.fixture
def store() -> Store:
    return Store()


@pytest.fixture
def handlers(store: Store) -> Handlers:
    return Handlers(lambda: FakeUnitOfWork(store), review_threshold=1_000)


def key(method: str, request_id: str | None = None, fingerprint: bytes = b"f") -> RequestKey[object]:
    return RequestKey(request_id or uuid.uuid4().hex, method, fingerprint, lambda value: repr(value).encode())


async def open_account(
    handlers: Handlers, opening: int, currency: str = "EUR", daily: int = 5_000
) -> Account:
    command = commands.CreateAccount("Ada", currency, opening, 2_000, daily)
    outcome = await handlers.create_account(command, key("CreateAccount"))  # type: ignore[arg-type]
    assert outcome.value is not None
    return outcome.value


async def pay(
    handlers: Handlers, payer: Account, payee: Account, amount: int, request_id: str | None = None
) -> Payment:
    command = commands.SubmitPayment(payer.account_id, payee.account_id, "EUR", amount, "")
    outcome = await handlers.submit_payment(command, key("SubmitPayment", request_id))  # type: ignore[arg-type]
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
    assert store.accounts[payer.account_id].held == 2_500
    assert store.accounts[payer.account_id].available_balance == 2_500
    store.now = START + timedelta(minutes=5)

    approve = commands.ReviewPayment(first.payment_id, "bob", "checked", approve=True)
    approved = (await handlers.review_payment(approve, key("ApprovePayment"))).value  # type: ignore[arg-type]
    decline = commands.ReviewPayment(second.payment_id, "eve", "", approve=False)
    declined = (await handlers.review_payment(decline, key("DeclinePayment"))).value  # type: ignore[arg-type]

    assert approved is not None
    assert declined is not None
    assert approved.status is PaymentStatus.APPROVED
    assert approved.updated_at == store.now
    assert declined.decline_reason is DeclineReason.DECLINED_BY_REVIEWER
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
        await handlers.review_payment(approve, key("ApprovePayment"))  # type: ignore[arg-type]


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
        await handlers.review_payment(review, key("ApprovePayment"))  # type: ignore[arg-type]
    freeze = commands.SetAccountStatus(uuid.uuid4(), AccountStatus.FROZEN, "")
    with pytest.raises(AccountNotFound):
        await handlers.set_account_status(freeze, key("FreezeAccount"))  # type: ignore[arg-type]


async def test_a_retry_replays_and_a_reuse_is_rejected(handlers: Handlers, store: Store) -> None:
    payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 0)
    command = commands.SubmitPayment(payer.account_id, payee.account_id, "EUR", 100, "")
    first = await handlers.submit_payment(command, key("SubmitPayment", "same"))  # type: ignore[arg-type]
    again = await handlers.submit_payment(command, key("SubmitPayment", "same"))  # type: ignore[arg-type]
    assert first.value is not None
    assert again.value is None
    assert again.replay == repr(first.value).encode()
    assert again.position >= first.position
    assert len(store.payments) == 1
    assert store.accounts[payer.account_id].ledger_balance == 900

    with pytest.raises(RequestIdReused):
        await handlers.submit_payment(command, key("SubmitPayment", "same", b"other"))  # type: ignore[arg-type]
    freeze = commands.SetAccountStatus(payer.account_id, AccountStatus.FROZEN, "")
    with pytest.raises(RequestIdReused):
        await handlers.set_account_status(freeze, key("FreezeAccount", "same"))  # type: ignore[arg-type]


async def test_freezing_is_idempotent_and_declines_payments(handlers: Handlers, store: Store) -> None:
    payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 0)
    freeze = commands.SetAccountStatus(payee.account_id, AccountStatus.FROZEN, "fraud check")
    frozen = (await handlers.set_account_status(freeze, key("FreezeAccount"))).value  # type: ignore[arg-type]
    assert frozen is not None
    assert frozen.status is AccountStatus.FROZEN
    store.now = START + timedelta(hours=1)
    again = (await handlers.set_account_status(freeze, key("FreezeAccount"))).value  # type: ignore[arg-type]
    assert again == frozen
    assert (await pay(handlers, payer, payee, 10)).decline_reason is DeclineReason.ACCOUNT_FROZEN
    unfreeze = commands.SetAccountStatus(payee.account_id, AccountStatus.ACTIVE, "")
    await handlers.set_account_status(unfreeze, key("UnfreezeAccount"))  # type: ignore[arg-type]
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
    store.committed_elsewhere["dup"] = StoredRequest("SubmitPayment", b"f", b"the first response")
    command = commands.SubmitPayment(payer.account_id, payee.account_id, "EUR", 100, "")
    outcome = await handlers.submit_payment(command, key("SubmitPayment", "dup"))  # type: ignore[arg-type]
    assert outcome.value is None
    assert outcome.replay == b"the first response"
    assert store.payments == {}
    assert store.accounts[payer.account_id].ledger_balance == 1_000
    with pytest.raises(RequestIdReused):
        await handlers.submit_payment(command, key("SubmitPayment", "dup", b"other"))  # type: ignore[arg-type]
