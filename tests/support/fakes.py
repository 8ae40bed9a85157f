"""An in-memory store for the approval handlers' unit tests, held to SqlRepository by tests/contract.

Where the real store's behaviour is observable through the Repository protocol (what is
stored, what an unknown id does, which writes the table constraints refuse), the fake
does the same; tests/contract/test_approval_repository_contract.py runs one set of cases
against both. It does not model concurrency: units of work here run one after another.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Self
from uuid import UUID

import asyncpg

from approval_svc.adapters.repository import (
    IdempotencyKey,
    Repository,
    RequestLookup,
    SavedRequest,
    StoredRequest,
)
from approval_svc.domain.errors import TransactionConflict
from approval_svc.domain.model import (
    Account,
    AccountChange,
    AccountStatus,
    LedgerEntry,
    Payment,
    PaymentEvent,
)

START = datetime(2026, 3, 4, 9, 0, tzinfo=UTC)


@dataclass
class Store:
    """The committed state; each unit of work edits a copy and publishes it on commit."""

    accounts: dict[UUID, Account] = field(default_factory=dict)
    payments: dict[UUID, Payment] = field(default_factory=dict)
    events: list[PaymentEvent] = field(default_factory=list)
    ledger: list[LedgerEntry] = field(default_factory=list)
    requests: dict[IdempotencyKey, StoredRequest] = field(default_factory=dict)
    now: datetime = START
    position: int = 100
    conflicts_to_raise: int = 0
    # Requests a duplicate commits while a submission waits for its locks: the lookup
    # before the locks misses them, the statements after the locks see them.
    committed_elsewhere: dict[IdempotencyKey, StoredRequest] = field(default_factory=dict)


class FakeRepository(Repository):
    """The Repository on a Store; subclasses the protocol so that mypy checks every signature."""

    def __init__(self, state: Store, shared: Store | None = None) -> None:
        self.state = state
        # Simulated conflicts are counted on the committed state: a conflict rolls back.
        self.shared = shared or state

    async def claim_request(self, key: IdempotencyKey, method: str, fingerprint: bytes) -> RequestLookup:
        stored = self.state.requests.get(key)
        if stored is None:
            self.state.requests[key] = StoredRequest(method, fingerprint, b"")
        return RequestLookup(self.state.now, stored)

    async def save_response(self, key: IdempotencyKey, response: bytes) -> None:
        self._maybe_conflict()
        claimed = self.state.requests.get(key)
        if claimed is None:
            raise RuntimeError(f"the request {key!r} was not claimed by this transaction")
        self.state.requests[key] = dataclasses.replace(claimed, response=response)

    def _maybe_conflict(self) -> None:
        if self.shared.conflicts_to_raise:
            self.shared.conflicts_to_raise -= 1
            raise TransactionConflict("simulated")

    async def now(self) -> datetime:
        return self.state.now

    async def add_account(self, account: Account, entries: Sequence[LedgerEntry]) -> None:
        if account.account_id in self.state.accounts:
            raise asyncpg.UniqueViolationError("duplicate key value violates unique constraint")
        # As the INSERT does: balances and counters start from the account's opening values,
        # and the opening entries belong to the new account.
        self.state.accounts[account.account_id] = _checked(
            Account(
                account_id=account.account_id,
                owner_name=account.owner_name,
                currency=account.currency,
                status=account.status,
                ledger_balance=account.ledger_balance,
                held=0,
                per_payment_limit=account.per_payment_limit,
                daily_limit=account.daily_limit,
                created_at=account.created_at,
                updated_at=account.created_at,
            )
        )
        self.state.ledger.extend(
            dataclasses.replace(e, account_id=account.account_id, payment_id=None) for e in entries
        )

    async def lock_accounts(self, account_ids: Sequence[UUID]) -> dict[UUID, Account]:
        return {i: self.state.accounts[i] for i in account_ids if i in self.state.accounts}

    async def begin_submission(
        self, key: IdempotencyKey, account_ids: Sequence[UUID]
    ) -> tuple[RequestLookup, dict[UUID, Account]]:
        lookup = RequestLookup(self.state.now, self.state.requests.get(key))
        # The duplicate commits while this transaction waits for the locks.
        committed = self.shared.committed_elsewhere.pop(key, None)
        if committed is not None:
            self.shared.requests[key] = self.state.requests[key] = committed
        return lookup, await self.lock_accounts(account_ids)

    async def find_request(self, key: IdempotencyKey) -> StoredRequest | None:
        return self.state.requests.get(key)

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
    ) -> StoredRequest | None:
        self._maybe_conflict()
        # A request committed before the statement: its record, and nothing written (the
        # real statement's writes are rolled back with the transaction).
        stored = self.state.requests.get(request.key)
        if stored is not None:
            return stored
        await self.add_payment(payment, event)
        await self.apply_changes(changes, entries, payment.created_at)
        self.state.requests[request.key] = StoredRequest(
            request.method, request.fingerprint, request.response
        )
        return None

    async def update_payment(self, payment: Payment, event: PaymentEvent) -> None:
        # The UPDATE sets the status, the reason and the time, and adds the event only
        # when it found the payment.
        current = self.state.payments.get(payment.payment_id)
        if current is None:
            return
        self.state.payments[payment.payment_id] = dataclasses.replace(
            current,
            status=payment.status,
            decline_reason=payment.decline_reason,
            updated_at=payment.updated_at,
        )
        self.state.events.append(event)

    async def apply_changes(
        self, changes: Sequence[AccountChange], entries: Sequence[LedgerEntry], at: datetime
    ) -> None:
        for change in changes:
            account = self.state.accounts[change.account_id].applied(change, at)
            self.state.accounts[change.account_id] = _checked(account)
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
        account = self.state.accounts.get(account_id)
        if account is not None:
            self.state.accounts[account_id] = dataclasses.replace(account, status=status, updated_at=at)


def _checked(account: Account) -> Account:
    """The account, if it satisfies the accounts table's CHECK constraints; refused as they refuse it."""
    if not (
        0 <= account.held <= account.ledger_balance
        and account.total_sent >= 0
        and account.total_received >= 0
    ):
        raise asyncpg.CheckViolationError(f"new row for account {account.account_id} violates a check")
    return account


class FakeUnitOfWork:
    """A UnitOfWork on a Store: a copy to edit, published on commit and dropped otherwise."""

    repo: FakeRepository

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
