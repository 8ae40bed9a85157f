"""Runs the replicator as a real subprocess in tests, and waits for it to catch up.

Use the `replicator` fixture (import it into a test module or a conftest) to start one or
more replicators for a database and a Redis database; every process it started is
stopped at the end of the test. `wait_caught_up` polls until Redis's checkpoint reaches the
source's current WAL position.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psycopg2
import pytest
from redis.typing import StreamRangeResponse

from payments.readmodel.v1 import read_model_pb2
from payments_common.keys import DEFAULT_NAMESPACE, KeySchema
from payments_common.lsn import format_lsn
from payments_common.redisconn import sync_client
from payments_common.redisurl import is_cluster
from replicator.config import Settings
from replicator.status import Status, read_status
from stack.replication import ROOT, replicator_env, start_replicator
from stack.replication import checkpoint_lsn as checkpoint_lsn
from stack.replication import current_wal_lsn as current_wal_lsn
from tests.support.processes import ChildProcess
from tests.support.waiting import wait_until


def slot_for(database_url: str) -> str:
    """A replication slot name unique to a test database (slot names are cluster-wide)."""
    return "rm_" + (urlparse(database_url).path.lstrip("/") or "postgres").lower()


def schema_for(redis_url: str, slot: str, namespace: str = DEFAULT_NAMESPACE) -> KeySchema:
    """The keys of version `namespace` fed by `slot`, as they are laid out on the Redis of `redis_url`."""
    return KeySchema.for_redis(namespace, slot, is_cluster(redis_url))


def wait_caught_up(
    database_url: str,
    redis_url: str,
    slot: str | None = None,
    timeout: float = 60.0,
    process: ReplicatorProcess | None = None,
    namespace: str = DEFAULT_NAMESPACE,
) -> int:
    """Waits until the checkpoint in Redis (of `namespace`) reaches the source's WAL position of now; returns it."""
    name = slot or slot_for(database_url)
    target = current_wal_lsn(database_url)
    reached = 0

    def caught_up() -> bool:
        nonlocal reached
        reached = checkpoint_lsn(redis_url, name, namespace)
        if reached >= target:
            return True
        if process is not None and not process.alive:
            raise AssertionError(f"the replicator exited with {process.returncode}:\n{process.log_tail()}")
        return False

    def detail() -> str:
        return f"it is at {format_lsn(reached)}\n{process.log_tail() if process else ''}"

    wait_until(caught_up, timeout, f"the checkpoint at {format_lsn(target)}", detail=detail)
    return reached


@dataclass
class ReplicatorProcess(ChildProcess):
    """One `python -m replicator run` child process."""

    database_url: str
    redis_url: str
    log_path: Path
    slot: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    name: str = field(default="the replicator", init=False, repr=False)

    def __post_init__(self) -> None:
        self.slot = self.slot or slot_for(self.database_url)

    def env(self) -> dict[str, str]:
        return replicator_env(
            self.database_url,
            self.redis_url,
            slot=self.slot,
            extra={"REPLICATOR_LOCK_TTL_SECONDS": "2", "REPLICATOR_LOG_LEVEL": "INFO", **self.extra_env},
        )

    def start(self) -> ReplicatorProcess:
        self.process = start_replicator(self.env(), self.log_path)
        return self

    @property
    def namespace(self) -> str:
        return self.extra_env.get("REPLICATOR_KEY_NAMESPACE", DEFAULT_NAMESPACE)

    def wait_caught_up(self, timeout: float = 60.0) -> int:
        return wait_caught_up(
            self.database_url, self.redis_url, self.slot, timeout, process=self, namespace=self.namespace
        )


def run_status(
    database_url: str, redis_url: str, *args: str, slot: str | None = None, **extra_env: str
) -> subprocess.CompletedProcess[str]:
    """`python -m replicator status ARGS` with the settings `replicator run` would get (`extra_env` as in the fixture)."""
    extra = {f"REPLICATOR_{k.upper()}": v for k, v in extra_env.items()}
    return subprocess.run(
        [sys.executable, "-m", "replicator", "status", *args],
        env=replicator_env(database_url, redis_url, slot=slot or slot_for(database_url), extra=extra),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def status_json(
    database_url: str, redis_url: str, *args: str, slot: str | None = None, **extra_env: str
) -> tuple[int, dict[str, Any]]:
    """The exit status and the document of `replicator status --json ARGS`; fails on anything on stderr."""
    done = run_status(database_url, redis_url, "--json", *args, slot=slot, **extra_env)
    assert done.stderr == "", done.stderr
    document = json.loads(done.stdout)
    assert isinstance(document, dict)
    return done.returncode, document


def status_now(database_url: str, redis_url: str, slot: str | None = None, **extra_env: str) -> Status:
    """What `replicator status` reads, read in this process: for polling, where a process per look is too slow."""
    env = replicator_env(database_url, redis_url, slot=slot or slot_for(database_url))
    env.update({f"REPLICATOR_{k.upper()}": v for k, v in extra_env.items()})
    return read_status(Settings.from_env(env))


def change_batches(entries: StreamRangeResponse | None) -> list[read_model_pb2.ChangeBatch]:
    """The batches that entries of the change stream (XRANGE, XREVRANGE) announce."""
    assert entries is not None
    batches = []
    for _, fields in entries:
        assert fields is not None
        raw = fields[b"batch"]
        assert isinstance(raw, bytes)
        batches.append(read_model_pb2.ChangeBatch.FromString(raw))
    return batches


StartReplicator = Callable[..., ReplicatorProcess]


@pytest.fixture
def replicator(tmp_path: Path) -> Iterator[StartReplicator]:
    """A factory: `replicator(database_url, redis_url, **env)` starts a replicator subprocess."""
    started: list[ReplicatorProcess] = []

    def start(database_url: str, redis_url: str, slot: str = "", **extra_env: str) -> ReplicatorProcess:
        process = ReplicatorProcess(
            database_url,
            redis_url,
            tmp_path / f"replicator-{len(started)}.log",
            slot=slot,
            extra_env={f"REPLICATOR_{k.upper()}": v for k, v in extra_env.items()},
        )
        started.append(process.start())
        return process

    yield start
    for process in started:
        if process.process is not None and process.process.poll() is None:
            process.resume()
        process.stop()


class Monotonic:
    """Samples the `lsn` of some hashes while a test runs and records any that moved backwards."""

    def __init__(self, redis_url: str, keys: list[str]) -> None:
        self.client = sync_client(redis_url)
        self.keys = keys
        self.highest: dict[str, int] = {}
        self.backwards: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monotonic", daemon=True)

    def __enter__(self) -> Monotonic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.client.pipeline(transaction=False) as pipe:
                for key in self.keys:
                    pipe.hget(key, "lsn")
                values = pipe.execute()
            for key, raw in zip(self.keys, values, strict=True):
                if raw is None:
                    continue
                value = int(raw)
                if value < self.highest.get(key, 0):
                    self.backwards.append(f"{key}: {self.highest[key]} -> {value}")
                self.highest[key] = max(value, self.highest.get(key, 0))
            self.samples += 1
            self._stop.wait(0.005)


def retire(database_url: str, redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m replicator retire ARGS` with the replicator's settings."""
    return subprocess.run(
        [sys.executable, "-m", "replicator", "retire", *args],
        env=replicator_env(database_url, redis_url, extra={"REPLICATOR_LOG_LEVEL": "WARNING"}),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def keys_of(redis_url: str, namespace: str) -> int:
    """How many keys of the Redis of `redis_url` (every node of a cluster) are under `namespace`."""
    client = sync_client(redis_url)
    try:
        return sum(1 for _ in client.scan_iter(match=f"{namespace}:*", count=1000))
    finally:
        client.close()


def slot_exists(database_url: str, slot: str) -> bool:
    with psycopg2.connect(database_url) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT 1 FROM pg_replication_slots WHERE slot_name = %s", (slot,))
        found = cursor.fetchone() is not None
    connection.close()
    return found
