"""Rows of the published tables as the decoder hands them over, for the replicator's tests.

One payment P (and a second id, Q) from account A (Alice) to account B (Bob), every value
in PostgreSQL's text form. Each builder takes any column as a keyword to override; a test
that depends on a value passes it rather than relying on the default here.
"""

from __future__ import annotations

import struct

from payments_common.keys import DEFAULT_SCHEMA
from replicator.decoder import UNCHANGED, Value
from replicator.projector import Projector

P = "00000000-0000-4000-8000-000000000001"
Q = "00000000-0000-4000-8000-000000000002"
A = "00000000-0000-4000-8000-00000000000a"
B = "00000000-0000-4000-8000-00000000000b"

# The projection under the default key schema; it keeps nothing but a cache of key names, so one serves every test.
PROJECTOR = Projector(DEFAULT_SCHEMA)


def payment_row(**changes: Value) -> dict[str, Value]:
    """Payment P of 12.34 EUR from A to B, approved; a declined one has a decline reason, a held one a hold
    reason, unless one is given."""
    row: dict[str, Value] = {
        "payment_id": P,
        "request_id": "r1",
        "payer_account_id": A,
        "payee_account_id": B,
        "payer_name": "Alice",
        "payee_name": "Bob",
        "currency_code": "EUR",
        "amount_minor": "1234",
        "reference": "rent",
        "status": "APPROVED",
        "decline_reason": None,
        "created_at": "2026-01-02 03:04:05.123456+00",
        "updated_at": "2026-01-02 03:04:06+00",
        "hold_reason": None,
    }
    return _declined_with_reason(row, changes)


def payment_event_row(sequence: int = 1, **changes: Value) -> dict[str, Value]:
    """Entry `sequence` of P's timeline, written by the system; a declined one has a reason unless one is given."""
    row: dict[str, Value] = {
        "payment_id": P,
        "sequence": str(sequence),
        "status": "APPROVED",
        "decline_reason": None,
        "actor": "system",
        "note": "",
        "created_at": "2026-01-02 03:04:05.123456+00",
    }
    return _declined_with_reason(row, changes)


def account_row(**changes: Value) -> dict[str, Value]:
    """Account A, Alice's, active, 100.00 EUR with nothing held, sent or received yet."""
    row: dict[str, Value] = {
        "account_id": A,
        "owner_name": "Alice",
        "currency_code": "EUR",
        "status": "ACTIVE",
        "ledger_balance_minor": "10000",
        "held_minor": "0",
        "per_payment_limit_minor": "5000",
        "daily_limit_minor": "9000",
        "total_sent_minor": "0",
        "total_received_minor": "0",
        "sent_approved": "0",
        "sent_declined": "0",
        "sent_pending_review": "0",
        "received_approved": "0",
        "received_declined": "0",
        "received_pending_review": "0",
        "created_at": "2026-01-01 00:00:00+00",
        "updated_at": "2026-01-02 00:00:00+00",
    }
    row.update(changes)
    return row


def _declined_with_reason(row: dict[str, Value], changes: dict[str, Value]) -> dict[str, Value]:
    # As in the source, where a payment or event is DECLINED exactly when it has a decline reason,
    # and a payment submitted PENDING_REVIEW has a hold reason (events have none).
    row.update(changes)
    if row["status"] == "DECLINED" and "decline_reason" not in changes:
        row["decline_reason"] = "INSUFFICIENT_FUNDS"
    if row["status"] == "PENDING_REVIEW" and "hold_reason" in row and "hold_reason" not in changes:
        row["hold_reason"] = "AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD"
    return row


def tuple_data(*values: object) -> bytes:
    """pgoutput's TupleData of the values: text, binary, null and unchanged TOAST."""
    out = struct.pack(">h", len(values))
    for value in values:
        if value is None:
            out += b"n"
        elif value is UNCHANGED:
            out += b"u"
        elif isinstance(value, bytes):
            out += b"b" + struct.pack(">I", len(value)) + value
        else:
            assert isinstance(value, str)
            encoded = value.encode()
            out += b"t" + struct.pack(">I", len(encoded)) + encoded
    return out
