"""Typed errors with a `reason`, and the one table that maps them to gRPC statuses."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

# The `domain` of every ErrorInfo this platform sends.
ERROR_DOMAIN = "payments.example.com"


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field of a request, named by its path in the request message."""

    field: str
    description: str


class ServiceError(Exception):
    """An error that a client should see, with its gRPC code and ErrorInfo reason.

    Subclasses fix the code; instances carry the reason, a message safe to show a
    client, and optional metadata for the ErrorInfo.
    """

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, reason: str, message: str, metadata: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.metadata = dict(metadata or {})

    def details(self) -> list[any_pb2.Any]:
        info = error_details_pb2.ErrorInfo(reason=self.reason, domain=ERROR_DOMAIN, metadata=self.metadata)
        packed = any_pb2.Any()
        packed.Pack(info)
        return [packed]


class InvalidArgument(ServiceError):
    """The request is malformed; `violations` list the fields at fault."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(
        self,
        violations: Sequence[FieldViolation],
        reason: str = "INVALID_ARGUMENT",
        message: str | None = None,
    ) -> None:
        text = message or "; ".join(f"{v.field}: {v.description}" for v in violations)
        super().__init__(reason, text or "invalid request")
        self.violations = list(violations)

    def details(self) -> list[any_pb2.Any]:
        request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in self.violations
            ]
        )
        packed = any_pb2.Any()
        packed.Pack(request)
        return [*super().details(), packed]


class NotFound(ServiceError):
    code = grpc.StatusCode.NOT_FOUND


class FailedPrecondition(ServiceError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class AlreadyExists(ServiceError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Aborted(ServiceError):
    code = grpc.StatusCode.ABORTED


class Unavailable(ServiceError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class ResourceExhausted(ServiceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Internal(ServiceError):
    code = grpc.StatusCode.INTERNAL


INTERNAL_MESSAGE = "internal error; the server logged the details"


def to_grpc_status(error: ServiceError) -> grpc.Status:
    """The `grpc.Status` (code, message, google.rpc.Status trailer) for an error."""
    status = status_pb2.Status(
        code=getattr(code_pb2, error.code.name),
        message=error.message,
        details=error.details(),
    )
    return rpc_status.to_status(status)


def internal_error() -> Internal:
    """The error sent for an unexpected exception: a generic message, no traceback."""
    return Internal("INTERNAL", INTERNAL_MESSAGE)


def error_info(call_error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo in a failed call's status trailer, for clients and tests."""
    status = rpc_status.from_call(call_error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def bad_request(call_error: grpc.RpcError) -> error_details_pb2.BadRequest | None:
    """The BadRequest in a failed call's status trailer, for clients and tests."""
    status = rpc_status.from_call(call_error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            request = error_details_pb2.BadRequest()
            detail.Unpack(request)
            return request
    return None
