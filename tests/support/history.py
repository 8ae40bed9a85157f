"""Test support for the history service: a replicated source, running servers, hand-written read models.

The source data goes into the system of record (tests/support/source.py), so that the
real replicator builds the read models that the history service then answers from.
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from history_svc.config import Settings
from history_svc.server import Dependencies, HistoryServer, create_server
from payments.history.v1 import history_service_pb2_grpc
from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import payment_pb2
from payments_common.keys import (
    CHECKPOINT_LSN_FIELD,
    DEFAULT_SCHEMA,
    DEFAULT_SLOT_NAME,
    LSN_FIELD,
    STREAM_BATCH_FIELD,
    VIEW_FIELD,
    KeySchema,
)
from payments_common.tokens import decode_consistency_token
from stack.replication import checkpoint_lsn
from stack.servers import PostgresServer, RedisCluster, RedisServer
from tests.support.auth import aio_channel, auth_settings, server_env
from tests.support.history_cluster import start_cluster
from tests.support.processes import ServiceProcess
from tests.support.replicator import ReplicatorProcess
from tests.support.source import SourceWriter
from tests.support.waiting import wait_until

PAGE_SECRET = "history-tests-page-token-secret"


def source_writer(dsn: str) -> SourceWriter:
    """A SourceWriter whose accounts open as these tests expect: 1,000,000 minor units, limits out of reach."""
    return SourceWriter(
        dsn, balance_minor=1_000_000, per_payment_limit_minor=10**12, daily_limit_minor=10**13
    )


def at(base: datetime, seconds: float) -> datetime:
    return base + timedelta(seconds=seconds)


def settings_for(redis_url: str, **overrides: Any) -> Settings:
    """A test server's settings; it trusts the session's token authority unless `auth` says otherwise."""
    values: dict[str, Any] = {
        "redis_url": redis_url,
        "page_token_secret": PAGE_SECRET.encode(),
        "host": "127.0.0.1",
        "port": 0,
        "metrics_port": 0,
        "grace_seconds": 2.0,
        "redis_timeout_seconds": 1.0,
        **overrides,
    }
    values.setdefault("auth", auth_settings(Settings))
    return Settings(**values)


@dataclass
class RunningHistory:
    """An in-process history server and a stub bound to it."""

    server: HistoryServer
    port: int
    channel: grpc.aio.Channel
    stub: history_service_pb2_grpc.HistoryServiceAsyncStub

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def running_history(settings: Settings, token: str | None = None) -> AsyncIterator[RunningHistory]:
    """The server, and a channel whose calls carry `token` (by default the tests' service token)."""
    deps = Dependencies.connect(settings)
    server, port = create_server(settings, deps)
    await server.start()
    channel = aio_channel(f"127.0.0.1:{port}", token)
    try:
        yield RunningHistory(server, port, channel, history_service_pb2_grpc.HistoryServiceStub(channel))
    finally:
        await channel.close(None)
        await server.stop(0)
        await deps.close()


class HistoryProcess(ServiceProcess):
    """A `python -m history_svc serve` subprocess on a fixed port, set up as the history tests' server.

    It trusts the session's token authority, unless `extra_env` says otherwise.
    """

    def __init__(
        self, redis_url: str, port: int, log_path: Path, extra_env: dict[str, str] | None = None
    ) -> None:
        env = {
            "HISTORY_REDIS_URL": redis_url,
            "HISTORY_PAGE_TOKEN_SECRET": PAGE_SECRET,
            "HISTORY_HOST": "127.0.0.1",
            "HISTORY_PORT": str(port),
            "HISTORY_METRICS_PORT": "0",
            "HISTORY_GRACE_SECONDS": "2",
            **server_env("HISTORY_"),
            **(extra_env or {}),
        }
        super().__init__("history", "history_svc", port, env, log_path)


@contextlib.contextmanager
def history_processes(make: Callable[[int], HistoryProcess], count: int) -> Iterator[list[HistoryProcess]]:
    processes = [make(index) for index in range(count)]
    try:
        for process in processes:
            process.start()
        for process in processes:
            process.wait_serving()
        yield processes
    finally:
        for process in processes:
            process.kill()


# The Redis topologies that the read models' guarantees must hold on: a single node, and a
# Redis Cluster (3 masters with a replica each).
TOPOLOGIES = ("one node", "cluster")


@pytest.fixture(scope="module", params=TOPOLOGIES)
def topology(request: pytest.FixtureRequest) -> str:
    """The topology of a module's replicated source: each test of the module runs once on each."""
    value: str = request.param
    return value


@dataclass
class ReplicatedSource:
    """A source database with the real replicator feeding a private Redis (one node, or a Redis Cluster)."""

    dsn: str
    redis_url: str
    slot_name: str
    writer: SourceWriter
    replicator: ReplicatorProcess
    redis: RedisServer | RedisCluster

    @property
    def cluster(self) -> bool:
        return isinstance(self.redis, RedisCluster)

    def wait_replicated(self, token: str | None = None, timeout: float = 60.0) -> None:
        """Waits until the Redis checkpoint includes `token` (default: everything committed so far)."""
        if token is None:
            self.replicator.wait_caught_up(timeout)
            return
        target = decode_consistency_token(token)

        def reached() -> bool:
            assert self.replicator.alive, self.replicator.log_tail()
            return checkpoint_lsn(self.redis_url, self.slot_name) >= target

        wait_until(reached, timeout, f"the checkpoint at {target}", detail=self.replicator.log_tail)


@contextlib.contextmanager
def replicated_source(
    postgres: PostgresServer, work_dir: Path, topology: str = "one node"
) -> Iterator[ReplicatedSource]:
    """A new source database, and the real replicator feeding a Redis of its own: one node, or a
    private Redis Cluster when `topology` is "cluster" (its masters may be killed by the test)."""
    from approval_svc.migrate import upgrade

    if topology not in TOPOLOGIES:
        raise ValueError(f"unknown topology {topology!r}")
    name = f"h_{uuid.uuid4().hex[:12]}"
    dsn = postgres.create_database(name)
    # Detached: started without a pre-exec hook (see test_history_health).
    redis: RedisServer | RedisCluster | None = None
    writer = source_writer(dsn)
    replicator: ReplicatorProcess | None = None
    try:
        upgrade(dsn)
        if topology == "cluster":
            redis = start_cluster(work_dir / f"redis-{name}")
        else:
            redis = RedisServer(base_dir=work_dir / f"redis-{name}", detached=True).start()
        url = redis.url if isinstance(redis, RedisCluster) else redis.url()
        replicator = ReplicatorProcess(dsn, url, work_dir / f"replicator-{name}.log")
        replicator.start()
        yield ReplicatedSource(dsn, url, replicator.slot, writer, replicator, redis)
    finally:
        writer.close()
        if replicator is not None:
            replicator.stop()
        if redis is not None:
            redis.remove()
        postgres.drop_database(name)


def payment_view(number: int, payer: str, payee: str) -> read_model_pb2.PaymentView:
    """A payment view as the replicator stores it (no timeline), numbered for readable tests."""
    return read_model_pb2.PaymentView(
        payment_id=f"00000000-0000-4000-8000-{number:012d}",
        payer_account_id=payer,
        payee_account_id=payee,
        status=payment_pb2.PAYMENT_STATUS_APPROVED,
        source_lsn=number,
    )


class HandWrittenReadModel:
    """Writes accounts, the checkpoint and the change stream into Redis by hand, as the replicator would.

    Each `publish` moves the checkpoint and appends its ChangeBatch in one MULTI, chained to
    the entry before it, unless told otherwise: that is how the tests stage the replicator's
    faults (a rebuild, trimmed entries, a batch that omits payments, a broken chain).
    """

    def __init__(
        self, client: Redis, slot: str = DEFAULT_SLOT_NAME, keys: KeySchema = DEFAULT_SCHEMA
    ) -> None:
        self.client = client
        self.slot = slot
        self.keys = keys
        self.checkpoint = 0
        self._next_lsn = 1_000

    def next_lsn(self) -> int:
        self._next_lsn += 100
        return self._next_lsn

    async def open_account(self, account_id: str, name: str = "someone") -> None:
        view = read_model_pb2.AccountView(account_id=account_id, owner_name=name)
        await self.client.hset(
            self.keys.account(account_id),
            mapping={LSN_FIELD: self.next_lsn(), VIEW_FIELD: view.SerializeToString()},
        )

    async def delete_account(self, account_id: str) -> None:
        """What the replicator leaves for a deleted account: a tombstone, the position without the view."""
        key = self.keys.account(account_id)
        await self.client.hset(key, LSN_FIELD, self.next_lsn())
        await self.client.hdel(key, VIEW_FIELD)

    def batch(
        self,
        *views: read_model_pb2.PaymentView,
        previous: int | None = None,
        omits_payments: bool = False,
    ) -> read_model_pb2.ChangeBatch:
        """The next ChangeBatch, chained to the last one unless `previous` says otherwise."""
        return read_model_pb2.ChangeBatch(
            checkpoint_lsn=self.next_lsn(),
            previous_checkpoint_lsn=self.checkpoint if previous is None else previous,
            payments=views,
            omits_payments=omits_payments,
        )

    async def publish(
        self,
        *views: read_model_pb2.PaymentView,
        previous: int | None = None,
        omits_payments: bool = False,
        trim_to: int | None = None,
    ) -> int:
        """Moves the checkpoint and appends one entry atomically; returns the new checkpoint."""
        batch = self.batch(*views, previous=previous, omits_payments=omits_payments)
        async with self.client.pipeline(transaction=True) as pipe:
            self.stage(pipe, batch)
            if trim_to is not None:
                pipe.xtrim(self.keys.changes(), maxlen=trim_to, approximate=False)
            await pipe.execute()
        return batch.checkpoint_lsn

    def stage(self, pipe: Any, batch: read_model_pb2.ChangeBatch) -> None:
        """Adds one entry's writes to a MULTI, so that several entries can land at once."""
        pipe.hset(self.keys.checkpoint(self.slot), CHECKPOINT_LSN_FIELD, batch.checkpoint_lsn)
        pipe.xadd(self.keys.changes(), {STREAM_BATCH_FIELD: batch.SerializeToString()})
        self.checkpoint = batch.checkpoint_lsn

    async def set_checkpoint(self, lsn: int) -> None:
        """Moves the checkpoint without an entry, as a write applied without notification does."""
        await self.client.hset(self.keys.checkpoint(self.slot), CHECKPOINT_LSN_FIELD, lsn)
        self.checkpoint = lsn


# Accounts of the hand-written read model, opened by the `model` fixture.
ALICE = "00000000-0000-4000-8000-00000000000a"
BOB = "00000000-0000-4000-8000-00000000000b"
CAROL = "00000000-0000-4000-8000-00000000000c"


@pytest.fixture
async def client(redis_url: str) -> AsyncIterator[Redis]:
    """An asyncio Redis client on the test's Redis database."""
    client = Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def model(client: Redis) -> HandWrittenReadModel:
    """A hand-written read model with ALICE, BOB and CAROL opened and published."""
    model = HandWrittenReadModel(client)
    for account in (ALICE, BOB, CAROL):
        await model.open_account(account)
    await model.publish()
    return model
