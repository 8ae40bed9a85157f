"""The shared change watcher's logic: consistency waiters, fan-out, bounded buffers, shutdown."""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable

import pytest
from google.protobuf import timestamp_pb2

from history_svc.changestream import Change, StoredCheckpoint
from history_svc.watcher import ChangeWatcher, ContinuityLost, Subscription, WatchTooSlow
from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import payment_pb2

ALICE = "00000000-0000-4000-8000-00000000000a"
BOB = "00000000-0000-4000-8000-00000000000b"
CAROL = "00000000-0000-4000-8000-00000000000c"


def _watcher() -> ChangeWatcher:
    # The reader task is never started: these tests feed batches by hand, from position 1.
    watcher = ChangeWatcher(stream=None)  # type: ignore[arg-type]
    watcher.head, watcher.last_id = 1, b"1-0"
    return watcher


def _view(payment: int, payer: str, payee: str) -> read_model_pb2.PaymentView:
    return read_model_pb2.PaymentView(
        payment_id=f"00000000-0000-4000-8000-{payment:012d}",
        payer_account_id=payer,
        payee_account_id=payee,
        status=payment_pb2.PAYMENT_STATUS_APPROVED,
    )


async def _feed(watcher: ChangeWatcher, lsn: int, *views: read_model_pb2.PaymentView) -> None:
    """Applies the next entry of an unbroken stream: it moved from the entry before it."""
    batch = read_model_pb2.ChangeBatch(
        checkpoint_lsn=lsn, previous_checkpoint_lsn=watcher.head, payments=views
    )
    await watcher.apply(batch, f"{lsn}-0".encode())


async def _drain(subscription: Subscription, count: int) -> list[Change]:
    changes: list[Change] = []
    async for change in subscription:
        changes.append(change)
        if len(changes) == count:
            break
    return changes


async def test_a_reached_position_answers_at_once_and_a_later_one_waits() -> None:
    watcher = _watcher()
    watcher.advance(100)
    assert await watcher.wait_for(100, 0)
    assert await watcher.wait_for(50, 0)
    assert not await watcher.wait_for(101, 0)

    waiters = [asyncio.create_task(watcher.wait_for(lsn, 30)) for lsn in (150, 200, 300)]
    await asyncio.sleep(0)  # lets each task run up to its wait
    assert watcher.waiting == 3
    await _feed(watcher, 200)
    assert await waiters[0]
    assert await waiters[1]
    assert not waiters[2].done()
    assert watcher.waiting == 1
    watcher.advance(300)
    assert await waiters[2]
    assert watcher.waiting == 0


async def test_a_wait_that_times_out_leaves_nothing_behind() -> None:
    watcher = _watcher()
    assert not await watcher.wait_for(10, 0.01)
    assert watcher.waiting == 0
    task = asyncio.create_task(watcher.wait_for(10, 30))
    await asyncio.sleep(0)
    assert watcher.waiting == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert watcher.waiting == 0


async def test_the_checkpoint_read_from_redis_is_authoritative_even_when_lower() -> None:
    watcher = _watcher()
    watcher.advance(500)
    watcher.advance(20)  # the read models were rebuilt from scratch
    assert watcher.checkpoint == 20
    assert not await watcher.wait_for(500, 0)
    watcher.head = 5
    await _feed(watcher, 10)  # an older batch never moves it back
    assert watcher.checkpoint == 20


async def test_changes_reach_the_payer_and_the_payee_only() -> None:
    watcher = _watcher()
    alice = watcher.subscribe(ALICE, 10)
    bob = watcher.subscribe(BOB, 10)
    carol = watcher.subscribe(CAROL, 10)
    await _feed(watcher, 7, _view(1, ALICE, BOB))
    await _feed(watcher, 8, _view(2, BOB, BOB))
    watcher.close_streams()

    alice_changes = [change async for change in alice]
    bob_changes = [change async for change in bob]
    carol_changes = [change async for change in carol]
    assert [(c.view.payment_id[-1], c.lsn) for c in alice_changes] == [("1", 7)]
    assert [(c.view.payment_id[-1], c.lsn) for c in bob_changes] == [("1", 7), ("2", 8)]
    assert carol_changes == []
    assert watcher.checkpoint == 8


async def test_a_slow_subscriber_is_ended_without_growing_and_others_continue() -> None:
    watcher = _watcher()
    slow = watcher.subscribe(ALICE, 3)
    fast = watcher.subscribe(ALICE, 3)
    for lsn in range(1, 6):
        await _feed(watcher, lsn, _view(lsn, ALICE, BOB))
        if lsn <= 3:
            assert (await fast.__anext__()).lsn == lsn
    assert slow.ended
    with pytest.raises(WatchTooSlow) as raised:
        await slow.__anext__()
    assert raised.value.reason == "WATCH_TOO_SLOW"
    assert [c.lsn for c in await _drain(fast, 2)] == [4, 5]
    watcher.unsubscribe(slow)
    watcher.unsubscribe(fast)
    assert watcher.subscriptions == 0


async def test_shutdown_ends_open_streams_after_their_buffer_and_new_ones_at_once() -> None:
    watcher = _watcher()
    open_stream = watcher.subscribe(ALICE, 2)
    await _feed(watcher, 1, _view(1, ALICE, BOB))
    await _feed(watcher, 2, _view(2, ALICE, BOB))
    watcher.close_streams()
    assert [c.lsn async for c in open_stream] == [1, 2]
    late = watcher.subscribe(ALICE, 2)
    assert [c async for c in late] == []


class _SwallowingStream:
    """A change stream whose blocking read swallows a cancellation, as redis-py's asyncio client can."""

    name = "changes"

    def __init__(self) -> None:
        self.reading = asyncio.Event()
        self.swallowed = 0

    async def last_entry_then_checkpoint(self) -> tuple[None, StoredCheckpoint]:
        return None, StoredCheckpoint(0)

    async def checkpoint_then_last_id(self) -> tuple[StoredCheckpoint, bytes]:
        return StoredCheckpoint(0), b"0-0"

    async def read(self, after_id: bytes, count: int, block_ms: int) -> list[object]:
        self.reading.set()
        try:
            await asyncio.sleep(block_ms / 1000)
        except asyncio.CancelledError:
            if self.swallowed:
                raise  # only the first: so that a failing test can still end the reader
            self.swallowed += 1
        return []


async def test_stop_ends_the_reader_even_when_a_read_swallows_the_cancellation() -> None:
    stream = _SwallowingStream()
    watcher = ChangeWatcher(stream, block_ms=50)  # type: ignore[arg-type]
    await watcher.start()
    await stream.reading.wait()
    stopping = asyncio.create_task(watcher.stop())
    done, _ = await asyncio.wait({stopping}, timeout=10)
    if not done:
        assert watcher._task is not None
        watcher._task.cancel()
        await stopping
    assert done
    assert stream.swallowed == 1


async def test_missing_timelines_are_read_once_per_batch_for_watched_payments() -> None:
    calls: list[list[str]] = []
    entry = read_model_pb2.TimelineEntry(sequence=1, status=payment_pb2.PAYMENT_STATUS_APPROVED)

    async def timelines(ids: Iterable[str]) -> dict[str, list[read_model_pb2.TimelineEntry]]:
        calls.append(list(ids))
        return {payment_id: [entry] for payment_id in calls[-1]}

    watcher = ChangeWatcher(stream=None, timelines=timelines)  # type: ignore[arg-type]
    watcher.head = 1
    subscription = watcher.subscribe(ALICE, 10)
    await _feed(watcher, 3, _view(1, ALICE, BOB), _view(2, CAROL, BOB), _view(3, CAROL, ALICE))
    await _feed(watcher, 4, _view(4, CAROL, BOB))
    changes = await _drain(subscription, 2)
    assert calls == [[changes[0].view.payment_id, changes[1].view.payment_id]]
    assert all(list(c.view.timeline) == [entry] for c in changes)


def _broken(kind: str, head: int) -> read_model_pb2.ChangeBatch:
    """An entry that does not provably follow the entry at `head`."""
    view = _view(9, ALICE, BOB)
    if kind == "previous_differs":  # entries trimmed, or a segment applied without notification
        return read_model_pb2.ChangeBatch(
            checkpoint_lsn=head + 20, previous_checkpoint_lsn=head + 10, payments=[view]
        )
    if kind == "after_a_rebuild":
        return read_model_pb2.ChangeBatch(
            checkpoint_lsn=head + 20, previous_checkpoint_lsn=0, payments=[view]
        )
    if kind == "omits_payments":
        return read_model_pb2.ChangeBatch(
            checkpoint_lsn=head + 20, previous_checkpoint_lsn=head, omits_payments=True
        )
    assert kind == "moves_backwards"
    return read_model_pb2.ChangeBatch(checkpoint_lsn=head - 1, previous_checkpoint_lsn=head, payments=[view])


@pytest.mark.parametrize("kind", ["previous_differs", "after_a_rebuild", "omits_payments", "moves_backwards"])
async def test_an_entry_that_breaks_the_chain_ends_every_open_stream_after_what_it_buffered(
    kind: str,
) -> None:
    watcher = _watcher()
    alice, carol = watcher.subscribe(ALICE, 10), watcher.subscribe(CAROL, 10)
    await _feed(watcher, 5, _view(1, ALICE, BOB))
    waiting = asyncio.create_task(watcher.wait_for(30, 30))
    await asyncio.sleep(0)
    broken = _broken(kind, watcher.head)
    await watcher.apply(broken, b"6-0")

    assert (await alice.__anext__()).lsn == 5
    for subscription in (alice, carol):
        with pytest.raises(ContinuityLost) as raised:
            await subscription.__anext__()
        assert raised.value.reason == "WATCH_CONTINUITY_LOST"
    # The chain starts again at the entry that broke it; the checkpoint follows it on.
    assert (watcher.head, watcher.last_id) == (broken.checkpoint_lsn, b"6-0")
    later = watcher.subscribe(ALICE, 10)
    await _feed(watcher, 40, _view(2, ALICE, BOB))
    assert [c.lsn for c in await _drain(later, 1)] == [40]
    assert await waiting
    assert watcher.checkpoint == 40


async def test_an_unbroken_chain_ends_nothing() -> None:
    watcher = _watcher()
    alice = watcher.subscribe(ALICE, 10)
    await _feed(watcher, 5)
    await _feed(watcher, 5)  # an entry that did not move the checkpoint
    await _feed(watcher, 9, _view(1, ALICE, BOB))
    assert not alice.ended
    assert [c.lsn for c in await _drain(alice, 1)] == [9]


async def test_a_subscription_begins_after_the_entry_taken_in_last() -> None:
    watcher = _watcher()
    await _feed(watcher, 7)
    subscription = watcher.subscribe(ALICE, 10)
    assert (subscription.after_id, subscription.after_lsn) == (b"7-0", 7)


async def test_a_batch_larger_than_the_buffer_is_taken_whole_when_none_waits() -> None:
    """A client that keeps up is not ended by one large batch: the replicator catching up after a pause."""
    watcher = _watcher()
    subscription = watcher.subscribe(ALICE, 2)
    await _feed(watcher, 5, *(_view(n, ALICE, BOB) for n in range(1, 6)))
    assert not subscription.ended
    assert [c.view.payment_id[-1] for c in await _drain(subscription, 5)] == ["1", "2", "3", "4", "5"]
    # Read: the next large batch is taken whole too.
    await _feed(watcher, 6, *(_view(n, ALICE, BOB) for n in range(6, 9)))
    assert len(await _drain(subscription, 3)) == 3
    # One that arrives while another still waits overflows the buffer: the client is behind.
    await _feed(watcher, 7, *(_view(n, ALICE, BOB) for n in range(1, 4)))
    await _feed(watcher, 8, _view(9, ALICE, BOB))
    assert subscription.ended
    with pytest.raises(WatchTooSlow):
        await subscription.__anext__()


async def test_the_end_of_a_stream_never_splits_a_batch() -> None:
    watcher = _watcher()
    subscription = watcher.subscribe(ALICE, 2)
    await _feed(watcher, 2, _view(1, ALICE, BOB), _view(2, ALICE, BOB))
    first = await subscription.__anext__()
    await _feed(watcher, 3, _view(3, ALICE, BOB), _view(4, ALICE, BOB))
    await _feed(watcher, 4, _view(5, ALICE, BOB))  # overflows: the stream ends
    assert subscription.ended
    # The batch already begun is finished; the batches not begun are dropped.
    second = await subscription.__anext__()
    assert (first.lsn, second.lsn) == (2, 2)
    with pytest.raises(WatchTooSlow):
        await subscription.__anext__()


def _at(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromMicroseconds(int(seconds * 1e6))
    return stamp


async def test_the_read_models_age_follows_the_source_time_of_each_entry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_000.0)
    watcher = _watcher()
    assert math.isnan(watcher.read_model_age())  # nothing read yet: unknown, never 0

    async def feed(
        lsn: int,
        commit_time: timestamp_pb2.Timestamp | None = None,
        source_time: timestamp_pb2.Timestamp | None = None,
    ) -> None:
        batch = read_model_pb2.ChangeBatch(
            checkpoint_lsn=lsn,
            previous_checkpoint_lsn=watcher.head,
            commit_time=commit_time,
            source_time=source_time,
        )
        await watcher.apply(batch, f"{lsn}-0".encode())

    # A transaction: covered up to its commit.
    await feed(5, commit_time=_at(990), source_time=_at(990))
    assert watcher.read_model_age() == pytest.approx(10)
    # An idle advance or a heartbeat: no commit, a newer source time.
    await feed(5, source_time=_at(998))
    assert watcher.read_model_age() == pytest.approx(2)
    # An entry of a replicator that records no source time: its commit time stands for it.
    await feed(6, commit_time=_at(999))
    assert watcher.read_model_age() == pytest.approx(1)
    # An entry with neither says nothing new: the age keeps growing from the last known time.
    await feed(7)
    monkeypatch.setattr(time, "time", lambda: 1_030.0)
    assert watcher.read_model_age() == pytest.approx(31)
    # A host clock behind the source's never makes it negative.
    await feed(8, source_time=_at(1_031))
    assert watcher.read_model_age() == 0


class _CheckpointOnly:
    """A change stream without entries whose checkpoint covers the source up to `covered_until_us`."""

    name = "changes"

    def __init__(self, lsn: int, covered_until_us: int | None) -> None:
        self.checkpoint = StoredCheckpoint(lsn, covered_until_us)

    async def last_entry_then_checkpoint(self) -> tuple[None, StoredCheckpoint]:
        return None, self.checkpoint

    async def checkpoint_then_last_id(self) -> tuple[StoredCheckpoint, bytes]:
        return self.checkpoint, b"0-0"


async def test_the_read_models_age_follows_the_checkpoint_read_at_sync_and_after_idle_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "time", lambda: 1_000.0)
    stream = _CheckpointOnly(5, 980_000_000)
    watcher = ChangeWatcher(stream)  # type: ignore[arg-type]
    await watcher._sync()
    assert watcher.checkpoint == 5
    assert watcher.read_model_age() == pytest.approx(20)
    # The checkpoint renewed while no entry was read (a replicator that writes no notification).
    stream.checkpoint = StoredCheckpoint(5, 995_000_000)
    await watcher._check_idle()
    assert watcher.read_model_age() == pytest.approx(5)
    # Redis has no checkpoint any more (emptied): unknown again.
    stream.checkpoint = StoredCheckpoint(0)
    await watcher._check_idle()
    assert math.isnan(watcher.read_model_age())
