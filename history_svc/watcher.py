"""The one change watcher per process: follows the replicator's change stream for every request."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final

from opentelemetry.trace import SpanContext
from prometheus_client import Counter, Gauge, Histogram

from history_svc.changestream import Change, ChangeStream, Entry, StoredCheckpoint, stream_id
from history_svc.queries import REDIS_ERRORS
from payments.readmodel.v1 import read_model_pb2
from payments_common import tracing
from payments_common.errors import Aborted, ResourceExhausted, ServiceError
from payments_common.metrics import CHANGE_DELAY_BUCKETS

log = logging.getLogger(__name__)

CHECKPOINT_LSN = Gauge(
    "history_checkpoint_lsn", "The replicator's applied WAL position, as this process knows it."
)
# Labelled as the replicator labels its series (replicator/metrics.py): the read-model version
# this process serves, HISTORY_SLOT_NAME and HISTORY_KEY_NAMESPACE (history_svc/server.py).
READ_MODEL_AGE = Gauge(
    "history_read_model_age_seconds",
    "Seconds since the source time up to which the read models cover the source, as this process "
    "last read their checkpoint; NaN until it knows one.",
    ["slot", "key_namespace"],
)
BATCHES = Counter("history_change_batches_total", "Change batches read from the change stream.")
APPLY_TO_WATCH = Histogram(
    "history_apply_to_watch_seconds",
    "Seconds from Redis appending a change-stream entry (the time in its id, Redis's clock) to this "
    "process handing the entry's changes to its WatchPayments streams (this host's clock); "
    "observed for every entry read, watched or not.",
    buckets=CHANGE_DELAY_BUCKETS,
)
WATCHER_ERRORS = Counter("history_watcher_errors_total", "Failed reads of the change stream.")
WATCH_STREAMS = Gauge("history_watch_streams", "Open WatchPayments streams.")
WATCH_TOO_SLOW = Counter(
    "history_watch_too_slow_total", "WatchPayments streams ended because the client lagged."
)
CONTINUITY_LOST = Counter(
    "history_watch_continuity_lost_total",
    "Times the change stream could not be shown continuous; the open WatchPayments streams ended.",
)

# The traced transactions a process remembers (the latest), and the links one read makes at most.
TRACED_KEPT: Final = 4096
MAX_LINKS: Final = 16


@dataclass(frozen=True)
class TracedApply:
    """A traced source transaction as the change stream announced it: the span that applied it."""

    commit_lsn: int
    context: SpanContext
    payment_ids: tuple[str, ...]


# Fetches the timelines of payments whose views in a batch have none.
TimelineReader = Callable[[Iterable[str]], Awaitable[dict[str, list[read_model_pb2.TimelineEntry]]]]


class WatchTooSlow(ResourceExhausted):
    def __init__(self) -> None:
        super().__init__("WATCH_TOO_SLOW", "the client read the stream too slowly; watch again")


class ContinuityLost(Aborted):
    """The watcher cannot prove that it saw every change in order: a stream must not go on silently."""

    def __init__(self) -> None:
        super().__init__(
            "WATCH_CONTINUITY_LOST",
            "changes may have been missed; list the account's payments, then watch again",
        )


_SHUTDOWN: Final = object()


class Subscription:
    """One WatchPayments stream's bounded buffer of changes, one group per change batch.

    A batch's changes are offered, and taken, together: an end (shutdown, WATCH_TOO_SLOW,
    WATCH_CONTINUITY_LOST) comes between two batches, never inside one, so the last token a
    client saw before an end covers every change it received with that token. When the buffer
    would overflow while batches still wait in it, the stream ends with WATCH_TOO_SLOW instead
    of growing: the buffered batches are dropped, so memory stays bounded. A batch that
    arrives when none waits is taken whole, however large: a client that keeps up is not
    ended by one large batch (a transaction of many payments, the first batch of a catch-up);
    what is held stays below the buffer plus two batches, which the replicator bounds
    (REPLICATOR_BATCH_MAX_CHANGES and the transaction that crosses it).

    `after_id` and `after_lsn` are the change stream entry (and its checkpoint) that the
    watcher had taken in when the subscription began: every later entry is offered to it.
    """

    def __init__(self, account_id: str, maxsize: int, after_id: bytes | None, after_lsn: int) -> None:
        self.account_id = account_id
        self.after_id = after_id
        self.after_lsn = after_lsn
        self._limit = maxsize
        self._groups: deque[list[Change]] = deque()
        self._size = 0
        self._current: deque[Change] = deque()
        self._end: object | ServiceError | None = None
        self._wakeup = asyncio.Event()
        self.ended = False

    def offer(self, changes: list[Change]) -> None:
        if self.ended or not changes:
            return
        if self._size and self._size + len(changes) > self._limit:
            WATCH_TOO_SLOW.inc()
            self._groups.clear()
            self._size = 0
            self._finish(WatchTooSlow())
            return
        self._groups.append(changes)
        self._size += len(changes)
        self._wakeup.set()

    def shutdown(self) -> None:
        """Ends the stream cleanly after the changes already buffered."""
        self._finish(_SHUTDOWN)

    def lose_continuity(self) -> None:
        """Ends the stream with WATCH_CONTINUITY_LOST after the changes already buffered."""
        self._finish(ContinuityLost())

    def _finish(self, end: object) -> None:
        if not self.ended:
            self.ended = True
            self._end = end
            self._wakeup.set()

    def __aiter__(self) -> AsyncIterator[Change]:
        return self

    async def __anext__(self) -> Change:
        while True:
            if self._current:
                return self._current.popleft()
            if self._groups:
                group = self._groups.popleft()
                self._size -= len(group)
                self._current.extend(group)
                continue
            if self._end is _SHUTDOWN:
                raise StopAsyncIteration
            if isinstance(self._end, ServiceError):
                raise self._end
            self._wakeup.clear()
            await self._wakeup.wait()


class ChangeWatcher:
    """Follows the change stream; keeps the checkpoint, wakes waiters and feeds subscriptions.

    A single task blocks on the stream (XREAD BLOCK, through history_svc/changestream.py).
    Each entry moves the in-process checkpoint, which wakes the requests waiting for a
    consistency token, and is fanned out to the WatchPayments streams of the payer and the
    payee. Requests never poll Redis themselves, so the waiting costs Redis nothing per request.

    It also proves that it saw every entry in order: each ChangeBatch names the checkpoint it
    moved from (`previous_checkpoint_lsn`), which must be the checkpoint of the entry taken in
    before it (`head`). When that chain breaks (entries trimmed before they were read, Redis
    lost data or was rebuilt, a batch applied without notification), when a batch omits
    payments, or when Redis's checkpoint moves without an entry to show for it, every open
    WatchPayments stream ends with WATCH_CONTINUITY_LOST. The checkpoint, and so the
    consistency waits, keep following Redis through all of it.
    """

    def __init__(
        self,
        stream: ChangeStream,
        timelines: TimelineReader | None = None,
        block_ms: int = 1000,
        batch_count: int = 128,
        retry_seconds: float = 0.5,
    ) -> None:
        self._stream = stream
        self._timelines = timelines
        self._block_ms = block_ms
        self._batch_count = batch_count
        self._retry_seconds = retry_seconds
        self.checkpoint = 0
        # The source time that the checkpoint covers (Unix microseconds; None: unknown).
        self.covered_until_us: int | None = None
        self.connected = False
        # The entry taken in last and its checkpoint: the position that the next entry must name.
        self.last_id: bytes | None = None
        self.head = 0
        self.synced = asyncio.Event()
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._subscriptions: dict[str, set[Subscription]] = {}
        self._closing = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        # The traced transactions seen last, oldest first: what a read that waited links to.
        self.traced: deque[TracedApply] = deque(maxlen=TRACED_KEPT)

    # -- consistency waits -------------------------------------------------

    def advance(self, lsn: int) -> None:
        """Sets the known checkpoint and wakes every waiter it satisfies.

        The value read from Redis is authoritative, even when lower: a read model
        rebuilt from scratch must not answer tokens it does not include yet.
        """
        self.checkpoint = lsn
        CHECKPOINT_LSN.set(lsn)
        while self._waiters and self._waiters[0][0] <= lsn:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)

    def read_model_age(self) -> float:
        """Seconds from the source time the checkpoint covers to now (this host's clock); NaN when unknown.

        Computed when asked (at each scrape) from what the watcher last took in: every entry
        of the change stream carries it, and the checkpoint read after each idle wait. It
        grows while nothing renews it: a replicator that is stopped, stuck or behind. A
        replicator that is caught up renews it even when the source writes nothing
        (replicator/runner.py, HEARTBEAT_INTERVAL_SECONDS). Never below 0: a clock behind the
        source's would otherwise make it negative.
        """
        covered = self.covered_until_us
        if covered is None:
            return math.nan
        return max(0.0, time.time() - covered / 1e6)

    def _covers(self, stored: StoredCheckpoint) -> None:
        self.covered_until_us = stored.covered_until_us
        self.advance(stored.lsn)

    async def wait_for(self, lsn: int, within_seconds: float) -> bool:
        """Whether the checkpoint reaches `lsn` within `within_seconds`."""
        if self.checkpoint >= lsn:
            return True
        if within_seconds <= 0:
            return False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (lsn, next(self._order), future)
        heapq.heappush(self._waiters, entry)
        try:
            await asyncio.wait_for(future, within_seconds)
            return True
        except TimeoutError:
            return False
        finally:
            if not future.done() or future.cancelled():
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                    heapq.heapify(self._waiters)

    async def wait_synced(self, within_seconds: float) -> bool:
        """Whether the watcher has found its place in the change stream within `within_seconds`."""
        if self.synced.is_set():
            return True
        try:
            await asyncio.wait_for(self.synced.wait(), within_seconds)
        except TimeoutError:
            return False
        return True

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    # -- subscriptions -----------------------------------------------------

    def subscribe(self, account_id: str, maxsize: int) -> Subscription:
        """A subscription to every entry after the one taken in last (`head`, `last_id`)."""
        subscription = Subscription(account_id, maxsize, self.last_id, self.head)
        if self._closing:
            subscription.shutdown()
            return subscription
        self._subscriptions.setdefault(account_id, set()).add(subscription)
        WATCH_STREAMS.inc()
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        subscribers = self._subscriptions.get(subscription.account_id)
        if subscribers is None or subscription not in subscribers:
            return
        subscribers.discard(subscription)
        WATCH_STREAMS.dec()
        if not subscribers:
            del self._subscriptions[subscription.account_id]

    @property
    def subscriptions(self) -> int:
        return sum(len(subscribers) for subscribers in self._subscriptions.values())

    def close_streams(self) -> None:
        """Ends every WatchPayments stream, and the ones opened from now on (shutdown)."""
        self._closing = True
        for subscribers in self._subscriptions.values():
            for subscription in subscribers:
                subscription.shutdown()

    def lose_continuity(self, why: str, *args: object) -> None:
        """Ends every open WatchPayments stream with WATCH_CONTINUITY_LOST; later ones start afresh."""
        streams = 0
        for subscribers in self._subscriptions.values():
            for subscription in subscribers:
                if not subscription.ended:
                    subscription.lose_continuity()
                    streams += 1
        CONTINUITY_LOST.inc()
        log.warning("change stream continuity lost (%s); %d watch streams ended", why % args, streams)

    def _check_chain(self, batch: read_model_pb2.ChangeBatch) -> None:
        """Ends the open streams unless `batch` provably follows the entry taken in before it."""
        previous = batch.previous_checkpoint_lsn
        if batch.omits_payments:
            self.lose_continuity("batch at %s omits payments", batch.checkpoint_lsn)
        elif previous == 0:
            self.lose_continuity("batch at %s follows no checkpoint (a rebuild)", batch.checkpoint_lsn)
        elif previous != self.head:
            self.lose_continuity(
                "batch at %s moved from %s, the entry before it ended at %s",
                batch.checkpoint_lsn,
                previous,
                self.head,
            )
        elif batch.checkpoint_lsn < previous:
            self.lose_continuity("batch at %s moved back from %s", batch.checkpoint_lsn, previous)

    async def apply(self, batch: read_model_pb2.ChangeBatch, entry_id: bytes) -> None:
        """Takes in one entry: checks the chain, fans its payments out, then moves the checkpoint.

        Everything up to the fan-out target list happens before the first await, so that a
        subscription begun at any moment gets exactly the entries after `last_id`.
        """
        BATCHES.inc()
        self._check_chain(batch)
        self.head = batch.checkpoint_lsn
        self.last_id = entry_id
        traces = self._take_traced(batch) if batch.traced else None
        targets: list[tuple[read_model_pb2.PaymentView, list[Subscription]]] = []
        for view in batch.payments:
            subscribers = [
                subscription
                for subscription in (
                    *self._subscriptions.get(view.payer_account_id, ()),
                    *(
                        self._subscriptions.get(view.payee_account_id, ())
                        if view.payee_account_id != view.payer_account_id
                        else ()
                    ),
                )
                if not subscription.ended
            ]
            if subscribers:
                targets.append((view, subscribers))
        missing = [view.payment_id for view, _ in targets if not view.timeline]
        if missing and self._timelines is not None:
            try:
                found = await self._timelines(missing)
            except Exception as error:  # a stream without a timeline beats no stream
                log.warning("could not read timelines for watchers: %s", error)
                found = {}
            for view, _ in targets:
                if not view.timeline and view.payment_id in found:
                    view.timeline.extend(found[view.payment_id])
        # One subscription watches one account, so a group's order is the account's order.
        groups: dict[Subscription, list[Change]] = {}
        for view, subscribers in targets:
            for subscription in subscribers:
                group = groups.setdefault(subscription, [])
                trace = traces.get(view.payment_id) if traces else None
                group.append(Change(view, batch.checkpoint_lsn, entry_id, len(group), trace))
        for subscription, changes in groups.items():
            subscription.offer(changes)
        APPLY_TO_WATCH.observe(max(0.0, time.time() - stream_id(entry_id)[0] / 1000))
        if batch.HasField("source_time") or batch.HasField("commit_time"):
            covered = batch.source_time if batch.HasField("source_time") else batch.commit_time
            self.covered_until_us = covered.ToMicroseconds()
        if batch.checkpoint_lsn > self.checkpoint:
            self.advance(batch.checkpoint_lsn)

    def _take_traced(self, batch: read_model_pb2.ChangeBatch) -> dict[str, SpanContext]:
        """Keeps the batch's traced transactions; returns the span that applied each of their payments."""
        traces: dict[str, SpanContext] = {}
        for traced in batch.traced:
            context = tracing.parse_traceparent(traced.traceparent)
            if context is None:
                continue
            self.traced.append(TracedApply(traced.commit_lsn, context, tuple(traced.payment_ids)))
            for payment_id in traced.payment_ids:
                traces[payment_id] = context
        return traces

    def traced_up_to(self, lsn: int, trace_id: int, payment_id: str = "") -> list[SpanContext]:
        """The spans that applied traced transactions up to `lsn` of trace `trace_id`, or that changed `payment_id`.

        Of those still kept (TRACED_KEPT), newest first; the payment's latest change only.
        """
        found: list[SpanContext] = []
        payment_seen = not payment_id
        for traced in reversed(self.traced):
            if traced.commit_lsn > lsn:
                continue
            changed_payment = not payment_seen and payment_id in traced.payment_ids
            if traced.context.trace_id == trace_id or changed_payment:
                found.append(traced.context)
            if changed_payment:
                payment_seen = True
            if len(found) >= MAX_LINKS:
                break
        return found

    # -- the stream reader -------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="change-watcher")

    async def stop(self) -> None:
        self.close_streams()
        # redis-py's asyncio client can lose a cancellation (one that lands as a command is
        # sent, through Python 3.11's asyncio.wait_for), and the loop would then go on for
        # ever: the flag ends it at its next turn, one block later at most.
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _sync(self) -> None:
        """Reads the stream's last entry, then the checkpoint, to follow the stream after that entry.

        In this order a batch published in between is read again from the stream rather
        than missed. Streams open before a sync cannot be shown to have missed nothing, so
        they end.
        """
        last, checkpoint = await self._stream.last_entry_then_checkpoint()
        if self.subscriptions:
            self.lose_continuity("the watcher started over")
        if last is not None:
            self.last_id = last.id
            self.head = last.batch.checkpoint_lsn if last.batch is not None else checkpoint.lsn
        else:
            self.last_id = b"0-0"
            self.head = checkpoint.lsn
        self._covers(checkpoint)
        self.synced.set()

    async def _check_idle(self) -> None:
        """After an idle wait: follows Redis's checkpoint, and checks that no entry went missing.

        The checkpoint is read before the stream's last entry. A batch moves both at once, so
        a checkpoint other than `head` with no unread entry after it means that the checkpoint
        moved without an entry that this watcher can read: Redis lost data or was restored
        (backwards), or entries were trimmed or never written (forwards).
        """
        stored, last_id = await self._stream.checkpoint_then_last_id()
        self._covers(stored)
        checkpoint = stored.lsn
        assert self.last_id is not None
        if stream_id(last_id) > stream_id(self.last_id):
            return  # entries to read: the next XREAD takes them
        if checkpoint != self.head:
            self.lose_continuity(
                "Redis's checkpoint is %s with no entry after the one at %s", checkpoint, self.head
            )
            self.head = checkpoint
            self.last_id = last_id

    async def _run(self) -> None:
        stream = self._stream.name
        while not self._stopping:
            try:
                if self.last_id is None:
                    await self._sync()
                elif not self.connected:
                    await self._check_idle()
                assert self.last_id is not None
                if not self.connected:
                    log.info("following the change stream %s from %s", stream, self.last_id.decode())
                    self.connected = True
                entries = await self._stream.read(self.last_id, self._batch_count, self._block_ms)
                if not entries:
                    await self._check_idle()
                    continue
                for entry in entries:
                    await self._apply_entry(entry)
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as error:
                WATCHER_ERRORS.inc()
                if self.connected:
                    log.warning("change stream read failed, retrying: %s", error)
                self.connected = False
                await asyncio.sleep(self._retry_seconds)
            except Exception:
                # Never let the one watcher die: every consistency wait of the process depends on it.
                WATCHER_ERRORS.inc()
                log.exception("change watcher failed; resynchronizing")
                self.connected = False
                self.last_id = None
                await asyncio.sleep(self._retry_seconds)

    async def _apply_entry(self, entry: Entry) -> None:
        if entry.batch is None:
            # Unreadable: what it changed is unknown, so no stream can go on past it.
            self.last_id = entry.id
            self.lose_continuity("entry %s is not a ChangeBatch", entry.id.decode())
            return
        await self.apply(entry.batch, entry.id)
