"""The commands of the command side, built from raw request values and validated as a whole."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final
from uuid import UUID

from approval_svc.domain.currencies import is_currency
from approval_svc.domain.errors import InvalidRequest
from approval_svc.domain.model import MAX_AMOUNT, AccountStatus
from payments_common.errors import FieldViolation
from payments_common.identity import MAX_SUBJECT

MAX_REQUEST_ID: Final = 64
MAX_NAME: Final = 200
MAX_REFERENCE: Final = 140
MAX_NOTE: Final = 500
# Longer than any UUID spelling that uuid.UUID accepts ("urn:uuid:" and braces included).
_MAX_UUID_TEXT: Final = 45


@dataclass(frozen=True, slots=True)
class CreateAccount:
    owner_name: str
    currency: str
    opening_balance: int
    per_payment_limit: int
    daily_limit: int


@dataclass(frozen=True, slots=True)
class SubmitPayment:
    payer_account_id: UUID
    payee_account_id: UUID
    currency: str
    amount: int
    reference: str


@dataclass(frozen=True, slots=True)
class ReviewPayment:
    payment_id: UUID
    reviewer: str
    note: str
    approve: bool
    # The accounts bound to the reviewer (by its token): their payments need another reviewer.
    reviewer_accounts: frozenset[UUID] = frozenset()


@dataclass(frozen=True, slots=True)
class SetAccountStatus:
    account_id: UUID
    status: AccountStatus
    reason: str


class _Checker:
    """Collects every violation of one request, so a client learns all of them at once."""

    def __init__(self) -> None:
        self.violations: list[FieldViolation] = []

    def fail(self, field: str, description: str) -> None:
        self.violations.append(FieldViolation(field, description))

    def text(self, field: str, value: str, *, maximum: int, required: bool) -> str:
        if required and not value.strip():
            self.fail(field, "is required")
        elif len(value) > maximum:
            self.fail(field, f"must be at most {maximum} characters")
        elif "\x00" in value:
            # PostgreSQL text cannot hold NUL; reject it here rather than fail in the store.
            self.fail(field, "must not contain NUL characters")
        return value

    def request_id(self, value: str) -> None:
        """A mutation's request_id: required, at most 64 characters (AIP-155)."""
        self.text("request_id", value, maximum=MAX_REQUEST_ID, required=True)

    def uuid(self, field: str, value: str) -> UUID | None:
        if not value:
            self.fail(field, "is required")
            return None
        if len(value) <= _MAX_UUID_TEXT:
            try:
                return uuid.UUID(value)
            except ValueError:
                pass
        self.fail(field, "must be a UUID")
        return None

    def currency(self, field: str, value: str) -> str:
        if not value:
            self.fail(field, "is required")
        elif not is_currency(value):
            self.fail(field, "must be an ISO 4217 currency code in upper case")
        return value

    def amount(self, field: str, value: int, *, minimum: int) -> int:
        if value < minimum:
            self.fail(field, "must be more than zero" if minimum > 0 else "must not be negative")
        elif value > MAX_AMOUNT:
            self.fail(field, "is too large")
        return value

    def done(self) -> None:
        if self.violations:
            raise InvalidRequest(self.violations)


def create_account(
    request_id: str,
    owner_name: str,
    currency_code: str,
    opening_balance_minor: int,
    per_payment_limit_minor: int,
    daily_limit_minor: int,
) -> CreateAccount:
    checker = _Checker()
    checker.request_id(request_id)
    checker.text("owner_name", owner_name, maximum=MAX_NAME, required=True)
    checker.currency("currency_code", currency_code)
    checker.amount("opening_balance_minor", opening_balance_minor, minimum=0)
    checker.amount("per_payment_limit_minor", per_payment_limit_minor, minimum=1)
    checker.amount("daily_limit_minor", daily_limit_minor, minimum=1)
    checker.done()
    return CreateAccount(
        owner_name, currency_code, opening_balance_minor, per_payment_limit_minor, daily_limit_minor
    )


def submit_payment(
    request_id: str,
    payer_account_id: str,
    payee_account_id: str,
    has_amount: bool,
    currency_code: str,
    amount_minor: int,
    reference: str,
) -> SubmitPayment:
    checker = _Checker()
    checker.request_id(request_id)
    payer = checker.uuid("payer_account_id", payer_account_id)
    payee = checker.uuid("payee_account_id", payee_account_id)
    if payer is not None and payer == payee:
        checker.fail("payee_account_id", "must differ from payer_account_id")
    if not has_amount:
        checker.fail("amount", "is required")
    else:
        checker.currency("amount.currency_code", currency_code)
        checker.amount("amount.amount_minor", amount_minor, minimum=1)
    checker.text("reference", reference, maximum=MAX_REFERENCE, required=False)
    checker.done()
    assert payer is not None
    assert payee is not None
    return SubmitPayment(payer, payee, currency_code, amount_minor, reference)


def review_payment(
    request_id: str,
    payment_id: str,
    reviewer: str,
    note: str,
    approve: bool,
    reviewer_accounts: Iterable[str] = (),
) -> ReviewPayment:
    checker = _Checker()
    checker.request_id(request_id)
    payment = checker.uuid("payment_id", payment_id)
    # The reviewer is the caller's identity: as long as a subject may be.
    checker.text("reviewer", reviewer, maximum=MAX_SUBJECT, required=True)
    checker.text("note", note, maximum=MAX_NOTE, required=False)
    checker.done()
    assert payment is not None
    return ReviewPayment(payment, reviewer, note, approve, _uuids(reviewer_accounts))


def _uuids(values: Iterable[str]) -> frozenset[UUID]:
    """The values that are UUIDs (a token may bind text that names no account: it binds nothing)."""
    found = set()
    for value in values:
        try:
            found.add(UUID(value))
        except ValueError:
            continue
    return frozenset(found)


def set_account_status(
    request_id: str, account_id: str, reason: str, status: AccountStatus
) -> SetAccountStatus:
    checker = _Checker()
    checker.request_id(request_id)
    account = checker.uuid("account_id", account_id)
    checker.text("reason", reason, maximum=MAX_NOTE, required=False)
    checker.done()
    assert account is not None
    return SetAccountStatus(account, status, reason)


def payment_id(value: str) -> UUID:
    """The payment id of a read request."""
    checker = _Checker()
    parsed = checker.uuid("payment_id", value)
    checker.done()
    assert parsed is not None
    return parsed
