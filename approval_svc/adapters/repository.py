"""The repository: every SQL statement of the command side, with few round trips per decision."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol
from uuid import UUID

from sqlalchemy import RowMapping, text
from sqlalchemy.ext.asyncio import AsyncConnection

from approval_svc.domain.errors import TransactionConflict
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


@dataclass(frozen=True, slots=True)
class StoredRequest:
    """The record of a request already carried out (AIP-155)."""

    method: str
    fingerprint: bytes
    response: bytes


@dataclass(frozen=True, slots=True)
class RequestLookup:
    """The transaction's timestamp, and the earlier request with the same request_id if any."""

    now: datetime
    stored: StoredRequest | None


class Repository(Protocol):
    """What the handlers need from the store; SqlRepository and the tests' fake implement it."""

    async def begin_request(self, request_id: str) -> RequestLookup: ...

    async def save_request(self, request_id: str, method: str, fingerprint: bytes, response: bytes) -> None:
        """Records a request's response; raises TransactionConflict when a concurrent one won."""

    async def now(self) -> datetime: ...

    async def add_account(self, account: Account, entries: Sequence[LedgerEntry]) -> None: ...

    async def lock_accounts(self, account_ids: Sequence[UUID]) -> dict[UUID, Account]: ...

    async def daily_usage(self, payer_account_id: UUID, since: datetime) -> int: ...

    async def add_payment(self, payment: Payment, event: PaymentEvent) -> None: ...

    async def update_payment(self, payment: Payment, event: PaymentEvent) -> None: ...

    async def apply_changes(
        self, changes: Sequence[AccountChange], entries: Sequence[LedgerEntry], at: datetime
    ) -> None: ...

    async def lock_payment(self, payment_id: UUID) -> Payment | None: ...

    async def get_payment(self, payment_id: UUID) -> Payment | None: ...

    async def get_payment_with_events(
        self, payment_id: UUID
    ) -> tuple[Payment, list[PaymentEvent]] | None: ...

    async def set_account_status(self, account_id: UUID, status: AccountStatus, at: datetime) -> None: ...


_ACCOUNT_COLUMNS = """
    account_id, owner_name, currency_code, status, ledger_balance_minor, held_minor,
    per_payment_limit_minor, daily_limit_minor, created_at, updated_at,
    total_sent_minor, total_received_minor, sent_approved, sent_declined, sent_pending_review,
    received_approved, received_declined, received_pending_review
"""

_PAYMENT_COLUMNS = """
    payment_id, request_id, payer_account_id, payee_account_id, payer_name, payee_name,
    currency_code, amount_minor, reference, status, decline_reason, created_at, updated_at
"""

_BEGIN_REQUEST = text(
    """
    SELECT now() AS now, k.method, k.request_fingerprint, k.response
    FROM (SELECT 1) AS one LEFT JOIN idempotency_keys AS k ON k.request_id = :request_id
    """
)

# DO NOTHING waits for a concurrent insert of the same key to finish, so the loser
# learns of the winner here and retries its whole unit of work as a replay.
_SAVE_REQUEST = text(
    """
    INSERT INTO idempotency_keys (request_id, method, request_fingerprint, response)
    VALUES (:request_id, :method, :fingerprint, :response)
    ON CONFLICT (request_id) DO NOTHING
    RETURNING 1
    """
)

_ADD_ACCOUNT = text(
    """
    WITH account AS (
        INSERT INTO accounts (account_id, owner_name, currency_code, status, ledger_balance_minor,
                              per_payment_limit_minor, daily_limit_minor, created_at, updated_at)
        VALUES (:account_id, :owner_name, :currency_code, :status, :ledger,
                :per_payment_limit, :daily_limit, :at, :at)
        RETURNING account_id
    )
    INSERT INTO ledger_entries (account_id, payment_id, kind, amount_minor, created_at)
    SELECT account.account_id, NULL, e.kind, e.amount, :at
    FROM account, unnest(CAST(:kinds AS text[]), CAST(:amounts AS bigint[])) AS e(kind, amount)
    """
)

# ORDER BY makes every transaction lock accounts in the same order, so two payments
# between the same accounts in opposite directions cannot deadlock. NO KEY UPDATE
# does not block the key-share locks that foreign keys of new payments take.
_LOCK_ACCOUNTS = text(
    f"""
    SELECT {_ACCOUNT_COLUMNS} FROM accounts
    WHERE account_id = ANY(CAST(:account_ids AS uuid[]))
    ORDER BY account_id
    FOR NO KEY UPDATE
    """
)

# A separate statement after the locks: in READ COMMITTED it takes a new snapshot, so
# it sees every payment committed by the transactions it waited for.
_DAILY_USAGE = text(
    """
    SELECT coalesce(sum(amount_minor), 0) FROM payments
    WHERE payer_account_id = :payer AND created_at >= :since
      AND status IN ('APPROVED', 'PENDING_REVIEW')
    """
)

_ADD_PAYMENT = text(
    f"""
    WITH payment AS (
        INSERT INTO payments ({_PAYMENT_COLUMNS})
        VALUES (:payment_id, :request_id, :payer, :payee, :payer_name, :payee_name, :currency_code,
                :amount, :reference, :status, :decline_reason, :created_at, :updated_at)
        RETURNING payment_id
    )
    INSERT INTO payment_events (payment_id, sequence, status, decline_reason, actor, note, created_at)
    SELECT payment_id, :sequence, :event_status, :event_reason, :actor, :note, :event_at FROM payment
    """
)

_UPDATE_PAYMENT = text(
    """
    WITH payment AS (
        UPDATE payments SET status = :status, decline_reason = :decline_reason, updated_at = :updated_at
        WHERE payment_id = :payment_id
        RETURNING payment_id
    )
    INSERT INTO payment_events (payment_id, sequence, status, decline_reason, actor, note, created_at)
    SELECT payment_id, :sequence, :event_status, :event_reason, :actor, :note, :event_at FROM payment
    """
)

# One statement for both accounts and the ledger rows: a data-modifying WITH runs to
# completion even though the outer statement does not read it.
_APPLY_CHANGES = text(
    """
    WITH changed AS (
        UPDATE accounts AS a SET
            ledger_balance_minor = a.ledger_balance_minor + d.ledger,
            held_minor = a.held_minor + d.held,
            total_sent_minor = a.total_sent_minor + d.total_sent,
            total_received_minor = a.total_received_minor + d.total_received,
            sent_approved = a.sent_approved + d.sent_approved,
            sent_declined = a.sent_declined + d.sent_declined,
            sent_pending_review = a.sent_pending_review + d.sent_pending_review,
            received_approved = a.received_approved + d.received_approved,
            received_declined = a.received_declined + d.received_declined,
            received_pending_review = a.received_pending_review + d.received_pending_review,
            updated_at = :at
        FROM unnest(
            CAST(:ids AS uuid[]), CAST(:ledger AS bigint[]), CAST(:held AS bigint[]),
            CAST(:total_sent AS bigint[]), CAST(:total_received AS bigint[]),
            CAST(:sent_approved AS bigint[]), CAST(:sent_declined AS bigint[]),
            CAST(:sent_pending_review AS bigint[]), CAST(:received_approved AS bigint[]),
            CAST(:received_declined AS bigint[]), CAST(:received_pending_review AS bigint[])
        ) AS d(account_id, ledger, held, total_sent, total_received, sent_approved, sent_declined,
               sent_pending_review, received_approved, received_declined, received_pending_review)
        WHERE a.account_id = d.account_id
    )
    INSERT INTO ledger_entries (account_id, payment_id, kind, amount_minor, created_at)
    SELECT e.account_id, e.payment_id, e.kind, e.amount, :at
    FROM unnest(CAST(:entry_accounts AS uuid[]), CAST(:entry_payments AS uuid[]),
                CAST(:entry_kinds AS text[]), CAST(:entry_amounts AS bigint[]))
         AS e(account_id, payment_id, kind, amount)
    """
)

_LOCK_PAYMENT = text(
    f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE payment_id = :payment_id FOR NO KEY UPDATE"
)
_GET_PAYMENT = text(f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE payment_id = :payment_id")
# One statement, so the payment and its timeline come from one snapshot.
_PAYMENT_WITH_EVENTS = text(
    """
    SELECT p.payment_id, p.request_id, p.payer_account_id, p.payee_account_id, p.payer_name,
           p.payee_name, p.currency_code, p.amount_minor, p.reference, p.status, p.decline_reason,
           p.created_at, p.updated_at, e.sequence, e.status AS event_status, e.decline_reason AS event_reason, e.actor, e.note,
           e.created_at AS event_at
    FROM payments AS p LEFT JOIN payment_events AS e ON e.payment_id = p.payment_id
    WHERE p.payment_id = :payment_id
    ORDER BY e.sequence
    """
)
_SET_ACCOUNT_STATUS = text(
    "UPDATE accounts SET status = :status, updated_at = :at WHERE account_id = :account_id"
)
_NOW = text("SELECT now()")


def _account(row: RowMapping) -> Account:
    return Account(
        account_id=row["account_id"],
        owner_name=row["owner_name"],
        currency=row["currency_code"],
        status=AccountStatus(row["status"]),
        ledger_balance=row["ledger_balance_minor"],
        held=row["held_minor"],
        per_payment_limit=row["per_payment_limit_minor"],
        daily_limit=row["daily_limit_minor"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        total_sent=row["total_sent_minor"],
        total_received=row["total_received_minor"],
        sent_approved=row["sent_approved"],
        sent_declined=row["sent_declined"],
        sent_pending_review=row["sent_pending_review"],
        received_approved=row["received_approved"],
        received_declined=row["received_declined"],
        received_pending_review=row["received_pending_review"],
    )


def _payment(row: RowMapping) -> Payment:
    reason = row["decline_reason"]
    return Payment(
        payment_id=row["payment_id"],
        request_id=row["request_id"],
        payer_account_id=row["payer_account_id"],
        payee_account_id=row["payee_account_id"],
        payer_name=row["payer_name"],
        payee_name=row["payee_name"],
        currency=row["currency_code"],
        amount=row["amount_minor"],
        reference=row["reference"],
        status=PaymentStatus(row["status"]),
        decline_reason=DeclineReason(reason) if reason is not None else None,
        created_at=row["created_at"],
        updated_at=row["updated_at"],
    )


def _event_params(event: PaymentEvent) -> dict[str, Any]:
    return {
        "sequence": event.sequence,
        "event_status": event.status.value,
        "event_reason": event.decline_reason.value if event.decline_reason else None,
        "actor": event.actor,
        "note": event.note,
        "event_at": event.created_at,
    }


class SqlRepository:
    """The Repository on one connection inside the unit of work's transaction."""

    def __init__(self, connection: AsyncConnection) -> None:
        self._connection = connection

    async def begin_request(self, request_id: str) -> RequestLookup:
        row = (await self._connection.execute(_BEGIN_REQUEST, {"request_id": request_id})).one()
        stored = None
        if row.method is not None:
            stored = StoredRequest(row.method, bytes(row.request_fingerprint), bytes(row.response))
        return RequestLookup(row.now, stored)

    async def save_request(self, request_id: str, method: str, fingerprint: bytes, response: bytes) -> None:
        params = {
            "request_id": request_id,
            "method": method,
            "fingerprint": fingerprint,
            "response": response,
        }
        inserted = (await self._connection.execute(_SAVE_REQUEST, params)).first()
        if inserted is None:
            raise TransactionConflict("a concurrent request with the same request_id committed first")

    async def now(self) -> datetime:
        value: datetime = (await self._connection.execute(_NOW)).scalar_one()
        return value

    async def add_account(self, account: Account, entries: Sequence[LedgerEntry]) -> None:
        await self._connection.execute(
            _ADD_ACCOUNT,
            {
                "account_id": account.account_id,
                "owner_name": account.owner_name,
                "currency_code": account.currency,
                "status": account.status.value,
                "ledger": account.ledger_balance,
                "per_payment_limit": account.per_payment_limit,
                "daily_limit": account.daily_limit,
                "at": account.created_at,
                "kinds": [e.kind.value for e in entries],
                "amounts": [e.amount for e in entries],
            },
        )

    async def lock_accounts(self, account_ids: Sequence[UUID]) -> dict[UUID, Account]:
        result = await self._connection.execute(_LOCK_ACCOUNTS, {"account_ids": list(account_ids)})
        return {row["account_id"]: _account(row) for row in result.mappings()}

    async def daily_usage(self, payer_account_id: UUID, since: datetime) -> int:
        result = await self._connection.execute(_DAILY_USAGE, {"payer": payer_account_id, "since": since})
        return int(result.scalar_one())

    async def add_payment(self, payment: Payment, event: PaymentEvent) -> None:
        await self._connection.execute(
            _ADD_PAYMENT,
            {
                "payment_id": payment.payment_id,
                "request_id": payment.request_id,
                "payer": payment.payer_account_id,
                "payee": payment.payee_account_id,
                "payer_name": payment.payer_name,
                "payee_name": payment.payee_name,
                "currency_code": payment.currency,
                "amount": payment.amount,
                "reference": payment.reference,
                "status": payment.status.value,
                "decline_reason": payment.decline_reason.value if payment.decline_reason else None,
                "created_at": payment.created_at,
                "updated_at": payment.updated_at,
                **_event_params(event),
            },
        )

    async def update_payment(self, payment: Payment, event: PaymentEvent) -> None:
        await self._connection.execute(
            _UPDATE_PAYMENT,
            {
                "payment_id": payment.payment_id,
                "status": payment.status.value,
                "decline_reason": payment.decline_reason.value if payment.decline_reason else None,
                "updated_at": payment.updated_at,
                **_event_params(event),
            },
        )

    async def apply_changes(
        self, changes: Sequence[AccountChange], entries: Sequence[LedgerEntry], at: datetime
    ) -> None:
        await self._connection.execute(
            _APPLY_CHANGES,
            {
                "at": at,
                "ids": [c.account_id for c in changes],
                "ledger": [c.ledger for c in changes],
                "held": [c.held for c in changes],
                "total_sent": [c.total_sent for c in changes],
                "total_received": [c.total_received for c in changes],
                "sent_approved": [c.sent_approved for c in changes],
                "sent_declined": [c.sent_declined for c in changes],
                "sent_pending_review": [c.sent_pending_review for c in changes],
                "received_approved": [c.received_approved for c in changes],
                "received_declined": [c.received_declined for c in changes],
                "received_pending_review": [c.received_pending_review for c in changes],
                "entry_accounts": [e.account_id for e in entries],
                "entry_payments": [e.payment_id for e in entries],
                "entry_kinds": [e.kind.value for e in entries],
                "entry_amounts": [e.amount for e in entries],
            },
        )

    async def lock_payment(self, payment_id: UUID) -> Payment | None:
        row = (await self._connection.execute(_LOCK_PAYMENT, {"payment_id": payment_id})).mappings().first()
        return _payment(row) if row is not None else None

    async def get_payment(self, payment_id: UUID) -> Payment | None:
        row = (await self._connection.execute(_GET_PAYMENT, {"payment_id": payment_id})).mappings().first()
        return _payment(row) if row is not None else None

    async def get_payment_with_events(self, payment_id: UUID) -> tuple[Payment, list[PaymentEvent]] | None:
        rows = (
            (await self._connection.execute(_PAYMENT_WITH_EVENTS, {"payment_id": payment_id}))
            .mappings()
            .all()
        )
        if not rows:
            return None
        events = [
            PaymentEvent(
                payment_id=row["payment_id"],
                sequence=row["sequence"],
                status=PaymentStatus(row["event_status"]),
                decline_reason=DeclineReason(row["event_reason"]) if row["event_reason"] else None,
                actor=row["actor"],
                note=row["note"],
                created_at=row["event_at"],
            )
            for row in rows
            if row["sequence"] is not None
        ]
        return _payment(rows[0]), events

    async def set_account_status(self, account_id: UUID, status: AccountStatus, at: datetime) -> None:
        await self._connection.execute(
            _SET_ACCOUNT_STATUS, {"account_id": account_id, "status": status.value, "at": at}
        )
