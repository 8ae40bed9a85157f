"""The private test servers: logical replication works, servers coexist, nothing outlives its owner."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg2
import psycopg2.extras
import redis

from stack.servers import (
    PostgresServer,
    RedisServer,
    free_cluster_port,
    free_port,
    process_alive,
    running_postgres,
    running_redis,
)


def _wait_gone(pid: int, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not process_alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_logical_slot_streams_a_committed_insert(database_dsn: str) -> None:
    setup = psycopg2.connect(database_dsn)
    setup.autocommit = True
    with setup.cursor() as cursor:
        cursor.execute("CREATE TABLE t (id int PRIMARY KEY, note text)")
        cursor.execute("CREATE PUBLICATION p FOR TABLE t")

    replication = psycopg2.connect(
        database_dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection
    )
    stream = replication.cursor()
    stream.create_replication_slot("s", output_plugin="pgoutput")
    stream.start_replication(
        slot_name="s", decode=False, options={"proto_version": "1", "publication_names": "p"}
    )
    with setup.cursor() as cursor:
        cursor.execute("INSERT INTO t VALUES (1, 'streamed')")

    kinds: list[bytes] = []
    deadline = time.monotonic() + 20
    while b"C" not in kinds and time.monotonic() < deadline:
        message = stream.read_message()
        if message is None:
            time.sleep(0.01)
            continue
        kinds.append(bytes(message.payload[:1]))
        if kinds[-1] == b"I":
            assert b"streamed" in bytes(message.payload)
    replication.close()
    setup.close()
    assert kinds[:4] == [b"B", b"R", b"I", b"C"]


def test_two_servers_run_side_by_side(postgres_server: PostgresServer, redis_server: RedisServer) -> None:
    with running_postgres() as second_pg, running_redis() as second_redis:
        assert second_pg.port != postgres_server.port
        assert second_redis.port != redis_server.port
        for server in (postgres_server, second_pg):
            connection = psycopg2.connect(server.dsn())
            with connection.cursor() as cursor:
                cursor.execute("SHOW port")
                row = cursor.fetchone()
                assert row is not None
                assert int(row[0]) == server.port
            connection.close()
        first, second = redis.Redis.from_url(redis_server.url(0)), redis.Redis.from_url(second_redis.url(0))
        first.set("side-by-side", "first")
        assert second.get("side-by-side") is None
        first.delete("side-by-side")
        first.close()
        second.close()


def test_context_managers_stop_and_remove_everything() -> None:
    with running_postgres() as pg, running_redis() as rd:
        assert pg.process is not None
        assert rd.process is not None
        pids = [pg.process.pid, rd.process.pid]
        dirs = [pg.base_dir, rd.base_dir]
    assert all(_wait_gone(pid) for pid in pids)
    assert all(d is not None and not d.exists() for d in dirs)


def test_servers_die_with_a_killed_owner() -> None:
    """A test process killed with SIGKILL leaves no server behind."""
    script = textwrap.dedent(
        """
        import sys, time
        from stack.servers import PostgresServer, RedisServer
        pg, rd = PostgresServer().start(), RedisServer().start()
        print(pg.process.pid, rd.process.pid, flush=True)
        time.sleep(600)
        """
    )
    owner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert owner.stdout is not None
    pids = [int(p) for p in owner.stdout.readline().split()]
    assert len(pids) == 2
    assert all(process_alive(pid) for pid in pids)
    owner.send_signal(signal.SIGKILL)
    owner.wait()
    assert all(_wait_gone(pid) for pid in pids)


def test_a_cluster_nodes_ports_are_chosen_below_the_kernels_ephemeral_range() -> None:
    """A port that `free_port` returned, or that an outgoing connection took, is never a
    cluster node's port or bus port: a service's port chosen before a cluster starts
    beside it is still free when the service binds it."""
    low, _ = (int(part) for part in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    for _ in range(50):
        port = free_cluster_port()
        assert port + 10000 < low
        assert free_port() >= low
