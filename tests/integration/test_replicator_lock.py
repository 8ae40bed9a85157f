"""The slot's lock against a private Redis: kept alive by time while the owner works, let go when it stalls."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator

import pytest
import redis

from payments_common.keys import DEFAULT_SCHEMA as KEYS
from replicator.lock import LockKeeper, LockLost, SlotLock

TTL_MS = 1000
KEY = KEYS.lock("s")


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    connection = redis.Redis.from_url(redis_url)
    yield connection
    connection.close()


@pytest.fixture
def keeper(redis_url: str, client: redis.Redis) -> Iterator[Callable[[float], LockKeeper]]:
    started: list[LockKeeper] = []

    def start(stall_seconds: float) -> LockKeeper:
        lock = SlotLock(client, KEY, TTL_MS)
        assert lock.try_acquire()
        started.append(LockKeeper(redis_url, KEY, TTL_MS, lock.token, stall_seconds).start())
        return started[-1]

    yield start
    for one in started:
        one.stop()


def _poll(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_the_lock_outlives_a_step_many_times_longer_than_its_ttl(
    keeper: Callable[[float], LockKeeper], client: redis.Redis
) -> None:
    held = keeper(60)
    # One long step of the owner (a projection, a slow script call): nothing calls check().
    threading.Event().wait(4 * TTL_MS / 1000)
    held.check()
    assert client.pttl(KEY) > 0
    assert client.get(KEY) is not None


def test_a_lock_taken_by_another_instance_is_reported_as_lost(
    keeper: Callable[[float], LockKeeper], client: redis.Redis
) -> None:
    held = keeper(60)
    client.set(KEY, "another instance", px=TTL_MS)
    _poll(lambda: held.lost, "the keeper saw the lock taken")
    with pytest.raises(LockLost):
        held.check()
    assert client.get(KEY) == b"another instance"


def test_an_owner_that_makes_no_progress_lets_the_lock_expire(
    keeper: Callable[[float], LockKeeper], client: redis.Redis
) -> None:
    held = keeper(2 * TTL_MS / 1000)
    _poll(lambda: client.get(KEY) is None, "the lock expired")
    with pytest.raises(LockLost):
        held.check()
