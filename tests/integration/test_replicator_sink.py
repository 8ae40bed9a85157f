"""The line from projected ops to a private Redis: position guards, idempotent replays, fencing, notifications."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import payment_pb2
from payments_common.keys import DEFAULT_SCHEMA as KEYS
from replicator.changes import ACCOUNTS, PAYMENT_EVENTS, PAYMENTS, Checkpoint, RowChange, TruncateTables
from replicator.decoder import UNCHANGED, Value
from replicator.lock import LockLost, SlotLock
from replicator.sink import CheckpointMoved, Sink
from replicator.writer import Writer
from tests.support.replicator import change_batches
from tests.support.rows import PROJECTOR, A, B, P, Q, payment_event_row, payment_row


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def sink(client: redis.Redis) -> Sink:
    lock = SlotLock(client, KEYS.lock("s"), 10.0)
    assert lock.try_acquire()
    sink = Sink(client, KEYS, "s", lock, stream_maxlen=100)
    sink.load_scripts()
    return sink


@pytest.fixture
def writer(sink: Sink) -> Writer:
    return Writer(PROJECTOR, sink)


def _payment(lsn: int, status: str = "APPROVED", **changes: Value) -> RowChange:
    """An update of the payment at `lsn`, its reference "at <lsn>" unless given."""
    changes.setdefault("reference", f"at {lsn}")
    return RowChange(PAYMENTS, "update", payment_row(status=status, **changes), lsn)


def _event(lsn: int, sequence: int, status: str) -> RowChange:
    return RowChange(PAYMENT_EVENTS, "insert", payment_event_row(sequence=sequence, status=status), lsn)


def _view(client: redis.Redis) -> read_model_pb2.PaymentView:
    raw = client.hget(KEYS.payment(P), "view")
    assert isinstance(raw, bytes)
    return read_model_pb2.PaymentView.FromString(raw)


def _snapshot(client: redis.Redis) -> dict[bytes, object]:
    state: dict[bytes, object] = {}
    for key in client.scan_iter(match="rm:v1:*"):
        kind = client.type(key)
        if kind == b"hash":
            state[key] = client.hgetall(key)
        elif kind == b"zset":
            state[key] = client.zrange(key, 0, -1)
    return state


def test_an_older_write_never_replaces_a_newer_one(writer: Writer, sink: Sink, client: redis.Redis) -> None:
    writer.write(PROJECTOR.project(_payment(200, "DECLINED")), Checkpoint(200, 1))
    writer.write(PROJECTOR.project(_payment(100, "APPROVED")), Checkpoint(100, 1))
    view = _view(client)
    assert view.status == payment_pb2.PAYMENT_STATUS_DECLINED
    assert view.source_lsn == 200
    assert client.zcard(KEYS.account_index(A, "sent", payment_pb2.PAYMENT_STATUS_DECLINED)) == 1
    assert client.zcard(KEYS.account_index(A, "sent", payment_pb2.PAYMENT_STATUS_APPROVED)) == 0
    assert sink.read_checkpoint() == Checkpoint(200, 1, 1)


def test_replaying_batches_gives_the_same_state(writer: Writer, sink: Sink, client: redis.Redis) -> None:
    batches = [
        [_payment(10, "PENDING_REVIEW"), _event(10, 1, "PENDING_REVIEW")],
        [_payment(20, "APPROVED"), _event(20, 2, "APPROVED")],
    ]
    for batch in batches:
        writer.write(
            [op for change in batch for op in PROJECTOR.project(change)], Checkpoint(batch[0].lsn, 5)
        )
    first = _snapshot(client)
    for batch in batches:
        writer.write(
            [op for change in batch for op in PROJECTOR.project(change)], Checkpoint(batch[0].lsn, 5)
        )
    assert _snapshot(client) == first
    assert client.hlen(KEYS.payment_timeline(P)) == 2


def test_writes_in_one_transaction_apply_in_order(writer: Writer, sink: Sink, client: redis.Redis) -> None:
    ops = PROJECTOR.project(_payment(30, "PENDING_REVIEW")) + PROJECTOR.project(_payment(30, "APPROVED"))
    writer.write(ops, Checkpoint(30, 5))
    assert _view(client).status == payment_pb2.PAYMENT_STATUS_APPROVED
    assert client.zcard(KEYS.account_index(B, "received", payment_pb2.PAYMENT_STATUS_PENDING_REVIEW)) == 0


def test_unchanged_column_is_taken_from_the_stored_view(
    writer: Writer, sink: Sink, client: redis.Redis
) -> None:
    writer.write(PROJECTOR.project(_payment(40, "PENDING_REVIEW")), Checkpoint(40, 5))
    writer.write(PROJECTOR.project(_payment(50, "APPROVED", reference=UNCHANGED)), Checkpoint(50, 5))
    view = _view(client)
    assert view.reference == "at 40"
    assert view.status == payment_pb2.PAYMENT_STATUS_APPROVED


def test_delete_leaves_a_tombstone_and_empties_the_indexes(
    writer: Writer, sink: Sink, client: redis.Redis
) -> None:
    writer.write(PROJECTOR.project(_payment(60)), Checkpoint(60, 5))
    delete = RowChange(PAYMENTS, "delete", {"payment_id": P}, 70)
    writer.write(PROJECTOR.project(delete), Checkpoint(70, 5))
    assert client.hget(KEYS.payment(P), "view") is None
    assert client.hget(KEYS.payment(P), "lsn") == b"70"
    for account in (A, B):
        assert client.zcard(KEYS.account_index(account, "all", payment_pb2.PAYMENT_STATUS_UNSPECIFIED)) == 0
    # A replayed older insert cannot bring it back.
    writer.write(PROJECTOR.project(_payment(60)), Checkpoint(60, 5))
    assert client.hget(KEYS.payment(P), "view") is None
    assert client.zcard(KEYS.account_index(A, "all", payment_pb2.PAYMENT_STATUS_UNSPECIFIED)) == 0


def _queue(client: redis.Redis) -> list[str]:
    members: list[bytes] = client.zrange(KEYS.review_queue(), 0, -1)  # type: ignore[assignment]
    return [member.decode().partition(":")[2] for member in members]


def test_a_held_payment_is_queued_until_decided_and_an_older_write_cannot_queue_it_again(
    writer: Writer, sink: Sink, client: redis.Redis
) -> None:
    insert = RowChange(PAYMENTS, "insert", payment_row(status="PENDING_REVIEW"), 10)
    writer.write(PROJECTOR.project(insert), Checkpoint(10, 5))
    assert _queue(client) == [P]
    writer.write(PROJECTOR.project(_payment(20, "APPROVED")), Checkpoint(20, 5))
    assert _queue(client) == []
    # Replays of the held states, the insert and an update, are older than the approval: skipped.
    writer.write(PROJECTOR.project(insert), Checkpoint(10, 5))
    writer.write(PROJECTOR.project(_payment(15, "PENDING_REVIEW")), Checkpoint(15, 5))
    assert _queue(client) == []
    assert client.hget(KEYS.review_queue_versions(), P) == b"20"


def test_a_declined_or_deleted_payment_leaves_the_queue_and_a_replay_cannot_bring_it_back(
    writer: Writer, sink: Sink, client: redis.Redis
) -> None:
    held_q = RowChange(PAYMENTS, "insert", payment_row(payment_id=Q, status="PENDING_REVIEW"), 30)
    writer.write(
        PROJECTOR.project(held_q) + PROJECTOR.project(_payment(30, "PENDING_REVIEW")), Checkpoint(30, 5)
    )
    assert sorted(_queue(client)) == sorted([P, Q])
    writer.write(PROJECTOR.project(_payment(40, "DECLINED")), Checkpoint(40, 5))
    writer.write(PROJECTOR.project(RowChange(PAYMENTS, "delete", {"payment_id": Q}, 50)), Checkpoint(50, 5))
    assert _queue(client) == []
    writer.write(
        PROJECTOR.project(held_q) + PROJECTOR.project(_payment(30, "PENDING_REVIEW")), Checkpoint(30, 5)
    )
    assert _queue(client) == []


def test_a_truncate_of_payments_empties_the_queue(writer: Writer, sink: Sink, client: redis.Redis) -> None:
    writer.write(PROJECTOR.project(_payment(60, "PENDING_REVIEW")), Checkpoint(60, 5))
    assert _queue(client) == [P]
    writer.write([TruncateTables((PAYMENTS,), 70)], Checkpoint(70, 5))
    assert not client.exists(KEYS.review_queue(), KEYS.review_queue_versions())


def test_the_features_are_written_fenced_and_wiped_with_the_namespace(
    sink: Sink, client: redis.Redis
) -> None:
    assert sink.read_features() == frozenset()
    sink.write_features(("review_queue",))
    assert sink.read_features() == {"review_queue"}
    assert client.hgetall(KEYS.meta()) == {b"features": b"review_queue"}
    sink.wipe()
    assert sink.read_features() == frozenset()
    client.set(KEYS.lock("s"), "someone else")
    with pytest.raises(LockLost):
        sink.write_features(("review_queue",))
    assert not client.exists(KEYS.meta())


def test_an_instance_without_the_lock_cannot_apply(writer: Writer, sink: Sink, client: redis.Redis) -> None:
    client.set(KEYS.lock("s"), "someone else")
    with pytest.raises(LockLost):
        writer.write(PROJECTOR.project(_payment(80)), Checkpoint(80, 5))
    assert not client.exists(KEYS.payment(P))
    assert sink.read_checkpoint() is None


def test_each_batch_is_announced_on_the_change_stream(
    writer: Writer, sink: Sink, client: redis.Redis
) -> None:
    ops = PROJECTOR.project(_payment(90, "PENDING_REVIEW")) + PROJECTOR.project(
        _event(90, 1, "PENDING_REVIEW")
    )
    writer.write(ops, Checkpoint(90, 1_700_000_000_000_000))
    writer.write([], Checkpoint(95, None))
    entries = client.xrange(KEYS.changes())
    batches = change_batches(entries)
    assert [b.checkpoint_lsn for b in batches] == [90, 95]
    assert batches[0].commit_time.ToMicroseconds() == 1_700_000_000_000_000
    (view,) = batches[0].payments
    assert view.payment_id == P
    assert [entry.sequence for entry in view.timeline] == [1]
    assert not batches[1].payments


def test_wipe_keeps_locks_and_the_change_stream(writer: Writer, sink: Sink, client: redis.Redis) -> None:
    writer.write(PROJECTOR.project(_payment(100)), Checkpoint(100, 5))
    assert sink.wipe() > 0
    assert client.exists(KEYS.lock("s"))
    assert client.exists(KEYS.changes())
    assert not client.exists(KEYS.payment(P))
    assert sink.read_checkpoint() is None


def test_each_batch_names_the_checkpoint_it_moved_from(
    writer: Writer, sink: Sink, client: redis.Redis
) -> None:
    writer.write(PROJECTOR.project(_payment(110)), Checkpoint(110, 5))
    writer.write([], Checkpoint(120, None))
    writer.write(PROJECTOR.project(_payment(130)), Checkpoint(130, 5))
    batches = change_batches(client.xrange(KEYS.changes()))
    assert [(b.previous_checkpoint_lsn, b.checkpoint_lsn) for b in batches] == [
        (0, 110),
        (110, 120),
        (120, 130),
    ]
    assert not any(b.omits_payments for b in batches)


def test_a_batch_is_refused_when_redis_holds_another_checkpoint(
    writer: Writer, sink: Sink, client: redis.Redis
) -> None:
    writer.write([], Checkpoint(140, None))
    # Redis lost its last writes (restored from an older file), behind the instance's back.
    client.hset(KEYS.checkpoint("s"), "lsn", "100")
    with pytest.raises(CheckpointMoved):
        writer.write(PROJECTOR.project(_payment(150)), Checkpoint(150, 5))
    assert not client.exists(KEYS.payment(P))
    assert client.hget(KEYS.checkpoint("s"), "lsn") == b"100"


def test_a_truncate_is_announced_as_omitting_payments(
    writer: Writer, sink: Sink, client: redis.Redis
) -> None:
    writer.write(PROJECTOR.project(_payment(160)), Checkpoint(160, 5))
    writer.write([TruncateTables((PAYMENTS,), 170)], Checkpoint(170, 5))
    last = change_batches(client.xrevrange(KEYS.changes(), count=1))[0]
    assert last.omits_payments
    assert last.checkpoint_lsn == 170
    assert not client.exists(KEYS.payment(P))


def test_an_instance_without_the_lock_removes_nothing(
    writer: Writer, sink: Sink, client: redis.Redis
) -> None:
    writer.write(PROJECTOR.project(_payment(180)), Checkpoint(180, 5))
    before = _snapshot(client)
    client.set(KEYS.lock("s"), "someone else")
    with pytest.raises(LockLost):
        sink.clear_checkpoint()
    with pytest.raises(LockLost):
        sink.wipe()
    with pytest.raises(LockLost):
        writer.write([TruncateTables((PAYMENTS, ACCOUNTS), 190)], Checkpoint(190, 5))
    assert _snapshot(client) == before
    assert sink.read_checkpoint() == Checkpoint(180, 5, 5)


def test_the_checkpoint_records_the_source_time_it_covers(writer: Writer, sink: Sink) -> None:
    """A transaction's commit time, or the walsender's clock of an idle advance: what lag in seconds is measured from."""
    writer.write(PROJECTOR.project(_payment(100)), Checkpoint(100, 1_000))
    assert sink.read_checkpoint() == Checkpoint(100, 1_000, 1_000)
    # An idle advance keeps the last commit's time and moves the source time.
    writer.write([], Checkpoint(150, None, 2_000))
    assert sink.read_checkpoint() == Checkpoint(150, 1_000, 2_000)
    writer.write(PROJECTOR.project(_payment(200)), Checkpoint(200, 3_000))
    assert sink.read_checkpoint() == Checkpoint(200, 3_000, 3_000)
    # A batch without a checkpoint moves neither.
    writer.write(PROJECTOR.project(_payment(250)), None)
    assert sink.read_checkpoint() == Checkpoint(200, 3_000, 3_000)
