"""The apply stage on a Redis Cluster: each batch as one fenced script call per node, made durable, then the checkpoint.

On one node a batch is one script (replicator/sink.py). On a cluster no script may touch
keys of another node, so a batch is applied in two steps:

1. Every master with writes in the batch gets one call of `APPLY_ON_NODE` with the writes
   to the entities it serves (their keys passed as arguments: the script's
   `allow-cross-slot-keys` flag lets it touch any key of its own node). When the batch
   moves the checkpoint, each call is followed on the same connection by `WAIT`, until
   `wait_replicas` replicas have everything the master wrote (masters written by earlier
   batches without a checkpoint, a large transaction's chunks, are called and waited for
   too). The masters work in parallel.
2. Only once every master has accepted its part, and its replicas have it, every master's
   own checkpoint moves (another `APPLY_ON_NODE` call, without writes) and, on the slot's
   master, the slot's checkpoint moves and the change notification is appended (the
   single-node script with no writes: the lock, the checkpoint and the change stream share
   the slot's hash tag), each followed by `WAIT`. Only a position past this step is
   confirmed to PostgreSQL, so an acknowledged change is on at least `wait_replicas`
   replicas of every master that holds a part of it, and survives the failover of any one
   master; and a master's checkpoint never covers a write that a refused call left out.

Fencing: the lock lives on one node, where another node's script cannot read it. Each
session takes a number from the slot's epoch counter (while it holds the lock) and writes
it into every master's fence hash, unless a later session's number is there already;
a node's script writes nothing unless the fence holds its session's number. An instance
that lost the lock to another is refused everywhere as soon as the other has claimed the
nodes, which it does before it writes anything.

Topology: a node's fence and checkpoint carry the hash tag of the lowest slot it serves
(payments_common.keys.node_tag), so readers find a node's checkpoint from the topology
alone. Any refusal that says the topology moved (MOVED, ASK, a key that the node does not
own, CLUSTERDOWN, TRYAGAIN), and any lost connection, refreshes the client's topology and
ends the session; the next one starts from the slot's checkpoint, and per-entity position
fencing makes the replay harmless. A node's script checks that it owns every key before
it writes any, so a refused call writes nothing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from hashlib import sha1
from typing import TYPE_CHECKING, Any, Final

import hiredis
import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import key_slot

from payments_common import keys
from payments_common.keys import KeySchema
from payments_common.redisconn import topology_moved
from replicator.encode import EncodedBatch
from replicator.lock import LockLost, SlotLock
from replicator.sink import _PACKERS, _SCRIPTS, APPLY_OPS, NEWER, Arg, Sink, fill_fields, pack_evalsha

if TYPE_CHECKING:
    from payments_common.redisconn import SyncClient
    from replicator.config import Settings

log = logging.getLogger(__name__)

_CROSS_SLOT: Final = "#!lua flags=allow-cross-slot-keys\n"
_FENCED: Final = """if redis.call('HGET', KEYS[1], '@EPOCH@') ~= ARGV[1] then
  return redis.error_reply('LOCKLOST another session of the slot owns this node')
end
"""

# One batch's writes to the entities of one node, and the node's checkpoint.
# KEYS: the node's fence, the node's checkpoint (both with the node's own hash tag).
# ARGV: the session's epoch, the checkpoint position ('' = none), commit time in us ('' =
#       unchanged), source time in us ('' = unchanged), the node's name (host:port), the
#       number of keys, the keys, the number of slots they are in and, for each slot, the
#       number of its distinct keys and their indexes in the keys, then the ops as
#       APPLY_BATCH takes them, their keys numbered from 1 in that list.
# Before anything is written, one EXISTS per slot touches every distinct key of that slot: a
# slot this node does not serve, or one that it is migrating away (its missing keys would be
# asked of the target), refuses it there ("non local key"), so a refused call writes nothing.
APPLY_ON_NODE: Final = fill_fields(
    _CROSS_SLOT
    + NEWER
    + _FENCED
    + """local n = tonumber(ARGV[6])
local K = {}
for i = 1, n do K[i] = ARGV[6 + i] end
local j = 8 + n
for _ = 1, tonumber(ARGV[7 + n]) do
  local count = tonumber(ARGV[j])
  local group = {}
  for i = 1, count do group[i] = K[tonumber(ARGV[j + i])] end
  redis.call('EXISTS', unpack(group))
  j = j + 1 + count
end
local k, a, applied, skipped = 1, j, 0, 0
"""
    + APPLY_OPS.replace("KEYS[", "K[")
    + """if ARGV[2] ~= '' then
  -- A checkpoint that another node wrote came with a slot that moved here: it says nothing
  -- of this node, which has everything up to this batch.
  local ours = redis.call('HGET', KEYS[2], '@NODE@') == ARGV[5]
  local cur = redis.call('HGET', KEYS[2], '@CHECKPOINT_LSN@')
  if not ours or not (cur and newer(cur, ARGV[2])) then
    redis.call('HSET', KEYS[2], '@CHECKPOINT_LSN@', ARGV[2], '@NODE@', ARGV[5])
    if ARGV[3] ~= '' then redis.call('HSET', KEYS[2], '@COMMIT_TIME@', ARGV[3]) end
    if ARGV[4] ~= '' then redis.call('HSET', KEYS[2], '@SOURCE_TIME@', ARGV[4]) end
  end
end
-- Always a write: a WAIT after the call then covers everything the node wrote before it.
redis.call('HSET', KEYS[1], '@EPOCH@', ARGV[1])
return {applied, skipped}
"""
)

# Takes the next session number, only while the caller holds the lock, and records the tags
# of the fences the session claims. KEYS: the lock, the epoch counter, the tags of the fences
# ever claimed (the slot's hash tag). ARGV: owner token, the session's tags. Returns
# {epoch, the tags recorded before}.
NEXT_EPOCH: Final = """if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return redis.error_reply('LOCKLOST the slot lock is not held by this instance')
end
local known = redis.call('SMEMBERS', KEYS[3])
for i = 2, #ARGV do redis.call('SADD', KEYS[3], ARGV[i]) end
return {redis.call('INCR', KEYS[2]), known}
"""

# Makes a node writable by the caller's session, unless a later session has claimed it.
# KEYS: the node's fence. ARGV: the session's epoch.
CLAIM_NODE: Final = fill_fields(
    """local cur = tonumber(redis.call('HGET', KEYS[1], '@EPOCH@') or '0')
if cur > tonumber(ARGV[1]) then
  return redis.error_reply('LOCKLOST a later session of the slot owns this node')
end
redis.call('HSET', KEYS[1], '@EPOCH@', ARGV[1])
return 1
"""
)

# Removes keys of one node. KEYS: the node's fence. ARGV: the session's epoch, the keys.
UNLINK_ON_NODE: Final = fill_fields(
    _CROSS_SLOT
    + _FENCED
    + """local removed = 0
for i = 2, #ARGV do removed = removed + redis.call('UNLINK', ARGV[i]) end
return removed
"""
)

# Sets a field of a hash of one node. KEYS: the node's fence. ARGV: epoch, hash, field, value.
HSET_ON_NODE: Final = fill_fields(
    _CROSS_SLOT + _FENCED + "return redis.call('HSET', ARGV[2], ARGV[3], ARGV[4])\n"
)

_CLUSTER_SCRIPTS: Final = {
    "apply_on_node": APPLY_ON_NODE,
    "next_epoch": NEXT_EPOCH,
    "claim_node": CLAIM_NODE,
    "unlink_on_node": UNLINK_ON_NODE,
    "hset_on_node": HSET_ON_NODE,
}

# How long one WAIT blocks before the node is asked again (and the lock keeper hears of progress).
WAIT_STEP_MS: Final = 500


class TopologyChanged(redis.RedisError):
    """A node refused a call because the cluster's slots or masters changed: the session restarts."""


class NotDurable(redis.RedisError):
    """A node's replicas did not acknowledge its writes in time: nothing past them is confirmed."""


def _sha(body: str) -> str:
    return sha1(body.encode()).hexdigest()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class _Call:
    """Commands sent on one node's connection, their replies not read yet.

    The connection is held until `release`: a WAIT counts what this connection wrote, so a
    node is asked again on the connection that wrote.
    """

    def __init__(self, sink: ClusterSink, node: ClusterNode, commands: list[bytes]) -> None:
        self.sink = sink
        self.node = node
        self.pool = sink.cluster.get_redis_connection(node).connection_pool
        self.connection = self.pool.get_connection()
        self.count = 0
        self.dropped = False
        self.send(commands)

    def send(self, commands: list[bytes]) -> None:
        try:
            self.connection.send_packed_command(commands)  # type: ignore[no-untyped-call]
        except BaseException:
            self.drop()
            raise
        self.count = len(commands)

    def replies(self) -> list[Any]:
        """Every command's reply, or its error as the value (a refused script, NOSCRIPT)."""
        out: list[Any] = []
        try:
            for _ in range(self.count):
                try:
                    out.append(self.connection.read_response())
                except redis.ResponseError as error:
                    out.append(error)
        except BaseException:
            self.drop()
            raise
        return out

    def release(self) -> None:
        if not self.dropped:
            self.pool.release(self.connection)

    def drop(self) -> None:
        if not self.dropped:
            self.dropped = True
            self.connection.disconnect()  # type: ignore[no-untyped-call]  # a reply may be half read
            self.pool.release(self.connection)


class ClusterSink(Sink):
    """Applies encoded batches to a Redis Cluster, fenced per node, durable before confirmed.

    `wait_replicas`: how many replicas of a node must have its writes before a position
    past them counts (0: none, on a cluster without replicas); `wait_timeout_seconds`: how
    long to wait for them before the session restarts.
    """

    def __init__(
        self,
        client: RedisCluster,
        schema: KeySchema,
        slot: str,
        lock: SlotLock,
        stream_maxlen: int = 10_000,
        on_progress: Callable[[], None] = lambda: None,
        wait_replicas: int = 1,
        wait_timeout_seconds: float = 30.0,
    ) -> None:
        super().__init__(client, schema, slot, lock, stream_maxlen, on_progress)  # type: ignore[arg-type]
        self.cluster = client
        self.slot = slot
        self.wait_replicas = wait_replicas
        self.wait_timeout_seconds = wait_timeout_seconds
        self.epoch = ""
        # Each master's name and the tag of its fence and checkpoint, from the session's topology.
        self.tags: dict[str, str] = {}
        self._nodes: dict[str, ClusterNode] = {}
        # Masters written by batches without a checkpoint since their replicas were last waited for.
        self._unwaited: set[str] = set()
        # The single-node script moves the slot's checkpoint: its keys share the slot's tag.
        self._scripts = {**_CLUSTER_SCRIPTS, "apply_batch": _SCRIPTS["apply_batch"]}

    def load_scripts(self) -> None:
        # SCRIPT LOAD through the cluster client reaches every master; a replica promoted
        # later lacks them, which a node call finds out (NOSCRIPT) and mends.
        for body in self._scripts.values():
            self.client.script_load(body)
        self._sha = {name: _sha(body) for name, body in self._scripts.items()}

    # -- the session ------------------------------------------------------------------------

    def begin(self) -> None:
        """Takes the session's number and claims every master for it, durably, before any write.

        Every fence found on a master is claimed, not only the one of its lowest slot: a
        fence that moved with its slot (resharding) must not admit an earlier session. A
        fence that a session claimed once and that no master holds any more says that a
        master came back without its data (with its replicas): the slot's checkpoint is
        removed, so that the session rebuilds the read models (`redis_empty`).
        """
        self._read_topology()
        found = self._fences()
        control = self._node_of(self.lock.key)
        fences = self.schema.fence_tags(self.slot)
        ((epoch, known),) = self._on_node(
            control,
            [
                pack_evalsha(
                    self._sha["next_epoch"],
                    [self.lock.key, self.schema.epoch(self.slot), fences],
                    [self.lock.token, *sorted(set(self.tags.values()))],
                )
            ],
            durable=True,
        )
        self.epoch = str(int(epoch))
        held = {tag for tags in found.values() for tag in tags}
        # A fence in the middle of a move may be missed by the scans of both nodes: asked for
        # by name, the client follows the move.
        lost = sorted(
            tag
            for tag in (_text(raw) for raw in known)
            if tag not in held and not self.cluster.exists(self.schema.node_fence(tag))
        )
        calls = [
            (
                name,
                [
                    pack_evalsha(self._sha["claim_node"], [self.schema.node_fence(tag)], [self.epoch])
                    for tag in sorted({self.tags[name], *found.get(name, ())})
                ],
            )
            for name in self.tags
        ]
        self._on_nodes(calls, durable=True)
        log.info(
            "session %s of slot %s writes %d masters: %s",
            self.epoch,
            self.slot,
            len(self.tags),
            ", ".join(sorted(self.tags)),
        )
        if lost:
            log.error(
                "REBUILD: the fences %s of slot %s are on no master: a master came back without its data "
                "(with its replicas); the read models are rebuilt",
                ", ".join(lost),
                self.slot,
            )
            self.clear_checkpoint()

    def _fences(self) -> dict[str, list[str]]:
        """The tags of the node fences each master holds now."""
        pattern = self.schema.node_fence_pattern()
        prefix = len(self.schema.lock_prefix()) + 1
        found: dict[str, list[str]] = {}
        for name, node in self._nodes.items():
            client = self.cluster.get_redis_connection(node)
            found[name] = [
                _text(key)[prefix : -len("}:node")] for key in client.scan_iter(match=pattern, count=1000)
            ]
        return found

    def _read_topology(self) -> None:
        cache = self.cluster.nodes_manager.slots_cache
        uncovered = next((slot for slot in range(16384) if not cache.get(slot)), None)
        if uncovered is not None:
            raise TopologyChanged(f"no node serves slot {uncovered}")
        self.tags = keys.node_tags((slot, owners[0].name) for slot, owners in cache.items())
        self._nodes = {owners[0].name: owners[0] for owners in cache.values()}

    def _node_of(self, key: str) -> str:
        return self._node_of_slot(key_slot(key.encode()), key)

    def _node_of_slot(self, slot: int, key: str) -> str:
        """The master that serves `slot`, where `key` is."""
        owners = self.cluster.nodes_manager.slots_cache.get(slot)
        name = owners[0].name if owners else None
        if name is None or name not in self.tags:
            self._refresh()
            raise TopologyChanged(f"the key {key} is on a node this session does not know")
        return name

    def _refresh(self) -> None:
        try:
            self.cluster.nodes_manager.initialize()
        except redis.RedisError as error:
            log.warning("could not refresh the cluster's topology: %s", error)

    # -- calls on nodes ---------------------------------------------------------------------

    def _on_node(self, name: str, commands: list[bytes], durable: bool) -> list[Any]:
        return self._on_nodes([(name, commands)], durable)[name]

    def _on_nodes(self, calls: Sequence[tuple[str, list[bytes]]], durable: bool) -> dict[str, list[Any]]:
        """Sends each node its commands (and a WAIT when `durable`), all before reading any reply.

        Returns each node's replies to its commands; raises what a refusal means, and
        NotDurable when a node's replicas have not acknowledged within the timeout.
        """
        wait = [self._wait_command()] if durable and self.wait_replicas > 0 else []
        sent: list[tuple[str, list[bytes], _Call]] = []
        try:
            for name, commands in calls:
                sent.append((name, commands, _Call(self, self._nodes[name], [*commands, *wait])))
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            for _, _, call in sent:
                call.drop()
            self._refresh()
            raise
        results: dict[str, list[Any]] = {}
        failure: BaseException | None = None
        live: list[_Call] = []
        try:
            for name, commands, call in sent:
                try:
                    replies = call.replies()
                except (redis.ConnectionError, redis.TimeoutError, OSError) as error:
                    failure = failure or error
                    continue
                live.append(call)
                if any(
                    isinstance(reply, redis.exceptions.NoScriptError) for reply in replies[: len(commands)]
                ):
                    # A promoted replica has no scripts: load them there, and run the calls again.
                    self._load_on(name)
                    call.send([*commands, *wait])
                    replies = call.replies()
                results[name] = replies
            if failure is not None:
                self._refresh()
                raise failure
            for name, commands, _ in sent:
                for reply in results[name][: len(commands)]:
                    if isinstance(reply, redis.ResponseError):
                        self._raise_refusal(name, reply)
            if wait:
                deadline = time.monotonic() + self.wait_timeout_seconds
                for name, commands, call in sent:
                    self._wait_durable(name, call, int(results[name][len(commands)]), deadline)
        finally:
            for call in live:
                call.release()
        return {name: results[name][: len(commands)] for name, commands, _ in sent}

    def _raise_refusal(self, name: str, error: redis.ResponseError) -> None:
        if str(error).startswith("LOCKLOST"):
            raise LockLost(f"node {name}: {error}") from error
        if str(error).startswith("CHECKPOINTMOVED"):
            self._raise_script_error(error)
        if topology_moved(error):
            self._refresh()
            raise TopologyChanged(f"node {name}: {error}") from error
        raise error

    def _wait_durable(self, name: str, call: _Call, acknowledged: int, deadline: float) -> None:
        """Waits until `wait_replicas` replicas of node `name` have what `call`'s connection wrote.

        NotDurable once `deadline` has passed (one deadline for every node of a call).
        """
        while acknowledged < self.wait_replicas:
            if time.monotonic() >= deadline:
                raise NotDurable(
                    f"node {name}: {acknowledged} of {self.wait_replicas} replicas acknowledged its writes"
                    f" within {self.wait_timeout_seconds:.0f}s; nothing past them is confirmed"
                )
            self.on_progress()
            call.send([self._wait_command()])
            (acknowledged,) = call.replies()

    def _wait_command(self) -> bytes:
        packed: bytes = hiredis.pack_command(("WAIT", self.wait_replicas, WAIT_STEP_MS))  # type: ignore[arg-type]
        return packed

    def _load_on(self, name: str) -> None:
        node = self.cluster.get_redis_connection(self._nodes[name])
        for body in self._scripts.values():
            node.script_load(body)

    # -- applying ---------------------------------------------------------------------------

    def apply(self, batch: EncodedBatch, on_applied: Callable[[], None] | None = None) -> None:
        """Applies the batch on every node that it writes, durably, then moves the slot's checkpoint.

        Waited for whole: `on_applied` runs before it returns.
        """
        checkpoint = batch.checkpoint
        if batch.writes or checkpoint is not None:
            self._apply(batch)
        if on_applied is not None:
            on_applied()

    def _apply(self, batch: EncodedBatch) -> None:
        """The batch's writes on their masters, durably, then every master's checkpoint and the slot's.

        Two rounds, each in parallel across the masters. The first writes the entities (and,
        when the batch moves the checkpoint, waits until each master's replicas have them,
        those written by earlier batches without a checkpoint too); only once every master
        has accepted its part does the second move each master's own checkpoint, and, on the
        slot's master, the slot's checkpoint and the change stream. So a master's checkpoint
        never covers a write that a refused or lost call left out, nor one its replicas lack.
        """
        checkpoint = batch.checkpoint
        # Per master: its keys, its ops' arguments, and per slot its distinct keys' indexes.
        per_node: dict[str, tuple[list[str], list[Arg], dict[int, dict[str, int]]]] = {}
        for write in batch.writes:
            write_keys: list[str] = []
            write_args: list[Arg] = []
            _PACKERS[type(write)](write, write_keys, write_args)
            slot = key_slot(write_keys[0].encode())
            node_keys, node_args, slots = per_node.setdefault(
                self._node_of_slot(slot, write_keys[0]), ([], [], {})
            )
            # A write's keys are one entity's: they share its hash tag, so its slot.
            distinct = slots.setdefault(slot, {})
            for offset, key in enumerate(write_keys, start=len(node_keys) + 1):
                distinct.setdefault(key, offset)
            node_keys += write_keys
            node_args += write_args
        written = set(per_node)
        if checkpoint is not None:
            # Masters written by a large transaction's earlier chunks are waited for too.
            for name in self._unwaited:
                per_node.setdefault(name, ([], [], {}))
        if per_node:
            self._on_nodes(
                [
                    (name, [self._node_call(name, ["", "", ""], keys_, args, slots)])
                    for name, (keys_, args, slots) in per_node.items()
                ],
                durable=checkpoint is not None,
            )
        if checkpoint is None:
            self._unwaited |= written
            return
        self._unwaited.clear()
        header: list[Arg] = [
            checkpoint.lsn,
            "" if checkpoint.commit_time_us is None else checkpoint.commit_time_us,
            "" if checkpoint.covered_until_us is None else checkpoint.covered_until_us,
        ]
        notification = b""
        if batch.notification is not None:
            batch.notification.previous_checkpoint_lsn = self.position
            notification = batch.notification.SerializeToString()
        control = pack_evalsha(
            self._sha["apply_batch"],
            [self.lock.key, self.checkpoint_key, self.schema.changes()],
            [
                self.lock.token,
                checkpoint.lsn,
                "" if checkpoint.commit_time_us is None else checkpoint.commit_time_us,
                self.stream_maxlen,
                notification,
                self.position,
                "" if checkpoint.covered_until_us is None else checkpoint.covered_until_us,
            ],
        )
        control_node = self._node_of(self.lock.key)
        # Every master's checkpoint moves, written or not: readers of any master wait on it.
        self._on_nodes(
            [
                (name, [self._node_call(name, header, [], []), *([control] if name == control_node else [])])
                for name in self.tags
            ],
            durable=True,
        )
        self.position = max(self.position, checkpoint.lsn)

    def _node_call(
        self,
        name: str,
        header: list[Arg],
        keys_: list[str],
        args: list[Arg],
        slots: Mapping[int, Mapping[str, int]] | None = None,
    ) -> bytes:
        """The packed call of APPLY_ON_NODE on master `name`: `header` is the checkpoint's three
        arguments, `slots` the distinct keys of each slot that `keys_` are in, with their index
        (from 1) in `keys_`."""
        tag = self.tags[name]
        checks: list[Arg] = [len(slots or ())]
        for distinct in (slots or {}).values():
            checks.append(len(distinct))
            checks += distinct.values()
        return pack_evalsha(
            self._sha["apply_on_node"],
            [self.schema.node_fence(tag), self.schema.node_checkpoint(tag)],
            [self.epoch, *header, name, len(keys_), *keys_, *checks, *args],
        )

    def _execute(self, script: str, keys_: Sequence[str | bytes], args: Sequence[Any]) -> Any:
        """Runs a script whose keys share one slot on that slot's node, durably."""
        first = keys_[0]
        name = self._node_of(first.decode() if isinstance(first, bytes) else first)
        (reply,) = self._on_node(name, [pack_evalsha(self._sha[script], keys_, args)], durable=True)
        return reply

    # -- fenced writes of whole keys ---------------------------------------------------------

    def write_features(self, features: tuple[str, ...]) -> None:
        meta = self.schema.meta()
        name = self._node_of(meta)
        self._on_node(
            name,
            [
                pack_evalsha(
                    self._sha["hset_on_node"],
                    [self.schema.node_fence(self.tags[name])],
                    [self.epoch, meta, keys.META_FEATURES_FIELD, keys.format_features(features)],
                )
            ],
            durable=True,
        )

    def _unlink(self, chunk: Sequence[str | bytes]) -> int:
        self.on_progress()
        per_node: dict[str, list[str | bytes]] = {}
        for key in chunk:
            text = key.decode() if isinstance(key, bytes) else key
            per_node.setdefault(self._node_of(text), []).append(key)
        calls = [
            (
                name,
                [
                    pack_evalsha(
                        self._sha["unlink_on_node"],
                        [self.schema.node_fence(self.tags[name])],
                        [self.epoch, *node_keys],
                    )
                ],
            )
            for name, node_keys in per_node.items()
        ]
        replies = self._on_nodes(calls, durable=True)
        return sum(int(reply) for node_replies in replies.values() for reply in node_replies)

    def clear_checkpoint(self) -> None:
        """Removes the slot's checkpoint and every node's: readers wait until the rebuild has moved them again."""
        self._unlink([self.checkpoint_key, *(self.schema.node_checkpoint(tag) for tag in self.tags.values())])
        self.position = 0


def sink_for(
    client: SyncClient, schema: KeySchema, settings: Settings, lock: SlotLock, on_progress: Callable[[], None]
) -> Sink:
    """The apply stage of the Redis that `client` reaches: one node's, or a cluster's."""
    if isinstance(client, RedisCluster):
        return ClusterSink(
            client,
            schema,
            settings.slot_name,
            lock,
            settings.stream_maxlen,
            on_progress=on_progress,
            wait_replicas=settings.wait_replicas,
            wait_timeout_seconds=settings.redis_timeout_seconds,
        )
    return Sink(client, schema, settings.slot_name, lock, settings.stream_maxlen, on_progress=on_progress)
