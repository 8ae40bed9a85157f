"""gRPC's report of an answer refused after the deadline becomes one line, without a traceback."""

from __future__ import annotations

import logging
import sys

from payments_common.grpcserver import _LateAnswerFilter


class ExecuteBatchError(Exception):
    """Named as gRPC's core names the error of a refused send."""


def _record(error: BaseException) -> logging.LogRecord:
    try:
        raise error
    except BaseException:
        exc_info = sys.exc_info()
    return logging.LogRecord(
        "grpc._cython.cygrpc", logging.ERROR, __file__, 1, "raised in core", (), exc_info
    )


def test_a_refused_late_answer_is_logged_as_one_line() -> None:
    record = _record(ExecuteBatchError("Failed execute_batch"))
    assert _LateAnswerFilter().filter(record)
    assert record.exc_info is None
    assert record.levelno == logging.INFO
    assert record.getMessage() == "call ended before its answer could be sent"


def test_other_errors_keep_their_traceback() -> None:
    record = _record(RuntimeError("a real failure"))
    assert _LateAnswerFilter().filter(record)
    assert record.exc_info is not None
    assert record.levelno == logging.ERROR
