"""Session-wide private PostgreSQL and Redis servers, and per-test databases on them."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator

import pytest
import redis

from stack.servers import PostgresServer, RedisServer

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
def migrated_dsn(database_dsn: str) -> str:
    """A database of its own for one test, with the schema of the system of record."""
    from approval_svc.migrate import upgrade

    upgrade(database_dsn)
    return database_dsn


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Orders and groups the tests for pytest-xdist (`make test` runs them on every core).

    The slow tests go first, so that they overlap the many quick ones rather than run alone
    at the end; the end-to-end tests share one worker, so that one local stack serves them.
    A module whose tests must run in order, on one worker, says so with
    `pytestmark = pytest.mark.xdist_group("<module>")`.
    """
    for item in items:
        if item.nodeid.startswith("tests/e2e/"):
            item.add_marker(pytest.mark.xdist_group("e2e"))
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
