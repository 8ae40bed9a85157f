"""The read side on a Redis Cluster at its edges: starts, retirement, takeovers and slots that move.

Each test starts a cluster of its own where it changes one (kills, reshards), and runs the
real replicator where the guarantee is the process's; the fencing and the readers' view
of a master's checkpoint are checked on the apply stage and the history server in process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import redis
from redis.cluster import RedisCluster as ClusterClient
from redis.crc import key_slot

from payments.history.v1 import history_service_pb2 as pb
from payments_common.grpcstatus import error_info
from payments_common.keys import DEFAULT_SLOT_NAME, KeySchema, node_tag
from payments_common.redisconn import async_client, sync_client
from payments_common.tokens import encode_consistency_token
from replicator.changes import Checkpoint
from replicator.clustersink import ClusterSink
from replicator.encode import EncodedBatch, EncodedView
from replicator.lock import LockLost, SlotLock
from stack.servers import RedisCluster, free_cluster_port
from tests.support.cluster import cluster_schema, missing_payments
from tests.support.history import (
    ALICE,
    BOB,
    HandWrittenReadModel,
    payment_view,
    running_history,
    settings_for,
)
from tests.support.history_cluster import move_node_checkpoint, node_checkpoints
from tests.support.replicator import StartReplicator, replicator, retire, run_status
from tests.support.source import SourceWriter
from tests.support.waiting import eventually, wait_until

__all__ = ["replicator"]

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def _cluster(
    base_dir: Path, masters: int = 3, replicas: int = 0, ports: list[int] | None = None
) -> Iterator[RedisCluster]:
    cluster = RedisCluster(
        base_dir=base_dir, masters=masters, replicas=replicas, node_timeout_ms=1000, ports=list(ports or [])
    )
    try:
        yield cluster
    finally:
        cluster.remove()


def _keys_of(redis_url: str, namespace: str) -> list[str]:
    """Every key of `namespace` on every master of the cluster."""
    client = sync_client(redis_url)
    try:
        return sorted(key.decode() for key in client.scan_iter(match=f"{namespace}:*", count=1000))
    finally:
        client.close()


def _pay(database_url: str, count: int) -> None:
    with SourceWriter(database_url) as source:
        accounts = [source.open_account(f"Owner {n}") for n in range(4)]
        for n in range(count):
            source.pay(accounts[n % 4], accounts[(n + 1) % 4], 100 + n)


# -- the replicator's process ------------------------------------------------------------------


def test_a_replicator_started_before_its_cluster_answers_waits_for_it_and_then_streams(
    migrated_dsn: str, replicator: StartReplicator, tmp_path: Path
) -> None:
    """A cluster that does not answer yet is a Redis outage like any other: the replicator
    retries until it answers, and does not exit."""
    _pay(migrated_dsn, 5)
    ports = [free_cluster_port() for _ in range(3)]
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in ports)
    process = replicator(migrated_dsn, url, ack_delay_seconds="0", redis_wait_replicas="0")
    wait_until(
        lambda: "restarting in" in process.log_text() or not process.alive,
        60,
        "a first failed session",
        detail=process.log_tail,
    )
    assert process.alive, f"the replicator exited with {process.returncode}:\n{process.log_tail()}"
    with _cluster(tmp_path / "cluster", ports=ports) as cluster:
        cluster.start()
        assert cluster.url == url
        process.wait_caught_up(timeout=120)
        committed, missing = missing_payments(migrated_dsn, url, cluster_schema(process.slot))
        assert committed == 5
        assert missing == []


def test_a_stopped_versions_keys_are_all_retired_from_every_master(
    migrated_dsn: str, cluster_url: str, replicator: StartReplicator
) -> None:
    """`replicator retire` removes a stopped version from a cluster: every key on every master,
    the per-master fences and checkpoints too, and its slot."""
    _pay(migrated_dsn, 20)
    process = replicator(migrated_dsn, cluster_url, key_namespace="rm:v7", ack_delay_seconds="0")
    process.wait_caught_up()
    before = _keys_of(cluster_url, "rm:v7")
    assert any(key.endswith("}:node") for key in before)  # the masters' fences and checkpoints
    process.stop()
    done = retire(migrated_dsn, cluster_url, "--namespace", "rm:v7", "--slot", process.slot)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _keys_of(cluster_url, "rm:v7") == []


# -- fencing across a reshard ------------------------------------------------------------------


def _masters_by_lowest_slot(client: ClusterClient) -> list[str]:
    lowest: dict[str, int] = {}
    for slot, owners in client.nodes_manager.slots_cache.items():
        lowest[owners[0].name] = min(slot, lowest.get(owners[0].name, slot))
    return sorted(lowest, key=lambda name: lowest[name])


def _port(name: str) -> int:
    return int(name.rsplit(":", 1)[1])


def _key_on(client: ClusterClient, master: str, prefix: str) -> str:
    """A payment key whose slot `master` serves, in none of the first 100 slots."""
    cache = client.nodes_manager.slots_cache
    for number in range(100_000):
        key = f"{prefix}{number:08d}-0000-4000-8000-000000000000"
        slot = key_slot(f"rm:v1:payment:{{{key}}}".encode())
        if slot >= 100 and cache[slot][0].name == master:
            return key
    raise AssertionError(f"no key found on {master}")


def test_a_session_that_lost_the_lock_writes_nothing_once_a_later_one_began_even_after_a_reshard(
    tmp_path: Path,
) -> None:
    """A master that gained a lower slot is claimed by the later session under its new fence:
    the earlier session, whose topology predates the move, must be refused there too."""
    slot = "rm_fence"
    schema = cluster_schema(slot)
    with _cluster(tmp_path / "cluster") as cluster:
        cluster.start()
        old_client = sync_client(cluster.url)
        assert isinstance(old_client, ClusterClient)
        old_lock = SlotLock(old_client, schema.lock(slot), 60, "old")
        assert old_lock.try_acquire()
        old = ClusterSink(old_client, schema, slot, old_lock, wait_replicas=0)
        old.load_scripts()
        old.begin()
        first, second = _masters_by_lowest_slot(old_client)[:2]
        payment = _key_on(old_client, second, "0000")
        # Slot 0, and with it the first master's fence, moves to the second master.
        cluster.reshard(_port(first), _port(second), 1)
        assert cluster.master_of_slot(0) == _port(second)
        # The lock expires; another instance takes it and begins a session on the new layout.
        old_client.delete(schema.lock(slot))
        new_client = sync_client(cluster.url)
        assert isinstance(new_client, ClusterClient)
        new_lock = SlotLock(new_client, schema.lock(slot), 60, "new")
        assert new_lock.try_acquire()
        new = ClusterSink(new_client, schema, slot, new_lock, wait_replicas=0)
        new.load_scripts()
        new.begin()
        assert new.tags[second] == node_tag(0)
        key = schema.payment(payment)
        refused: list[Exception] = []
        try:
            for checkpoint in (None, Checkpoint(10**12, None, None)):
                try:
                    old.apply(EncodedBatch([EncodedView(key, 10**12, b"stale")], checkpoint, None))
                except (LockLost, redis.RedisError) as error:
                    refused.append(error)
            assert new_client.hget(key, "view") is None, "the earlier session wrote after the later one began"
            assert len(refused) == 2
        finally:
            old_client.close()
            new_client.close()


def test_status_of_a_cluster_that_does_not_answer_is_unreachable_without_a_traceback(
    migrated_dsn: str,
) -> None:
    """`replicator status` reports a cluster whose seeds do not answer as Redis not reached
    (exit status 4), as it reports one node that does not answer."""
    url = "redis+cluster://" + ",".join(f"127.0.0.1:{free_cluster_port()}" for _ in range(3))
    done = run_status(migrated_dsn, url, "--timeout", "2")
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 4, done.stdout + done.stderr
    assert "not reached" in done.stdout


# -- the readers' view of a master's checkpoint across a reshard ---------------------------------

HISTORY_SCHEMA = KeySchema.for_redis("rm:v1", DEFAULT_SLOT_NAME, cluster=True)
AHEAD = 900_000


async def test_a_token_read_is_not_answered_from_a_checkpoint_that_a_reshard_brought_from_another_master(
    tmp_path: Path,
) -> None:
    """One master has applied its part of the batch at AHEAD, another not yet (as between the
    two masters' scripts, or after the second one's call failed). Slot 0, the lowest of the
    first master, moves to the second: a read of a payment on the second master with the
    token AHEAD must not be answered, for that master does not hold the batch."""
    with _cluster(tmp_path / "cluster") as cluster:
        cluster.start()
        url = cluster.url
        first, second = cluster.master_ports()[:2]
        sync = sync_client(url)
        assert isinstance(sync, ClusterClient)
        try:
            view = next(
                view
                for view in (payment_view(number, ALICE, BOB) for number in range(1, 10_000))
                if _slot_on(sync, HISTORY_SCHEMA.payment(view.payment_id), second)
            )
        finally:
            sync.close()
        client = async_client(url)
        try:
            model = HandWrittenReadModel(client, keys=HISTORY_SCHEMA)  # type: ignore[arg-type]
            for account in (ALICE, BOB):
                await model.open_account(account)
            await model.publish()
            masters = node_checkpoints(url, HISTORY_SCHEMA)
            for key, node in masters.items():
                await move_node_checkpoint(client, key, node, model.checkpoint)
            # The first master has its part of the batch at AHEAD (not this payment: it is the second's).
            first_checkpoint = HISTORY_SCHEMA.node_checkpoint(node_tag(0))
            await move_node_checkpoint(client, first_checkpoint, masters[first_checkpoint], AHEAD)
            cluster.reshard(first, second, 1)
            assert cluster.master_of_slot(0) == second
            settings = settings_for(url, consistency_wait_max_seconds=0.5)
            async with running_history(settings) as history:
                await eventually(
                    lambda: history.server.watcher.checkpoint == model.checkpoint, 10, "the watcher synced"
                )
                with pytest.raises(grpc.aio.AioRpcError) as raised:
                    await history.stub.GetPayment(
                        pb.GetPaymentRequest(
                            payment_id=view.payment_id, min_consistency_token=encode_consistency_token(AHEAD)
                        ),
                        timeout=10,
                    )
                assert raised.value.code() == grpc.StatusCode.UNAVAILABLE, raised.value
                info = error_info(raised.value)
                assert info is not None
                assert info.reason == "CONSISTENCY_NOT_REACHED"
        finally:
            await client.aclose()


def _slot_on(client: ClusterClient, key: str, port: int) -> bool:
    """Whether the master on `port` serves `key`, in a slot that no reshard of a few slots moves."""
    slot = key_slot(key.encode())
    return slot >= 100 and _port(client.nodes_manager.slots_cache[slot][0].name) == port


# -- a master that comes back empty --------------------------------------------------------------


def test_a_master_that_came_back_empty_with_its_replica_is_filled_again(
    migrated_dsn: str, replicator: StartReplicator, tmp_path: Path
) -> None:
    """A master and its replica both restarted without their data (kill -9, nothing on disk):
    the replicator does not take the empty master for a current one; once it has caught up
    with the source again, every committed payment has its view."""
    with _cluster(tmp_path / "cluster", replicas=1) as cluster:
        cluster.start()
        for master in cluster.master_ports():
            cluster.wait_in_sync(cluster.replica_of(master))
        _pay(migrated_dsn, 30)
        process = replicator(migrated_dsn, cluster.url, ack_delay_seconds="0", redis_timeout_seconds="3")
        process.wait_caught_up(timeout=120)
        schema = cluster_schema(process.slot)
        slots_master = cluster.master_of_slot(key_slot(schema.lock(process.slot).encode()))
        victim = next(port for port in cluster.master_ports() if port != slots_master)
        replica = cluster.replica_of(victim)
        cluster.kill(victim)
        cluster.kill(replica)
        cluster.node(victim).start()
        cluster.node(replica).start()
        cluster.wait_ok()
        cluster.wait_in_sync(replica)
        _pay(migrated_dsn, 5)
        process.wait_caught_up(timeout=120)
        state: tuple[int, list[str]] = (0, [])

        def filled() -> bool:
            nonlocal state
            state = missing_payments(migrated_dsn, cluster.url, schema)
            return state[1] == []

        wait_until(
            filled, 60, "every payment in Redis", detail=lambda: f"missing {len(state[1])} of {state[0]}"
        )
