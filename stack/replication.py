"""The replicator seen from outside, for the benchmark and the tests: its checkpoint, the source's WAL position, its process.

One home for what both need: reading the checkpoint that the replicator keeps in Redis,
reading PostgreSQL's current WAL position to compare it with, and starting
`python -m replicator run` with its settings in the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import psycopg2

from payments_common.keys import (
    CHECKPOINT_LSN_FIELD,
    DEFAULT_NAMESPACE,
    DEFAULT_SCHEMA,
    DEFAULT_SLOT_NAME,
    KeySchema,
)
from payments_common.lsn import parse_lsn
from payments_common.redisconn import SyncClient, sync_client
from payments_common.redisurl import is_cluster
from stack.servers import dying_with_parent

ROOT = Path(__file__).resolve().parent.parent


def read_checkpoint(
    client: SyncClient, slot: str = DEFAULT_SLOT_NAME, keys: KeySchema = DEFAULT_SCHEMA
) -> int:
    """The WAL position up to which the replicator of `slot` has applied the source; 0 before its first batch."""
    raw = client.hget(keys.checkpoint(slot), CHECKPOINT_LSN_FIELD)
    return int(raw) if raw is not None else 0


def checkpoint_lsn(redis_url: str, slot: str = DEFAULT_SLOT_NAME, namespace: str = DEFAULT_NAMESPACE) -> int:
    """`read_checkpoint` on a connection of its own."""
    client = sync_client(redis_url)
    try:
        return read_checkpoint(client, slot, KeySchema.for_redis(namespace, slot, is_cluster(redis_url)))
    finally:
        client.close()


def current_wal_lsn(database_url: str) -> int:
    """PostgreSQL's current WAL write position, as the integer that checkpoints are compared with."""
    return _read_lsn(database_url, "SELECT pg_current_wal_lsn()::text")


def slot_confirmed_lsn(database_url: str, slot: str = DEFAULT_SLOT_NAME) -> int:
    """The position up to which `slot`'s consumer has confirmed the source (its confirmed_flush_lsn)."""
    return _read_lsn(
        database_url,
        "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
        (slot,),
    )


def _read_lsn(database_url: str, query: str, args: tuple[str, ...] = ()) -> int:
    """The one WAL position that `query` returns, on a connection of its own."""
    connection = psycopg2.connect(database_url)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(query, args or None)
            row = cursor.fetchone()
            assert row is not None, query
            return parse_lsn(row[0])
    finally:
        connection.close()


def wait_for_checkpoint(
    client: SyncClient,
    target: int,
    timeout: float,
    slot: str = DEFAULT_SLOT_NAME,
    alive: Callable[[], bool] | None = None,
    poll_s: float = 0.01,
) -> int:
    """Polls until the checkpoint reaches `target`; returns it. TimeoutError, or RuntimeError once `alive()` is false."""
    deadline = time.monotonic() + timeout
    while True:
        reached = read_checkpoint(client, slot)
        if reached >= target:
            return reached
        if alive is not None and not alive():
            raise RuntimeError(f"the replicator exited before its checkpoint reached {target}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the replicator did not reach {target} within {timeout:.0f}s")
        time.sleep(poll_s)


def replicator_env(
    database_url: str,
    redis_url: str,
    *,
    slot: str | None = None,
    health_port: int = 0,
    metrics_port: int = 0,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """This process's environment plus the replicator's settings; `extra` (full REPLICATOR_* names) wins."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REPLICATOR_DATABASE_URL": database_url,
        "REPLICATOR_REDIS_URL": redis_url,
        "REPLICATOR_HEALTH_PORT": str(health_port),
        "REPLICATOR_METRICS_PORT": str(metrics_port),
    }
    if slot is not None:
        env["REPLICATOR_SLOT_NAME"] = slot
    env.update(extra or {})
    return env


def start_replicator(env: Mapping[str, str], log: Path, *, detached: bool = False) -> subprocess.Popen[bytes]:
    """Starts `python -m replicator run`, its output appended to `log`.

    A detached replicator runs in a session of its own and outlives this process (the
    local stack stops it); otherwise it dies with this process, so that nothing is left
    running after a crashed test or benchmark.
    """
    args = [sys.executable, "-m", "replicator", "run"]
    preexec: Callable[[], None] | None = None
    if not detached:
        # No Python in the forked child: with gRPC threads busy in this process it can crash there.
        args, preexec = dying_with_parent(args)
    with open(log, "ab") as out:
        return subprocess.Popen(
            args,
            env=dict(env),
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=preexec,
            start_new_session=detached,
        )


def run_reconcile(
    database_url: str,
    redis_url: str,
    slot: str | None = None,
    wait_seconds: float = 60,
    namespace: str = DEFAULT_NAMESPACE,
) -> subprocess.CompletedProcess[str]:
    """`python -m replicator reconcile`, the oracle: exit 0 means no difference between PostgreSQL and Redis."""
    extra = {"REPLICATOR_LOG_LEVEL": "WARNING", "REPLICATOR_KEY_NAMESPACE": namespace}
    return subprocess.run(
        [sys.executable, "-m", "replicator", "reconcile", "--wait-seconds", str(wait_seconds)],
        env=replicator_env(database_url, redis_url, slot=slot, extra=extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=wait_seconds + 60,
        check=False,
    )
