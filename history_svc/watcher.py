"""The one change watcher per process: follows the replicator's change stream for every request.

A single task blocks on the stream (XREAD BLOCK). Each entry moves the in-process
checkpoint, which wakes the requests waiting for a consistency token, and is fanned out
to the WatchPayments streams of the payer and the payee. Requests never poll Redis
themselves, so the waiting costs Redis nothing per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

from google.protobuf.message import DecodeError
from prometheus_client import Counter, Gauge
from redis.asyncio import Redis

from history_svc.queries import REDIS_ERRORS
from payments.readmodel.v1 import read_model_pb2
from payments_common.errors import ResourceExhausted
from payments_common.keys import CHECKPOINT_LSN_FIELD, STREAM_BATCH_FIELD, KeySchema

log = logging.getLogger(__name__)

CHECKPOINT_LSN = Gauge(
    "history_checkpoint_lsn", "The replicator's applied WAL position, as this process knows it."
)
BATCHES = Counter("history_change_batches_total", "Change batches read from the change stream.")
WATCHER_ERRORS = Counter("history_watcher_errors_total", "Failed reads of the change stream.")
WATCH_STREAMS = Gauge("history_watch_streams", "Open WatchPayments streams.")
WATCH_TOO_SLOW = Counter(
    "history_watch_too_slow_total", "WatchPayments streams ended because the client lagged."
)

# Fetches the timelines of payments whose views in a batch have none.
TimelineReader = Callable[[Iterable[str]], Awaitable[dict[str, list[read_model_pb2.TimelineEntry]]]]


@dataclass(frozen=True)
class Change:
    """A payment's new view and the checkpoint at which it became visible."""

    view: read_model_pb2.PaymentView
    lsn: int


class WatchTooSlow(ResourceExhausted):
    def __init__(self) -> None:
        super().__init__("WATCH_TOO_SLOW", "the client read the stream too slowly; watch again")


_SHUTDOWN: Final = object()
_TOO_SLOW: Final = object()


class Subscription:
    """One WatchPayments stream's bounded buffer of changes.

    When the buffer is full the stream is ended with WATCH_TOO_SLOW instead of growing:
    the buffer is cleared and an end marker takes its place, so memory stays bounded.
    """

    def __init__(self, account_id: str, maxsize: int) -> None:
        self.account_id = account_id
        self._queue: asyncio.Queue[Change | object] = asyncio.Queue(maxsize=maxsize + 1)
        self._limit = maxsize
        self.ended = False

    def offer(self, change: Change) -> None:
        if self.ended:
            return
        if self._queue.qsize() >= self._limit:
            WATCH_TOO_SLOW.inc()
            self._end(_TOO_SLOW)
            return
        self._queue.put_nowait(change)

    def shutdown(self) -> None:
        """Ends the stream cleanly after the changes already buffered."""
        if not self.ended:
            self.ended = True
            self._queue.put_nowait(_SHUTDOWN)  # the extra slot is kept for this marker

    def _end(self, marker: object) -> None:
        self.ended = True
        while not self._queue.empty():
            self._queue.get_nowait()
        self._queue.put_nowait(marker)

    def __aiter__(self) -> AsyncIterator[Change]:
        return self

    async def __anext__(self) -> Change:
        item = await self._queue.get()
        if item is _SHUTDOWN:
            raise StopAsyncIteration
        if item is _TOO_SLOW:
            raise WatchTooSlow()
        assert isinstance(item, Change)
        return item


class ChangeWatcher:
    """Follows the change stream; keeps the checkpoint, wakes waiters and feeds subscriptions."""

    def __init__(
        self,
        redis: Redis,
        keys: KeySchema,
        slot: str,
        timelines: TimelineReader | None = None,
        block_ms: int = 1000,
        batch_count: int = 128,
        retry_s: float = 0.5,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._slot = slot
        self._timelines = timelines
        self._block_ms = block_ms
        self._batch_count = batch_count
        self._retry_s = retry_s
        self.checkpoint = 0
        self.connected = False
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()
        self._subscriptions: dict[str, set[Subscription]] = {}
        self._closing = False
        self._task: asyncio.Task[None] | None = None

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

    async def wait_for(self, lsn: int, within_s: float) -> bool:
        """Whether the checkpoint reaches `lsn` within `within_s` seconds."""
        if self.checkpoint >= lsn:
            return True
        if within_s <= 0:
            return False
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (lsn, next(self._order), future)
        heapq.heappush(self._waiters, entry)
        try:
            await asyncio.wait_for(future, within_s)
            return True
        except TimeoutError:
            return False
        finally:
            if not future.done() or future.cancelled():
                with contextlib.suppress(ValueError):
                    self._waiters.remove(entry)
                    heapq.heapify(self._waiters)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    # -- subscriptions -----------------------------------------------------

    def subscribe(self, account_id: str, maxsize: int) -> Subscription:
        subscription = Subscription(account_id, maxsize)
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

    async def apply(self, batch: read_model_pb2.ChangeBatch) -> None:
        """Fans a batch's payments out to their accounts' subscribers, then moves the checkpoint."""
        BATCHES.inc()
        targets: list[tuple[read_model_pb2.PaymentView, list[Subscription]]] = []
        for view in batch.payments:
            subscribers = [
                *self._subscriptions.get(view.payer_account_id, ()),
                *(
                    self._subscriptions.get(view.payee_account_id, ())
                    if view.payee_account_id != view.payer_account_id
                    else ()
                ),
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
        for view, subscribers in targets:
            change = Change(view=view, lsn=batch.checkpoint_lsn)
            for subscription in subscribers:
                subscription.offer(change)
        if batch.checkpoint_lsn > self.checkpoint:
            self.advance(batch.checkpoint_lsn)

    # -- the stream reader -------------------------------------------------

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="change-watcher")

    async def stop(self) -> None:
        self.close_streams()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _sync(self) -> bytes:
        """Reads the stream's last entry id, then the checkpoint, to follow the stream after that entry.

        In this order a batch published in between is read again from the stream rather
        than missed. No MULTI: the service's Redis user may only read.
        """
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xrevrange(self._keys.changes(), count=1)
            pipe.hget(self._keys.checkpoint(self._slot), CHECKPOINT_LSN_FIELD)
            last, raw_lsn = await pipe.execute()
        self.advance(int(raw_lsn) if raw_lsn is not None else 0)
        return bytes(last[0][0]) if last else b"0-0"

    async def _refresh_checkpoint(self) -> None:
        raw = await self._redis.hget(self._keys.checkpoint(self._slot), CHECKPOINT_LSN_FIELD)
        self.advance(int(raw) if raw is not None else 0)

    async def _run(self) -> None:
        stream = self._keys.changes()
        last_id: bytes | None = None
        while True:
            try:
                if last_id is None:
                    last_id = await self._sync()
                elif not self.connected:
                    await self._refresh_checkpoint()
                if not self.connected:
                    log.info("following the change stream %s from %s", stream, last_id.decode())
                    self.connected = True
                reply: Any = await self._redis.xread(
                    {stream: last_id}, count=self._batch_count, block=self._block_ms
                )
                if not reply:
                    # Idle: the checkpoint may still have moved (a trimmed stream, a missed entry).
                    await self._refresh_checkpoint()
                    continue
                for _, entries in reply:
                    for entry_id, fields in entries:
                        last_id = bytes(entry_id)
                        await self._apply_entry(fields)
            except asyncio.CancelledError:
                raise
            except REDIS_ERRORS as error:
                WATCHER_ERRORS.inc()
                if self.connected:
                    log.warning("change stream read failed, retrying: %s", error)
                self.connected = False
                await asyncio.sleep(self._retry_s)
            except Exception:
                # Never let the one watcher die: every consistency wait of the process depends on it.
                WATCHER_ERRORS.inc()
                log.exception("change watcher failed; resynchronizing")
                self.connected = False
                last_id = None
                await asyncio.sleep(self._retry_s)

    async def _apply_entry(self, fields: dict[bytes, bytes]) -> None:
        raw = fields.get(STREAM_BATCH_FIELD.encode())
        if raw is None:
            log.warning("change stream entry without a %s field", STREAM_BATCH_FIELD)
            return
        try:
            batch = read_model_pb2.ChangeBatch.FromString(raw)
        except DecodeError:
            log.error("change stream entry is not a ChangeBatch; skipped")
            return
        await self.apply(batch)
