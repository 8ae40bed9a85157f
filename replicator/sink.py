"""Applies batches of read-model writes to Redis atomically with the slot's checkpoint.

One batch is one call of a Lua script: it checks that this instance still owns the slot's
lock, applies every entity write (each guarded by the entity's stored WAL position, so a
replay never moves a key backwards), moves the checkpoint and appends the change
notification. A script runs atomically, so a batch is all or nothing and a fenced-off
instance writes nothing. Every write touches the keys of one entity, which share a hash
tag, so nothing relies on a transaction across entities.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import hiredis
import redis

from payments.readmodel.v1 import read_model_pb2
from payments_common import keys
from payments_common.keys import KeySchema
from replicator.lock import LockLost, SlotLock
from replicator.projector import (
    ACCOUNTS,
    PAYMENT_EVENTS,
    PAYMENTS,
    DeleteTimeline,
    DeleteView,
    Op,
    Projector,
    SetIndexes,
    TruncateTables,
    UnindexPayment,
    UpsertTimeline,
    UpsertView,
    timestamp,
)

log = logging.getLogger(__name__)

# Applies one batch: checks that the caller owns the slot's lock, applies every entity
# write whose position is not older than the stored one, moves the checkpoint and appends
# the change notification. A script runs atomically, so a batch is all or nothing, and an
# instance that lost the lock writes nothing.
#
# KEYS: lock, checkpoint, change stream, then each op's keys in order.
# ARGV: owner token, checkpoint position ('' = none), commit time in us ('' = unchanged),
#       stream MAXLEN, ChangeBatch bytes ('' = none), the checkpoint the batch moves from
#       ('0' = none; checked when a checkpoint is given), then each op: a code and its arguments.
#   V key(hash)                        position, view   upsert a view
#   D key(hash)                        position         delete a view, keep a tombstone
#   I keys(idxver, add..., remove...)  position, payment id, member, #add, #remove
#   T keys(payment hash, timeline)     position, sequence, entry   ('X': delete, no entry)
#
# Positions are decimal strings; comparing them as Lua numbers would lose precision above
# 2^53, so they are compared by length, then lexically.
APPLY_BATCH = """
local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('LOCKLOST the slot lock is not held by this instance')
end
-- The change stream is a chain: each entry names the checkpoint it moved from. A stored
-- checkpoint other than the one this instance last wrote means Redis lost or gained
-- writes behind its back: nothing is written, and the session restarts from Redis.
if ARGV[2] ~= '' and (redis.call('HGET', KEYS[2], 'lsn') or '0') ~= ARGV[6] then
  return redis.error_reply('CHECKPOINTMOVED the stored checkpoint is not the one this instance wrote')
end
local k, a, applied, skipped = 4, 7, 0, 0
while a <= #ARGV do
  local code, lsn = ARGV[a], ARGV[a + 1]
  if code == 'V' or code == 'D' then
    local key = KEYS[k]
    local cur = redis.call('HGET', key, 'lsn')
    if cur and newer(cur, lsn) then
      skipped = skipped + 1
    elseif code == 'V' then
      redis.call('HSET', key, 'lsn', lsn, 'view', ARGV[a + 2])
      applied = applied + 1
    else
      redis.call('HSET', key, 'lsn', lsn)
      redis.call('HDEL', key, 'view')
      applied = applied + 1
    end
    k = k + 1
    a = a + (code == 'V' and 3 or 2)
  elseif code == 'I' then
    local payment, member = ARGV[a + 2], ARGV[a + 3]
    local adds, removes = tonumber(ARGV[a + 4]), tonumber(ARGV[a + 5])
    local cur = redis.call('HGET', KEYS[k], payment)
    if cur and newer(cur, lsn) then
      skipped = skipped + 1
    else
      redis.call('HSET', KEYS[k], payment, lsn)
      for i = k + 1, k + adds do redis.call('ZADD', KEYS[i], 0, member) end
      -- A payment never indexed in this account is in none of its indexes yet.
      if cur then
        for i = k + adds + 1, k + adds + removes do redis.call('ZREM', KEYS[i], member) end
      end
      applied = applied + 1
    end
    k = k + 1 + adds + removes
    a = a + 6
  elseif code == 'T' or code == 'X' then
    local field = 'tl:' .. ARGV[a + 2]
    local cur = redis.call('HGET', KEYS[k], field)
    if cur and newer(cur, lsn) then
      skipped = skipped + 1
    else
      redis.call('HSET', KEYS[k], field, lsn)
      if code == 'T' then
        redis.call('HSET', KEYS[k + 1], ARGV[a + 2], ARGV[a + 3])
      else
        redis.call('HDEL', KEYS[k + 1], ARGV[a + 2])
      end
      applied = applied + 1
    end
    k = k + 2
    a = a + (code == 'T' and 4 or 3)
  else
    return redis.error_reply('ERR unknown op ' .. tostring(code))
  end
end
if ARGV[2] ~= '' then
  local cur = redis.call('HGET', KEYS[2], 'lsn')
  if not (cur and newer(cur, ARGV[2])) then
    redis.call('HSET', KEYS[2], 'lsn', ARGV[2])
    if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], 'commit_time_us', ARGV[3]) end
  end
  if ARGV[5] ~= '' then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'batch', ARGV[5])
  end
end
return {applied, skipped}
"""

# Removes keys (the checkpoint, read-model keys of a truncate or a rebuild) only while the
# caller owns the slot's lock. KEYS: lock, then the keys to remove. ARGV: owner token.
FENCED_UNLINK = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('LOCKLOST the slot lock is not held by this instance')
end
local removed = 0
for i = 2, #KEYS do removed = removed + redis.call('UNLINK', KEYS[i]) end
return removed
"""

_SCRIPTS: Final = {"apply_batch": APPLY_BATCH, "fenced_unlink": FENCED_UNLINK}


class CheckpointMoved(RuntimeError):
    """Redis's checkpoint is not the one this instance last wrote: Redis lost or gained writes."""


@dataclass(frozen=True)
class Checkpoint:
    lsn: int
    commit_time_us: int | None


@dataclass
class BatchResult:
    """What one apply wrote, for metrics and logs."""

    ops: int
    payments: int


class Sink:
    """Writes batches of ops to one Redis database, fenced by the slot's lock."""

    def __init__(
        self,
        client: redis.Redis,
        schema: KeySchema,
        slot: str,
        lock: SlotLock,
        projector: Projector,
        stream_maxlen: int = 10_000,
        on_progress: Callable[[], None] = lambda: None,
    ) -> None:
        self.client = client
        self.schema = schema
        self.slot = slot
        self.lock = lock
        self.projector = projector
        self.stream_maxlen = stream_maxlen
        # Called between the steps of long work (removing many keys), so that the lock
        # keeper sees progress and the owner can stop it when the lock is lost.
        self.on_progress = on_progress
        self.checkpoint_key = schema.checkpoint(slot)
        # The checkpoint as this instance last read or wrote it (0: none); every batch that
        # moves the checkpoint names it, and the script checks that Redis still has it.
        self.position = 0
        self._sha: dict[str, str] = {}

    def load_scripts(self) -> None:
        self._sha = {name: str(self.client.script_load(body)) for name, body in _SCRIPTS.items()}

    def ping(self) -> None:
        self.client.ping()

    def read_checkpoint(self) -> Checkpoint | None:
        values = self.client.hmget(
            self.checkpoint_key, [keys.CHECKPOINT_LSN_FIELD, keys.CHECKPOINT_COMMIT_TIME_FIELD]
        )
        lsn, commit_time = values
        if lsn is None:
            self.position = 0
            return None
        self.position = int(lsn)
        return Checkpoint(int(lsn), int(commit_time) if commit_time else None)

    # -- applying ---------------------------------------------------------------------------

    def apply(
        self,
        ops: Sequence[Op],
        checkpoint: Checkpoint | None,
        notify: bool = True,
        omits_payments: bool = False,
    ) -> BatchResult:
        """Applies `ops` and, if given, moves the checkpoint, in one fenced transaction.

        A truncate splits the batch: what comes before it is applied first (without the
        checkpoint; a replay is harmless), then the truncated keys are removed, and the
        change notification says that it omits payments.
        """
        segment: list[Op] = []
        total = BatchResult(0, 0)
        for op in ops:
            if isinstance(op, TruncateTables):
                if segment:
                    self._add(total, self._apply_segment(segment, None, notify=False))
                    segment = []
                self._truncate(op.tables)
                omits_payments = True
            else:
                segment.append(op)
        self._add(total, self._apply_segment(segment, checkpoint, notify, omits_payments))
        return total

    @staticmethod
    def _add(total: BatchResult, part: BatchResult) -> None:
        total.ops += part.ops
        total.payments += part.payments

    def _apply_segment(
        self, ops: Sequence[Op], checkpoint: Checkpoint | None, notify: bool, omits_payments: bool = False
    ) -> BatchResult:
        if not ops and checkpoint is None:
            return BatchResult(0, 0)
        final = self._coalesce(ops)
        payments: list[read_model_pb2.PaymentView] = []
        timelines: dict[str, dict[int, read_model_pb2.TimelineEntry]] = {}
        keys_: list[str] = [self.lock.key, self.checkpoint_key, self.schema.changes()]
        args: list[Any] = []
        for op in final:
            if isinstance(op, UpsertView):
                keys_.append(op.key)
                args += ("V", op.lsn, op.view.SerializeToString())
                if isinstance(op.view, read_model_pb2.PaymentView):
                    payments.append(op.view)
            elif isinstance(op, DeleteView):
                keys_.append(op.key)
                args += ("D", op.lsn)
            elif isinstance(op, SetIndexes):
                keys_.append(op.versions_key)
                keys_ += op.add
                keys_ += op.remove
                args += ("I", op.lsn, op.payment_id, op.member, len(op.add), len(op.remove))
            elif isinstance(op, UpsertTimeline):
                keys_ += (op.payment_key, op.timeline_key)
                args += ("T", op.lsn, op.sequence, op.entry.SerializeToString())
                timelines.setdefault(op.payment_id, {})[op.sequence] = op.entry
            elif isinstance(op, DeleteTimeline):
                keys_ += (op.payment_key, op.timeline_key)
                args += ("X", op.lsn, op.sequence)
        batch_bytes = b""
        if checkpoint is not None and notify:
            batch = read_model_pb2.ChangeBatch(
                checkpoint_lsn=checkpoint.lsn,
                previous_checkpoint_lsn=self.position,
                omits_payments=omits_payments,
            )
            if checkpoint.commit_time_us is not None:
                batch.commit_time.CopyFrom(timestamp(checkpoint.commit_time_us))
            for view in payments:
                entries = timelines.get(view.payment_id)
                # Only a complete timeline is worth sending; otherwise readers fetch it.
                item = batch.payments.add()
                item.CopyFrom(view)
                if entries and sorted(entries) == list(range(1, len(entries) + 1)):
                    item.timeline.extend(entries[s] for s in sorted(entries))
            batch_bytes = batch.SerializeToString()
        head = [
            self.lock.token,
            "" if checkpoint is None else checkpoint.lsn,
            "" if checkpoint is None or checkpoint.commit_time_us is None else checkpoint.commit_time_us,
            self.stream_maxlen,
            batch_bytes,
            self.position,
        ]
        self._execute("apply_batch", keys_, head + args)
        if checkpoint is not None:
            self.position = max(self.position, checkpoint.lsn)
        return BatchResult(len(final), len(payments))

    def _execute(self, script: str, keys_: Sequence[str | bytes], args: Sequence[Any]) -> Any:
        for attempt in (1, 2):
            try:
                return self._call(pack_evalsha(self._sha[script], keys_, args))
            except redis.exceptions.NoScriptError:
                # Redis restarted or flushed its scripts; nothing ran, so load and retry.
                if attempt == 2:
                    raise
                self.load_scripts()
            except redis.ResponseError as error:
                if str(error).startswith("LOCKLOST"):
                    raise LockLost(f"the lock {self.lock.key} is not held by this instance") from error
                if str(error).startswith("CHECKPOINTMOVED"):
                    raise CheckpointMoved(
                        f"the checkpoint {self.checkpoint_key} is not at {self.position} as this instance wrote it"
                    ) from error
                raise
        raise AssertionError("unreachable")

    def _call(self, command: bytes) -> Any:
        """Sends one packed command and reads its reply on a connection of the client's pool.

        Bypasses redis-py's generic per-argument packing, which cost more than a third of
        the apply's CPU for a batch of a few thousand arguments. No retry: an error
        restarts the session, which resumes from the checkpoint.
        """
        pool = self.client.connection_pool
        connection = pool.get_connection()
        try:
            connection.send_packed_command([command])  # type: ignore[no-untyped-call]
            return connection.read_response()
        except redis.ResponseError:
            raise  # a whole reply was read: the connection is in a clean state
        except BaseException:
            connection.disconnect()  # type: ignore[no-untyped-call]  # a reply may be half read
            raise
        finally:
            pool.release(connection)

    def _coalesce(self, ops: Sequence[Op]) -> list[Op]:
        """Keeps the last write of each key (each is a full state), merging unchanged TOAST fields.

        Fields that the source did not send come from an earlier write in the batch, else
        from the stored view, which one read fetches for the whole batch.
        """
        latest: dict[tuple[str, ...], Op] = {}
        for op in ops:
            if isinstance(op, UpsertView | DeleteView):
                identity: tuple[str, ...] = ("view", op.key)
                previous = latest.get(identity)
                if isinstance(op, UpsertView) and op.keep and isinstance(previous, UpsertView):
                    op = _merge_view(op, previous.view)
            elif isinstance(op, SetIndexes):
                identity = ("idx", op.versions_key, op.payment_id)
            elif isinstance(op, UnindexPayment):
                identity = ("unindex", op.payment_id)
                previous = latest.get(("view", self.schema.payment(op.payment_id)))
                if isinstance(previous, UpsertView) and isinstance(previous.view, read_model_pb2.PaymentView):
                    for resolved in self._unindex(op, previous.view):
                        latest.pop(("idx", resolved.versions_key, resolved.payment_id), None)
                        latest[("idx", resolved.versions_key, resolved.payment_id)] = resolved
                    continue
            elif isinstance(op, UpsertTimeline | DeleteTimeline):
                identity = ("tl", op.timeline_key, str(op.sequence))
                previous = latest.get(identity)
                if isinstance(op, UpsertTimeline) and op.keep and isinstance(previous, UpsertTimeline):
                    op = _merge_timeline(op, previous.entry)
            else:
                continue
            # Re-insert so that the order of the batch is the order of the last writes.
            latest.pop(identity, None)
            latest[identity] = op
        return self._resolve_stored(list(latest.values()))

    def _unindex(self, op: UnindexPayment, view: read_model_pb2.PaymentView) -> list[SetIndexes]:
        created_us = view.create_time.seconds * 1_000_000 + view.create_time.nanos // 1000
        member = keys.index_member(created_us, op.payment_id)
        return [
            SetIndexes(
                self.schema.account_index_versions(account_id),
                op.payment_id,
                op.lsn,
                member,
                (),
                self.projector.all_index_keys(account_id),
            )
            for account_id in dict.fromkeys((view.payer_account_id, view.payee_account_id))
        ]

    def _resolve_stored(self, ops: list[Op]) -> list[Op]:
        wanted: dict[str, str] = {}  # key -> field to read
        for op in ops:
            if isinstance(op, UpsertView) and op.keep:
                wanted[op.key] = keys.VIEW_FIELD
            elif isinstance(op, UnindexPayment):
                wanted[self.schema.payment(op.payment_id)] = keys.VIEW_FIELD
            elif isinstance(op, UpsertTimeline) and op.keep:
                wanted[op.timeline_key + "\0" + str(op.sequence)] = str(op.sequence)
        if not wanted:
            return ops
        with self.client.pipeline(transaction=False) as pipe:
            for key, field in wanted.items():
                pipe.hget(key.split("\0", 1)[0], field)
            stored = dict(zip(wanted, pipe.execute(), strict=True))
        resolved: list[Op] = []
        for op in ops:
            if isinstance(op, UpsertView) and op.keep:
                raw = stored[op.key]
                if raw is not None:
                    op = _merge_view(op, type(op.view).FromString(raw))
                else:
                    log.warning("unchanged column of %s with no stored view to take it from", op.key)
            elif isinstance(op, UnindexPayment):
                raw = stored[self.schema.payment(op.payment_id)]
                if raw is None:
                    continue  # never indexed, or already removed
                resolved.extend(self._unindex(op, read_model_pb2.PaymentView.FromString(raw)))
                continue
            elif isinstance(op, UpsertTimeline) and op.keep:
                raw = stored[op.timeline_key + "\0" + str(op.sequence)]
                if raw is not None:
                    op = _merge_timeline(op, read_model_pb2.TimelineEntry.FromString(raw))
            resolved.append(op)
        return resolved

    # -- whole-namespace operations ---------------------------------------------------------

    def _truncate(self, tables: Iterable[str]) -> None:
        patterns: list[str] = []
        ns = self.schema.namespace
        for table in tables:
            if table == PAYMENTS:
                patterns += [f"{ns}:payment:*", f"{ns}:account:*:idx:*", f"{ns}:account:*:idxver"]
            elif table == PAYMENT_EVENTS:
                patterns.append(f"{ns}:payment:*:timeline")
            elif table == ACCOUNTS:
                patterns.append(f"{ns}:account:*")
        log.warning("truncate of %s: removing keys %s", list(tables), patterns)
        self._unlink_matching(patterns)

    def wipe(self) -> int:
        """Removes every read-model key of the namespace except the locks and the change stream."""
        ns = self.schema.namespace
        keep_prefixes = (f"{ns}:lock:", self.schema.changes())
        return self._unlink_matching([f"{ns}:*"], keep_prefixes)

    def _unlink_matching(self, patterns: list[str], keep_prefixes: tuple[str, ...] = ()) -> int:
        removed = 0
        for pattern in patterns:
            chunk: list[bytes] = []
            for key in self.client.scan_iter(match=pattern, count=1000):
                if keep_prefixes and _text(key).startswith(keep_prefixes):
                    continue
                chunk.append(key)
                if len(chunk) >= 1000:
                    removed += self._unlink(chunk)
                    chunk = []
            if chunk:
                removed += self._unlink(chunk)
        return removed

    def _unlink(self, chunk: Sequence[str | bytes]) -> int:
        self.on_progress()
        return int(self._execute("fenced_unlink", [self.lock.key, *chunk], [self.lock.token]))

    def clear_checkpoint(self) -> None:
        self._unlink([self.checkpoint_key])
        self.position = 0


def pack_evalsha(sha: str, keys_: Sequence[str | bytes], args: Sequence[str | bytes | int]) -> bytes:
    """The RESP bytes of `EVALSHA sha len(keys) *keys *args`, as redis-py would send them."""
    packed: bytes = hiredis.pack_command(("EVALSHA", sha, len(keys_), *keys_, *args))  # type: ignore[arg-type]
    return packed


def _merge_view(op: UpsertView, stored: Any) -> UpsertView:
    view = type(op.view).FromString(op.view.SerializeToString())
    for field in op.keep:
        setattr(view, field, getattr(stored, field))
    return UpsertView(op.key, op.lsn, view, ())


def _merge_timeline(op: UpsertTimeline, stored: read_model_pb2.TimelineEntry) -> UpsertTimeline:
    entry = read_model_pb2.TimelineEntry.FromString(op.entry.SerializeToString())
    for field in op.keep:
        setattr(entry, field, getattr(stored, field))
    return UpsertTimeline(op.payment_key, op.timeline_key, op.payment_id, op.sequence, op.lsn, entry, ())


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
