"""The one table from error family to gRPC status, and the rich status each error is sent with."""

from __future__ import annotations

import importlib
import pkgutil

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from payments_common import errors
from payments_common.grpcstatus import ERROR_DOMAIN, STATUS_CODES, status_code, to_grpc_status

# The packages whose modules define errors of their own; importing them defines their classes.
_ERROR_PACKAGES = ("approval_svc.domain", "history_svc")


def _status(error: errors.ServiceError) -> status_pb2.Status:
    sent = to_grpc_status(error)
    [(_, raw)] = [m for m in sent.trailing_metadata if m[0] == "grpc-status-details-bin"]
    assert isinstance(raw, bytes)
    return status_pb2.Status.FromString(raw)


def _subclasses(cls: type[errors.ServiceError]) -> set[type[errors.ServiceError]]:
    found = set(cls.__subclasses__())
    for sub in list(found):
        found |= _subclasses(sub)
    return found


@pytest.mark.parametrize(
    ("family", "code"),
    [
        (errors.NotFound, grpc.StatusCode.NOT_FOUND),
        (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION),
        (errors.AlreadyExists, grpc.StatusCode.ALREADY_EXISTS),
        (errors.Aborted, grpc.StatusCode.ABORTED),
        (errors.OutOfRange, grpc.StatusCode.OUT_OF_RANGE),
        (errors.Unavailable, grpc.StatusCode.UNAVAILABLE),
        (errors.DeadlineExceeded, grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.Unimplemented, grpc.StatusCode.UNIMPLEMENTED),
        (errors.Internal, grpc.StatusCode.INTERNAL),
        (errors.ServiceError, grpc.StatusCode.INTERNAL),
    ],
)
def test_each_family_has_its_code_and_an_error_info(
    family: type[errors.ServiceError], code: grpc.StatusCode
) -> None:
    error = family("SOME_REASON", "what happened", {"key": "value"})
    assert status_code(error) == code
    status = _status(error)
    assert (status.code, status.message) == (getattr(code_pb2, code.name), "what happened")
    [detail] = status.details
    info = error_details_pb2.ErrorInfo()
    assert detail.Unpack(info)
    assert (info.reason, info.domain, dict(info.metadata)) == ("SOME_REASON", ERROR_DOMAIN, {"key": "value"})


def test_an_invalid_argument_names_its_fields() -> None:
    error = errors.InvalidArgument(
        [errors.FieldViolation("a", "required"), errors.FieldViolation("b.c", "bad")]
    )
    assert status_code(error) == grpc.StatusCode.INVALID_ARGUMENT
    status = _status(error)
    assert status.message == "a: required; b.c: bad"
    info, request = error_details_pb2.ErrorInfo(), error_details_pb2.BadRequest()
    assert status.details[0].Unpack(info)
    assert status.details[1].Unpack(request)
    assert info.reason == "INVALID_ARGUMENT"
    assert [(v.field, v.description) for v in request.field_violations] == [("a", "required"), ("b.c", "bad")]


def test_a_service_error_takes_the_code_of_its_nearest_family() -> None:
    class Specific(errors.NotFound):
        pass

    assert status_code(Specific("R", "m")) == grpc.StatusCode.NOT_FOUND


def test_the_services_errors_name_no_status_code() -> None:
    """A status code belongs in the one table: an error class with a `code` of its own would be ignored."""
    for package in _ERROR_PACKAGES:
        path = importlib.import_module(package).__path__
        for module in pkgutil.iter_modules(path, package + "."):
            importlib.import_module(module.name)
    defined = _subclasses(errors.ServiceError)
    assert {"AccountNotFound", "ReadModelUnavailable", "ResumeUnavailable"} <= {c.__name__ for c in defined}
    for cls in defined:
        assert "code" not in vars(cls), f"{cls.__module__}.{cls.__qualname__} sets a code"
        assert any(family in STATUS_CODES for family in cls.__mro__)
