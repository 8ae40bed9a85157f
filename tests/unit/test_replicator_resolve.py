"""Resolution as a pure function: which stored fields it needs, and the whole writes it makes of them."""

from __future__ import annotations

from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import payment_pb2
from payments_common.keys import DEFAULT_SCHEMA as KEYS
from payments_common.keys import index_member
from replicator.ops import (
    DeleteView,
    SegmentOp,
    SetIndexes,
    StoredField,
    UnindexPayment,
    UpsertTimeline,
    UpsertView,
)
from replicator.resolve import resolve, stored_fields
from tests.support.rows import PROJECTOR, A, B, P


def _view(reference: str, keep: tuple[str, ...] = ()) -> UpsertView:
    view = read_model_pb2.PaymentView(
        payment_id=P, payer_account_id=A, payee_account_id=B, reference=reference
    )
    view.create_time.FromMicroseconds(1_700_000_000_000_001)
    return UpsertView(KEYS.payment(P), 50, view, keep)


def _entry(note: str, keep: tuple[str, ...] = ()) -> UpsertTimeline:
    entry = read_model_pb2.TimelineEntry(sequence=2, actor="carol", note=note)
    return UpsertTimeline(KEYS.payment(P), KEYS.payment_timeline(P), P, 2, 50, entry, keep)


def test_only_unsent_fields_and_deleted_payments_need_stored_values() -> None:
    ops: list[SegmentOp] = [
        _view("new"),
        _view("", keep=("reference",)),
        _entry("", keep=("note",)),
        _entry("new"),
        UnindexPayment(P, 60),
        DeleteView(KEYS.account(A), 60),
    ]
    # The payment's view is read once, for its unsent field and for the delete alike.
    assert stored_fields(ops, KEYS) == [
        StoredField(KEYS.payment(P), "view"),
        StoredField(KEYS.payment_timeline(P), "2"),
    ]
    assert stored_fields([_view("new"), _entry("new")], KEYS) == []


def test_unsent_fields_are_taken_from_the_stored_state() -> None:
    stored = {
        StoredField(KEYS.payment(P), "view"): _view("stored").view.SerializeToString(),
        StoredField(KEYS.payment_timeline(P), "2"): _entry("stored").entry.SerializeToString(),
    }
    resolution = resolve([_view("", keep=("reference",)), _entry("", keep=("note",))], stored, PROJECTOR)
    view, entry = resolution.writes
    assert resolution.unfilled == []
    assert isinstance(view, UpsertView)
    assert isinstance(view.view, read_model_pb2.PaymentView)
    assert (view.view.reference, view.keep, view.lsn) == ("stored", (), 50)
    assert isinstance(entry, UpsertTimeline)
    assert (entry.entry.note, entry.entry.actor, entry.keep) == ("stored", "carol", ())


def test_an_unsent_field_without_a_stored_state_stays_empty() -> None:
    stored: dict[StoredField, bytes | None] = {
        StoredField(KEYS.payment(P), "view"): None,
        StoredField(KEYS.payment_timeline(P), "2"): None,
    }
    resolution = resolve([_view("", keep=("reference",)), _entry("", keep=("note",))], stored, PROJECTOR)
    view, entry = resolution.writes
    assert isinstance(view, UpsertView)
    assert isinstance(view.view, read_model_pb2.PaymentView)
    assert (view.view.reference, view.keep) == ("", ())
    assert isinstance(entry, UpsertTimeline)
    assert (entry.entry.note, entry.keep) == ("", ())
    # Said, not logged: the writer logs it (test_replicator_writer.py).
    assert resolution.unfilled == [KEYS.payment(P)]


def test_a_deleted_payment_leaves_every_index_of_the_accounts_in_its_stored_view_and_the_queue() -> None:
    stored = {StoredField(KEYS.payment(P), "view"): _view("stored").view.SerializeToString()}
    writes = resolve([UnindexPayment(P, 60), DeleteView(KEYS.payment(P), 60)], stored, PROJECTOR).writes
    payer, payee, queue, delete = writes
    assert delete == DeleteView(KEYS.payment(P), 60)
    assert queue == SetIndexes(
        KEYS.review_queue_versions(),
        P,
        60,
        index_member(1_700_000_000_000_001, P),
        (),
        (KEYS.review_queue(),),
    )
    for write, account in ((payer, A), (payee, B)):
        assert isinstance(write, SetIndexes)
        assert (write.versions_key, write.payment_id, write.lsn, write.add) == (
            KEYS.account_index_versions(account),
            P,
            60,
            (),
        )
        assert write.member == index_member(1_700_000_000_000_001, P)
        assert len(write.remove) == 12  # 3 directions x 4 statuses
        assert KEYS.account_index(account, "all", payment_pb2.PAYMENT_STATUS_DECLINED) in write.remove


def test_a_deleted_payment_without_a_stored_view_has_no_index_to_leave() -> None:
    stored: dict[StoredField, bytes | None] = {StoredField(KEYS.payment(P), "view"): None}
    writes = resolve([UnindexPayment(P, 60), DeleteView(KEYS.payment(P), 60)], stored, PROJECTOR).writes
    assert writes == [DeleteView(KEYS.payment(P), 60)]


def test_whole_writes_pass_through_unchanged() -> None:
    ops: list[SegmentOp] = [_view("new"), _entry("new"), DeleteView(KEYS.account(A), 60)]
    assert resolve(ops, {}, PROJECTOR).writes == ops
