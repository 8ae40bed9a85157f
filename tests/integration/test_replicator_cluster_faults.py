"""The replicator on a Redis Cluster under failures, each under a steady payment load.

What is proved, on a cluster of 3 masters with a replica each (replicator/clustersink.py):

- A master killed with kill -9 (the one holding the slot's lock and checkpoint, or
  another): its replica is promoted with what it had, and no position that PostgreSQL was
  told before the promotion is past what that replica holds. The replicator carries on.
- 1000 hash slots moved to another master while the replicator writes, among them the
  slot's lock, checkpoint and change stream: the replicator carries on.
- A replica that stops (SIGSTOP): its master's writes cannot be made durable, so the
  replicator confirms nothing past the checkpoint it had reached, however far the source
  runs ahead; once the replica is back, it catches up and confirms again.

Each test ends with nothing lost: `reconcile` finds no difference, every payment committed
in PostgreSQL has its view in Redis, and the slot's confirmed position is not past the
checkpoint. Positions are confirmed with no delay (`REPLICATOR_ACK_DELAY_SECONDS=0`: the
cluster keeps nothing on disk, so the delay would protect nothing), so that only the WAIT
for replicas holds a confirmation back.
"""

from __future__ import annotations

import itertools

import pytest
from redis.crc import key_slot

from payments_common.keys import node_tag
from replicator.config import Settings
from replicator.reconcile import reconcile
from stack.replication import checkpoint_lsn, current_wal_lsn, slot_confirmed_lsn
from stack.servers import RedisCluster
from tests.support.cluster import (
    ConfirmedMonitor,
    cluster_schema,
    is_master,
    missing_payments,
    own_cluster,
    read_held,
)
from tests.support.replicator import ReplicatorProcess, StartReplicator, replicator, slot_for
from tests.support.source import SourceLoad, SourceWriter
from tests.support.waiting import wait_until

__all__ = ["own_cluster", "replicator"]

pytestmark = pytest.mark.slow

# Payments written under load before a fault, and after it.
BEFORE_FAULT = 300
AFTER_FAULT = 200
MOVED_SLOTS = 1000


def _start(
    database_url: str, cluster: RedisCluster, replicator: StartReplicator, slot: str = "", **env: str
) -> tuple[ReplicatorProcess, list[str]]:
    with SourceWriter(database_url) as source:
        accounts = [source.open_account(f"Owner {i}") for i in range(6)]
    process = replicator(database_url, cluster.url, slot=slot, ack_delay_seconds="0", **env)
    process.wait_caught_up()
    return process, accounts


def _logged(process: ReplicatorProcess, text: str) -> int:
    return process.log_text().count(text)


def _confirms_under_load(process: ReplicatorProcess, load: SourceLoad) -> int:
    """Waits until the load has written BEFORE_FAULT payments and the slot is confirmed past its
    position of then; returns the confirmed position."""
    load.wait_for(BEFORE_FAULT)
    start = slot_confirmed_lsn(process.database_url, process.slot)
    confirmed = start

    def moved() -> bool:
        nonlocal confirmed
        confirmed = slot_confirmed_lsn(process.database_url, process.slot)
        return confirmed > start

    wait_until(moved, 60, "the slot confirmed under load", detail=process.log_tail)
    return confirmed


def _carries_on(process: ReplicatorProcess, load: SourceLoad, timeout: float = 120) -> None:
    """Waits until the checkpoint passes the source's position of now and AFTER_FAULT more payments are written."""
    target, written = current_wal_lsn(process.database_url), load.written

    def passed() -> bool:
        if not process.alive:
            raise AssertionError(f"the replicator exited with {process.returncode}:\n{process.log_tail()}")
        return checkpoint_lsn(process.redis_url, process.slot) >= target

    wait_until(passed, timeout, "the checkpoint past the fault", detail=process.log_tail)
    load.wait_for(written + AFTER_FAULT)


def _assert_nothing_lost(process: ReplicatorProcess) -> None:
    """Once the load has stopped: caught up and confirmed, no difference, every payment in Redis."""
    database_url, redis_url, slot = process.database_url, process.redis_url, process.slot
    reached = process.wait_caught_up(timeout=120)
    wait_until(
        lambda: slot_confirmed_lsn(database_url, slot) >= reached,
        60,
        "the slot confirmed up to the checkpoint",
        detail=process.log_tail,
    )
    assert slot_confirmed_lsn(database_url, slot) <= checkpoint_lsn(redis_url, slot)
    report = reconcile(
        Settings(database_url=database_url, redis_url=redis_url, slot_name=slot), wait_seconds=60
    )
    assert report.clean, "\n".join(report.lines())
    committed, missing = missing_payments(database_url, redis_url, cluster_schema(slot))
    assert committed >= BEFORE_FAULT + AFTER_FAULT
    assert missing == [], f"{len(missing)} of {committed} payments missing in Redis, e.g. {missing[:3]}"


@pytest.mark.parametrize("victim", ["the slot's master", "another master"])
def test_a_killed_master_is_replaced_by_its_replica_which_holds_every_confirmed_position(
    migrated_dsn: str, own_cluster: RedisCluster, replicator: StartReplicator, victim: str
) -> None:
    cluster = own_cluster
    process, accounts = _start(migrated_dsn, cluster, replicator, redis_timeout_seconds="3")
    slot = process.slot
    schema = cluster_schema(slot)
    slots_master = cluster.master_of_slot(key_slot(schema.lock(slot).encode()))
    killed = (
        slots_master
        if victim == "the slot's master"
        else next(port for port in cluster.master_ports() if port != slots_master)
    )
    replica = cluster.replica_of(killed)
    lowest = next(view.slots[0][0] for view in cluster.topology() if view.port == killed)
    # The killed master's own checkpoint: every change up to it is on that master (and, WAITed, on its replica).
    node_checkpoint = schema.node_checkpoint(node_tag(lowest))
    with (
        ConfirmedMonitor(migrated_dsn, cluster.url, slot) as monitor,
        SourceLoad(migrated_dsn, accounts) as load,
    ):
        _confirms_under_load(process, load)
        sessions = _logged(process, "streaming slot")
        cluster.kill(killed)
        # Its master gone, the replica receives nothing more: what it holds now is what it
        # serves once promoted. It is read before the promotion, and the positions confirmed
        # are sampled until the promotion: all of them must be covered by it.
        held_node = read_held(replica, node_checkpoint)
        held_slot = read_held(replica, schema.checkpoint(slot)) if killed == slots_master else None
        assert not is_master(replica), "promoted before its data was read: the node timeout is too short"
        confirmed_before_promotion: list[int] = []

        def promoted() -> bool:
            confirmed = slot_confirmed_lsn(migrated_dsn, slot)
            if is_master(replica):
                return True
            confirmed_before_promotion.append(confirmed)
            return False

        wait_until(promoted, 60, "the replica promoted", detail=process.log_tail)
        cluster.wait_promoted(replica)
        # With REPLICATOR_REDIS_WAIT_REPLICAS=1 (the cluster's default) a batch counts only
        # once one replica of every master has it. The promoted node has no replica until the
        # killed one comes back as its replica (from its nodes.conf, empty, then a full sync),
        # and until then the replicator confirms nothing: each session gives up (NotDurable).
        cluster.start_node(killed)
        cluster.wait_ok()
        _carries_on(process, load)
    assert held_node > 0
    assert confirmed_before_promotion, "no confirmed position sampled between the kill and the promotion"
    assert max(confirmed_before_promotion) <= held_node, (
        f"confirmed {max(confirmed_before_promotion)} but the promoted replica holds the node up to {held_node}"
    )
    if held_slot is not None:
        assert max(confirmed_before_promotion) <= held_slot, (
            f"confirmed {max(confirmed_before_promotion)} but the promoted replica holds the slot's "
            f"checkpoint at {held_slot}"
        )
    assert _logged(process, "streaming slot") > sessions, "the replicator streamed again after the failover"
    assert monitor.samples > 50
    assert monitor.ahead == [], f"{len(monitor.ahead)} samples with the slot ahead, e.g. {monitor.ahead[:3]}"
    _assert_nothing_lost(process)


def test_slots_moved_to_another_master_under_load_with_the_slots_own_keys(
    migrated_dsn: str, own_cluster: RedisCluster, replicator: StartReplicator
) -> None:
    cluster = own_cluster
    source, target = cluster.master_ports()[:2]
    lowest = next(view.slots[0][0] for view in cluster.topology() if view.port == source)
    # redis-cli moves the source's lowest slots: a slot name whose hash tag is among them
    # moves the lock, the epoch counter, the checkpoint and the change stream too.
    slot = next(
        name
        for name in (f"{slot_for(migrated_dsn)}_{k}" for k in itertools.count())
        if lowest <= key_slot(name.encode()) < lowest + MOVED_SLOTS
    )
    process, accounts = _start(migrated_dsn, cluster, replicator, slot=slot, redis_timeout_seconds="3")
    with (
        ConfirmedMonitor(migrated_dsn, cluster.url, slot) as monitor,
        SourceLoad(migrated_dsn, accounts) as load,
    ):
        _confirms_under_load(process, load)
        restarts = _logged(process, "TopologyChanged")
        cluster.reshard(source, target, MOVED_SLOTS)
        assert cluster.master_of_slot(key_slot(slot.encode())) == target
        _carries_on(process, load)
    assert _logged(process, "TopologyChanged") > restarts, "the replicator was refused by the moved slots"
    assert monitor.samples > 50
    assert monitor.ahead == [], f"{len(monitor.ahead)} samples with the slot ahead, e.g. {monitor.ahead[:3]}"
    _assert_nothing_lost(process)


def test_a_stopped_replica_holds_back_every_confirmation_until_it_is_back(
    migrated_dsn: str, own_cluster: RedisCluster, replicator: StartReplicator
) -> None:
    cluster = own_cluster
    # A short timeout: each session gives up on the stopped replica soon, and new ones start meanwhile.
    process, accounts = _start(migrated_dsn, cluster, replicator, redis_timeout_seconds="2")
    slot = process.slot
    slots_master = cluster.master_of_slot(key_slot(cluster_schema(slot).lock(slot).encode()))
    # The replica of a master that holds only entities and its own checkpoint: the slot's
    # checkpoint, on another node, must still not move past what the stopped replica has.
    master = next(port for port in cluster.master_ports() if port != slots_master)
    stopped = cluster.replica_of(master)
    samples: list[tuple[int, int]] = []
    with (
        ConfirmedMonitor(migrated_dsn, cluster.url, slot) as monitor,
        SourceLoad(migrated_dsn, accounts) as load,
    ):
        _confirms_under_load(process, load)
        refused = _logged(process, "NotDurable")
        cluster.pause(stopped)
        # The session running when the replica stopped may still move the checkpoint, once,
        # with writes the replica acknowledged before it stopped. Once that session has
        # given up, the checkpoint of then bounds every position confirmed until the replica is back.
        wait_until(
            lambda: _logged(process, "NotDurable") > refused,
            60,
            "the session given up on the stopped replica",
            detail=process.log_tail,
        )
        bound = checkpoint_lsn(cluster.url, slot)

        def refused_twice_more() -> bool:
            samples.append((slot_confirmed_lsn(migrated_dsn, slot), checkpoint_lsn(cluster.url, slot)))
            return _logged(process, "NotDurable") >= refused + 3

        wait_until(refused_twice_more, 90, "two more sessions given up", detail=process.log_tail)
        source_then = current_wal_lsn(migrated_dsn)
        cluster.resume(stopped)
        cluster.wait_in_sync(stopped)
        wait_until(
            lambda: slot_confirmed_lsn(migrated_dsn, slot) >= source_then,
            120,
            "the slot confirmed past the source's position of the pause",
            detail=process.log_tail,
        )
        load.wait_for(load.written + AFTER_FAULT)
    assert source_then > bound, "the source went on while the replica was stopped"
    assert len(samples) > 10
    assert [s for s in samples if s[0] > bound] == [], f"confirmed past {bound} while the replica was stopped"
    assert [s for s in samples if s[1] > bound] == [], (
        f"the checkpoint moved past {bound} while the replica was stopped"
    )
    assert monitor.samples > 50
    assert monitor.ahead == [], f"{len(monitor.ahead)} samples with the slot ahead, e.g. {monitor.ahead[:3]}"
    _assert_nothing_lost(process)
