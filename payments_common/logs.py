"""Structured JSON logging to stdout, configured once per process."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime

request_id_var: ContextVar[str] = ContextVar("request_id", default="")
method_var: ContextVar[str] = ContextVar("method", default="")
# The payment that the request concerns, once known (named by the request, or created by it).
payment_id_var: ContextVar[str] = ContextVar("payment_id", default="")
# The current trace and span ids as hex, or None (payments_common.tracing installs it when on).
trace_ids: Callable[[], tuple[str, str] | None] | None = None

_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

# The longest text a caller's field puts in a log line: a valid id is far shorter, and a
# request of megabytes must not become a log line of megabytes.
MAX_LOGGED_CHARS = 128


def bounded(text: str) -> str:
    """`text`, or its first MAX_LOGGED_CHARS characters and how long it was."""
    if len(text) <= MAX_LOGGED_CHARS:
        return text
    return f"{text[:MAX_LOGGED_CHARS]}... ({len(text)} characters)"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the request context and any `extra` fields."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "service": self.service,
            "logger": record.name,
            "message": record.getMessage(),
        }
        method = method_var.get()
        if method:
            entry["method"] = method
        request_id = request_id_var.get()
        if request_id:
            entry["request_id"] = bounded(request_id)
        payment_id = payment_id_var.get()
        if payment_id:
            entry["payment_id"] = bounded(payment_id)
        if trace_ids is not None:
            ids = trace_ids()
            if ids is not None:
                entry["trace_id"], entry["span_id"] = ids
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["traceback"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(service: str, level: str = "INFO") -> None:
    """Sends every log record of the process to stdout as JSON."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
