"""The Redis adapter of the query side: the Lua scripts and redis-py reads of the read models."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from hashlib import sha1
from typing import Any, Final, Protocol

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisClusterException, RedisError

from history_svc import wire
from history_svc.multiplex import Multiplexer
from history_svc.paging import ListQuery, index_range, queue_range
from payments.readmodel.v1 import read_model_pb2
from payments_common.errors import Unavailable
from payments_common.keys import (
    CHECKPOINT_LSN_FIELD,
    DEFAULT_SLOT_NAME,
    FEATURE_REVIEW_QUEUE,
    META_FEATURES_FIELD,
    VIEW_FIELD,
    KeySchema,
)

# Errors that mean "Redis cannot answer now"; everything else is a bug.
# What an unreachable or failing Redis raises: a cluster's client says that it cannot reach
# any node with RedisClusterException, which is no RedisError.
REDIS_ERRORS: Final = (RedisError, RedisClusterException, OSError)


log = logging.getLogger(__name__)


class ReadModelUnavailable(Unavailable):
    """Redis did not answer; the call can be retried (on this or another server)."""

    def __init__(self) -> None:
        super().__init__("READ_MODEL_UNAVAILABLE", "the read models are unavailable; retry later")


class CheckpointBehind(Exception):
    """Redis's checkpoint is below the position a read asked for: its data may not include it.

    The process's known checkpoint can be ahead of Redis for a moment after Redis lost its
    data (a restart, a flush before a rebuild), so a read with a consistency token checks
    the checkpoint again in the same round trip as its data, before the data.
    """

    def __init__(self, checkpoint: int) -> None:
        super().__init__(f"checkpoint {checkpoint}")
        self.checkpoint = checkpoint


# Lua helpers shared by the scripts (here and in history_svc/clusterqueries.py): a protobuf
# varint, and a length-delimited field (`tag` is the field's tag bytes, passed in ARGV from
# history_svc/wire.py).
LUA_WIRE: Final = """
local function varint(n)
  local out = {}
  while n >= 128 do
    out[#out + 1] = string.char(n % 128 + 128)
    n = math.floor(n / 128)
  end
  out[#out + 1] = string.char(n)
  return table.concat(out)
end
local function field(tag, bytes)
  return tag .. varint(#bytes) .. bytes
end
"""

# A page's range: at most `limit` (page size + 1) members were ranged; the extra one, if
# any, is dropped and the page's last member is the next cursor (nil on the last page).
LUA_PAGE_CUT: Final = """
local function cut(members, limit)
  local size = limit - 1
  if #members <= size then return false end
  members[#members] = nil
  return members[size]
end
"""


def payment_script(checkpoint_read: str, prelude: str = "") -> str:
    """GetPayment's script, the one node's or a cluster's: they differ only in how they read the checkpoint.

    KEYS: payment hash, timeline hash (and what `checkpoint_read` declares). ARGV: the tags of
    PaymentView.timeline and of GetPaymentResponse.payment (then what `checkpoint_read`
    reads). `checkpoint_read` is Lua that sets `checkpoint` (an lsn, or false) and runs
    first, so that the data read after it includes everything it covers. Returns
    {checkpoint, GetPaymentResponse bytes or nil}. The view is stored with an empty
    timeline, so the entries, sorted by sequence, are appended to it as timeline fields.
    `prelude` goes first (a cluster's flags line and helpers).
    """
    return (
        prelude
        + LUA_WIRE
        + checkpoint_read
        + """
local view = redis.call('HGET', KEYS[1], '@VIEW@')
if not view then return {checkpoint, false} end
local raw = redis.call('HGETALL', KEYS[2])
local entries = {}
for i = 1, #raw, 2 do entries[#entries + 1] = {tonumber(raw[i]), raw[i + 1]} end
table.sort(entries, function(a, b) return a[1] < b[1] end)
local parts = {view}
for _, entry in ipairs(entries) do parts[#parts + 1] = field(ARGV[1], entry[2]) end
return {checkpoint, field(ARGV[2], table.concat(parts))}
"""
    ).replace("@VIEW@", VIEW_FIELD)


# One node: KEYS[3], when given, is the checkpoint hash.
_PAYMENT_SCRIPT = payment_script(
    f"""
local checkpoint = false
if #KEYS == 3 then checkpoint = redis.call('HGET', KEYS[3], '{CHECKPOINT_LSN_FIELD}') end
"""
)

# KEYS: account hash, index zset[, checkpoint hash]. ARGV: upper bound, lower bound, the
# number of members to range (page size + 1; 0 when the bounds match nothing), the prefix
# and suffix that make a payment id into its hash key, and the tag of
# ListPaymentsResponse.payments. Returns {checkpoint lsn or nil, 0} when the account does
# not exist or was deleted (a tombstone: its hash holds a position but no view, as
# GetAccount reads it), else {checkpoint, 1, the page's payments as ListPaymentsResponse
# payments fields, the next cursor or nil}. A member whose view is missing (deleted since it
# was indexed) is skipped; the cursor moves past it.
_PAGE_SCRIPT = (
    (
        LUA_WIRE
        + LUA_PAGE_CUT
        + """
local checkpoint = false
if #KEYS == 3 then checkpoint = redis.call('HGET', KEYS[3], '@LSN@') end
if redis.call('HEXISTS', KEYS[1], '@VIEW@') == 0 then return {checkpoint, 0} end
local limit = tonumber(ARGV[3])
if limit == 0 then return {checkpoint, 1, '', false} end
local members = redis.call('ZRANGE', KEYS[2], ARGV[1], ARGV[2], 'BYLEX', 'REV', 'LIMIT', 0, limit)
local cursor = cut(members, limit)
local parts = {}
for _, member in ipairs(members) do
  local id = string.sub(member, string.find(member, ':', 1, true) + 1)
  local view = redis.call('HGET', ARGV[4] .. id .. ARGV[5], '@VIEW@')
  if view then parts[#parts + 1] = field(ARGV[6], view) end
end
return {checkpoint, 1, table.concat(parts), cursor}
"""
    )
    .replace("@LSN@", CHECKPOINT_LSN_FIELD)
    .replace("@VIEW@", VIEW_FIELD)
)

# KEYS: meta hash, review queue zset, checkpoint hash. ARGV: lower bound, the number of
# members to range (page size + 1), the prefix and suffix that make a payment id into its
# hash key, and the tag of ListHeldPaymentsResponse.payments. Returns {checkpoint lsn or
# nil, 0} when the namespace was built without the queue (its meta hash does not name it),
# else {checkpoint, 1, the page's payments as ListHeldPaymentsResponse payments fields, the
# next cursor or nil}. The checkpoint is always read, first: it is the page's consistency
# token. A member whose view is missing (deleted since it was queued) is skipped; the cursor
# moves past it.
_HELD_SCRIPT = (
    (
        LUA_WIRE
        + LUA_PAGE_CUT
        + """
local checkpoint = redis.call('HGET', KEYS[3], '@LSN@')
local features = redis.call('HGET', KEYS[1], '@FEATURES@')
if not (features and string.find(',' .. features .. ',', ',@REVIEW_QUEUE@,', 1, true)) then
  return {checkpoint, 0}
end
local limit = tonumber(ARGV[2])
local members = redis.call('ZRANGE', KEYS[2], ARGV[1], '+', 'BYLEX', 'LIMIT', 0, limit)
local cursor = cut(members, limit)
local parts = {}
for _, member in ipairs(members) do
  local id = string.sub(member, string.find(member, ':', 1, true) + 1)
  local view = redis.call('HGET', ARGV[3] .. id .. ARGV[4], '@VIEW@')
  if view then parts[#parts + 1] = field(ARGV[5], view) end
end
return {checkpoint, 1, table.concat(parts), cursor}
"""
    )
    .replace("@LSN@", CHECKPOINT_LSN_FIELD)
    .replace("@VIEW@", VIEW_FIELD)
    .replace("@FEATURES@", META_FEATURES_FIELD)
    .replace("@REVIEW_QUEUE@", FEATURE_REVIEW_QUEUE)
)

# The scripts' constant arguments, built once: per read they are only appended to the command.
_PAYMENT_ARGS: Final = (wire.PAYMENT_VIEW_TIMELINE, wire.GET_PAYMENT_RESPONSE_PAYMENT)


@dataclass(frozen=True)
class Script:
    """A Lua script run by EVALSHA, sent in full (which caches it) when Redis does not know it."""

    source: str

    @property
    def sha(self) -> str:
        return sha1(self.source.encode()).hexdigest()


PAYMENT_SCRIPT: Final = Script(_PAYMENT_SCRIPT)
PAGE_SCRIPT: Final = Script(_PAGE_SCRIPT)
HELD_SCRIPT: Final = Script(_HELD_SCRIPT)


@dataclass(frozen=True)
class Page:
    """One page of a list, newest first, and the cursor of the next page (None on the last).

    `payments` is the page in the wire format of ListPaymentsResponse's `payments` field,
    ready to be sent.
    """

    payments: bytes
    next_cursor: str | None


@dataclass(frozen=True)
class HeldPage:
    """One page of the review queue, oldest first, the cursor of the next page (None on the last), and
    the checkpoint it was read at (0: none, the read models are being built).

    `payments` is the page in the wire format of ListHeldPaymentsResponse's `payments` field.
    """

    payments: bytes
    next_cursor: str | None
    checkpoint: int


class Reads(Protocol):
    """What the servicer and the watches read: `ReadModel` on one node, `ClusterReadModel` on a Redis Cluster.

    `until` (a `time.monotonic()` instant; 0: the adapter's own bound) is how long a read may
    be tried again while a cluster's topology moves; on one node it is not used.
    """

    namespace: str

    async def ping(self) -> bool: ...

    async def refresh(self) -> None: ...

    async def payment_response(
        self, payment_id: str, min_lsn: int = 0, until: float = 0.0
    ) -> bytes | None: ...

    async def account(
        self, account_id: str, min_lsn: int = 0, until: float = 0.0
    ) -> read_model_pb2.AccountView | None: ...

    async def account_exists(self, account_id: str) -> bool: ...

    async def timelines(
        self, payment_ids: Iterable[str]
    ) -> dict[str, list[read_model_pb2.TimelineEntry]]: ...

    async def page(
        self, query: ListQuery, cursor: str | None, size: int, min_lsn: int = 0, until: float = 0.0
    ) -> Page | None: ...

    async def held_page(
        self, cursor: str | None, size: int, min_lsn: int = 0, until: float = 0.0
    ) -> HeldPage | None: ...


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _reached(checkpoint: bytes | None, min_lsn: int) -> None:
    """Raises CheckpointBehind when a token's read found Redis's checkpoint below `min_lsn`."""
    if min_lsn:
        position = int(checkpoint) if checkpoint is not None else 0
        if position < min_lsn:
            raise CheckpointBehind(position)


class ReadModel:
    """Reads the views that the replicator writes; raises ReadModelUnavailable when Redis fails.

    Every query is one round trip, whatever the page size: a payment and a page of a list are
    each one server-side script (EVALSHA), an account one command. The scripts answer with the
    response's protobuf wire format, built from the stored view bytes without parsing them
    (the replicator stores every PaymentView with an empty timeline, payments_common/keys.py),
    so the servicer sends the bytes as they are. The tags of the fields they write come from
    the generated descriptors (history_svc/wire.py), passed as script arguments.

    The scripts assume a single Redis node: a payment's keys share one hash tag, but a
    consistency token adds the checkpoint key (another slot), and a page (of an account's
    index or of the review queue) reads the views of payments whose keys are only known
    inside the script. On a Redis Cluster, history_svc/clusterqueries.py reads instead.
    """

    def __init__(
        self,
        redis: Redis,
        schema: KeySchema,
        slot: str = DEFAULT_SLOT_NAME,
        multiplexer: Multiplexer | None = None,
    ) -> None:
        self._redis = redis
        # The scripts go through the shared pipelined connection when there is one.
        self._execute = redis.execute_command if multiplexer is None else multiplexer.execute
        self._schema = schema
        self.namespace = schema.namespace
        self._slot = slot
        self._mismatch_logged = False
        self._checkpoint_key = schema.checkpoint(slot)
        self._shas = {script: script.sha for script in (PAYMENT_SCRIPT, PAGE_SCRIPT, HELD_SCRIPT)}
        # The page script's arguments after the bounds and count: a payment's hash key is the
        # prefix, its id and the suffix; then the tag of each payment in the page.
        prefix, suffix = schema.payment("\0").split("\0")
        self._page_args = (prefix, suffix, wire.LIST_PAYMENTS_RESPONSE_PAYMENTS)
        self._held_keys = [schema.meta(), schema.review_queue(), self._checkpoint_key]
        self._held_args = (prefix, suffix, wire.LIST_HELD_PAYMENTS_RESPONSE_PAYMENTS)

    async def _run(self, script: Script, keys: list[str], args: tuple[object, ...] = ()) -> Any:
        """One EVALSHA_RO; when Redis lost its script cache (a restart), one EVAL_RO that refills it.

        The read-only variants (Redis 7) refuse any write inside the script, so the service's
        Redis user needs no right to write: `+evalsha_ro +eval_ro`, not `+@scripting`.
        """
        try:
            return await self._execute("EVALSHA_RO", self._shas[script], len(keys), *keys, *args)
        except NoScriptError:
            return await self._execute("EVAL_RO", script.source, len(keys), *keys, *args)

    async def refresh(self) -> None:
        """Nothing to refresh: one node has no topology."""

    async def ping(self) -> bool:
        """Whether Redis answers, and this process's slot is the one that feeds its version.

        A version is fed by one slot (its `owner` key); a process whose settings pair the
        version with another slot would answer consistency tokens from a checkpoint nobody
        moves: it stays NOT_SERVING, saying why, so that a rolling update with that mistake
        stops at its first pod.
        """
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.ping()
            pipe.get(self._schema.owner())
            answered, owner = await pipe.execute()
        if owner is not None and owner.decode() != self._slot:
            if not self._mismatch_logged:
                log.error(
                    "HISTORY_SLOT_NAME %s does not feed %s (its slot is %s): not serving",
                    self._slot,
                    self.namespace,
                    owner.decode(),
                )
                self._mismatch_logged = True
            return False
        return bool(answered)

    async def payment_response(self, payment_id: str, min_lsn: int = 0, until: float = 0.0) -> bytes | None:
        """The GetPaymentResponse bytes of the payment, timeline oldest first; None when absent."""
        keys = [self._schema.payment(payment_id), self._schema.payment_timeline(payment_id)]
        if min_lsn:
            keys.append(self._checkpoint_key)
        try:
            checkpoint, response = await self._run(PAYMENT_SCRIPT, keys, _PAYMENT_ARGS)
        except REDIS_ERRORS as error:
            raise ReadModelUnavailable() from error
        _reached(checkpoint, min_lsn)
        return response  # type: ignore[no-any-return]

    async def timelines(self, payment_ids: Iterable[str]) -> dict[str, list[read_model_pb2.TimelineEntry]]:
        """The timelines of several payments in one round trip."""
        return await read_timelines(self._redis, self._schema, payment_ids)

    async def account(
        self, account_id: str, min_lsn: int = 0, until: float = 0.0
    ) -> read_model_pb2.AccountView | None:
        try:
            if min_lsn:
                async with self._redis.pipeline(transaction=False) as pipe:
                    pipe.hget(self._checkpoint_key, CHECKPOINT_LSN_FIELD)
                    pipe.hget(self._schema.account(account_id), VIEW_FIELD)
                    checkpoint, raw = await pipe.execute()
                _reached(checkpoint, min_lsn)
            else:
                raw = await self._redis.execute_command("HGET", self._schema.account(account_id), VIEW_FIELD)  # type: ignore[no-untyped-call]
        except REDIS_ERRORS as error:
            raise ReadModelUnavailable() from error
        return None if raw is None else read_model_pb2.AccountView.FromString(raw)

    async def account_exists(self, account_id: str) -> bool:
        """Whether the account has a view: a deleted one leaves a tombstone (a position, no view)."""
        try:
            return bool(await self._redis.hexists(self._schema.account(account_id), VIEW_FIELD))
        except REDIS_ERRORS as error:
            raise ReadModelUnavailable() from error

    async def page(
        self, query: ListQuery, cursor: str | None, size: int, min_lsn: int = 0, until: float = 0.0
    ) -> Page | None:
        """One page of the query, newest first; None when the account does not exist."""
        upper, lower, count = index_range(query, cursor, size)
        keys = [
            self._schema.account(query.account_id),
            self._schema.account_index(query.account_id, query.direction, query.status),
        ]
        if min_lsn:
            keys.append(self._checkpoint_key)
        try:
            reply = await self._run(PAGE_SCRIPT, keys, (upper, lower, count, *self._page_args))
        except REDIS_ERRORS as error:
            raise ReadModelUnavailable() from error
        _reached(reply[0], min_lsn)
        if not reply[1]:
            return None
        return Page(payments=reply[2], next_cursor=None if reply[3] is None else _text(reply[3]))

    async def held_page(
        self, cursor: str | None, size: int, min_lsn: int = 0, until: float = 0.0
    ) -> HeldPage | None:
        """One page of the review queue, oldest first; None when the namespace was built without it.

        A namespace with neither the queue's feature nor a checkpoint is being built (or lost
        its data): ReadModelUnavailable, to retry, rather than an answer about its features.
        """
        lower, count = queue_range(cursor, size)
        try:
            reply = await self._run(HELD_SCRIPT, self._held_keys, (lower, count, *self._held_args))
        except REDIS_ERRORS as error:
            raise ReadModelUnavailable() from error
        _reached(reply[0], min_lsn)
        checkpoint = int(reply[0]) if reply[0] is not None else 0
        if not reply[1]:
            if not checkpoint:
                raise ReadModelUnavailable()
            return None
        return HeldPage(reply[2], None if reply[3] is None else _text(reply[3]), checkpoint)


async def read_timelines(
    client: Redis | RedisCluster, schema: KeySchema, payment_ids: Iterable[str]
) -> dict[str, list[read_model_pb2.TimelineEntry]]:
    """The timelines of several payments, pipelined (on a cluster, one round trip per master)."""
    ids = list(dict.fromkeys(payment_ids))
    if not ids:
        return {}
    try:
        async with client.pipeline(transaction=False) as pipe:
            for payment_id in ids:
                pipe.hgetall(schema.payment_timeline(payment_id))
            replies = await pipe.execute()
    except REDIS_ERRORS as error:
        raise ReadModelUnavailable() from error
    return {payment_id: timeline_of(raw) for payment_id, raw in zip(ids, replies, strict=True)}


def timeline_of(raw: dict[bytes, bytes]) -> list[read_model_pb2.TimelineEntry]:
    ordered = sorted(raw.items(), key=lambda item: int(item[0]))
    return [read_model_pb2.TimelineEntry.FromString(value) for _, value in ordered]
