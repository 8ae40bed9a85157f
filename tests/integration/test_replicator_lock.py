"""The slot's lock against a private Redis: kept alive by time while the owner works, let go when it stalls."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import REGISTRY

from payments_common.keys import DEFAULT_PUBLICATION
from payments_common.keys import DEFAULT_SCHEMA as KEYS
from payments_common.redisconn import SyncClient, sync_client
from replicator import metrics
from replicator.lock import LockKeeper, LockLost, SlotLock
from replicator.source import Source
from tests.support.waiting import wait_until

TTL_SECONDS = 1.0
KEY = KEYS.lock("s")


@pytest.fixture
def client(any_redis_url: str) -> Iterator[SyncClient]:
    connection = sync_client(any_redis_url)
    yield connection
    connection.close()


@pytest.fixture
def keeper(any_redis_url: str, client: SyncClient) -> Iterator[Callable[[float], LockKeeper]]:
    started: list[LockKeeper] = []

    def start(stall_seconds: float) -> LockKeeper:
        lock = SlotLock(client, KEY, TTL_SECONDS)
        assert lock.try_acquire()
        started.append(LockKeeper(any_redis_url, KEY, TTL_SECONDS, lock.token, stall_seconds).start())
        return started[-1]

    yield start
    for one in started:
        one.stop()


def test_the_lock_outlives_a_step_many_times_longer_than_its_ttl(
    keeper: Callable[[float], LockKeeper], client: SyncClient
) -> None:
    held = keeper(60)
    # One long step of the owner (a projection, a slow script call): nothing calls check().
    threading.Event().wait(4 * TTL_SECONDS)
    held.check()
    assert client.pttl(KEY) > 0
    assert client.get(KEY) is not None


def _reports_lost(keeper: LockKeeper) -> bool:
    try:
        keeper.check()
    except LockLost:
        return True
    return False


def test_a_lock_taken_by_another_instance_is_reported_as_lost(
    keeper: Callable[[float], LockKeeper], client: SyncClient
) -> None:
    held = keeper(60)
    metrics.LOCK_HELD.set(1)  # as the runner sets it once it has the lock
    client.set(KEY, "another instance", px=int(TTL_SECONDS * 1000))
    wait_until(lambda: _reports_lost(held), 30, "the keeper saw the lock taken", interval=0.01)
    with pytest.raises(LockLost):
        held.check()
    assert client.get(KEY) == b"another instance"
    # The gauge falls with the lock, before the main loop notices.
    assert REGISTRY.get_sample_value("replicator_lock_held") == 0


def test_an_owner_that_makes_no_progress_lets_the_lock_expire(
    keeper: Callable[[float], LockKeeper], client: SyncClient
) -> None:
    held = keeper(2 * TTL_SECONDS)
    metrics.LOCK_HELD.set(1)
    wait_until(lambda: client.get(KEY) is None, 30, "the lock expired", interval=0.01)
    with pytest.raises(LockLost):
        held.check()
    # A wedged owner reports that it holds no lock, though its main loop never gets to say so.
    assert REGISTRY.get_sample_value("replicator_lock_held") == 0


def _refuse() -> None:
    raise LockLost("not ours")


def _slot_holder(dsn: str, slot: str) -> Source:
    """A source streaming `slot`, as the instance that owns it would."""
    holder = Source(dsn, slot, DEFAULT_PUBLICATION)
    holder.connect()
    holder.create_slot_with_snapshot()
    holder.start_replication(fence=lambda: None)
    return holder


def test_an_instance_without_the_lock_neither_ends_the_owners_walsender_nor_drops_the_slot(
    migrated_dsn: str,
) -> None:
    slot = "fenced_" + migrated_dsn.rsplit("/", 1)[-1].lower()
    holder = _slot_holder(migrated_dsn, slot)
    stale = Source(migrated_dsn, slot, DEFAULT_PUBLICATION)
    try:
        stale.connect()
        before = stale.slot_state()
        assert before is not None
        assert before.active_pid == holder.stream.backend_pid
        with pytest.raises(LockLost):
            stale.start_replication(fence=_refuse)
        with pytest.raises(LockLost):
            stale.drop_slot(fence=_refuse)
        after = stale.slot_state()
        assert after is not None
        assert after.active_pid == holder.stream.backend_pid
    finally:
        stale.close()
        holder.close()
        cleanup = Source(migrated_dsn, slot, DEFAULT_PUBLICATION)
        cleanup.connect()
        wait_until(
            lambda: getattr(cleanup.slot_state(), "active_pid", None) is None,
            30,
            "the holder's walsender ended",
            interval=0.01,
        )
        cleanup.drop_slot(fence=lambda: None)
        cleanup.close()
