"""Encoding as a pure function: serialized writes, and the change notification of a batch."""

from __future__ import annotations

from payments.readmodel.v1 import read_model_pb2
from payments_common.keys import DEFAULT_SCHEMA as KEYS
from replicator.changes import Checkpoint
from replicator.encode import EncodedEntry, EncodedView, encode
from replicator.ops import DeleteTimeline, DeleteView, SetIndexes, UpsertTimeline, UpsertView, Write
from tests.support.rows import A, P, Q


def _payment(payment_id: str) -> UpsertView:
    return UpsertView(
        KEYS.payment(payment_id), 40, read_model_pb2.PaymentView(payment_id=payment_id, reference="x")
    )


def _entry(payment_id: str, sequence: int) -> UpsertTimeline:
    entry = read_model_pb2.TimelineEntry(sequence=sequence, actor="system")
    return UpsertTimeline(
        KEYS.payment(payment_id), KEYS.payment_timeline(payment_id), payment_id, sequence, 40, entry
    )


def test_messages_are_serialized_and_other_writes_pass_through() -> None:
    indexes = SetIndexes(KEYS.account_index_versions(A), P, 40, "m", ("add",), ("remove",))
    tombstone = DeleteView(KEYS.account(A), 40)
    removal = DeleteTimeline(KEYS.payment(P), KEYS.payment_timeline(P), 3, 40)
    account = read_model_pb2.AccountView(account_id=A)
    writes: list[Write] = [
        UpsertView(KEYS.account(A), 40, account),
        indexes,
        _entry(P, 1),
        tombstone,
        removal,
    ]
    batch = encode(writes, None)
    assert batch.writes == [
        EncodedView(KEYS.account(A), 40, account.SerializeToString()),
        indexes,
        EncodedEntry(
            KEYS.payment(P), KEYS.payment_timeline(P), 1, 40, _entry(P, 1).entry.SerializeToString()
        ),
        tombstone,
        removal,
    ]


def test_a_batch_without_a_checkpoint_is_not_announced() -> None:
    batch = encode([_payment(P)], None)
    assert batch.checkpoint is None
    assert batch.notification is None


def test_the_notification_lists_the_payments_with_their_complete_timelines_only() -> None:
    writes: list[Write] = [_payment(P), _entry(P, 2), _entry(P, 1), _payment(Q), _entry(Q, 2)]
    batch = encode(writes, Checkpoint(90, 1_700_000_000_000_000))
    assert batch.checkpoint == Checkpoint(90, 1_700_000_000_000_000)
    notification = batch.notification
    assert notification is not None
    assert notification.checkpoint_lsn == 90
    assert notification.commit_time.ToMicroseconds() == 1_700_000_000_000_000
    # Without a source time of its own, the checkpoint covers the source up to its commit.
    assert notification.source_time.ToMicroseconds() == 1_700_000_000_000_000
    assert not notification.omits_payments
    # Left for the apply stage, which knows the checkpoint the batch moves from.
    assert notification.previous_checkpoint_lsn == 0
    complete, partial = notification.payments
    assert complete.payment_id == P
    assert [entry.sequence for entry in complete.timeline] == [1, 2]
    assert partial.payment_id == Q
    assert not partial.timeline


def test_an_idle_advance_has_no_commit_time_and_a_truncate_omits_payments() -> None:
    idle = encode([], Checkpoint(95, None)).notification
    assert idle is not None
    assert not idle.HasField("commit_time")
    assert not idle.payments
    truncated = encode([], Checkpoint(96, 5), omits_payments=True).notification
    assert truncated is not None
    assert truncated.omits_payments


def test_the_notification_says_up_to_when_the_checkpoint_covers_the_source() -> None:
    # An idle advance, or a heartbeat of an idle source: the walsender's send time, no commit.
    idle = encode([], Checkpoint(95, None, 1_700_000_005_000_000)).notification
    assert idle is not None
    assert not idle.HasField("commit_time")
    assert idle.source_time.ToMicroseconds() == 1_700_000_005_000_000
    # A source time recorded beside a commit time is the one that says how far it covers.
    both = encode([_payment(P)], Checkpoint(96, 1_700_000_000_000_000, 1_700_000_001_000_000)).notification
    assert both is not None
    assert both.commit_time.ToMicroseconds() == 1_700_000_000_000_000
    assert both.source_time.ToMicroseconds() == 1_700_000_001_000_000
    # Neither known: unset, never the epoch.
    unknown = encode([], Checkpoint(97, None)).notification
    assert unknown is not None
    assert not unknown.HasField("source_time")
