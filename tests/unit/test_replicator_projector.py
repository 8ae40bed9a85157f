"""The projection as a pure function: row changes in, read-model writes out, no server."""

from __future__ import annotations

from redis.crc import key_slot

from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import payment_pb2
from payments_common.keys import DEFAULT_SCHEMA as KEYS
from payments_common.keys import KeySchema, index_member
from replicator.changes import ACCOUNTS, PAYMENT_EVENTS, PAYMENTS, RowBatch, RowChange, TruncateTables
from replicator.decoder import UNCHANGED
from replicator.encode import encode
from replicator.ops import (
    DeleteTimeline,
    DeleteView,
    Op,
    SetIndexes,
    UnindexPayment,
    UpsertTimeline,
    UpsertView,
    Write,
)
from replicator.projector import Projector, parse_timestamp_us
from replicator.sink import _PACKERS
from tests.support.rows import PROJECTOR, A, B, P, account_row, payment_event_row, payment_row


def test_timestamps_parse_to_unix_microseconds() -> None:
    assert parse_timestamp_us("1970-01-01 00:00:01.000002+00") == 1_000_002
    assert parse_timestamp_us("2026-01-02 05:04:05+02") == parse_timestamp_us("2026-01-02 03:04:05+00")
    assert parse_timestamp_us("1969-12-31 23:59:59.5+00") == -500_000


def test_payment_insert_writes_the_view_and_both_accounts_indexes() -> None:
    row = payment_row(
        payer_name="Alice",
        payee_name="Bob",
        reference="rent",
        currency_code="EUR",
        amount_minor="1234",
        status="APPROVED",
        created_at="2026-01-02 03:04:05.123456+00",
    )
    ops = PROJECTOR.project(RowChange(PAYMENTS, "insert", row, 900))
    view_op = ops[0]
    assert isinstance(view_op, UpsertView)
    assert view_op.key == KEYS.payment(P)
    assert view_op.lsn == 900
    assert not view_op.keep
    view = view_op.view
    assert isinstance(view, read_model_pb2.PaymentView)
    assert (view.payer_name, view.payee_name, view.reference) == ("Alice", "Bob", "rent")
    assert (view.amount.currency_code, view.amount.amount_minor) == ("EUR", 1234)
    assert view.status == payment_pb2.PAYMENT_STATUS_APPROVED
    assert view.decline_reason == payment_pb2.DECLINE_REASON_UNSPECIFIED
    assert view.create_time.ToMicroseconds() == parse_timestamp_us("2026-01-02 03:04:05.123456+00")
    assert view.source_lsn == 900
    indexes = [op for op in ops if isinstance(op, SetIndexes)]
    assert [op.versions_key for op in indexes] == [
        KEYS.account_index_versions(A),
        KEYS.account_index_versions(B),
    ]
    member = index_member(view.create_time.ToMicroseconds(), P)
    approved = payment_pb2.PAYMENT_STATUS_APPROVED
    payer = indexes[0]
    assert payer.member == member
    assert set(payer.add) == {
        KEYS.account_index(A, "sent", payment_pb2.PAYMENT_STATUS_UNSPECIFIED),
        KEYS.account_index(A, "sent", approved),
        KEYS.account_index(A, "all", payment_pb2.PAYMENT_STATUS_UNSPECIFIED),
        KEYS.account_index(A, "all", approved),
    }
    # A new row is in no index yet: nothing to remove.
    assert payer.remove == ()
    assert not any(":received:" in key for key in payer.add + payer.remove)
    payee = indexes[1]
    assert KEYS.account_index(B, "received", approved) in payee.add
    assert not any(":sent:" in key for key in payee.add + payee.remove)


def test_a_held_payment_says_why_and_keeps_it_once_decided() -> None:
    for status in ("PENDING_REVIEW", "APPROVED"):
        row = payment_row(status=status, hold_reason="AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD")
        view = PROJECTOR.project(RowChange(PAYMENTS, "update", row, 950))[0].view  # type: ignore[union-attr]
        assert isinstance(view, read_model_pb2.PaymentView)
        assert view.hold_reason == payment_pb2.HOLD_REASON_AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD


def test_a_payment_without_a_hold_reason_has_none() -> None:
    """Never held (NULL), a reason this version does not know, or a row from before the column existed."""
    no_column = {k: v for k, v in payment_row(status="PENDING_REVIEW").items() if k != "hold_reason"}
    for row in (payment_row(), payment_row(status="PENDING_REVIEW", hold_reason="LATER_RULE"), no_column):
        view = PROJECTOR.project(RowChange(PAYMENTS, "insert", row, 960))[0].view  # type: ignore[union-attr]
        assert isinstance(view, read_model_pb2.PaymentView)
        assert view.hold_reason == payment_pb2.HOLD_REASON_UNSPECIFIED


def test_status_change_moves_the_payment_between_status_indexes() -> None:
    row = payment_row(status="DECLINED", decline_reason="DECLINED_BY_REVIEWER")
    ops = PROJECTOR.project(RowChange(PAYMENTS, "update", row, 1000))
    upsert = ops[0]
    assert isinstance(upsert, UpsertView)
    assert isinstance(upsert.view, read_model_pb2.PaymentView)
    view = upsert.view
    assert view.decline_reason == payment_pb2.DECLINE_REASON_DECLINED_BY_REVIEWER
    payer = next(op for op in ops if isinstance(op, SetIndexes))
    declined = payment_pb2.PAYMENT_STATUS_DECLINED
    assert KEYS.account_index(A, "sent", declined) in payer.add
    for status in (payment_pb2.PAYMENT_STATUS_APPROVED, payment_pb2.PAYMENT_STATUS_PENDING_REVIEW):
        assert KEYS.account_index(A, "sent", status) in payer.remove
        assert KEYS.account_index(A, "all", status) in payer.remove
        assert KEYS.account_index(A, "sent", status) not in payer.add


def _queue_writes(ops: list[Op]) -> list[SetIndexes]:
    return [
        op for op in ops if isinstance(op, SetIndexes) and op.versions_key == KEYS.review_queue_versions()
    ]


def test_a_held_payment_enters_the_review_queue() -> None:
    row = payment_row(status="PENDING_REVIEW", created_at="2026-01-02 03:04:05.123456+00")
    for kind in ("insert", "update"):
        (queue,) = _queue_writes(PROJECTOR.project(RowChange(PAYMENTS, kind, row, 300)))
        # Ordered by creation time, as the account indexes: oldest first when read forwards.
        assert queue.member == index_member(parse_timestamp_us("2026-01-02 03:04:05.123456+00"), P)
        assert (queue.payment_id, queue.lsn, queue.add, queue.remove) == (P, 300, (KEYS.review_queue(),), ())


def test_an_approved_or_declined_payment_leaves_the_review_queue() -> None:
    for status in ("APPROVED", "DECLINED"):
        (queue,) = _queue_writes(
            PROJECTOR.project(RowChange(PAYMENTS, "update", payment_row(status=status), 310))
        )
        assert (queue.lsn, queue.add, queue.remove) == (310, (), (KEYS.review_queue(),))


def test_a_payment_decided_at_once_writes_nothing_to_the_review_queue() -> None:
    for status in ("APPROVED", "DECLINED"):
        assert (
            _queue_writes(PROJECTOR.project(RowChange(PAYMENTS, "insert", payment_row(status=status), 320)))
            == []
        )


def test_a_deleted_payment_leaves_the_review_queue() -> None:
    held = PROJECTOR.project(RowChange(PAYMENTS, "insert", payment_row(status="PENDING_REVIEW"), 330))
    view = held[0].view  # type: ignore[union-attr]
    assert isinstance(view, read_model_pb2.PaymentView)
    (queue,) = _queue_writes(list(PROJECTOR.unindex(UnindexPayment(P, 340), view)))
    assert (queue.lsn, queue.add, queue.remove) == (340, (), (KEYS.review_queue(),))


def test_the_queue_write_is_fenced_by_position_per_payment() -> None:
    """Like an index write, the queue write is one entity per payment: the last of a batch wins, and the
    apply script skips it when the payment's queue version is newer (tests/integration/test_replicator_sink.py)."""
    batch = RowBatch()
    batch.add(PAYMENTS, "insert", payment_row(status="PENDING_REVIEW"), 400)
    batch.add(PAYMENTS, "update", payment_row(status="APPROVED"), 410)
    (queue,) = _queue_writes(PROJECTOR.project_batch(batch))
    assert queue.identity == ("idx", KEYS.review_queue_versions(), P)
    assert (queue.lsn, queue.remove) == (410, (KEYS.review_queue(),))


def test_payment_to_oneself_is_sent_and_received_in_one_index_write() -> None:
    ops = PROJECTOR.project(RowChange(PAYMENTS, "insert", payment_row(payee_account_id=A), 5))
    indexes = [op for op in ops if isinstance(op, SetIndexes) and op not in _queue_writes(ops)]
    assert len(indexes) == 1
    directions = {key.split(":idx:")[1].split(":")[0] for key in indexes[0].add}
    assert directions == {"sent", "received", "all"}


def test_unchanged_toast_columns_are_kept_from_the_stored_view() -> None:
    ops = PROJECTOR.project(RowChange(PAYMENTS, "update", payment_row(reference=UNCHANGED), 7))
    assert isinstance(ops[0], UpsertView)
    assert ops[0].keep == ("reference",)


def test_payment_delete_unindexes_before_it_removes_the_view() -> None:
    ops = PROJECTOR.project(RowChange(PAYMENTS, "delete", {"payment_id": P, "status": None}, 8))
    assert ops == [UnindexPayment(P, 8), DeleteView(KEYS.payment(P), 8)]


def test_timeline_entry_and_its_delete() -> None:
    row = payment_event_row(
        sequence=2, status="DECLINED", decline_reason="DECLINED_BY_REVIEWER", actor="carol"
    )
    (op,) = PROJECTOR.project(RowChange(PAYMENT_EVENTS, "insert", row, 11))
    assert isinstance(op, UpsertTimeline)
    assert (op.payment_key, op.timeline_key, op.sequence) == (KEYS.payment(P), KEYS.payment_timeline(P), 2)
    assert op.entry.actor == "carol"
    assert op.entry.status == payment_pb2.PAYMENT_STATUS_DECLINED
    (gone,) = PROJECTOR.project(RowChange(PAYMENT_EVENTS, "delete", {"payment_id": P, "sequence": "2"}, 12))
    assert gone == DeleteTimeline(KEYS.payment(P), KEYS.payment_timeline(P), 2, 12)


def test_account_view_is_a_function_of_the_row() -> None:
    row = account_row(
        currency_code="EUR",
        status="FROZEN",
        ledger_balance_minor="10000",
        held_minor="2500",
        per_payment_limit_minor="5000",
        total_sent_minor="700",
        total_received_minor="300",
        sent_approved="1",
        sent_declined="2",
        sent_pending_review="3",
        received_approved="4",
        received_declined="5",
        received_pending_review="6",
    )
    (op,) = PROJECTOR.project(RowChange(ACCOUNTS, "update", row, 13))
    assert isinstance(op, UpsertView)
    view = op.view
    assert isinstance(view, read_model_pb2.AccountView)
    assert view.status == payment_pb2.ACCOUNT_STATUS_FROZEN
    assert view.ledger_balance.amount_minor == 10000
    assert view.available_balance.amount_minor == 7500
    assert (view.total_sent.amount_minor, view.total_received.amount_minor) == (700, 300)
    counts = view.counts
    assert (counts.sent_approved, counts.sent_declined, counts.sent_pending_review) == (1, 2, 3)
    assert (counts.received_approved, counts.received_declined, counts.received_pending_review) == (4, 5, 6)
    assert view.per_payment_limit.amount_minor == 5000
    assert view.daily_limit.currency_code == "EUR"
    # The same row projects to the same write: replaying a change cannot double-count.
    assert PROJECTOR.project(RowChange(ACCOUNTS, "update", row, 13)) == [op]


def test_new_columns_are_ignored_and_other_tables_produce_nothing() -> None:
    (op,) = PROJECTOR.project(RowChange(ACCOUNTS, "update", account_row(nickname="B"), 14))
    assert isinstance(op, UpsertView)
    assert PROJECTOR.project(RowChange("public.ledger_entries", "insert", {"entry_id": "1"}, 15)) == []


def test_truncate_keeps_only_published_tables() -> None:
    batch = RowBatch()
    batch.truncate((PAYMENTS, "public.ledger_entries"), 16)
    assert PROJECTOR.project_batch(batch) == [TruncateTables((PAYMENTS,), 16)]
    batch = RowBatch()
    batch.truncate(("public.ledger_entries",), 16)
    assert PROJECTOR.project_batch(batch) == []


def _views(ops: list[Op]) -> list[tuple[str, int]]:
    return [(op.key, op.lsn) for op in ops if isinstance(op, UpsertView | DeleteView)]


def test_row_batch_projects_only_the_last_state_of_each_row() -> None:
    batch = RowBatch()
    batch.add(ACCOUNTS, "update", account_row(ledger_balance_minor="1"), 10)
    batch.add(PAYMENTS, "insert", payment_row(status="PENDING_REVIEW"), 10)
    batch.add(ACCOUNTS, "update", account_row(ledger_balance_minor="2"), 20)
    batch.add(PAYMENTS, "update", payment_row(), 20)
    assert batch.changes == 4
    ops = PROJECTOR.project_batch(batch)
    assert _views(ops) == [(KEYS.account(A), 20), (KEYS.payment(P), 20)]
    account = next(op for op in ops if isinstance(op, UpsertView) and op.key == KEYS.account(A))
    assert account.view.ledger_balance.amount_minor == 2  # type: ignore[union-attr]


def test_row_batch_fills_unchanged_columns_from_the_earlier_change() -> None:
    batch = RowBatch()
    batch.add(PAYMENTS, "insert", payment_row(reference="long"), 10)
    batch.add(PAYMENTS, "update", payment_row(reference=UNCHANGED, status="DECLINED"), 10)
    (view, *_) = PROJECTOR.project_batch(batch)
    assert isinstance(view, UpsertView)
    assert not view.keep
    assert view.view.reference == "long"  # type: ignore[union-attr]


def test_row_batch_keeps_a_delete_before_a_new_insert_of_the_same_key() -> None:
    batch = RowBatch()
    batch.add(ACCOUNTS, "delete", {"account_id": A}, 10)
    batch.add(ACCOUNTS, "insert", account_row(), 20)
    assert _views(PROJECTOR.project_batch(batch)) == [(KEYS.account(A), 10), (KEYS.account(A), 20)]
    assert isinstance(PROJECTOR.project_batch(batch)[0], DeleteView)


def test_row_batch_truncate_is_a_barrier() -> None:
    batch = RowBatch()
    batch.add(ACCOUNTS, "update", account_row(), 10)
    batch.truncate((ACCOUNTS, PAYMENTS), 20)
    batch.add(ACCOUNTS, "insert", account_row(), 30)
    ops = PROJECTOR.project_batch(batch)
    kinds = [type(op).__name__ for op in ops]
    assert kinds == ["UpsertView", "TruncateTables", "UpsertView"]


def test_every_write_keeps_to_one_slot_on_a_cluster() -> None:
    """Each write touches one entity's keys, which share its hash tag: the cluster's apply
    script checks them with one EXISTS per slot before it writes (replicator/clustersink.py APPLY_ON_NODE)."""
    projector = Projector(KeySchema.for_redis("rm:v1", "payments_read_model", cluster=True))
    changes = [
        RowChange(ACCOUNTS, "insert", account_row(), 1),
        RowChange(ACCOUNTS, "update", account_row(), 2),
        RowChange(PAYMENTS, "insert", payment_row(status="PENDING_REVIEW"), 3),
        RowChange(PAYMENTS, "update", payment_row(status="APPROVED"), 4),
        RowChange(PAYMENTS, "insert", payment_row(payee_account_id=A), 5),
        RowChange(PAYMENT_EVENTS, "insert", payment_event_row(sequence=2), 6),
        RowChange(PAYMENT_EVENTS, "delete", {"payment_id": P, "sequence": "2"}, 7),
        RowChange(PAYMENTS, "delete", {"payment_id": P, "status": None}, 8),
        RowChange(ACCOUNTS, "delete", {"account_id": A}, 9),
    ]
    held = projector.project(RowChange(PAYMENTS, "insert", payment_row(status="PENDING_REVIEW"), 10))
    view = held[0].view  # type: ignore[union-attr]
    assert isinstance(view, read_model_pb2.PaymentView)
    ops: list[Op] = [op for change in changes for op in projector.project(change)]
    ops += projector.unindex(UnindexPayment(P, 11), view)
    writes = encode([op for op in ops if isinstance(op, Write)], None).writes
    assert {type(write) for write in writes} == set(_PACKERS)
    for write in writes:
        keys: list[str] = []
        _PACKERS[type(write)](write, keys, [])
        assert len({key_slot(key.encode()) for key in keys}) == 1, keys
