"""The business rules: how a payment is decided and what each decision does to the accounts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime

from approval_svc.domain.errors import InvalidRequest, TransactionConflict
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


def utc_day(moment: datetime) -> date:
    """The UTC day of `moment`: the daily limit counts the payments created on it."""
    return moment.astimezone(UTC).date()


def daily_usage(payer: Account, today: date) -> int:
    """What the payer's approved and held payments of `today` add up to, from its counter.

    The counter of an earlier day says nothing of today: 0. A counter of a later day means
    that this transaction's clock (its start, `now()`) is before a UTC midnight that a
    payment of the same payer, which started later and committed while this one waited for
    the payer's lock, has already passed: the transaction runs again (TransactionConflict),
    with a clock past that midnight, rather than decide for a day whose count is gone.
    """
    if payer.daily_usage_day is None or payer.daily_usage_day < today:
        return 0
    if payer.daily_usage_day == today:
        return payer.daily_usage
    raise TransactionConflict("the payer's daily usage is already counted for a later day")


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
    UTC day (`daily_usage`). The first failing rule gives the reason, in the order below:
    an account's state before the payment's own properties, and the limits before the
    balance, so that a client learns the most lasting cause first.
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
    """What a submitted payment's decision does to the payer and the payee.

    An approved or held payment counts towards the payer's usage of its UTC day.
    """
    payer, payee, amount = payment.payer_account_id, payment.payee_account_id, payment.amount
    day = utc_day(payment.created_at)
    if payment.status is PaymentStatus.APPROVED:
        return [
            AccountChange(
                payer,
                ledger=-amount,
                total_sent=amount,
                sent_approved=1,
                daily_usage=amount,
                daily_usage_day=day,
            ),
            AccountChange(payee, ledger=amount, total_received=amount, received_approved=1),
        ]
    if payment.status is PaymentStatus.PENDING_REVIEW:
        return [
            AccountChange(payer, held=amount, sent_pending_review=1, daily_usage=amount, daily_usage_day=day),
            AccountChange(payee, received_pending_review=1),
        ]
    return [AccountChange(payer, sent_declined=1), AccountChange(payee, received_declined=1)]


def review_changes(payment: Payment, approve: bool) -> list[AccountChange]:
    """What a reviewer's decision on a held payment does: move or release the held funds.

    A held payment was counted towards the daily limit of its UTC day when it was held: an
    approval leaves that count as it is, a decline takes it back (from the payer's counter
    if it still counts that day, see Account.applied).
    """
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
        AccountChange(
            payer,
            held=-amount,
            sent_pending_review=-1,
            sent_declined=1,
            daily_usage=-amount,
            daily_usage_day=utc_day(payment.created_at),
        ),
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
