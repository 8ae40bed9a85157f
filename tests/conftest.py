"""Session-wide private PostgreSQL and Redis servers, and per-test databases on them."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from payments_common.redisconn import sync_client
from stack.servers import PostgresServer, RedisCluster, RedisServer

_redis_dbs = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.remove()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server.start()
    finally:
        server.remove()


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A private Redis Cluster (3 masters, a replica each) shared by a worker's tests; each test empties it."""
    cluster = RedisCluster(node_timeout_ms=2000)
    try:
        yield cluster.start()
    finally:
        cluster.remove()


@pytest.fixture
def database_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """An empty database of its own for one test (dropped afterwards, with its slots)."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    dsn = postgres_server.create_database(name)
    yield dsn
    postgres_server.drop_database(name)


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """An empty Redis database of its own for one test (one of 63, reused round-robin)."""
    db = next(_redis_dbs) % 63 + 1
    url = redis_server.url(db)
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()
    return url


@pytest.fixture
def cluster_url(redis_cluster: RedisCluster) -> str:
    """The shared cluster, emptied for one test (every master flushed; the replicas follow)."""
    client = sync_client(redis_cluster.url)
    assert isinstance(client, redis.RedisCluster)
    try:
        client.flushall(target_nodes=redis.RedisCluster.PRIMARIES)
    finally:
        client.close()
    return redis_cluster.url


@pytest.fixture(params=["one node", "cluster"])
def any_redis_url(request: pytest.FixtureRequest) -> str:
    """An empty Redis of its own for one test, once a single node and once a Redis Cluster.

    For the tests of what must hold on either topology: the read models' guarantees.
    """
    name = "redis_url" if request.param == "one node" else "cluster_url"
    url: str = request.getfixturevalue(name)
    return url


@pytest.fixture
def migrated_dsn(database_dsn: str) -> str:
    """A database of its own for one test, with the schema of the system of record."""
    from approval_svc.migrate import upgrade

    upgrade(database_dsn)
    return database_dsn


# Modules whose tests run in order, on one worker: their last tests check what the ones before left.
IN_ORDER = frozenset({"tests/integration/test_fuzz_approval.py", "tests/integration/test_fuzz_history.py"})
# End-to-end modules that start what they need themselves (the image's containers and their own servers),
# so that they run beside the local stack's suites rather than after them.
APART = frozenset({"tests/e2e/test_image_stack.py", "tests/e2e/test_freshness_alert.py"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The slow tests go first, so that they overlap the many quick ones rather than run alone at the end."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """How pytest-xdist shares the tests out (`make test` runs them on every core).

    Each test is a unit of its own, but for the end-to-end tests, which share one worker so that
    one local stack serves them, and the modules of IN_ORDER and APART.
    """
    from xdist.scheduler import LoadScopeScheduling

    class Scheduling(LoadScopeScheduling):  # type: ignore[misc]  # xdist has no type hints
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            if module in IN_ORDER or module in APART:
                return module
            if nodeid.startswith("tests/e2e/"):
                return "tests/e2e"
            return nodeid

    return Scheduling(config, log)
