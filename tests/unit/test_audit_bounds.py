"""A caller's fields reach the logs bounded: a request of megabytes is not a log line of megabytes."""

from __future__ import annotations

import logging

import pytest

from payments_common import audit
from payments_common.identity import Identity, Source
from payments_common.logs import MAX_LOGGED_CHARS, JsonFormatter, request_id_var


def test_an_audit_line_holds_at_most_a_bounded_part_of_each_field(caplog: pytest.LogCaptureFixture) -> None:
    huge = "\x01" * 4_000_000
    caplog.set_level(logging.INFO, logger=audit.AUDIT_LOGGER)
    token = request_id_var.set("r" * 2_000_000)
    try:
        audit.record(
            "/payments.approval.v1.ApprovalService/FreezeAccount",
            Identity("s" * 100_000, Source.TOKEN),
            {"account_id": huge},
            "UNAUTHENTICATED",
        )
        (record,) = caplog.records
        line = JsonFormatter("approval").format(record)
    finally:
        request_id_var.reset(token)
    assert len(line) < 20 * MAX_LOGGED_CHARS
    assert "(4000000 characters)" in line
    assert "(2000000 characters)" in line
    assert "(100000 characters)" in line


def test_short_fields_are_logged_as_they_are(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=audit.AUDIT_LOGGER)
    audit.record("/m", Identity("operator.jane", Source.TOKEN), {"payment_id": "p-1"}, "OK")
    (record,) = caplog.records
    assert record.target == {"payment_id": "p-1"}  # type: ignore[attr-defined]
    assert record.identity == "operator.jane"  # type: ignore[attr-defined]
