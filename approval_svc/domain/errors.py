"""Typed errors of the command side, each with the `reason` that clients see in ErrorInfo."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Violation:
    """One invalid field of a request, named by its path in the API request."""

    field: str
    description: str


class DomainError(Exception):
    """Base of every error the command side raises on purpose."""

    reason: str = "INTERNAL"

    def __init__(self, message: str, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.metadata = dict(metadata or {})


class InvalidRequest(DomainError):
    """The request is malformed; `violations` name the fields at fault."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, violations: Sequence[Violation]) -> None:
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations) or "invalid request")
        self.violations = list(violations)


class AccountNotFound(DomainError):
    reason = "ACCOUNT_NOT_FOUND"

    def __init__(self, account_id: str, field: str) -> None:
        super().__init__(f"account {account_id} does not exist", {"account_id": account_id, "field": field})


class PaymentNotFound(DomainError):
    reason = "PAYMENT_NOT_FOUND"

    def __init__(self, payment_id: str) -> None:
        super().__init__(f"payment {payment_id} does not exist", {"payment_id": payment_id})


class PaymentNotUnderReview(DomainError):
    reason = "PAYMENT_NOT_UNDER_REVIEW"

    def __init__(self, payment_id: str, status: str) -> None:
        super().__init__(
            f"payment {payment_id} is {status}, not under review",
            {"payment_id": payment_id, "status": status},
        )


class RequestIdReused(DomainError):
    """The request_id was already used for a different request (AIP-155)."""

    reason = "REQUEST_ID_REUSED"

    def __init__(self, request_id: str) -> None:
        super().__init__(
            "this request_id was already used for a different request", {"request_id": request_id}
        )


class DatabaseUnavailable(DomainError):
    """The system of record cannot be reached, or stayed too busy to commit; the client may retry."""

    reason = "DATABASE_UNAVAILABLE"


class DeadlineExceeded(DomainError):
    """The call's deadline passed before the work could start: its client has stopped waiting."""

    reason = "DEADLINE_EXCEEDED"


class TransactionConflict(DomainError):
    """A transaction lost a race (serialization failure, deadlock, concurrent request_id); retry it."""

    reason = "DATABASE_UNAVAILABLE"
