"""The gRPC edge of the errors: the one table from error family to status code, and the rich status.

Servers send a `google.rpc.Status` whose details hold an `ErrorInfo` (the error's
reason and metadata) and, for invalid arguments, a `BadRequest` naming the fields;
`error_info` and `bad_request` read them back on the client side.
"""

from __future__ import annotations

from typing import Final, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from payments_common.errors import (
    Aborted,
    AlreadyExists,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    ServiceError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)

D = TypeVar("D", error_details_pb2.ErrorInfo, error_details_pb2.BadRequest)

# The `domain` of every ErrorInfo this platform sends.
ERROR_DOMAIN: Final = "payments.example.com"

# The one table from error family to status code. An error of no family is INTERNAL.
STATUS_CODES: Final[dict[type[ServiceError], grpc.StatusCode]] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    Aborted: grpc.StatusCode.ABORTED,
    OutOfRange: grpc.StatusCode.OUT_OF_RANGE,
    Unavailable: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded: grpc.StatusCode.DEADLINE_EXCEEDED,
    ResourceExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Unimplemented: grpc.StatusCode.UNIMPLEMENTED,
    Internal: grpc.StatusCode.INTERNAL,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
}


def status_code(error: ServiceError) -> grpc.StatusCode:
    """The status code of an error's family (its nearest listed ancestor)."""
    for family in type(error).__mro__:
        code = STATUS_CODES.get(family)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def _packed(detail: error_details_pb2.ErrorInfo | error_details_pb2.BadRequest) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(detail)
    return packed


def status_details(error: ServiceError) -> list[any_pb2.Any]:
    """The ErrorInfo of an error, then the BadRequest of an invalid argument."""
    details = [
        _packed(
            error_details_pb2.ErrorInfo(reason=error.reason, domain=ERROR_DOMAIN, metadata=error.metadata)
        )
    ]
    if isinstance(error, InvalidArgument):
        request = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.description)
                for v in error.violations
            ]
        )
        details.append(_packed(request))
    return details


def to_grpc_status(error: ServiceError) -> grpc.Status:
    """The `grpc.Status` (code, message, google.rpc.Status trailer) for an error."""
    status = status_pb2.Status(
        code=getattr(code_pb2, status_code(error).name),
        message=error.message,
        details=status_details(error),
    )
    return rpc_status.to_status(status)


def _detail(call_error: grpc.RpcError, detail_type: type[D]) -> D | None:
    """The first detail of `detail_type` in a failed call's status trailer."""
    status = rpc_status.from_call(call_error)  # type: ignore[arg-type]
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(detail_type.DESCRIPTOR):
            found = detail_type()
            detail.Unpack(found)
            return found
    return None


def error_info(call_error: grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The ErrorInfo in a failed call's status trailer, for clients and tests."""
    return _detail(call_error, error_details_pb2.ErrorInfo)


def bad_request(call_error: grpc.RpcError) -> error_details_pb2.BadRequest | None:
    """The BadRequest in a failed call's status trailer, for clients and tests."""
    return _detail(call_error, error_details_pb2.BadRequest)
