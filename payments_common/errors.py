"""Typed errors with a `reason`, in families that say what went wrong, whatever the transport.

Every error a client should see is a `ServiceError` of one family (`NotFound`,
`InvalidArgument`, ...); a service subclasses a family for each reason it raises.
The families carry no status codes: the gRPC edge (payments_common/grpcstatus.py)
holds the one table from family to status.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field of a request, named by its path in the request message."""

    field: str
    description: str


class ServiceError(Exception):
    """An error that a client should see: a reason, a message safe to show it, and metadata.

    Subclasses fix the family; instances carry the reason (UPPER_SNAKE, the ErrorInfo
    reason on the wire), the message, and optional metadata for the ErrorInfo. An error
    of no family is sent as an internal error, with its own reason and message.
    """

    def __init__(self, reason: str, message: str, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})


class InvalidArgument(ServiceError):
    """The request is malformed; `violations` list the fields at fault."""

    def __init__(
        self,
        violations: Sequence[FieldViolation],
        reason: str = "INVALID_ARGUMENT",
        message: str | None = None,
    ) -> None:
        text = message or "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(reason, text or "invalid request")
        self.violations = list(violations)


class Unauthenticated(ServiceError):
    """The call carries no credentials, or none that the server accepts; the reason says which in general terms."""


class PermissionDenied(ServiceError):
    """The caller is known, but may not do what it asks."""


class NotFound(ServiceError):
    """What the request names does not exist."""


class FailedPrecondition(ServiceError):
    """The request is well formed, but the state of what it names does not allow it."""


class AlreadyExists(ServiceError):
    """What the request would create, or the key it claims, is already taken."""


class Aborted(ServiceError):
    """The operation lost a race, or could not go on; the client may retry from the start."""


class OutOfRange(ServiceError):
    """The request asks for a position outside what is held."""


class Unavailable(ServiceError):
    """A store the service depends on cannot answer now; the client may retry."""


class DeadlineExceeded(ServiceError):
    """The call's deadline passed before the work was done."""


class ResourceExhausted(ServiceError):
    """A limit was reached (a buffer, a quota); the client should slow down."""


class Unimplemented(ServiceError):
    """The operation is not offered by this server."""


class Internal(ServiceError):
    """A failure of the server itself; its details stay in the log."""


INTERNAL_MESSAGE: Final = "internal error; the server logged the details"


def internal_error() -> Internal:
    """The error sent for an unexpected exception: a generic message, no traceback."""
    return Internal("INTERNAL", INTERNAL_MESSAGE)
