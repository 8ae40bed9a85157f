"""The apply stage on a private Redis Cluster: every master written and made durable, fenced, its topology checked."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final, cast

import pytest
import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from payments.readmodel.v1 import read_model_pb2
from payments_common.keys import KeySchema, node_tags
from payments_common.redisconn import sync_client
from replicator.changes import Checkpoint
from replicator.clustersink import ClusterSink, NotDurable, TopologyChanged
from replicator.encode import EncodedBatch, EncodedEntry, EncodedView, EncodedWrite
from replicator.lock import LockLost, SlotLock
from tests.support.replicator import change_batches
from tests.support.waiting import wait_until

SLOT: Final = "s"
SCHEMA: Final = KeySchema.for_redis("rm:v1", SLOT, cluster=True)
# Long enough that no lock expires while a test runs; a test that takes a lock over deletes it.
LOCK_TTL_SECONDS: Final = 60.0


@pytest.fixture
def client(cluster_url: str) -> Iterator[RedisCluster]:
    connection = sync_client(cluster_url)
    assert isinstance(connection, RedisCluster)
    yield connection
    connection.close()


def _ranges(client: RedisCluster) -> list[tuple[int, int, str]]:
    """The cluster's slot ranges and the master that serves each, as the cluster itself reports them."""
    # redis-py types the reply as a list; it parses it into {(start, end): {"primary": (host, port), ...}}.
    shards = cast(dict[tuple[int, int], dict[str, Any]], client.cluster_slots())
    return [
        (start, end, f"{shard['primary'][0]}:{shard['primary'][1]}") for (start, end), shard in shards.items()
    ]


def _masters(client: RedisCluster) -> dict[str, str]:
    """Each master's name and its tag (that of the lowest slot it serves), as the nodes report their slots."""
    tags = node_tags((start, name) for start, _, name in _ranges(client))
    assert len(tags) == 3, tags
    return tags


def _payment_per_master(client: RedisCluster) -> dict[str, str]:
    """A payment id whose keys live on each master."""
    ranges = _ranges(client)
    masters = {name for _, _, name in ranges}
    found: dict[str, str] = {}
    candidate = 0
    while len(found) < len(masters):
        payment_id = f"p{candidate}"
        slot = key_slot(SCHEMA.payment(payment_id).encode())
        (owner,) = [name for start, end, name in ranges if start <= slot <= end]
        found.setdefault(owner, payment_id)
        candidate += 1
    return found


def _sink(client: RedisCluster, token: str, wait_timeout: float = 30.0) -> ClusterSink:
    """A sink whose session has begun: the lock taken with `token`, every master claimed."""
    lock = SlotLock(client, SCHEMA.lock(SLOT), LOCK_TTL_SECONDS, token)
    assert lock.try_acquire()
    sink = ClusterSink(
        client,
        SCHEMA,
        SLOT,
        lock,
        stream_maxlen=100,
        wait_replicas=1,
        wait_timeout_seconds=wait_timeout,
    )
    sink.load_scripts()
    sink.begin()
    sink.read_checkpoint()
    return sink


def _batch(payment_ids: list[str], lsn: int) -> EncodedBatch:
    """Each payment's view at `lsn` (its reference names the position), and the checkpoint moved to `lsn`."""
    writes: list[EncodedWrite] = [
        EncodedView(
            SCHEMA.payment(payment_id),
            lsn,
            read_model_pb2.PaymentView(payment_id=payment_id, reference=f"at {lsn}").SerializeToString(),
        )
        for payment_id in payment_ids
    ]
    return EncodedBatch(writes, Checkpoint(lsn, 1_000 + lsn), read_model_pb2.ChangeBatch(checkpoint_lsn=lsn))


def _lsn(client: redis.Redis | RedisCluster, key: str) -> int | None:
    raw = client.hget(key, "lsn")
    return None if raw is None else int(raw)


def _node_checkpoints(client: RedisCluster) -> dict[str, int | None]:
    return {name: _lsn(client, SCHEMA.node_checkpoint(tag)) for name, tag in _masters(client).items()}


def _changes(client: RedisCluster) -> list[read_model_pb2.ChangeBatch]:
    return change_batches(client.xrange(SCHEMA.changes()))


def _replica_of(client: RedisCluster, master: str) -> redis.Redis:
    """A connection to the master's replica that may read it (READONLY), once the replica is online."""
    host, port = master.rsplit(":", 1)
    admin = redis.Redis(host=host, port=int(port))
    found: list[tuple[str, int]] = []

    def online() -> bool:
        info = admin.info("replication")
        replica = info.get("slave0")
        if isinstance(replica, dict) and replica.get("state") == "online":
            found.append((str(replica["ip"]), int(replica["port"])))
            return True
        return False

    try:
        wait_until(online, 30, f"a replica of {master} online")
    finally:
        admin.close()
    replica = redis.Redis(host=found[-1][0], port=found[-1][1], single_connection_client=True)
    replica.execute_command("READONLY")  # type: ignore[no-untyped-call]
    return replica


def test_a_batch_on_every_master_moves_each_nodes_checkpoint_then_the_slots_on_their_replicas_too(
    client: RedisCluster,
) -> None:
    payments = _payment_per_master(client)
    sink = _sink(client, "first")
    sink.apply(_batch(list(payments.values()), 100))

    for master, payment_id in payments.items():
        assert _lsn(client, SCHEMA.payment(payment_id)) == 100, master
    assert _node_checkpoints(client) == dict.fromkeys(payments, 100)
    assert sink.read_checkpoint() == Checkpoint(100, 1_100, 1_100)
    (entry,) = _changes(client)
    assert (entry.checkpoint_lsn, entry.previous_checkpoint_lsn) == (100, 0)

    # Applied means on a replica of every node that holds a part of it: each replica has its
    # master's writes as soon as the apply returns, without waiting for them.
    control = client.get_node_from_key(SCHEMA.checkpoint(SLOT)).name  # type: ignore[no-untyped-call]
    for master, tag in _masters(client).items():
        replica = _replica_of(client, master)
        try:
            assert _lsn(replica, SCHEMA.node_checkpoint(tag)) == 100, master
            assert _lsn(replica, SCHEMA.payment(payments[master])) == 100, master
            if master == control:
                assert _lsn(replica, SCHEMA.checkpoint(SLOT)) == 100
        finally:
            replica.close()

    # The next batch names the checkpoint it moves from; a batch without entity writes moves every node.
    sink.apply(_batch([], 200))
    assert _node_checkpoints(client) == dict.fromkeys(payments, 200)
    assert [(e.checkpoint_lsn, e.previous_checkpoint_lsn) for e in _changes(client)] == [(100, 0), (200, 100)]


def test_a_session_that_lost_the_lock_is_refused_on_every_node_once_a_later_one_has_begun(
    client: RedisCluster,
) -> None:
    payments = _payment_per_master(client)
    first = _sink(client, "first")
    first.apply(_batch(list(payments.values()), 100))
    # The first's lock expires (it stalled) and another instance takes it and begins its session.
    client.delete(SCHEMA.lock(SLOT))
    second = _sink(client, "second")
    assert int(second.epoch) > int(first.epoch)

    with pytest.raises(LockLost):
        first.apply(_batch(list(payments.values()), 200))

    # No node took any of its writes: neither an entity nor a node's checkpoint moved.
    for payment_id in payments.values():
        assert _lsn(client, SCHEMA.payment(payment_id)) == 100
    assert _node_checkpoints(client) == dict.fromkeys(payments, 100)
    assert _lsn(client, SCHEMA.checkpoint(SLOT)) == 100
    assert len(_changes(client)) == 1
    # Every node refuses the first session, even a call that moves only a checkpoint.
    for master in payments:
        with pytest.raises(LockLost):
            first._on_node(master, [_apply_on_node(first, master, 300)], durable=False)
    assert _node_checkpoints(client) == dict.fromkeys(payments, 100)

    second.read_checkpoint()
    second.apply(_batch(list(payments.values()), 200))
    assert _node_checkpoints(client) == dict.fromkeys(payments, 200)


def _apply_on_node(sink: ClusterSink, master: str, lsn: int) -> bytes:
    """The sink's node call that moves only the node's checkpoint to `lsn`."""
    return sink._node_call(master, [lsn, "", ""], [], [])


def test_a_node_asked_to_write_a_key_it_does_not_serve_writes_nothing_and_the_session_ends(
    client: RedisCluster,
) -> None:
    payments = _payment_per_master(client)
    sink = _sink(client, "first")
    sink.apply(_batch(list(payments.values()), 100))
    masters = sorted(payments)
    moved, wrong = masters[0], masters[1]
    moved_slot = key_slot(SCHEMA.payment(payments[moved]).encode())
    # A stale view of the topology: it has the slot of one master's payment on another master.
    right = client.nodes_manager.slots_cache[moved_slot]
    client.nodes_manager.slots_cache[moved_slot] = [client.get_node(node_name=wrong)]  # type: ignore[no-untyped-call]

    # The wrong node's call names its own payment first, then the one it does not serve.
    order = [payments[wrong], payments[moved], payments[masters[2]]]
    with pytest.raises(TopologyChanged):
        sink.apply(_batch(order, 200))

    # The wrong node wrote nothing at all, not even its own payment before the stranger.
    assert _lsn(client, SCHEMA.payment(payments[wrong])) == 100
    # No master's checkpoint moved, the one whose payment was sent astray included: a
    # checkpoint never covers a write that a refused call left out.
    assert _node_checkpoints(client) == dict.fromkeys(payments, 100)
    assert _lsn(client, SCHEMA.checkpoint(SLOT)) == 100
    assert len(_changes(client)) == 1
    # The refusal refreshed the client's topology: the next session writes where the keys are.
    # (The replicas listed may differ: the nodes learn them by gossip after the cluster forms.)
    assert client.nodes_manager.slots_cache[moved_slot][0].name == right[0].name
    sink.begin()
    sink.read_checkpoint()
    sink.apply(_batch(order, 200))
    assert {_lsn(client, SCHEMA.payment(payment_id)) for payment_id in payments.values()} == {200}
    assert _node_checkpoints(client) == dict.fromkeys(payments, 200)


def _command(node: Any, *args: Any) -> Any:
    """A raw command on one node's connection (or pipeline), for what redis-py has no method for."""
    return node.execute_command(*args)


def _with_entry(payment_id: str, lsn: int) -> EncodedBatch:
    """The payment's view and a timeline entry at `lsn`: two keys of the payment's slot."""
    batch = _batch([payment_id], lsn)
    entry = read_model_pb2.TimelineEntry(sequence=lsn, actor="system").SerializeToString()
    batch.writes.append(
        EncodedEntry(SCHEMA.payment(payment_id), SCHEMA.payment_timeline(payment_id), lsn, lsn, entry)
    )
    return batch


def test_a_slot_being_migrated_away_with_some_of_its_keys_moved_refuses_the_call_whole(
    client: RedisCluster,
) -> None:
    """While `redis-cli --cluster reshard` moves a slot key by key, its master still serves the
    keys it holds and asks for the others elsewhere: a call that writes both is refused before
    it writes any, so a reader never sees an entity half applied."""
    payments = _payment_per_master(client)
    masters = sorted(payments)
    source_name, target_name = masters[0], masters[1]
    payment = payments[source_name]
    sink = _sink(client, "first")
    sink.apply(_with_entry(payment, 100))
    source = client.get_redis_connection(client.get_node(node_name=source_name))  # type: ignore[no-untyped-call]
    target = client.get_redis_connection(client.get_node(node_name=target_name))  # type: ignore[no-untyped-call]
    slot = key_slot(SCHEMA.payment(payment).encode())
    timeline = SCHEMA.payment_timeline(payment)
    target_host, target_port = target_name.rsplit(":", 1)
    try:
        _command(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", _command(source, "CLUSTER", "MYID"))
        _command(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", _command(target, "CLUSTER", "MYID"))
        # The timeline has moved; the payment's view has not yet. The source asks for the
        # timeline at the target, and still serves the view.
        _command(source, "MIGRATE", target_host, int(target_port), timeline, 0, 5000)
        with pytest.raises(redis.exceptions.AskError):
            source.exists(timeline)
        assert source.exists(SCHEMA.payment(payment)) == 1

        with pytest.raises(TopologyChanged):
            sink.apply(_with_entry(payment, 200))
        assert _lsn(source, SCHEMA.payment(payment)) == 100
        with target.pipeline(transaction=False) as asking:
            _command(asking, "ASKING")
            asking.hkeys(timeline)
            assert asking.execute()[1] == [b"100"]
    finally:
        with target.pipeline(transaction=False) as asking:
            _command(asking, "ASKING")
            asking.delete(timeline)
            asking.execute()
        for node in (target, source):
            _command(node, "CLUSTER", "SETSLOT", slot, "STABLE")


def test_masters_that_lost_their_scripts_get_them_again_and_the_batch_applies(client: RedisCluster) -> None:
    payments = _payment_per_master(client)
    sink = _sink(client, "first")
    sink.apply(_batch(list(payments.values()), 100))
    for master in payments:
        node = client.get_redis_connection(client.get_node(node_name=master))  # type: ignore[no-untyped-call]
        node.script_flush()
        assert node.script_exists(sink._sha["apply_on_node"]) == [False]

    sink.apply(_batch(list(payments.values()), 200))

    assert {_lsn(client, SCHEMA.payment(payment_id)) for payment_id in payments.values()} == {200}
    assert _node_checkpoints(client) == dict.fromkeys(payments, 200)
    assert _lsn(client, SCHEMA.checkpoint(SLOT)) == 200
    assert [e.checkpoint_lsn for e in _changes(client)] == [100, 200]


def _greedy(client: RedisCluster) -> tuple[dict[str, str], ClusterSink]:
    """A payment per master applied at 100, then a sink of the same session that asks for two
    replicas of each master, which has one: every wait it makes fails, one second later."""
    payments = _payment_per_master(client)
    sink = _sink(client, "first")
    sink.apply(_batch(list(payments.values()), 100))
    greedy = _sink(client, "first", wait_timeout=1.0)
    greedy.wait_replicas = 2
    return payments, greedy


def test_writes_that_too_few_replicas_acknowledge_do_not_move_the_slots_checkpoint(
    client: RedisCluster,
) -> None:
    payments, greedy = _greedy(client)

    with pytest.raises(NotDurable):
        greedy.apply(_batch(list(payments.values()), 200))

    assert _lsn(client, SCHEMA.checkpoint(SLOT)) == 100
    assert [e.checkpoint_lsn for e in _changes(client)] == [100]
    # Nothing is confirmed past 100, so a session that resumes from the checkpoint replays it.
    assert greedy.read_checkpoint() == Checkpoint(100, 1_100, 1_100)


def test_the_end_of_a_chunked_transaction_waits_for_the_replicas_of_the_masters_its_chunks_wrote(
    client: RedisCluster,
) -> None:
    # Every wait fails: which one shows where the apply stopped.
    payments, greedy = _greedy(client)
    chunked = sorted(payments)[0]
    # A chunk of a large transaction: its writes, no checkpoint, not waited for yet.
    greedy.apply(EncodedBatch(_batch([payments[chunked]], 150).writes, None, None))
    assert _lsn(client, SCHEMA.payment(payments[chunked])) == 150

    # The transaction's last chunk writes on no master; the checkpoint moves with it.
    with pytest.raises(NotDurable):
        greedy.apply(EncodedBatch([], Checkpoint(200, 1_200), read_model_pb2.ChangeBatch(checkpoint_lsn=200)))
    # Refused at the wait for the chunk's master, before any master's checkpoint moved.
    assert _node_checkpoints(client) == dict.fromkeys(payments, 100)
    assert _lsn(client, SCHEMA.checkpoint(SLOT)) == 100


def test_removing_keys_of_every_master_counts_what_each_removed(client: RedisCluster) -> None:
    sink = _sink(client, "first")
    by_master: dict[str, list[str]] = {}
    candidate = 0
    ranges = _ranges(client)
    # One key on the first master, two on the second, three on the third.
    wanted = {name: n + 1 for n, name in enumerate(sorted(_masters(client)))}
    while any(len(by_master.get(name, [])) < count for name, count in wanted.items()):
        key = SCHEMA.payment(f"gone{candidate}")
        slot = key_slot(key.encode())
        (owner,) = [name for start, end, name in ranges if start <= slot <= end]
        if len(by_master.setdefault(owner, [])) < wanted[owner]:
            by_master[owner].append(key)
        candidate += 1
    present = [key for keys in by_master.values() for key in keys]
    for key in present:
        client.hset(key, "lsn", 1)

    assert sink.unlink([*present, SCHEMA.payment("never written")]) == 6
    assert sum(client.exists(key) for key in present) == 0
