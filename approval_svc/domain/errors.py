"""Typed errors of the command side, each with the `reason` that clients see in ErrorInfo.

Each is a member of a shared error family (payments_common/errors.py), which decides
its status at the gRPC edge; the domain never names a status code.
"""

from __future__ import annotations

from payments_common import errors


class InvalidRequest(errors.InvalidArgument):
    """The command is malformed; `violations` name the fields at fault."""


class AccountNotFound(errors.NotFound):
    def __init__(self, account_id: str, field: str) -> None:
        super().__init__(
            "ACCOUNT_NOT_FOUND",
            f"account {account_id} does not exist",
            {"account_id": account_id, "field": field},
        )


class PaymentNotFound(errors.NotFound):
    def __init__(self, payment_id: str) -> None:
        super().__init__(
            "PAYMENT_NOT_FOUND", f"payment {payment_id} does not exist", {"payment_id": payment_id}
        )


class PaymentNotUnderReview(errors.FailedPrecondition):
    def __init__(self, payment_id: str, status: str) -> None:
        super().__init__(
            "PAYMENT_NOT_UNDER_REVIEW",
            f"payment {payment_id} is {status}, not under review",
            {"payment_id": payment_id, "status": status},
        )


class ReviewerMismatch(errors.PermissionDenied):
    """A review names a reviewer other than the authenticated caller, who is the reviewer."""

    def __init__(self) -> None:
        super().__init__("REVIEWER_MISMATCH", "reviewer must be empty or the authenticated caller's identity")


class OwnPaymentReview(errors.PermissionDenied):
    """A reviewer decides a payment from or to an account bound to the reviewer: nobody reviews their own."""

    def __init__(self) -> None:
        super().__init__(
            "OWN_PAYMENT_REVIEW", "a payment from or to the reviewer's own account needs another reviewer"
        )


class RequestIdReused(errors.AlreadyExists):
    """The request_id was already used for a different request (AIP-155)."""

    def __init__(self, request_id: str) -> None:
        super().__init__(
            "REQUEST_ID_REUSED",
            "this request_id was already used for a different request",
            {"request_id": request_id},
        )


class DatabaseUnavailable(errors.Unavailable):
    """The system of record cannot be reached, or stayed too busy to commit; the client may retry."""

    def __init__(self, message: str) -> None:
        super().__init__("DATABASE_UNAVAILABLE", message)


class DeadlineExceeded(errors.DeadlineExceeded):
    """The call's deadline passed before the work could start: its client has stopped waiting."""

    def __init__(self, message: str) -> None:
        super().__init__("DEADLINE_EXCEEDED", message)


class TransactionConflict(errors.Unavailable):
    """A transaction lost a race (serialization failure, deadlock, concurrent request_id); retry it.

    A client that sees it sees a busy database: the same reason as DatabaseUnavailable.
    """

    def __init__(self, message: str) -> None:
        super().__init__("DATABASE_UNAVAILABLE", message)
