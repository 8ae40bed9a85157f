"""A Redis Cluster of its own for a fault test, and what such a test reads from it and from PostgreSQL.

The `own_cluster` fixture starts a cluster per test (3 masters, a replica each, a short
node timeout so that a replica is promoted within seconds) and removes it afterwards.
`ConfirmedMonitor` samples the slot's confirmed position against Redis's checkpoint while
a test runs; `read_held` reads what one node holds, replica or master; `missing_payments`
lists the payments that PostgreSQL has committed and Redis lacks.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest
import redis
from redis.exceptions import RedisClusterException

from payments_common.keys import CHECKPOINT_LSN_FIELD, DEFAULT_NAMESPACE, VIEW_FIELD, KeySchema
from payments_common.redisconn import SyncClient, sync_client
from stack.servers import RedisCluster

# How long a master may be silent before its replica is promoted: short, for quick
# failovers, but far above any pause of a node on a busy machine.
NODE_TIMEOUT_MS = 1000


def cluster_schema(slot: str, namespace: str = DEFAULT_NAMESPACE) -> KeySchema:
    """The keys of `namespace` as the replicator of `slot` lays them out on a cluster."""
    return KeySchema.for_redis(namespace, slot, cluster=True)


@pytest.fixture
def own_cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    """A Redis Cluster for one test, every replica in sync with its master; the nodes' logs stay in tmp_path."""
    cluster = RedisCluster(base_dir=tmp_path / "cluster", node_timeout_ms=NODE_TIMEOUT_MS)
    try:
        cluster.start()
        for master in cluster.master_ports():
            cluster.wait_in_sync(cluster.replica_of(master))
        yield cluster
    finally:
        cluster.remove()


def read_held(port: int, key: str, field: str = CHECKPOINT_LSN_FIELD) -> int:
    """A position that the node on `port` holds in a hash field (0 if none), read on that node
    alone: a replica answers from its own data (READONLY), even while its master is down."""
    client = redis.Redis(port=port, socket_connect_timeout=2, socket_timeout=5)
    try:
        client.execute_command("READONLY")  # type: ignore[no-untyped-call]
        raw = client.hget(key, field)
    finally:
        client.close()
    return int(raw) if raw is not None else 0


def is_master(port: int) -> bool:
    """Whether the node on `port` says it is a master (ROLE)."""
    client = redis.Redis(port=port, socket_connect_timeout=2, socket_timeout=5)
    try:
        role = client.execute_command("ROLE")  # type: ignore[no-untyped-call]
    finally:
        client.close()
    return bool(role[0] == b"master")


def missing_payments(database_url: str, redis_url: str, schema: KeySchema) -> tuple[int, list[str]]:
    """How many payments PostgreSQL has committed, and those of them without a view in Redis."""
    connection = psycopg2.connect(database_url)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT payment_id::text FROM payments")
            payment_ids = [row[0] for row in cursor.fetchall()]
    finally:
        connection.close()
    client = sync_client(redis_url)
    try:
        with client.pipeline(transaction=False) as pipe:
            for payment_id in payment_ids:
                pipe.hexists(schema.payment(payment_id), VIEW_FIELD)
            present = pipe.execute()
    finally:
        client.close()
    return len(payment_ids), [
        payment_id for payment_id, found in zip(payment_ids, present, strict=True) if not found
    ]


class ConfirmedMonitor:
    """Samples the slot's confirmed position, then Redis's checkpoint of the slot, until stopped.

    Both only move forward while Redis keeps what it acknowledged, and the slot is read
    first, so a sample with the slot ahead means PostgreSQL was told a position that Redis
    does not hold. While the cluster cannot serve the checkpoint (a failover), no sample is
    taken.
    """

    def __init__(self, database_url: str, redis_url: str, slot: str) -> None:
        self.database_url = database_url
        self.redis_url = redis_url
        self.slot = slot
        self.key = cluster_schema(slot).checkpoint(slot)
        self.samples = 0
        self.skipped = 0
        self.highest_confirmed = 0
        self.ahead: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="confirmed-monitor", daemon=True)

    def __enter__(self) -> ConfirmedMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        connection = psycopg2.connect(self.database_url)
        connection.autocommit = True
        client: SyncClient | None = None
        try:
            with connection.cursor() as cursor:
                while not self._stop.wait(0.005):
                    cursor.execute(
                        "SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
                        (self.slot,),
                    )
                    row = cursor.fetchone()
                    try:
                        client = client or sync_client(
                            self.redis_url, socket_timeout=2, socket_connect_timeout=2
                        )
                        raw = client.hget(self.key, CHECKPOINT_LSN_FIELD)
                    except _UNAVAILABLE:
                        self.skipped += 1
                        _close(client)
                        client = None
                        continue
                    if row is None or row[0] is None or raw is None:
                        continue
                    confirmed, checkpoint = int(row[0]), int(raw)
                    self.samples += 1
                    self.highest_confirmed = max(self.highest_confirmed, confirmed)
                    if confirmed > checkpoint:
                        self.ahead.append((confirmed, checkpoint))
        finally:
            _close(client)
            connection.close()


# What a cluster client raises while the cluster cannot serve a key (its constructor
# raises RedisClusterException, not a RedisError, when no seed answers).
_UNAVAILABLE = (redis.RedisError, RedisClusterException, OSError)


def _close(client: SyncClient | None) -> None:
    if client is not None:
        with contextlib.suppress(*_UNAVAILABLE):
            client.close()
