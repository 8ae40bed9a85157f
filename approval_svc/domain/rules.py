"""The business rules: how a payment is decided and what each decision does to the accounts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from approval_svc.domain.errors import InvalidRequest
from approval_svc.domain.model import (
    MAX_AMOUNT,
    Account,
    AccountChange,
    AccountStatus,
    DeclineReason,
    HoldReason,
    LedgerEntry,
    LedgerKind,
    Payment,
    PaymentStatus,
)
from payments_common.errors import FieldViolation


@dataclass(frozen=True, slots=True)
class Decision:
    status: PaymentStatus
    decline_reason: DeclineReason | None = None
    hold_reason: HoldReason | None = None


def day_start(now: datetime) -> datetime:
    """The start of the UTC day of `now`: the daily limit counts payments since then."""
    utc = now.astimezone(UTC)
    return utc.replace(hour=0, minute=0, second=0, microsecond=0)


def decide(
    payer: Account,
    payee: Account,
    currency: str,
    amount: int,
    daily_used: int,
    review_threshold: int,
) -> Decision:
    """Decides a payment of `amount` minor units of `currency` from `payer` to `payee`.

    `daily_used` is the sum of the payer's approved and held payments of the current
    UTC day. The first failing rule gives the reason, in the order below: an account's
    state before the payment's own properties, and the limits before the balance, so
    that a client learns the most lasting cause first.
    """
    if payer.status is AccountStatus.FROZEN or payee.status is AccountStatus.FROZEN:
        return Decision(PaymentStatus.DECLINED, DeclineReason.ACCOUNT_FROZEN)
    if currency != payer.currency or currency != payee.currency:
        return Decision(PaymentStatus.DECLINED, DeclineReason.CURRENCY_MISMATCH)
    if amount > payer.per_payment_limit:
        return Decision(PaymentStatus.DECLINED, DeclineReason.PER_PAYMENT_LIMIT_EXCEEDED)
    if amount > payer.daily_limit - daily_used:
        return Decision(PaymentStatus.DECLINED, DeclineReason.DAILY_LIMIT_EXCEEDED)
    if amount > payer.available_balance:
        return Decision(PaymentStatus.DECLINED, DeclineReason.INSUFFICIENT_FUNDS)
    if amount >= review_threshold:
        return Decision(
            PaymentStatus.PENDING_REVIEW, hold_reason=HoldReason.AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD
        )
    return Decision(PaymentStatus.APPROVED)


def check_credit_fits(payee: Account, amount: int) -> None:
    """Rejects a credit that the payee's balance or running total could not hold.

    The payer's side cannot overflow: a debit is bounded by its balance.
    """
    if payee.ledger_balance > MAX_AMOUNT - amount or payee.total_received > MAX_AMOUNT - amount:
        raise InvalidRequest(
            [FieldViolation("amount.amount_minor", "the payee's balance cannot hold this amount")]
        )


def submission_changes(payment: Payment) -> list[AccountChange]:
    """What a submitted payment's decision does to the payer and the payee."""
    payer, payee, amount = payment.payer_account_id, payment.payee_account_id, payment.amount
    if payment.status is PaymentStatus.APPROVED:
        return [
            AccountChange(payer, ledger=-amount, total_sent=amount, sent_approved=1),
            AccountChange(payee, ledger=amount, total_received=amount, received_approved=1),
        ]
    if payment.status is PaymentStatus.PENDING_REVIEW:
        return [
            AccountChange(payer, held=amount, sent_pending_review=1),
            AccountChange(payee, received_pending_review=1),
        ]
    return [AccountChange(payer, sent_declined=1), AccountChange(payee, received_declined=1)]


def review_changes(payment: Payment, approve: bool) -> list[AccountChange]:
    """What a reviewer's decision on a held payment does: move or release the held funds."""
    payer, payee, amount = payment.payer_account_id, payment.payee_account_id, payment.amount
    if approve:
        return [
            AccountChange(
                payer,
                ledger=-amount,
                held=-amount,
                total_sent=amount,
                sent_pending_review=-1,
                sent_approved=1,
            ),
            AccountChange(
                payee,
                ledger=amount,
                total_received=amount,
                received_pending_review=-1,
                received_approved=1,
            ),
        ]
    return [
        AccountChange(payer, held=-amount, sent_pending_review=-1, sent_declined=1),
        AccountChange(payee, received_pending_review=-1, received_declined=1),
    ]


def transfer_entries(payment: Payment) -> list[LedgerEntry]:
    """The double entry of a payment whose funds move: one debit, one credit of the same amount."""
    return [
        LedgerEntry(payment.payer_account_id, payment.payment_id, LedgerKind.DEBIT, -payment.amount),
        LedgerEntry(payment.payee_account_id, payment.payment_id, LedgerKind.CREDIT, payment.amount),
    ]


def opening_entries(account: Account) -> list[LedgerEntry]:
    """The credit of an opening balance; none for an account opened empty."""
    if account.ledger_balance == 0:
        return []
    return [LedgerEntry(account.account_id, None, LedgerKind.OPENING, account.ledger_balance)]
