"""Accounts, payments and their events as plain values; amounts are integers in minor units."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import Final
from uuid import UUID

# Every stored amount is a PostgreSQL bigint and every API amount an int64.
MAX_AMOUNT: Final = 2**63 - 1

SYSTEM_ACTOR: Final = "system"


class AccountStatus(StrEnum):
    ACTIVE = "ACTIVE"
    FROZEN = "FROZEN"


class PaymentStatus(StrEnum):
    APPROVED = "APPROVED"
    DECLINED = "DECLINED"
    PENDING_REVIEW = "PENDING_REVIEW"


class DeclineReason(StrEnum):
    INSUFFICIENT_FUNDS = "INSUFFICIENT_FUNDS"
    PER_PAYMENT_LIMIT_EXCEEDED = "PER_PAYMENT_LIMIT_EXCEEDED"
    DAILY_LIMIT_EXCEEDED = "DAILY_LIMIT_EXCEEDED"
    ACCOUNT_FROZEN = "ACCOUNT_FROZEN"
    CURRENCY_MISMATCH = "CURRENCY_MISMATCH"
    DECLINED_BY_REVIEWER = "DECLINED_BY_REVIEWER"


class HoldReason(StrEnum):
    """Why the rules held a payment for review."""

    AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD = "AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD"


class LedgerKind(StrEnum):
    OPENING = "OPENING"
    DEBIT = "DEBIT"
    CREDIT = "CREDIT"


@dataclass(frozen=True, slots=True)
class AccountChange:
    """What one decision adds to one account's balances and counters (negative to subtract).

    `daily_usage` is counted on the UTC day `daily_usage_day` (None when the decision
    changes no day's usage): see `Account.applied`.
    """

    account_id: UUID
    ledger: int = 0
    held: int = 0
    total_sent: int = 0
    total_received: int = 0
    sent_approved: int = 0
    sent_declined: int = 0
    sent_pending_review: int = 0
    received_approved: int = 0
    received_declined: int = 0
    received_pending_review: int = 0
    daily_usage: int = 0
    daily_usage_day: date | None = None


@dataclass(frozen=True, slots=True)
class Account:
    account_id: UUID
    owner_name: str
    currency: str
    status: AccountStatus
    ledger_balance: int
    held: int
    per_payment_limit: int
    daily_limit: int
    created_at: datetime
    updated_at: datetime
    total_sent: int = 0
    total_received: int = 0
    sent_approved: int = 0
    sent_declined: int = 0
    sent_pending_review: int = 0
    received_approved: int = 0
    received_declined: int = 0
    received_pending_review: int = 0
    # The daily limit's counter: what the account's approved and held payments of the UTC
    # day `daily_usage_day` add up to. It tells nothing of any other day (None: no payment
    # counted yet).
    daily_usage_day: date | None = None
    daily_usage: int = 0

    @property
    def available_balance(self) -> int:
        """What the account may spend: the ledger balance minus the funds held for review."""
        return self.ledger_balance - self.held

    def applied(self, change: AccountChange, at: datetime) -> Account:
        """This account after `change`; the store applies the same arithmetic in SQL."""
        if change.account_id != self.account_id:
            raise ValueError("change for another account")
        day, usage = self._counted(change)
        return dataclasses.replace(
            self,
            ledger_balance=self.ledger_balance + change.ledger,
            held=self.held + change.held,
            total_sent=self.total_sent + change.total_sent,
            total_received=self.total_received + change.total_received,
            sent_approved=self.sent_approved + change.sent_approved,
            sent_declined=self.sent_declined + change.sent_declined,
            sent_pending_review=self.sent_pending_review + change.sent_pending_review,
            received_approved=self.received_approved + change.received_approved,
            received_declined=self.received_declined + change.received_declined,
            received_pending_review=self.received_pending_review + change.received_pending_review,
            daily_usage_day=day,
            daily_usage=usage,
            updated_at=at,
        )

    def _counted(self, change: AccountChange) -> tuple[date | None, int]:
        """The daily counter after `change` (the same rule as repository._changes_sql's CASEs).

        A change of the counter's own day adds to it (a reviewer's decline subtracts). A
        payment counted on a later day than the counter's starts that day's count: the
        counter's day is over. Any other change leaves it alone: a payment of an earlier day
        declined today gives nothing back, since only the counter's day matters to a decision.
        """
        day = change.daily_usage_day
        if day is None or change.daily_usage == 0:
            return self.daily_usage_day, self.daily_usage
        if day == self.daily_usage_day:
            return day, self.daily_usage + change.daily_usage
        if change.daily_usage > 0 and (self.daily_usage_day is None or self.daily_usage_day < day):
            return day, change.daily_usage
        return self.daily_usage_day, self.daily_usage


@dataclass(frozen=True, slots=True)
class Payment:
    payment_id: UUID
    request_id: str
    payer_account_id: UUID
    payee_account_id: UUID
    payer_name: str
    payee_name: str
    currency: str
    amount: int
    reference: str
    status: PaymentStatus
    decline_reason: DeclineReason | None
    created_at: datetime
    updated_at: datetime
    # Set when the rules hold the payment, and kept after the review; None for a payment
    # never held, or held before the reason was recorded.
    hold_reason: HoldReason | None = None


@dataclass(frozen=True, slots=True)
class PaymentEvent:
    payment_id: UUID
    sequence: int
    status: PaymentStatus
    decline_reason: DeclineReason | None
    actor: str
    note: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One side of a movement of funds: a credit is positive, a debit negative."""

    account_id: UUID
    payment_id: UUID | None
    kind: LedgerKind
    amount: int
