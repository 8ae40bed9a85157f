"""The apply stage: the one place that speaks to Redis for the read models, in fenced Lua scripts."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import hiredis
import redis

from payments_common import keys
from payments_common.keys import KeySchema
from payments_common.redisconn import SyncClient
from replicator.changes import ACCOUNTS, PAYMENT_EVENTS, PAYMENTS, Checkpoint
from replicator.encode import EncodedBatch, EncodedEntry, EncodedView, EncodedWrite
from replicator.lock import LockLost, SlotLock
from replicator.ops import DeleteTimeline, DeleteView, SetIndexes, StoredField

log = logging.getLogger(__name__)

# Applies one batch: checks that the caller owns the slot's lock, applies every entity
# write whose position is not older than the stored one, moves the checkpoint and appends
# the change notification. A script runs atomically, so a batch is all or nothing, and an
# instance that lost the lock writes nothing.
#
# KEYS: lock, checkpoint, change stream, then each op's keys in order.
# ARGV: owner token, checkpoint position ('' = none), commit time in us ('' = unchanged),
#       stream MAXLEN, ChangeBatch bytes ('' = none), the checkpoint the batch moves from
#       ('0' = none; checked when a checkpoint is given), the source time the checkpoint
#       covers in us ('' = unchanged), then each op: a code and its arguments.
#   V key(hash)                        position, view   upsert a view
#   D key(hash)                        position         delete a view, keep a tombstone
#   I keys(idxver, add..., remove...)  position, payment id, member, #add, #remove
#   T keys(payment hash, timeline)     position, sequence, entry   ('X': delete, no entry)
#
# The field names are those of payments_common.keys, filled in for their @PLACEHOLDERS@.


def fill_fields(script: str) -> str:
    """The script with the field names of payments_common.keys in place of their @PLACEHOLDERS@."""
    for placeholder, name in (
        ("@CHECKPOINT_LSN@", keys.CHECKPOINT_LSN_FIELD),
        ("@COMMIT_TIME@", keys.CHECKPOINT_COMMIT_TIME_FIELD),
        ("@SOURCE_TIME@", keys.CHECKPOINT_SOURCE_TIME_FIELD),
        ("@BATCH@", keys.STREAM_BATCH_FIELD),
        ("@LSN@", keys.LSN_FIELD),
        ("@VIEW@", keys.VIEW_FIELD),
        ("@TIMELINE_POSITION@", keys.TIMELINE_POSITION_PREFIX),
        ("@EPOCH@", keys.FENCE_EPOCH_FIELD),
        ("@NODE@", keys.CHECKPOINT_NODE_FIELD),
    ):
        script = script.replace(placeholder, name)
    return script


# Positions are decimal strings; comparing them as Lua numbers would lose precision above
# 2^53, so they are compared by length, then lexically.
NEWER = """local function newer(a, b)
  if #a ~= #b then return #a > #b end
  return a > b
end
"""

# The entity writes of a batch: `k` indexes the op's first key in KEYS, `a` its code in ARGV,
# both set before the loop. The cluster's script (replicator/clustersink.py) runs the same
# loop over keys passed in ARGV.
APPLY_OPS = """while a <= #ARGV do
  local code, lsn = ARGV[a], ARGV[a + 1]
  if code == 'V' or code == 'D' then
    local key = KEYS[k]
    local cur = redis.call('HGET', key, '@LSN@')
    if cur and newer(cur, lsn) then
      skipped = skipped + 1
    elseif code == 'V' then
      redis.call('HSET', key, '@LSN@', lsn, '@VIEW@', ARGV[a + 2])
      applied = applied + 1
    else
      redis.call('HSET', key, '@LSN@', lsn)
      redis.call('HDEL', key, '@VIEW@')
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
    local field = '@TIMELINE_POSITION@' .. ARGV[a + 2]
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
"""

APPLY_BATCH = fill_fields(
    NEWER
    + """if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('LOCKLOST the slot lock is not held by this instance')
end
-- The change stream is a chain: each entry names the checkpoint it moved from. A stored
-- checkpoint other than the one this instance last wrote means Redis lost or gained
-- writes behind its back: nothing is written, and the session restarts from Redis.
if ARGV[2] ~= '' and (redis.call('HGET', KEYS[2], '@CHECKPOINT_LSN@') or '0') ~= ARGV[6] then
  return redis.error_reply('CHECKPOINTMOVED the stored checkpoint is not the one this instance wrote')
end
local k, a, applied, skipped = 4, 8, 0, 0
"""
    + APPLY_OPS
    + """if ARGV[2] ~= '' then
  local cur = redis.call('HGET', KEYS[2], '@CHECKPOINT_LSN@')
  if not (cur and newer(cur, ARGV[2])) then
    redis.call('HSET', KEYS[2], '@CHECKPOINT_LSN@', ARGV[2])
    if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], '@COMMIT_TIME@', ARGV[3]) end
    if ARGV[7] ~= '' then redis.call('HSET', KEYS[2], '@SOURCE_TIME@', ARGV[7]) end
  end
  if ARGV[5] ~= '' then
    redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', '@BATCH@', ARGV[5])
  end
end
return {applied, skipped}
"""
)

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

# Sets one field of a hash (the namespace's `meta`) only while the caller owns the slot's
# lock. KEYS: lock, the hash. ARGV: owner token, field, value.
FENCED_HSET = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('LOCKLOST the slot lock is not held by this instance')
end
return redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
"""

_SCRIPTS: Final = {"apply_batch": APPLY_BATCH, "fenced_unlink": FENCED_UNLINK, "fenced_hset": FENCED_HSET}


@dataclass
class _Pending:
    """A batch's script call sent on `connection`, its reply not read yet."""

    connection: Any
    keys: list[str]
    args: list[Arg]
    on_applied: Callable[[], None]


class CheckpointMoved(RuntimeError):
    """Redis's checkpoint is not the one this instance last wrote: Redis lost or gained writes."""


Arg = str | bytes | int


class Sink:
    """Applies encoded batches to one Redis database, fenced by the slot's lock, and reads what resolution needs."""

    def __init__(
        self,
        client: redis.Redis,
        schema: KeySchema,
        slot: str,
        lock: SlotLock,
        stream_maxlen: int = 10_000,
        on_progress: Callable[[], None] = lambda: None,
    ) -> None:
        self.client = client
        self.schema = schema
        self.lock = lock
        self.stream_maxlen = stream_maxlen
        # Called between the steps of long work (removing many keys), so that the lock
        # keeper sees progress and the owner can stop it when the lock is lost.
        self.on_progress = on_progress
        self.checkpoint_key = schema.checkpoint(slot)
        # The checkpoint as this instance last read or wrote it (0: none); every batch that
        # moves the checkpoint names it, and the script checks that Redis still has it.
        self.position = 0
        self._sha: dict[str, str] = {}
        # The batch sent and not yet waited for (apply with `on_applied`).
        self._pending: _Pending | None = None

    def load_scripts(self) -> None:
        self._sha = {name: str(self.client.script_load(body)) for name, body in _SCRIPTS.items()}

    def begin(self) -> None:
        """Readies a session's writes once the lock is held (on one node, the lock fences them all)."""

    def ping(self) -> None:
        self.settle()
        self.client.ping()

    def read_checkpoint(self) -> Checkpoint | None:
        self.settle()
        checkpoint = read_checkpoint(self.client, self.checkpoint_key)
        self.position = 0 if checkpoint is None else checkpoint.lsn
        return checkpoint

    def read_features(self) -> frozenset[str]:
        """The features the namespace was built with (its `meta` hash); none for one built before it existed."""
        self.settle()
        return keys.parse_features(self.client.hget(self.schema.meta(), keys.META_FEATURES_FIELD))

    def write_features(self, features: tuple[str, ...]) -> None:
        """Records the features of the read models that a bootstrap builds, fenced by the slot's lock."""
        self._execute(
            "fenced_hset",
            [self.lock.key, self.schema.meta()],
            [self.lock.token, keys.META_FEATURES_FIELD, keys.format_features(features)],
        )

    def read_fields(self, fields: Sequence[StoredField]) -> dict[StoredField, bytes | None]:
        """The stored value of each hash field (None: absent), in one round trip."""
        if not fields:
            return {}
        self.settle()  # what a batch in flight writes must be read
        with self.client.pipeline(transaction=False) as pipe:
            for key, field in fields:
                pipe.hget(key, field)
            return dict(zip(fields, pipe.execute(), strict=True))

    # -- applying ---------------------------------------------------------------------------

    def apply(self, batch: EncodedBatch, on_applied: Callable[[], None] | None = None) -> None:
        """Applies the batch's writes and, if it has one, moves the checkpoint, in one fenced script call.

        With `on_applied`, the call is sent and not waited for: the work that comes next (the
        next batch's decoding and projection) overlaps Redis's run of the script. Its reply is
        read before anything else is sent or read (`settle`), which then calls `on_applied`;
        an error in it (LockLost, CheckpointMoved) is raised there.
        """
        checkpoint = batch.checkpoint
        if not batch.writes and checkpoint is None:
            if on_applied is not None:
                self.settle()
                on_applied()
            return
        notification = b""
        if batch.notification is not None:
            batch.notification.previous_checkpoint_lsn = self.position
            notification = batch.notification.SerializeToString()
        keys_: list[str] = [self.lock.key, self.checkpoint_key, self.schema.changes()]
        args: list[Arg] = [
            self.lock.token,
            "" if checkpoint is None else checkpoint.lsn,
            "" if checkpoint is None or checkpoint.commit_time_us is None else checkpoint.commit_time_us,
            self.stream_maxlen,
            notification,
            self.position,
            "" if checkpoint is None or checkpoint.covered_until_us is None else checkpoint.covered_until_us,
        ]
        for write in batch.writes:
            _PACKERS[type(write)](write, keys_, args)
        if on_applied is None:
            self._execute("apply_batch", keys_, args)
        else:
            self.settle()
            self._send_pending(keys_, args, on_applied)
        if checkpoint is not None:
            # The next batch names this position as the one it moves from; if this one
            # fails, so does that one (CHECKPOINTMOVED), and the session restarts from Redis.
            self.position = max(self.position, checkpoint.lsn)

    def _send_pending(self, keys_: list[str], args: list[Arg], on_applied: Callable[[], None]) -> None:
        command = pack_evalsha(self._sha["apply_batch"], keys_, args)
        connection = self.client.connection_pool.get_connection()
        try:
            connection.send_packed_command([command])  # type: ignore[no-untyped-call]
        except BaseException:
            connection.disconnect()  # type: ignore[no-untyped-call]
            self.client.connection_pool.release(connection)
            raise
        self._pending = _Pending(connection, keys_, args, on_applied)

    def settle(self) -> None:
        """Waits for the batch in flight, if any: Redis has applied it (or its error is raised)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        pool = self.client.connection_pool
        try:
            pending.connection.read_response()
        except redis.exceptions.NoScriptError:
            # Redis lost its scripts (a restart, SCRIPT FLUSH): nothing ran; load and run it again.
            pool.release(pending.connection)
            self.load_scripts()
            self._execute("apply_batch", pending.keys, pending.args)
            pending.on_applied()
            return
        except redis.ResponseError as error:
            pool.release(pending.connection)
            self._raise_script_error(error)
            raise
        except BaseException:
            pending.connection.disconnect()  # a reply may be half read
            pool.release(pending.connection)
            raise
        pool.release(pending.connection)
        pending.on_applied()

    def _execute(self, script: str, keys_: Sequence[str | bytes], args: Sequence[Any]) -> Any:
        self.settle()
        for attempt in (1, 2):
            try:
                return self._call(pack_evalsha(self._sha[script], keys_, args))
            except redis.exceptions.NoScriptError:
                # Redis restarted or flushed its scripts; nothing ran, so load and retry.
                if attempt == 2:
                    raise
                self.load_scripts()
            except redis.ResponseError as error:
                self._raise_script_error(error)
                raise
        raise AssertionError("unreachable")

    def _raise_script_error(self, error: redis.ResponseError) -> None:
        """Raises what a fenced script's refusal means (LockLost, CheckpointMoved); returns for any other error."""
        if str(error).startswith("LOCKLOST"):
            raise LockLost(f"the lock {self.lock.key} is not held by this instance") from error
        if str(error).startswith("CHECKPOINTMOVED"):
            raise CheckpointMoved(
                f"the checkpoint {self.checkpoint_key} is not at {self.position} as this instance wrote it"
            ) from error

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

    # -- whole-namespace operations ---------------------------------------------------------

    def truncate(self, tables: Iterable[str]) -> None:
        """Removes the keys of every entity of these tables."""
        patterns: list[str] = []
        # Keys whose names are known need no SCAN of the keyspace.
        known: list[str] = []
        schema = self.schema
        for table in tables:
            if table == PAYMENTS:
                patterns += [
                    schema.payments_pattern(),
                    schema.account_indexes_pattern(),
                    schema.account_index_versions_pattern(),
                ]
                known += [schema.review_queue(), schema.review_queue_versions()]
            elif table == PAYMENT_EVENTS:
                patterns.append(schema.payment_timelines_pattern())
            elif table == ACCOUNTS:
                patterns.append(schema.accounts_pattern())
        log.warning("truncate of %s: removing keys %s and %s", list(tables), patterns, known)
        self._unlink_matching(patterns)
        if known:
            self._unlink(known)

    def wipe(self) -> int:
        """Removes every read-model key of the namespace except the locks, the change stream and its owner.

        The `meta` hash goes too: the bootstrap that wipes writes it again (`write_features`).
        """
        keep_prefixes = (self.schema.lock_prefix(), self.schema.changes(), self.schema.owner())
        return self._unlink_matching(list(self.schema.version_patterns()), keep_prefixes)

    def _unlink_matching(self, patterns: list[str], keep_prefixes: tuple[str, ...] = ()) -> int:
        self.settle()  # a batch in flight may write keys that match
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

    def unlink(self, chunk: Sequence[str | bytes]) -> int:
        """Removes these keys (a bounded number: one call per node), fenced; returns how many there were."""
        return self._unlink(chunk)

    def _unlink(self, chunk: Sequence[str | bytes]) -> int:
        self.on_progress()
        return int(self._execute("fenced_unlink", [self.lock.key, *chunk], [self.lock.token]))

    def clear_checkpoint(self) -> None:
        self._unlink([self.checkpoint_key])
        self.position = 0


def read_checkpoint(client: SyncClient, key: str) -> Checkpoint | None:
    """The checkpoint as the apply script stores it in the hash `key`; None when there is none."""
    lsn, commit_time, source_time = client.hmget(
        key,
        [keys.CHECKPOINT_LSN_FIELD, keys.CHECKPOINT_COMMIT_TIME_FIELD, keys.CHECKPOINT_SOURCE_TIME_FIELD],
    )
    if lsn is None:
        return None
    return Checkpoint(
        int(lsn), int(commit_time) if commit_time else None, int(source_time) if source_time else None
    )


def pack_evalsha(sha: str, keys_: Sequence[str | bytes], args: Sequence[str | bytes | int]) -> bytes:
    """The RESP bytes of `EVALSHA sha len(keys) *keys *args`, as redis-py would send them."""
    packed: bytes = hiredis.pack_command(("EVALSHA", sha, len(keys_), *keys_, *args))  # type: ignore[arg-type]
    return packed


# How each write is passed to APPLY_BATCH: its keys, then its op code and arguments.
def _pack_view(write: EncodedView, keys_: list[str], args: list[Arg]) -> None:
    keys_.append(write.key)
    args += ("V", write.lsn, write.view)


def _pack_tombstone(write: DeleteView, keys_: list[str], args: list[Arg]) -> None:
    keys_.append(write.key)
    args += ("D", write.lsn)


def _pack_indexes(write: SetIndexes, keys_: list[str], args: list[Arg]) -> None:
    keys_.append(write.versions_key)
    keys_ += write.add
    keys_ += write.remove
    args += ("I", write.lsn, write.payment_id, write.member, len(write.add), len(write.remove))


def _pack_entry(write: EncodedEntry, keys_: list[str], args: list[Arg]) -> None:
    keys_ += (write.payment_key, write.timeline_key)
    args += ("T", write.lsn, write.sequence, write.entry)


def _pack_entry_removal(write: DeleteTimeline, keys_: list[str], args: list[Arg]) -> None:
    keys_ += (write.payment_key, write.timeline_key)
    args += ("X", write.lsn, write.sequence)


_PACKERS: Final[dict[type[EncodedWrite], Callable[[Any, list[str], list[Arg]], None]]] = {
    EncodedView: _pack_view,
    DeleteView: _pack_tombstone,
    SetIndexes: _pack_indexes,
    EncodedEntry: _pack_entry,
    DeleteTimeline: _pack_entry_removal,
}


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
