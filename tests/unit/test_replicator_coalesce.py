"""Coalescing as a pure function: the last write of each entity, filled in from the batch."""

from __future__ import annotations

from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import payment_pb2
from payments_common.keys import DEFAULT_SCHEMA as KEYS
from replicator.changes import PAYMENT_EVENTS, PAYMENTS, RowChange, TruncateTables
from replicator.coalesce import coalesce
from replicator.decoder import UNCHANGED, Value
from replicator.ops import (
    DeleteTimeline,
    DeleteView,
    SegmentOp,
    SetIndexes,
    UnindexPayment,
    UpsertTimeline,
    UpsertView,
)
from tests.support.rows import PROJECTOR, A, B, P, Q, payment_event_row, payment_row


def _payment(lsn: int, payment_id: str = P, **changes: Value) -> list[SegmentOp]:
    """The ops of an update of the payment at `lsn`, its reference "at <lsn>" unless given."""
    changes.setdefault("reference", f"at {lsn}")
    row = payment_row(payment_id=payment_id, **changes)
    return [
        op
        for op in PROJECTOR.project(RowChange(PAYMENTS, "update", row, lsn))
        if not isinstance(op, TruncateTables)
    ]


def _delete(lsn: int) -> list[SegmentOp]:
    return [UnindexPayment(P, lsn), DeleteView(KEYS.payment(P), lsn)]


def _entry(lsn: int, sequence: int, **changes: Value) -> UpsertTimeline:
    """The op of an update of P's timeline entry at `lsn`, its note "note at <lsn>" unless given."""
    changes.setdefault("note", f"note at {lsn}")
    row = payment_event_row(sequence=sequence, **changes)
    (op,) = PROJECTOR.project(RowChange(PAYMENT_EVENTS, "update", row, lsn))
    assert isinstance(op, UpsertTimeline)
    return op


def _summary(ops: list[SegmentOp]) -> list[tuple[str, str, int]]:
    out = []
    for op in ops:
        name = type(op).__name__
        if isinstance(op, UpsertView | DeleteView):
            out.append((name, op.key, op.lsn))
        elif isinstance(op, SetIndexes):
            out.append((name, op.versions_key, op.lsn))
        elif isinstance(op, UpsertTimeline | DeleteTimeline):
            out.append((name, f"{op.timeline_key}#{op.sequence}", op.lsn))
        else:
            out.append((name, op.payment_id, op.lsn))
    return out


def test_the_last_write_of_each_entity_wins_in_the_order_of_the_last_writes() -> None:
    ops = _payment(10, Q) + _payment(10) + _payment(20, Q)
    assert _summary(coalesce(ops, PROJECTOR)) == [
        ("UpsertView", KEYS.payment(P), 10),
        ("SetIndexes", KEYS.account_index_versions(A), 10),
        ("SetIndexes", KEYS.account_index_versions(B), 10),
        ("SetIndexes", KEYS.review_queue_versions(), 10),
        ("UpsertView", KEYS.payment(Q), 20),
        ("SetIndexes", KEYS.account_index_versions(A), 20),
        ("SetIndexes", KEYS.account_index_versions(B), 20),
        ("SetIndexes", KEYS.review_queue_versions(), 20),
    ]


def test_a_delete_replaces_the_upsert_of_the_same_view() -> None:
    ops: list[SegmentOp] = [UpsertView(KEYS.account(A), 10, read_model_pb2.AccountView(account_id=A))]
    ops.append(DeleteView(KEYS.account(A), 20))
    assert coalesce(ops, PROJECTOR) == [DeleteView(KEYS.account(A), 20)]


def test_unsent_fields_come_from_the_write_replaced_in_the_batch() -> None:
    ops = _payment(10) + _payment(20, reference=UNCHANGED, status="DECLINED")
    view = coalesce(ops, PROJECTOR)[0]
    assert isinstance(view, UpsertView)
    assert isinstance(view.view, read_model_pb2.PaymentView)
    assert (view.view.reference, view.view.status, view.keep) == (
        "at 10",
        payment_pb2.PAYMENT_STATUS_DECLINED,
        (),
    )
    assert view.lsn == 20


def test_unsent_fields_stay_unresolved_without_an_earlier_write() -> None:
    ops = _payment(20, reference=UNCHANGED)
    view = coalesce(ops, PROJECTOR)[0]
    assert isinstance(view, UpsertView)
    assert view.keep == ("reference",)


def test_a_timeline_entry_is_filled_from_the_entry_it_replaces() -> None:
    (entry,) = coalesce([_entry(10, 1), _entry(20, 1, note=UNCHANGED)], PROJECTOR)
    assert isinstance(entry, UpsertTimeline)
    assert (entry.entry.note, entry.lsn, entry.keep) == ("note at 10", 20, ())


def test_a_payment_deleted_after_its_upsert_leaves_the_indexes_of_that_view() -> None:
    ops = _payment(10) + _delete(20)
    coalesced = coalesce(ops, PROJECTOR)
    assert not any(isinstance(op, UnindexPayment) for op in coalesced)
    indexes = [op for op in coalesced if isinstance(op, SetIndexes)]
    assert [(op.versions_key, op.lsn, op.add) for op in indexes] == [
        (KEYS.account_index_versions(A), 20, ()),
        (KEYS.account_index_versions(B), 20, ()),
        (KEYS.review_queue_versions(), 20, ()),
    ]
    assert indexes[2].remove == (KEYS.review_queue(),)
    assert KEYS.account_index(A, "sent", payment_pb2.PAYMENT_STATUS_UNSPECIFIED) in indexes[0].remove
    assert KEYS.account_index(B, "received", payment_pb2.PAYMENT_STATUS_UNSPECIFIED) in indexes[1].remove
    assert coalesced[-1] == DeleteView(KEYS.payment(P), 20)


def test_a_delete_without_an_earlier_view_is_left_for_resolution_once() -> None:
    ops = _delete(20) + _delete(30)
    assert coalesce(ops, PROJECTOR) == [UnindexPayment(P, 30), DeleteView(KEYS.payment(P), 30)]
