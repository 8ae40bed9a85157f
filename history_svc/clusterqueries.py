"""The read models' Redis adapter on a Redis Cluster: each read on the master that owns its entity, with that master's checkpoint.

The replicator moves a master's own checkpoint (`KeySchema.node_checkpoint`) in the same
atomic call as that master's part of a batch (replicator/clustersink.py), so a master's
checkpoint, read before its data, says which changes the data includes. A read compares
the checkpoints of the masters it read with its consistency token: at or past it, the data
of those masters includes the token's write, whatever the other masters hold.

Reads are routed by hand, not through redis-py's cluster client: that client finds the
keys of `EVALSHA_RO` (a command with movable keys) with a `COMMAND GETKEYS` round trip to
one node before every call, and would send a page's pipelined reads of other slots through
its own retries. Here each read is one round trip to the master of its key's slot, found in
the client's slot table; a refusal that says the slot moved (MOVED, ASK, TRYAGAIN,
CLUSTERDOWN, a non-local key) or a lost connection refreshes the table and retries, until
the call's retry deadline, then ReadModelUnavailable.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

from redis.asyncio.cluster import ClusterNode, PipelineCommand
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.crc import key_slot
from redis.exceptions import (
    AuthenticationError,
    ClusterError,
    NoScriptError,
    RedisClusterException,
    ResponseError,
    SlotNotCoveredError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from history_svc import wire
from history_svc.paging import ListQuery, index_range, queue_range
from history_svc.queries import (
    LUA_PAGE_CUT,
    REDIS_ERRORS,
    CheckpointBehind,
    HeldPage,
    Page,
    ReadModelUnavailable,
    Script,
    payment_script,
    read_timelines,
)
from payments.readmodel.v1 import read_model_pb2
from payments_common.keys import (
    CHECKPOINT_LSN_FIELD,
    CHECKPOINT_NODE_FIELD,
    DEFAULT_SLOT_NAME,
    FEATURE_REVIEW_QUEUE,
    META_FEATURES_FIELD,
    VIEW_FIELD,
    KeySchema,
    node_tags,
    parse_features,
)
from payments_common.redisconn import topology_moved

T = TypeVar("T")

log = logging.getLogger(__name__)

# A script that reads keys of other slots of its node (its node's checkpoint, not declared)
# and writes nothing, so that EVALSHA_RO may run it.
# A node's checkpoint counts only where that node wrote it: one that a reshard carried here
# with its slot is another node's, and says nothing of this one's data (read as none).
_NODE_READ: Final = (
    "#!lua flags=no-writes,allow-cross-slot-keys\n"
    + """
local function node_checkpoint(key, node)
  local found = redis.call('HMGET', key, '@LSN@', '@NODE@')
  if found[2] ~= node then return false end
  return found[1]
end
""".replace("@LSN@", CHECKPOINT_LSN_FIELD).replace("@NODE@", CHECKPOINT_NODE_FIELD)
)

# KEYS: payment hash, timeline hash. ARGV: the tags of PaymentView.timeline and of
# GetPaymentResponse.payment, the node's checkpoint hash, the node's name (host:port). Returns
# {node checkpoint lsn or nil, GetPaymentResponse bytes or nil}: the one node's script
# (`payment_script`), with the node's checkpoint read first.
CLUSTER_PAYMENT_SCRIPT: Final = Script(
    payment_script("\nlocal checkpoint = node_checkpoint(ARGV[3], ARGV[4])\n", prelude=_NODE_READ)
)

# KEYS: account hash, index zset. ARGV: upper bound, lower bound, the number of members to
# range (page size + 1; 0 when the bounds match nothing), the node's checkpoint hash, the
# node's name. Returns
# {node checkpoint lsn or nil, 0} when the account does not exist or was deleted, else
# {checkpoint, 1, the page's members (at most page size), the next cursor or nil}. The views
# live on the payments' nodes: the caller reads them there.
CLUSTER_PAGE_SCRIPT: Final = Script(
    (
        _NODE_READ
        + LUA_PAGE_CUT
        + """
local checkpoint = node_checkpoint(ARGV[4], ARGV[5])
if redis.call('HEXISTS', KEYS[1], '@VIEW@') == 0 then return {checkpoint, 0} end
local limit = tonumber(ARGV[3])
if limit == 0 then return {checkpoint, 1, {}, false} end
local members = redis.call('ZRANGE', KEYS[2], ARGV[1], ARGV[2], 'BYLEX', 'REV', 'LIMIT', 0, limit)
local cursor = cut(members, limit)
return {checkpoint, 1, members, cursor}
"""
    )
    .replace("@LSN@", CHECKPOINT_LSN_FIELD)
    .replace("@VIEW@", VIEW_FIELD)
)

# KEYS: review queue zset. ARGV: lower bound, the number of members to range (page size + 1),
# the node's checkpoint hash, the node's name. Returns {node checkpoint lsn or nil, the page's members, the
# next cursor or nil}.
CLUSTER_QUEUE_SCRIPT: Final = Script(
    (
        _NODE_READ
        + LUA_PAGE_CUT
        + """
local checkpoint = node_checkpoint(ARGV[3], ARGV[4])
local limit = tonumber(ARGV[2])
local members = redis.call('ZRANGE', KEYS[1], ARGV[1], '+', 'BYLEX', 'LIMIT', 0, limit)
local cursor = cut(members, limit)
return {checkpoint, members, cursor}
"""
    ).replace("@LSN@", CHECKPOINT_LSN_FIELD)
)

# Errors after which the same read may succeed on a refreshed topology, besides the refusals
# that say so (`topology_moved`).
_TOPOLOGY_ERRORS: Final = (
    # No node serves the key's slot, or none could be reached (a failover under way).
    RedisClusterException,
    ClusterError,
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
)


# How long the readiness probe waits for each master: within the probe's own bound (2 s), so
# that a master that hangs counts as one that cannot be reached.
PING_SECONDS: Final = 1.0


async def _within(seconds: float, calls: list[Awaitable[Any]]) -> list[Any]:
    """Each call's reply, or its error; a call not done within `seconds` gives a TimeoutError.

    Waited for without cancelling them (a redis-py call may lose a cancellation); the calls
    left are cancelled after, and end by their own socket timeout at the latest.
    """
    tasks = [asyncio.ensure_future(call) for call in calls]
    for task in tasks:
        task.add_done_callback(_retrieved)
    try:
        await asyncio.wait(tasks, timeout=seconds)
    finally:
        for task in tasks:
            if not task.done():
                task.cancel()
    return [
        (task.exception() or task.result())
        if task.done() and not task.cancelled()
        else TimeoutError(f"no answer within {seconds:g} s")
        for task in tasks
    ]


def _retrieved(task: asyncio.Future[Any]) -> None:
    """Takes a call's outcome, so that asyncio never reports it as never retrieved (a call left, or
    one whose waiter was cancelled)."""
    if not task.cancelled():
        task.exception()


def _unreachable(error: BaseException) -> bool:
    """Whether a node's error says it could not be reached (down, hung, loading), or that the
    slot table is out of date (a failover under way or done: MOVED, CLUSTERDOWN), not that it
    refused the call."""
    if isinstance(error, AuthenticationError):
        return False  # a refused login: every read of the node would be refused too
    if isinstance(error, ResponseError):
        return topology_moved(error)
    return isinstance(error, RedisConnectionError | RedisTimeoutError | OSError | TimeoutError)


# The pause between two tries of a read whose node is failing over.
RETRY_PAUSE_SECONDS: Final = 0.1


def _checkpoint_read(key: str) -> tuple[object, ...]:
    """The command that reads a node's checkpoint with the node that wrote it."""
    return ("HMGET", key, CHECKPOINT_LSN_FIELD, CHECKPOINT_NODE_FIELD)


def _node_lsn(reply: list[bytes | None], node: ClusterNode) -> int:
    """A node's checkpoint read by `_checkpoint_read`: 0 unless that node wrote it."""
    lsn, writer = reply
    return _lsn(lsn) if writer is not None and writer.decode() == node.name else 0


def _lsn(raw: bytes | None) -> int:
    return int(raw) if raw is not None else 0


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ClusterNodes:
    """Where a key lives: the master of its slot, and that master's own checkpoint key, from the client's slot table.

    A master's checkpoint carries the tag of the lowest slot it serves
    (`payments_common.keys.node_tag`), as the replicator derives it from the same topology.
    """

    def __init__(self, cluster: AsyncRedisCluster, schema: KeySchema) -> None:
        self._cluster = cluster
        self._schema = schema
        self._table: object = None
        self._checkpoints: dict[str, str] = {}

    async def master(self, key: str) -> ClusterNode:
        """The master of the key's slot (the topology is read first, once)."""
        await self._cluster.initialize()
        owners = self._cluster.nodes_manager.slots_cache.get(key_slot(key.encode()))
        if not owners:
            raise SlotNotCoveredError(f"no node serves the slot of {key}")
        return owners[0]

    def checkpoint_key(self, node: ClusterNode) -> str:
        """The key of the master's own checkpoint."""
        table = self._cluster.nodes_manager.slots_cache
        if table is not self._table:
            tags = node_tags((slot, owners[0].name) for slot, owners in table.items() if owners)
            self._checkpoints = {name: self._schema.node_checkpoint(tag) for name, tag in tags.items()}
            self._table = table
        key = self._checkpoints.get(node.name)
        if key is None:
            raise SlotNotCoveredError(f"{node.name} serves no slot")
        return key

    async def refresh(self) -> None:
        """Reads the cluster's topology again (redis-py lets concurrent callers share one refresh)."""
        try:
            await self._cluster.nodes_manager.initialize()
        except REDIS_ERRORS as error:
            log.warning("could not read the Redis Cluster's topology: %s", error)
        # The table may also have been patched in place (a MOVED the client saw): recompute.
        self._table = None


class ClusterReadModel:
    """Reads the views that the replicator writes on a Redis Cluster; ReadModelUnavailable when it cannot.

    GetPayment is one script on the payment's master, GetAccount one round trip to the
    account's master; a page is the index (or queue) read on its master, then the views of
    its payments read from their masters, in parallel, one round trip per master. Every read
    also reads each master's checkpoint, first: with a consistency token, the read is
    CheckpointBehind unless every checkpoint it read is at or past the token.

    `retry_seconds` bounds the retries of a read given no deadline of its own.
    """

    def __init__(
        self,
        cluster: AsyncRedisCluster,
        schema: KeySchema,
        slot: str = DEFAULT_SLOT_NAME,
        retry_seconds: float = 5.0,
    ) -> None:
        self._cluster = cluster
        self._schema = schema
        self.namespace = schema.namespace
        self._slot = slot
        self._retry_seconds = retry_seconds
        self._nodes = ClusterNodes(cluster, schema)
        self._mismatch_logged = False
        # Whether the slot's `owner` was this process's slot (or none) when last read; None
        # until it has been read.
        self._owner_verdict: bool | None = None
        self._refreshing: asyncio.Future[None] | None = None
        self._shas = {
            script: script.sha
            for script in (CLUSTER_PAYMENT_SCRIPT, CLUSTER_PAGE_SCRIPT, CLUSTER_QUEUE_SCRIPT)
        }

    async def refresh(self) -> None:
        await self._nodes.refresh()

    # -- one round trip to the master of a key, retried while the topology moves ----------------

    def _until(self, until: float) -> float:
        return until if until else time.monotonic() + self._retry_seconds

    async def _retrying(self, until: float, attempt: Callable[[], Awaitable[T]]) -> T:
        """`await attempt()`, tried again on a refreshed topology while the cluster says it moved, until `until`."""
        deadline = self._until(until)
        while True:
            try:
                return await attempt()
            except ResponseError as error:
                if not topology_moved(error):
                    raise ReadModelUnavailable() from error
                failure: Exception = error
            except _TOPOLOGY_ERRORS as error:
                failure = error
            except REDIS_ERRORS as error:
                raise ReadModelUnavailable() from error
            if time.monotonic() + RETRY_PAUSE_SECONDS >= deadline:
                raise ReadModelUnavailable() from failure
            log.info("a read will be tried again on a refreshed topology: %r", failure)
            try:
                # Reading the topology asks node after node: on a hung cluster, within the budget.
                async with asyncio.timeout(deadline - time.monotonic()):
                    await self._nodes.refresh()
            except TimeoutError:
                raise ReadModelUnavailable() from failure
            await asyncio.sleep(RETRY_PAUSE_SECONDS)

    async def _on_master(self, key: str, until: float, read: Callable[[ClusterNode, str], Awaitable[T]]) -> T:
        """`await read(node, its checkpoint key)` on the master of `key`, retried as `_retrying` does."""

        async def attempt() -> T:
            node = await self._nodes.master(key)
            return await read(node, self._nodes.checkpoint_key(node))

        return await self._retrying(until, attempt)

    async def _script(
        self, node: ClusterNode, script: Script, keys: Sequence[str], args: Sequence[object]
    ) -> Any:
        """One EVALSHA_RO on the node; when the node lacks the script (a promoted replica, a restart), EVAL_RO."""
        try:
            return await node.execute_command("EVALSHA_RO", self._shas[script], len(keys), *keys, *args)
        except NoScriptError:
            return await node.execute_command("EVAL_RO", script.source, len(keys), *keys, *args)

    @staticmethod
    async def _pipeline(node: ClusterNode, commands: Sequence[tuple[object, ...]]) -> list[Any]:
        """The commands in one round trip on the node's connection; the first refusal is raised."""
        pending = [PipelineCommand(index, *command) for index, command in enumerate(commands)]
        await node.execute_pipeline(pending)
        for command in pending:
            if isinstance(command.result, Exception):
                raise command.result
        return [command.result for command in pending]

    async def _hgets_with_checkpoint(
        self, key: str, reads: Sequence[tuple[str, str]], until: float
    ) -> tuple[int, list[Any]]:
        """The master's checkpoint, then HGET of each (key, field) (all on the master of `key`)."""

        async def read(node: ClusterNode, checkpoint_key: str) -> tuple[int, list[Any]]:
            replies = await self._pipeline(
                node, [_checkpoint_read(checkpoint_key), *(("HGET", k, f) for k, f in reads)]
            )
            return _node_lsn(replies[0], node), replies[1:]

        return await self._on_master(key, until, read)

    async def _views(self, members: list[bytes], until: float) -> tuple[list[bytes | None], int]:
        """The views of the members' payments (None: gone) and the lowest checkpoint read with them.

        One round trip per master, all in parallel; each master's checkpoint is read first.
        """
        keys = [self._schema.payment(_text(member).partition(":")[2]) for member in members]

        async def attempt() -> tuple[list[bytes | None], int]:
            groups: dict[str, tuple[ClusterNode, list[int]]] = {}
            for index, key in enumerate(keys):
                node = await self._nodes.master(key)
                groups.setdefault(node.name, (node, []))[1].append(index)
            results = await asyncio.gather(
                *(
                    self._pipeline(
                        node,
                        [
                            _checkpoint_read(self._nodes.checkpoint_key(node)),
                            *(("HGET", keys[i], VIEW_FIELD) for i in indexes),
                        ],
                    )
                    for node, indexes in groups.values()
                )
            )
            views: list[bytes | None] = [None] * len(keys)
            lowest = min(
                _node_lsn(replies[0], node)
                for (node, _), replies in zip(groups.values(), results, strict=True)
            )
            for (_, indexes), replies in zip(groups.values(), results, strict=True):
                for index, reply in zip(indexes, replies[1:], strict=True):
                    views[index] = reply
            return views, lowest

        return await self._retrying(until, attempt)

    # -- the reads ---------------------------------------------------------------------------

    async def ping(self) -> bool:
        """Whether history can serve: a master answers, none refuses, and this process's slot feeds its version.

        A master that cannot be reached (killed or hung, until its replica takes over) leaves
        history serving: history's processes all reach the same masters, and NOT_SERVING
        would take every one of them out of its Service and fail every read, not only those
        that need that master (UNAVAILABLE meanwhile, or answered once the replica has taken
        over, within the call's deadline). No master answering, or any refusing (a login, an
        ACL), is raised, as on one node: the readiness probe logs it and reports NOT_SERVING.
        Each master is asked once, without the client's retries, all at once, and waited for
        at most PING_SECONDS; after a failure the slot table is read again in the background,
        for the next probe. The slot's `owner` is read on its master meanwhile: while that
        master cannot be reached, the last verdict stands, and a process has none until it
        has read it once (NOT_SERVING).
        """
        await self._cluster.initialize()
        masters = self._cluster.get_primaries()
        if not masters:
            raise SlotNotCoveredError("the cluster has no master")
        owner_key = self._schema.owner()
        owner_node = await self._nodes.master(owner_key)
        *replies, owner = await _within(
            PING_SECONDS,
            [
                *(node.execute_command("PING") for node in masters),
                owner_node.execute_command("GET", owner_key),
            ],
        )
        failures = [reply for reply in (*replies, owner) if isinstance(reply, BaseException)]
        if failures:
            self._refresh_in_background()
        refusals = [failure for failure in failures if not _unreachable(failure)]
        if refusals:
            raise refusals[0]
        if all(isinstance(reply, BaseException) for reply in replies):
            raise replies[0]
        if isinstance(owner, BaseException):
            if self._owner_verdict is None:
                raise owner
            return self._owner_verdict
        self._owner_verdict = owner is None or _text(owner) == self._slot
        if not self._owner_verdict and not self._mismatch_logged:
            log.error(
                "HISTORY_SLOT_NAME %s does not feed %s (its slot is %s): not serving",
                self._slot,
                self.namespace,
                _text(owner),
            )
            self._mismatch_logged = True
        return self._owner_verdict

    def _refresh_in_background(self) -> None:
        """Reads the slot table again, once at a time, without waiting for it."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._nodes.refresh())
            self._refreshing.add_done_callback(_retrieved)

    async def payment_response(self, payment_id: str, min_lsn: int = 0, until: float = 0.0) -> bytes | None:
        """The GetPaymentResponse bytes of the payment, timeline oldest first; None when absent."""
        keys = [self._schema.payment(payment_id), self._schema.payment_timeline(payment_id)]

        async def read(node: ClusterNode, checkpoint_key: str) -> Any:
            return await self._script(
                node,
                CLUSTER_PAYMENT_SCRIPT,
                keys,
                (wire.PAYMENT_VIEW_TIMELINE, wire.GET_PAYMENT_RESPONSE_PAYMENT, checkpoint_key, node.name),
            )

        checkpoint, response = await self._on_master(keys[0], until, read)
        _reached(_lsn(checkpoint), min_lsn)
        return response  # type: ignore[no-any-return]

    async def account(
        self, account_id: str, min_lsn: int = 0, until: float = 0.0
    ) -> read_model_pb2.AccountView | None:
        key = self._schema.account(account_id)
        checkpoint, (raw,) = await self._hgets_with_checkpoint(key, [(key, VIEW_FIELD)], until)
        _reached(checkpoint, min_lsn)
        return None if raw is None else read_model_pb2.AccountView.FromString(raw)

    async def account_exists(self, account_id: str) -> bool:
        """Whether the account has a view: a deleted one leaves a tombstone (a position, no view)."""
        key = self._schema.account(account_id)
        _, (raw,) = await self._hgets_with_checkpoint(key, [(key, VIEW_FIELD)], 0.0)
        return raw is not None

    async def timelines(self, payment_ids: Iterable[str]) -> dict[str, list[read_model_pb2.TimelineEntry]]:
        """The timelines of several payments, one round trip per master."""
        return await read_timelines(self._cluster, self._schema, payment_ids)

    async def page(
        self, query: ListQuery, cursor: str | None, size: int, min_lsn: int = 0, until: float = 0.0
    ) -> Page | None:
        """One page of the query, newest first; None when the account does not exist."""
        upper, lower, count = index_range(query, cursor, size)
        keys = [
            self._schema.account(query.account_id),
            self._schema.account_index(query.account_id, query.direction, query.status),
        ]

        async def read(node: ClusterNode, checkpoint_key: str) -> Any:
            return await self._script(
                node, CLUSTER_PAGE_SCRIPT, keys, (upper, lower, count, checkpoint_key, node.name)
            )

        reply = await self._on_master(keys[0], until, read)
        checkpoint = _lsn(reply[0])
        _reached(checkpoint, min_lsn)
        if not reply[1]:
            return None
        members: list[bytes] = list(reply[2])
        payments = b""
        if members:
            views, lowest = await self._views(members, until)
            _reached(lowest, min_lsn)
            payments = b"".join(
                wire.length_delimited(wire.LIST_PAYMENTS_RESPONSE_PAYMENTS, view)
                for view in views
                if view is not None
            )
        return Page(payments=payments, next_cursor=None if reply[3] is None else _text(reply[3]))

    async def held_page(
        self, cursor: str | None, size: int, min_lsn: int = 0, until: float = 0.0
    ) -> HeldPage | None:
        """One page of the review queue, oldest first; None when the namespace was built without it.

        The page's checkpoint is the lowest of the masters' checkpoints it read (the queue's,
        the `meta` hash's and the views'): it includes every change up to that position.
        """
        lower, count = queue_range(cursor, size)
        queue = self._schema.review_queue()
        meta = self._schema.meta()

        async def read_queue(node: ClusterNode, checkpoint_key: str) -> Any:
            return await self._script(
                node, CLUSTER_QUEUE_SCRIPT, [queue], (lower, count, checkpoint_key, node.name)
            )

        queued, (meta_checkpoint, (features,)) = await asyncio.gather(
            self._on_master(queue, until, read_queue),
            self._hgets_with_checkpoint(meta, [(meta, META_FEATURES_FIELD)], until),
        )
        checkpoint = min(_lsn(queued[0]), meta_checkpoint)
        _reached(checkpoint, min_lsn)
        if FEATURE_REVIEW_QUEUE not in parse_features(features):
            if not checkpoint:
                raise ReadModelUnavailable()
            return None
        members: list[bytes] = list(queued[1])
        payments = b""
        if members:
            views, lowest = await self._views(members, until)
            checkpoint = min(checkpoint, lowest)
            _reached(checkpoint, min_lsn)
            payments = b"".join(
                wire.length_delimited(wire.LIST_HELD_PAYMENTS_RESPONSE_PAYMENTS, view)
                for view in views
                if view is not None
            )
        return HeldPage(payments, None if queued[2] is None else _text(queued[2]), checkpoint)


def _reached(checkpoint: int, min_lsn: int) -> None:
    """Raises CheckpointBehind when a token's read found a master's checkpoint below `min_lsn`."""
    if min_lsn and checkpoint < min_lsn:
        raise CheckpointBehind(checkpoint)
