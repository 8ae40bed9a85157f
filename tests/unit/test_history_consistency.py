"""Read-your-writes without Redis: a read waits for its position on the watcher, within its deadline."""

from __future__ import annotations

import asyncio

import pytest

from history_svc.consistency import Consistency, ConsistencyNotReached
from history_svc.queries import CheckpointBehind, ReadModelUnavailable
from history_svc.watcher import ChangeWatcher
from tests.support.waiting import eventually


class Call:
    """A call with `remaining` seconds before its deadline (None: no deadline)."""

    def __init__(self, remaining: float | None) -> None:
        self.remaining = remaining

    def time_remaining(self) -> float | None:
        return self.remaining


def _consistency(checkpoint: int, wait_max_seconds: float = 5.0) -> tuple[Consistency, ChangeWatcher]:
    # The reader task is never started: the tests move the checkpoint by hand.
    watcher = ChangeWatcher(stream=None)  # type: ignore[arg-type]
    watcher.advance(checkpoint)
    watcher.connected = True
    return Consistency(watcher, wait_max_seconds), watcher


async def test_a_reached_position_answers_at_once_and_a_later_one_when_the_watcher_gets_there() -> None:
    consistency, watcher = _consistency(100)
    assert await consistency.reach(100, Call(None)) == 100
    waiting = asyncio.create_task(consistency.reach(150, Call(10.0)))
    await asyncio.sleep(0)
    assert not waiting.done()
    watcher.advance(150)
    assert await waiting == 150


async def test_a_position_not_reached_within_the_budget_is_consistency_not_reached() -> None:
    consistency, _ = _consistency(100, wait_max_seconds=0.05)
    with pytest.raises(ConsistencyNotReached) as refusal:
        await consistency.reach(101, Call(None))
    assert refusal.value.reason == "CONSISTENCY_NOT_REACHED"
    assert set(refusal.value.metadata) == {"min_lsn", "checkpoint_lsn"}
    # Within 10% of the deadline there is no time left to wait at all.
    with pytest.raises(ConsistencyNotReached):
        await consistency.reach(101, Call(0.01))


async def test_without_redis_a_wait_that_fails_is_read_model_unavailable() -> None:
    consistency, watcher = _consistency(100, wait_max_seconds=0.01)
    watcher.connected = False
    with pytest.raises(ReadModelUnavailable):
        await consistency.reach(101, Call(None))


async def test_a_read_that_found_redis_behind_its_position_is_consistency_not_reached() -> None:
    consistency, _ = _consistency(100)

    async def behind() -> bytes:
        raise CheckpointBehind(40)

    async def answered() -> bytes:
        return b"view"

    assert await consistency.read(answered(), 100) == b"view"
    with pytest.raises(ConsistencyNotReached) as refusal:
        await consistency.read(behind(), 100)
    assert refusal.value.reason == "CONSISTENCY_NOT_REACHED"


class ClusterReads:
    """A cluster read whose masters' checkpoints the test sets: below `min_lsn` it is CheckpointBehind."""

    def __init__(self, checkpoints: list[int]) -> None:
        self.checkpoints = checkpoints  # one per read, the last one repeated
        self.reads = 0
        self.refreshes = 0

    async def read(self, min_lsn: int) -> bytes:
        checkpoint = self.checkpoints[min(self.reads, len(self.checkpoints) - 1)]
        self.reads += 1
        if checkpoint < min_lsn:
            raise CheckpointBehind(checkpoint)
        return b"view"

    async def refresh(self) -> None:
        self.refreshes += 1


def _cluster(
    checkpoint: int, reads: ClusterReads, wait_max_seconds: float = 5.0
) -> tuple[Consistency, ChangeWatcher]:
    watcher = ChangeWatcher(stream=None)  # type: ignore[arg-type]
    watcher.advance(checkpoint)
    watcher.connected = True
    return Consistency(watcher, wait_max_seconds, reads.refresh), watcher


async def test_on_a_cluster_a_master_at_the_token_answers_before_the_slots_checkpoint_gets_there() -> None:
    reads = ClusterReads([150])
    consistency, watcher = _cluster(100, reads)
    assert await consistency.answer(lambda until: reads.read(150), 150, Call(10.0)) == b"view"
    assert (reads.reads, reads.refreshes, watcher.waiting) == (1, 0, 0)


async def test_on_a_cluster_a_master_behind_is_read_again_once_the_slots_checkpoint_passed_the_token() -> (
    None
):
    reads = ClusterReads([100, 150])
    consistency, watcher = _cluster(100, reads)
    answer = asyncio.create_task(consistency.answer(lambda until: reads.read(150), 150, Call(10.0)))
    await eventually(lambda: watcher.waiting == 1, 5, "the read waiting on the watcher")
    assert reads.reads == 1
    watcher.advance(150)
    assert await answer == b"view"
    assert (reads.reads, reads.refreshes) == (2, 0)


async def test_on_a_cluster_a_master_still_behind_is_read_on_a_refreshed_topology_then_refused() -> None:
    reads = ClusterReads([100, 100, 150])
    consistency, _ = _cluster(200, reads)
    assert await consistency.answer(lambda until: reads.read(150), 150, Call(10.0)) == b"view"
    assert (reads.reads, reads.refreshes) == (3, 1)
    behind = ClusterReads([100])
    consistency, _ = _cluster(200, behind)
    with pytest.raises(ConsistencyNotReached) as refusal:
        await consistency.answer(lambda until: behind.read(150), 150, Call(10.0))
    assert refusal.value.reason == "CONSISTENCY_NOT_REACHED"
    assert (behind.reads, behind.refreshes) == (3, 1)


async def test_on_a_cluster_a_slots_checkpoint_not_reached_in_time_is_consistency_not_reached() -> None:
    reads = ClusterReads([100])
    consistency, _ = _cluster(100, reads, wait_max_seconds=0.05)
    with pytest.raises(ConsistencyNotReached):
        await consistency.answer(lambda until: reads.read(150), 150, Call(None))
    assert (reads.reads, reads.refreshes) == (1, 0)
