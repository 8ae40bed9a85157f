"""The change-stream adapter: every read of the change stream, and of the checkpoint read with it."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Final

from google.protobuf.message import DecodeError
from opentelemetry.trace import SpanContext
from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster

from history_svc.queries import REDIS_ERRORS, ReadModelUnavailable
from history_svc.resume import ChangePosition
from payments.readmodel.v1 import read_model_pb2
from payments_common.errors import OutOfRange
from payments_common.keys import (
    CHECKPOINT_COMMIT_TIME_FIELD,
    CHECKPOINT_LSN_FIELD,
    CHECKPOINT_SOURCE_TIME_FIELD,
    STREAM_BATCH_FIELD,
    KeySchema,
)

log = logging.getLogger(__name__)

# Entries read per round trip while walking back through the stream.
CHUNK: Final = 256
# The fields of the checkpoint's hash that the watcher reads, in one HMGET.
CHECKPOINT_FIELDS: Final = (CHECKPOINT_LSN_FIELD, CHECKPOINT_COMMIT_TIME_FIELD, CHECKPOINT_SOURCE_TIME_FIELD)


@dataclass(frozen=True)
class Change:
    """A payment's new view, where it became visible, and its place among one account's changes.

    `lsn` is the checkpoint of the change stream entry `entry_id` that carried it; `index`
    counts the watched account's changes before it in that entry (its payments where the
    account is payer or payee, in the entry's order). Together they name this very change,
    even among the changes that share a checkpoint.
    """

    view: read_model_pb2.PaymentView
    lsn: int
    entry_id: bytes
    index: int
    # The replicator's span that applied the change, when its transaction was traced.
    trace: SpanContext | None = None


@dataclass(frozen=True)
class Entry:
    """One entry of the change stream: its id, and its ChangeBatch (None when it holds none)."""

    id: bytes
    batch: read_model_pb2.ChangeBatch | None


@dataclass(frozen=True)
class StoredCheckpoint:
    """The checkpoint as Redis holds it: its position (0 before the first), and the source time it covers.

    `covered_until_us` (Unix microseconds, the source's clock; None when unknown) is the
    replicator's `source_time_us`, or the last applied commit's time where it recorded none.
    """

    lsn: int
    covered_until_us: int | None = None


def _stored_checkpoint(raw: list[bytes | None]) -> StoredCheckpoint:
    """The checkpoint from its hash's fields, read with HMGET in the order of CHECKPOINT_FIELDS."""
    lsn, commit_time, source_time = raw
    covered = source_time or commit_time
    return StoredCheckpoint(int(lsn) if lsn is not None else 0, int(covered) if covered else None)


class ResumeUnavailable(OutOfRange):
    """The changes after the client's position are no longer held, or cannot be shown complete."""

    def __init__(self, why: str) -> None:
        super().__init__(
            "WATCH_RESUME_UNAVAILABLE",
            "the changes since that position are no longer available; list the account's payments,"
            " then watch again without a start position",
            {"why": why},
        )


def parse_entry(fields: dict[bytes, bytes]) -> read_model_pb2.ChangeBatch | None:
    """The ChangeBatch of a stream entry, or None when the entry holds none."""
    raw = fields.get(STREAM_BATCH_FIELD.encode())
    if raw is None:
        log.warning("change stream entry without a %s field", STREAM_BATCH_FIELD)
        return None
    try:
        return read_model_pb2.ChangeBatch.FromString(raw)
    except DecodeError:
        log.error("change stream entry is not a ChangeBatch")
        return None


def stream_id(entry_id: bytes) -> tuple[int, int]:
    """A stream entry id as a pair that compares in stream order."""
    milliseconds, _, sequence = entry_id.partition(b"-")
    return int(milliseconds), int(sequence or 0)


def _changes_of(batch: read_model_pb2.ChangeBatch, entry_id: bytes, account_id: str) -> list[Change]:
    views = [view for view in batch.payments if account_id in (view.payer_account_id, view.payee_account_id)]
    return [Change(view, batch.checkpoint_lsn, entry_id, index) for index, view in enumerate(views)]


class ChangeStream:
    """Reads the change stream (and the checkpoint of `slot`) that the replicator writes.

    The change watcher follows it (`read`, and the two checks of where it ends); a resumed
    WatchPayments reads back what its client missed (`missed_changes`). The watcher's reads
    raise redis-py's errors, which it retries; `missed_changes` raises ReadModelUnavailable.

    On a Redis Cluster (`redis` a cluster client, `schema` the cluster's, whose stream carries
    the slot's hash tag) the stream and the slot's checkpoint share one slot, so every read
    here, and each pipeline of two, goes to that one node.
    """

    def __init__(self, redis: Redis | RedisCluster, schema: KeySchema, slot: str) -> None:
        self._redis = redis
        self.namespace = schema.namespace
        self.name = schema.changes()
        self._checkpoint_key = schema.checkpoint(slot)

    async def last_entry_then_checkpoint(self) -> tuple[Entry | None, StoredCheckpoint]:
        """The stream's last entry (None when it is empty), then the checkpoint.

        No MULTI: the service's Redis user may only read.
        """
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xrevrange(self.name, count=1)
            pipe.hmget(self._checkpoint_key, CHECKPOINT_FIELDS)
            last, raw = await pipe.execute()
        checkpoint = _stored_checkpoint(raw)
        if not last:
            return None, checkpoint
        return Entry(bytes(last[0][0]), parse_entry(last[0][1])), checkpoint

    async def checkpoint_then_last_id(self) -> tuple[StoredCheckpoint, bytes]:
        """The checkpoint, then the id of the stream's last entry ("0-0": none)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.hmget(self._checkpoint_key, CHECKPOINT_FIELDS)
            pipe.xrevrange(self.name, count=1)
            raw, last = await pipe.execute()
        return _stored_checkpoint(raw), bytes(last[0][0]) if last else b"0-0"

    async def read(self, after_id: bytes, count: int, block_ms: int) -> list[Entry]:
        """Up to `count` entries after `after_id`, waiting up to `block_ms` for the first (XREAD BLOCK)."""
        reply: Any = await self._redis.xread({self.name: after_id}, count=count, block=block_ms)
        return [
            Entry(bytes(entry_id), parse_entry(fields))
            for _, entries in reply or ()
            for entry_id, fields in entries
        ]

    async def missed_changes(
        self,
        account_id: str,
        after: int | ChangePosition,
        until_id: bytes | None,
        until_lsn: int,
    ) -> list[list[Change]]:
        """The account's changes after `after` up to the entry `until_id`, a list per batch.

        `after` is a checkpoint (a consistency token: every change of the entries up to it is
        behind the client) or one change's position (a resume token: the changes of its entry
        after it are still to come). `until_id` and `until_lsn` are where a live subscription
        begins (the entry the watcher had taken in, and its checkpoint), so the two together
        deliver every change once. The walk goes back from that entry and checks every link of
        the chain: each entry must end where the next one moved from, list all its payments, and
        not follow a rebuild. It stops at the entry that moved from the checkpoint `after`, or at
        the entry of the position `after`; when the chain breaks, passes below `after` or runs
        out (trimmed), the position cannot be resumed from (ResumeUnavailable).
        """
        position = after if isinstance(after, ChangePosition) else None
        if position is not None and position.namespace != self.namespace:
            # A position in another read-model version's stream (this process switched versions).
            raise ResumeUnavailable("read_model_switched")
        after_lsn = after if isinstance(after, int) else after.lsn
        if position is None and after_lsn == until_lsn:
            return []
        if until_id is None or after_lsn > until_lsn:
            raise ResumeUnavailable("position_unknown")
        if position is not None and stream_id(position.entry_id) > stream_id(until_id):
            raise ResumeUnavailable("position_unknown")
        groups: list[list[Change]] = []
        expected = until_lsn
        upper = until_id.decode()
        first = True
        while True:
            try:
                entries: Any = await self._redis.xrevrange(self.name, max=upper, min="-", count=CHUNK)
            except REDIS_ERRORS as error:
                raise ReadModelUnavailable() from error
            if first and (not entries or bytes(entries[0][0]) != until_id):
                raise ResumeUnavailable("stream_replaced")
            first = False
            for raw_id, fields in entries:
                entry_id = bytes(raw_id)
                batch = parse_entry(fields)
                if batch is None or batch.checkpoint_lsn != expected:
                    raise ResumeUnavailable("chain_broken")
                previous = batch.previous_checkpoint_lsn
                if batch.omits_payments:
                    raise ResumeUnavailable("batch_omits_payments")
                if position is not None and entry_id == position.entry_id:
                    # The entry of the client's last change: the rest of it is still to come.
                    changes = _changes_of(batch, entry_id, account_id)
                    if batch.checkpoint_lsn != position.lsn or position.index >= len(changes):
                        raise ResumeUnavailable("position_unknown")
                    groups.append(changes[position.index + 1 :])
                    groups.reverse()
                    return [group for group in groups if group]
                if position is not None and stream_id(entry_id) < stream_id(position.entry_id):
                    raise ResumeUnavailable("position_unknown")
                if previous == 0 or previous > batch.checkpoint_lsn:
                    raise ResumeUnavailable("chain_broken")
                groups.append(_changes_of(batch, entry_id, account_id))
                expected = previous
                if position is None and expected == after_lsn:
                    groups.reverse()
                    return [group for group in groups if group]
                if expected < after_lsn:
                    raise ResumeUnavailable("position_unknown")
                upper = "(" + entry_id.decode()
            if len(entries) < CHUNK:
                raise ResumeUnavailable("trimmed")
