"""Read-your-writes: a read waits, within its deadline, until the read models include its position."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import Protocol, TypeVar

from prometheus_client import Counter

from history_svc.queries import CheckpointBehind, ReadModelUnavailable
from history_svc.watcher import ChangeWatcher
from payments_common import tracing
from payments_common.errors import Unavailable
from payments_common.lsn import format_lsn

T = TypeVar("T")

CONSISTENCY_READS = Counter(
    "history_consistency_reads_total",
    "Reads with a consistency token, by outcome: at once, after waiting, or not reached.",
    ["outcome"],
)


class Deadline(Protocol):
    """What a wait needs of its call: the seconds left before the deadline (None: no deadline)."""

    def time_remaining(self) -> float | None: ...


class ConsistencyNotReached(Unavailable):
    """The read models do not include the position within the wait; the call can be retried."""

    def __init__(self, lsn: int, checkpoint: int) -> None:
        super().__init__(
            "CONSISTENCY_NOT_REACHED",
            "the read models do not include the requested write yet; retry later",
            {"min_lsn": format_lsn(lsn), "checkpoint_lsn": format_lsn(checkpoint)},
        )


def consistency_budget(time_remaining: float | None, cap: float) -> float:
    """How long a read may wait for its token: the cap, or less when the deadline is nearer.

    A margin before the deadline leaves time for the failure to reach the client as
    CONSISTENCY_NOT_REACHED rather than as the client's own DEADLINE_EXCEEDED.
    """
    if time_remaining is None:
        return cap
    margin = min(0.25, max(0.05, time_remaining * 0.1))
    return max(0.0, min(cap, time_remaining - margin))


class Consistency:
    """Waits on the process's one change watcher, so that a waiting read costs Redis nothing.

    `refresh` is given on a Redis Cluster: it reads the cluster's topology again (a master's
    lowest slot, which names its checkpoint, may have moved). There a read with a token reads
    first (see `answer`).
    """

    def __init__(
        self,
        watcher: ChangeWatcher,
        wait_max_seconds: float,
        refresh: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._watcher = watcher
        self._wait_max_seconds = wait_max_seconds
        self._refresh = refresh

    def budget(self, call: Deadline) -> float:
        return consistency_budget(call.time_remaining(), self._wait_max_seconds)

    async def reach(self, lsn: int, call: Deadline, payment_id: str = "") -> int:
        """Waits until the known checkpoint reaches `lsn`; returns it.

        ReadModelUnavailable when the watcher has lost Redis, else ConsistencyNotReached.
        Traced, the wait is a span that links to the replicator's spans of the traced
        transactions it waited for: those of the caller's trace, and the last that changed
        `payment_id`.
        """
        if not tracing.active():
            return await self._reach(lsn, call)
        with tracing.span("wait for consistency", {"db.consistency_lsn": format_lsn(lsn)}) as span:
            reached = await self._reach(lsn, call)
            if span is not None and span.is_recording():
                trace_id = span.get_span_context().trace_id
                for context in self._watcher.traced_up_to(lsn, trace_id, payment_id):
                    span.add_link(context)
            return reached

    async def _reach(self, lsn: int, call: Deadline) -> int:
        if self._watcher.checkpoint >= lsn:
            CONSISTENCY_READS.labels("immediate").inc()
            return lsn
        if await self._watcher.wait_for(lsn, self.budget(call)):
            CONSISTENCY_READS.labels("waited").inc()
            return lsn
        CONSISTENCY_READS.labels("not_reached").inc()
        if not self._watcher.connected:
            raise ReadModelUnavailable()
        raise ConsistencyNotReached(lsn, self._watcher.checkpoint)

    async def answer(
        self, read: Callable[[float], Awaitable[T]], lsn: int, call: Deadline, payment_id: str = ""
    ) -> T:
        """The answer of `read(until)`, a read that raises CheckpointBehind below `lsn` (0: no token).

        On one node: waits for `lsn` on the watcher, then reads once (`reach`, then `read`).
        On a Redis Cluster a read checks the checkpoints of the masters it read, which move
        before the slot's checkpoint (that one moves once every master has the batch): it
        reads first and answers at once when those are at `lsn`; else it waits for the slot's
        checkpoint on the watcher and reads again; a master still behind then may mean that
        the topology moved, so it is read once more on a refreshed topology; still behind,
        CONSISTENCY_NOT_REACHED. `until` bounds a cluster read's retries while a master fails
        over: the same budget as a wait.
        """
        if self._refresh is None:
            if lsn:
                await self.reach(lsn, call, payment_id)
            return await self.read(read(0.0), lsn)
        until = time.monotonic() + self.budget(call)
        if not lsn:
            return await read(until)
        try:
            answered = await read(until)
        except CheckpointBehind:
            pass
        else:
            CONSISTENCY_READS.labels("immediate").inc()
            return answered
        await self.reach(lsn, call, payment_id)
        try:
            return await read(until)
        except CheckpointBehind:
            CONSISTENCY_READS.labels("behind_in_redis").inc()
        await self._refresh()
        return await self.read(read(until), lsn)

    @staticmethod
    async def read(read: Awaitable[T], min_lsn: int) -> T:
        """Runs a read that checked Redis's checkpoint; below `min_lsn` it is CONSISTENCY_NOT_REACHED."""
        try:
            return await read
        except CheckpointBehind as behind:
            CONSISTENCY_READS.labels("behind_in_redis").inc()
            raise ConsistencyNotReached(min_lsn, behind.checkpoint) from None

    async def synced(self, call: Deadline) -> None:
        """Waits until the watcher has found its place in the change stream; ReadModelUnavailable if it does not."""
        if not await self._watcher.wait_synced(self.budget(call)):
            raise ReadModelUnavailable()

    async def reach_head(self, lsn: int, call: Deadline) -> None:
        """Waits until the watcher has taken in the change-stream entry at `lsn` (a watch's start)."""
        if self._watcher.head < lsn:
            await self.reach(lsn, call)
            if self._watcher.head < lsn:
                raise ConsistencyNotReached(lsn, self._watcher.head)
