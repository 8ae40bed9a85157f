"""The repository: every SQL statement of the command side, with few round trips per decision.

Statements run on asyncpg directly, with positional parameters: asyncpg prepares each
once per connection, and no SQL layer sits between the handlers and the protocol.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol
from uuid import UUID

import asyncpg

from approval_svc.domain.errors import TransactionConflict
from approval_svc.domain.model import (
    Account,
    AccountChange,
    AccountStatus,
    DeclineReason,
    HoldReason,
    LedgerEntry,
    Payment,
    PaymentEvent,
    PaymentStatus,
)
from approval_svc.domain.rules import Decision


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """The key of a request's record (AIP-155): a request_id belongs to the caller that sent it.

    The same request_id from two callers names two requests; `caller` is the caller's
    identity as the servicer writes it (approval_svc.servicer.caller_key).
    """

    caller: str
    request_id: str


@dataclass(frozen=True, slots=True)
class StoredRequest:
    """The record of a request already carried out (AIP-155)."""

    method: str
    fingerprint: bytes
    response: bytes


@dataclass(frozen=True, slots=True)
class SavedRequest:
    """A request's response to record with its effect (AIP-155)."""

    key: IdempotencyKey
    method: str
    fingerprint: bytes
    response: bytes


@dataclass(frozen=True, slots=True)
class RequestLookup:
    """The transaction's timestamp, and the caller's earlier request with the same request_id if any."""

    now: datetime
    stored: StoredRequest | None


SubmitOutcome = Literal["committed", "replay", "refused"]


@dataclass(frozen=True, slots=True)
class Submission:
    """A payment to decide, write and commit in one call (`SubmissionPath.submit`).

    `key`, `method` and `fingerprint` make the request's record; `payment_id` names the
    payment if one is written; `review_threshold` is the rules' (Settings), None for one
    above any amount.
    """

    key: IdempotencyKey
    method: str
    fingerprint: bytes
    payment_id: UUID
    payer_account_id: UUID
    payee_account_id: UUID
    currency: str
    amount: int
    reference: str
    review_threshold: int | None


@dataclass(frozen=True, slots=True)
class Decided:
    """What the rules decided for a committed submission, when, and the names it took from its accounts."""

    created_at: datetime
    decision: Decision
    payer_name: str
    payee_name: str


@dataclass(frozen=True, slots=True)
class Submitted:
    """What became of a submission in one call.

    committed: decided, written and committed (`decided`), `position` at or past its
    commit. replay: a request with the same key is recorded (`stored`), nothing written.
    refused: nothing written; the rules refuse what they found (an account missing, a
    credit the payee cannot hold), the payer's usage is counted for a later day, or the key
    was committed meanwhile: decided again under the locks, which says which.
    """

    outcome: SubmitOutcome
    position: int
    stored: StoredRequest | None = None
    decided: Decided | None = None


class SubmissionPath(Protocol):
    """A payment's decision in one round trip: the procedure `submit_payment` (migration 0006) looks up
    the request's record, locks the accounts, decides with the rules, writes and commits."""

    async def submit(self, submission: Submission) -> Submitted: ...


class Repository(Protocol):
    """What the handlers need from the store; SqlRepository and the tests' fake implement it."""

    async def claim_request(self, key: IdempotencyKey, method: str, fingerprint: bytes) -> RequestLookup:
        """Takes the key for this transaction before anything else, or finds its record.

        A concurrent transaction with the same key waits here until this one ends, then
        finds the record it committed (or, if it rolled back, claims the key itself).
        Another caller's key with the same request_id is another key: it neither waits
        nor is found.
        """

    async def save_response(self, key: IdempotencyKey, response: bytes) -> None:
        """Records the response of a request claimed by this transaction."""

    async def now(self) -> datetime: ...

    async def add_account(self, account: Account, entries: Sequence[LedgerEntry]) -> None: ...

    async def lock_accounts(self, account_ids: Sequence[UUID]) -> dict[UUID, Account]: ...

    async def begin_submission(
        self, key: IdempotencyKey, account_ids: Sequence[UUID]
    ) -> tuple[RequestLookup, dict[UUID, Account]]:
        """The request's earlier record (a plain retry's fast path) and `lock_accounts`, in one round trip.

        The lookup runs before the locks are granted, so it misses the record of a duplicate
        that held them and committed meanwhile: `add_decision` returns that record, and
        `find_request` reads it on a path that ends before `add_decision`.
        """

    async def find_request(self, key: IdempotencyKey) -> StoredRequest | None:
        """The request's record, as committed when this statement starts."""

    async def add_payment(self, payment: Payment, event: PaymentEvent) -> None: ...

    async def add_decision(
        self,
        payment: Payment,
        event: PaymentEvent,
        changes: Sequence[AccountChange],
        entries: Sequence[LedgerEntry],
        request: SavedRequest,
    ) -> StoredRequest | None:
        """`add_payment`, `apply_changes` and the request's record at once (one round trip).

        Returns None when the request is recorded. When a request with the same key was
        committed before this statement started (a duplicate that held the same locks),
        nothing is recorded and its record is returned: the caller replays it and leaves the
        transaction to roll back. Raises TransactionConflict when the key was committed
        while this statement waited for it (then the record is not in its snapshot).
        """

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
    received_approved, received_declined, received_pending_review, daily_usage_day, daily_usage_minor
"""

_PAYMENT_COLUMNS = """
    payment_id, request_id, payer_account_id, payee_account_id, payer_name, payee_name,
    currency_code, amount_minor, reference, status, decline_reason, created_at, updated_at,
    hold_reason
"""

# Every statement that reads or writes idempotency_keys names both columns of its key,
# the caller and the request_id, so that a caller never meets another caller's requests.
_BEGIN_REQUEST = """
    SELECT now() AS now, k.method, k.request_fingerprint, k.response
    FROM (SELECT 1) AS one LEFT JOIN idempotency_keys AS k ON k.caller = $1 AND k.request_id = $2
"""

# The claim comes before any lock: a second transaction with the same key waits
# on the first one's uncommitted key row, not behind its locks with a stale lookup. The
# statement's snapshot cannot see a key committed while it waited (nor the row this
# statement inserts): claimed false with no record means "look again" (_BEGIN_REQUEST).
# The response is filled in by _SAVE_RESPONSE before the commit.
_CLAIM_REQUEST = """
    WITH claim AS (
        INSERT INTO idempotency_keys (caller, request_id, method, request_fingerprint, response)
        VALUES ($1, $2, $3, $4, ''::bytea)
        ON CONFLICT (caller, request_id) DO NOTHING
        RETURNING 1
    )
    SELECT now() AS now, EXISTS (SELECT FROM claim) AS claimed,
           k.method, k.request_fingerprint, k.response
    FROM (SELECT 1) AS one LEFT JOIN idempotency_keys AS k ON k.caller = $1 AND k.request_id = $2
"""

_SAVE_RESPONSE = "UPDATE idempotency_keys SET response = $3 WHERE caller = $1 AND request_id = $2"

_ADD_ACCOUNT = """
    WITH account AS (
        INSERT INTO accounts (account_id, owner_name, currency_code, status, ledger_balance_minor,
                              per_payment_limit_minor, daily_limit_minor, created_at, updated_at)
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8)
        RETURNING account_id
    )
    INSERT INTO ledger_entries (account_id, payment_id, kind, amount_minor, created_at)
    SELECT account.account_id, NULL, e.kind, e.amount, $8
    FROM account, unnest($9::text[], $10::bigint[]) AS e(kind, amount)
"""

# ORDER BY makes every transaction lock accounts in the same order, so two payments
# between the same accounts in opposite directions cannot deadlock. NO KEY UPDATE
# does not block the key-share locks that foreign keys of new payments take.
_LOCK_ACCOUNTS = f"""
    SELECT {_ACCOUNT_COLUMNS} FROM accounts
    WHERE account_id = ANY($1::uuid[])
    ORDER BY account_id
    FOR NO KEY UPDATE
"""

# The request's lookup and the accounts' locks in one round trip; a replay locks the
# accounts it will not touch, which only makes it wait like the first request did. The
# lookup reads the statement's snapshot, taken before the wait for the locks; the locked
# rows do not: FOR NO KEY UPDATE returns the latest committed version of each row once
# its lock is granted, so the balances and the payer's daily counter include the
# payments of every transaction it waited for.
_BEGIN_SUBMISSION = f"""
    SELECT l.now, l.method, l.request_fingerprint, l.response, a.*
    FROM ({_BEGIN_REQUEST}) AS l
    LEFT JOIN (
        SELECT {_ACCOUNT_COLUMNS} FROM accounts
        WHERE account_id = ANY($3::uuid[])
        ORDER BY account_id
        FOR NO KEY UPDATE
    ) AS a ON true
"""

_INSERT_PAYMENT = f"""
    payment AS (
        INSERT INTO payments ({_PAYMENT_COLUMNS})
        VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
        RETURNING payment_id
    ),
    event AS (
        INSERT INTO payment_events (payment_id, sequence, status, decline_reason, actor, note, created_at)
        SELECT payment_id, $15, $16, $17, $18, $19, $20 FROM payment
    )
"""

_ADD_PAYMENT = f"WITH {_INSERT_PAYMENT} SELECT 1"

_UPDATE_PAYMENT = """
    WITH payment AS (
        UPDATE payments SET status = $2, decline_reason = $3, updated_at = $4
        WHERE payment_id = $1
        RETURNING payment_id
    )
    INSERT INTO payment_events (payment_id, sequence, status, decline_reason, actor, note, created_at)
    SELECT payment_id, $5, $6, $7, $8, $9, $10 FROM payment
"""


def _changes_sql(n: int) -> str:
    """The accounts' update and the ledger rows, with parameters numbered from `n`.

    The daily counter follows Account.applied's rule (model.py): a change of the counter's
    day adds to it, a payment counted on a later day starts that day's count, any other
    change leaves it alone. Every SET reads the row as it was before the UPDATE.
    """
    p = [f"${n + i}" for i in range(18)]
    restart = "d.usage > 0 AND (a.daily_usage_day IS NULL OR a.daily_usage_day < d.usage_day)"
    return f"""
    changed AS (
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
            daily_usage_minor = CASE
                WHEN a.daily_usage_day = d.usage_day THEN a.daily_usage_minor + d.usage
                WHEN {restart} THEN d.usage
                ELSE a.daily_usage_minor
            END,
            daily_usage_day = CASE WHEN {restart} THEN d.usage_day ELSE a.daily_usage_day END,
            updated_at = {p[0]}
        FROM unnest(
            {p[1]}::uuid[], {p[2]}::bigint[], {p[3]}::bigint[], {p[4]}::bigint[], {p[5]}::bigint[],
            {p[6]}::bigint[], {p[7]}::bigint[], {p[8]}::bigint[], {p[9]}::bigint[], {p[10]}::bigint[],
            {p[11]}::bigint[], {p[12]}::bigint[], {p[13]}::date[]
        ) AS d(account_id, ledger, held, total_sent, total_received, sent_approved, sent_declined,
               sent_pending_review, received_approved, received_declined, received_pending_review,
               usage, usage_day)
        WHERE a.account_id = d.account_id
    ),
    ledger AS (
        INSERT INTO ledger_entries (account_id, payment_id, kind, amount_minor, created_at)
        SELECT e.account_id, e.payment_id, e.kind, e.amount, {p[0]}
        FROM unnest({p[14]}::uuid[], {p[15]}::uuid[], {p[16]}::text[], {p[17]}::bigint[])
             AS e(account_id, payment_id, kind, amount)
    )
"""


# Data-modifying WITH clauses run to completion even though the outer statement does
# not read them.
_APPLY_CHANGES = f"WITH {_changes_sql(1)} SELECT 1"

# A submission in one statement (the function apply_decision, migration 0005): the payment,
# its event, both accounts, the ledger rows and the request's record. The foreign keys are checked at the end of the statement,
# when the payment row exists.
# When a request with the same key committed first, ON CONFLICT DO NOTHING records
# nothing, and the statement returns that request's record if its snapshot has it: a
# duplicate that held the same locks and committed while _BEGIN_SUBMISSION waited for
# them (whose lookup ran before the wait) committed before this statement started. This
# is the key's check after the locks, at no cost: the caller replays the record and the
# transaction rolls back. No row at all: the key was committed while this statement
# waited for it (the caller's reuse of the request_id with other accounts, which the
# locks did not serialise); the transaction runs again and its lookup finds the record.
_ADD_DECISION = "SELECT * FROM apply_decision(" + ", ".join(f"${n}" for n in range(1, 44)) + ")"

# A submission decided, written and committed in one call (migration 0006). CALLed outside a
# transaction block: it commits.
_SUBMIT_PAYMENT = "CALL submit_payment(" + ", ".join(f"${n}" for n in range(1, 13)) + ")"

_LOCK_PAYMENT = f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE payment_id = $1 FOR NO KEY UPDATE"
_GET_PAYMENT = f"SELECT {_PAYMENT_COLUMNS} FROM payments WHERE payment_id = $1"
# One statement, so the payment and its timeline come from one snapshot.
_PAYMENT_WITH_EVENTS = """
    SELECT p.payment_id, p.request_id, p.payer_account_id, p.payee_account_id, p.payer_name,
           p.payee_name, p.currency_code, p.amount_minor, p.reference, p.status, p.decline_reason,
           p.created_at, p.updated_at, p.hold_reason, e.sequence, e.status AS event_status,
           e.decline_reason AS event_reason, e.actor, e.note, e.created_at AS event_at
    FROM payments AS p LEFT JOIN payment_events AS e ON e.payment_id = p.payment_id
    WHERE p.payment_id = $1
    ORDER BY e.sequence
"""
_SET_ACCOUNT_STATUS = "UPDATE accounts SET status = $2, updated_at = $3 WHERE account_id = $1"
_NOW = "SELECT now()"


def _stored(row: asyncpg.Record) -> StoredRequest | None:
    if row["method"] is None:
        return None
    return StoredRequest(row["method"], bytes(row["request_fingerprint"]), bytes(row["response"]))


def _lookup(row: asyncpg.Record) -> RequestLookup:
    return RequestLookup(row["now"], _stored(row))


def _account(row: asyncpg.Record) -> Account:
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
        daily_usage_day=row["daily_usage_day"],
        daily_usage=row["daily_usage_minor"],
    )


def _payment(row: asyncpg.Record) -> Payment:
    reason, hold = row["decline_reason"], row["hold_reason"]
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
        hold_reason=HoldReason(hold) if hold is not None else None,
    )


def _payment_args(payment: Payment, event: PaymentEvent) -> list[Any]:
    return [
        payment.payment_id,
        payment.request_id,
        payment.payer_account_id,
        payment.payee_account_id,
        payment.payer_name,
        payment.payee_name,
        payment.currency,
        payment.amount,
        payment.reference,
        payment.status.value,
        payment.decline_reason.value if payment.decline_reason else None,
        payment.created_at,
        payment.updated_at,
        payment.hold_reason.value if payment.hold_reason else None,
        *_event_args(event),
    ]


def _event_args(event: PaymentEvent) -> list[Any]:
    return [
        event.sequence,
        event.status.value,
        event.decline_reason.value if event.decline_reason else None,
        event.actor,
        event.note,
        event.created_at,
    ]


def _changes_args(
    changes: Sequence[AccountChange], entries: Sequence[LedgerEntry], at: datetime
) -> list[Any]:
    return [
        at,
        [c.account_id for c in changes],
        [c.ledger for c in changes],
        [c.held for c in changes],
        [c.total_sent for c in changes],
        [c.total_received for c in changes],
        [c.sent_approved for c in changes],
        [c.sent_declined for c in changes],
        [c.sent_pending_review for c in changes],
        [c.received_approved for c in changes],
        [c.received_declined for c in changes],
        [c.received_pending_review for c in changes],
        [c.daily_usage for c in changes],
        [c.daily_usage_day for c in changes],
        [e.account_id for e in entries],
        [e.payment_id for e in entries],
        [e.kind.value for e in entries],
        [e.amount for e in entries],
    ]


async def submit_payment(
    connection: asyncpg.Connection, submission: Submission, trace_context: str | None
) -> Submitted:
    row = await connection.fetchrow(
        _SUBMIT_PAYMENT,
        submission.key.caller,
        submission.key.request_id,
        submission.method,
        submission.fingerprint,
        submission.payment_id,
        submission.payer_account_id,
        submission.payee_account_id,
        submission.currency,
        submission.amount,
        submission.reference,
        submission.review_threshold,
        trace_context,
    )
    outcome: SubmitOutcome = row["outcome"]
    position = int(row["wal_position"] or 0)  # asyncpg reads a pg_lsn as its integer
    if outcome == "replay":
        stored = StoredRequest(
            row["stored_method"], bytes(row["stored_fingerprint"]), bytes(row["stored_response"])
        )
        return Submitted(outcome, position, stored=stored)
    if outcome == "committed":
        reason, hold = row["decided_decline_reason"], row["decided_hold_reason"]
        decision = Decision(
            PaymentStatus(row["decided_status"]),
            DeclineReason(reason) if reason is not None else None,
            HoldReason(hold) if hold is not None else None,
        )
        decided = Decided(
            row["decided_at"],
            decision,
            row["payer_name"],
            row["payee_name"],
        )
        return Submitted(outcome, position, decided=decided)
    return Submitted(outcome, position)


class SqlRepository:
    """The Repository on one asyncpg connection inside the unit of work's transaction."""

    def __init__(self, connection: asyncpg.Connection) -> None:
        self._connection = connection

    async def claim_request(self, key: IdempotencyKey, method: str, fingerprint: bytes) -> RequestLookup:
        row = await self._connection.fetchrow(_CLAIM_REQUEST, key.caller, key.request_id, method, fingerprint)
        if row["claimed"] or row["method"] is not None:
            return _lookup(row)
        # Another transaction committed the key while this statement waited for it.
        lookup = _lookup(await self._connection.fetchrow(_BEGIN_REQUEST, key.caller, key.request_id))
        if lookup.stored is None:
            raise TransactionConflict("the key was taken and released while this request waited")
        return lookup

    async def begin_submission(
        self, key: IdempotencyKey, account_ids: Sequence[UUID]
    ) -> tuple[RequestLookup, dict[UUID, Account]]:
        rows = await self._connection.fetch(_BEGIN_SUBMISSION, key.caller, key.request_id, list(account_ids))
        return _lookup(rows[0]), {row["account_id"]: _account(row) for row in rows if row["account_id"]}

    async def save_response(self, key: IdempotencyKey, response: bytes) -> None:
        status = await self._connection.execute(_SAVE_RESPONSE, key.caller, key.request_id, response)
        if status != "UPDATE 1":
            raise RuntimeError(f"the request {key!r} was not claimed by this transaction")

    async def now(self) -> datetime:
        value: datetime = await self._connection.fetchval(_NOW)
        return value

    async def add_account(self, account: Account, entries: Sequence[LedgerEntry]) -> None:
        await self._connection.execute(
            _ADD_ACCOUNT,
            account.account_id,
            account.owner_name,
            account.currency,
            account.status.value,
            account.ledger_balance,
            account.per_payment_limit,
            account.daily_limit,
            account.created_at,
            [e.kind.value for e in entries],
            [e.amount for e in entries],
        )

    async def lock_accounts(self, account_ids: Sequence[UUID]) -> dict[UUID, Account]:
        rows = await self._connection.fetch(_LOCK_ACCOUNTS, list(account_ids))
        return {row["account_id"]: _account(row) for row in rows}

    async def find_request(self, key: IdempotencyKey) -> StoredRequest | None:
        return _stored(await self._connection.fetchrow(_BEGIN_REQUEST, key.caller, key.request_id))

    async def add_payment(self, payment: Payment, event: PaymentEvent) -> None:
        await self._connection.execute(_ADD_PAYMENT, *_payment_args(payment, event))

    async def add_decision(
        self,
        payment: Payment,
        event: PaymentEvent,
        changes: Sequence[AccountChange],
        entries: Sequence[LedgerEntry],
        request: SavedRequest,
    ) -> StoredRequest | None:
        row = await self._connection.fetchrow(
            _ADD_DECISION,
            *_payment_args(payment, event),
            *_changes_args(changes, entries, payment.created_at),
            request.key.caller,
            request.key.request_id,
            request.method,
            request.fingerprint,
            request.response,
        )
        if row is None:
            raise TransactionConflict("a concurrent request with the same key committed first")
        return _stored(row)

    async def update_payment(self, payment: Payment, event: PaymentEvent) -> None:
        await self._connection.execute(
            _UPDATE_PAYMENT,
            payment.payment_id,
            payment.status.value,
            payment.decline_reason.value if payment.decline_reason else None,
            payment.updated_at,
            *_event_args(event),
        )

    async def apply_changes(
        self, changes: Sequence[AccountChange], entries: Sequence[LedgerEntry], at: datetime
    ) -> None:
        await self._connection.execute(_APPLY_CHANGES, *_changes_args(changes, entries, at))

    async def lock_payment(self, payment_id: UUID) -> Payment | None:
        row = await self._connection.fetchrow(_LOCK_PAYMENT, payment_id)
        return _payment(row) if row is not None else None

    async def get_payment(self, payment_id: UUID) -> Payment | None:
        row = await self._connection.fetchrow(_GET_PAYMENT, payment_id)
        return _payment(row) if row is not None else None

    async def get_payment_with_events(self, payment_id: UUID) -> tuple[Payment, list[PaymentEvent]] | None:
        rows = await self._connection.fetch(_PAYMENT_WITH_EVENTS, payment_id)
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
        await self._connection.execute(_SET_ACCOUNT_STATUS, account_id, status.value, at)
