"""The replicator under faults: kill -9 under load, Redis flushed, PostgreSQL restarted, two instances."""

from __future__ import annotations

import time

import redis

from payments_common.keys import DEFAULT_SCHEMA as KEYS
from replicator.config import Settings
from replicator.reconcile import reconcile
from stack.servers import PostgresServer, RedisServer
from tests.support.replicator import (
    Monotonic,
    ReplicatorProcess,
    StartReplicator,
    checkpoint_lsn,
    replicator,
    slot_for,
)
from tests.support.source import SourceLoad, SourceWriter

__all__ = ["replicator"]


def _assert_reconciled(database_url: str, redis_url: str) -> None:
    settings = Settings(database_url=database_url, redis_url=redis_url, slot_name=slot_for(database_url))
    report = reconcile(settings, wait_seconds=60)
    assert report.clean, "\n".join(report.lines())
    assert report.in_flight == 0
    assert report.checked > 0


def _accounts(database_url: str, count: int = 6) -> list[str]:
    with SourceWriter(database_url) as source:
        return [source.open_account(f"Owner {i}") for i in range(count)]


def _watched(accounts: list[str], database_url: str) -> list[str]:
    return [KEYS.checkpoint(slot_for(database_url)), *(KEYS.account(a) for a in accounts)]


def _bootstraps(*processes: ReplicatorProcess) -> int:
    """Bootstraps completed (each logs a start and an end), summed over the processes' logs."""
    return sum(process.log_path.read_text().count("bootstrap of slot") // 2 for process in processes)


def _rebuilds(*processes: ReplicatorProcess) -> int:
    """Rebuilds announced, summed over the processes' logs."""
    return sum(process.log_path.read_text().count("REBUILD:") for process in processes)


def test_kill_9_under_load_loses_nothing_and_never_goes_backwards(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    accounts = _accounts(migrated_dsn)
    process = replicator(migrated_dsn, redis_url)
    processes = [process]
    process.wait_caught_up()
    with Monotonic(redis_url, _watched(accounts, migrated_dsn)) as monotonic:
        with SourceLoad(migrated_dsn, accounts) as load:
            for round_ in range(1, 4):
                load.wait_for(round_ * 500)
                process.kill()
                process = replicator(migrated_dsn, redis_url)
                processes.append(process)
            load.wait_for(2000)
        process.wait_caught_up()
    assert monotonic.samples > 10
    assert monotonic.backwards == []
    _assert_reconciled(migrated_dsn, redis_url)
    # Restarts resume from the checkpoint; only the first start copied the tables.
    assert _rebuilds(*processes) == 0
    assert _bootstraps(processes[0]) == 1
    assert _bootstraps(*processes) == 1


def test_redis_flushed_while_running_is_rebuilt(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    accounts = _accounts(migrated_dsn)
    process = replicator(migrated_dsn, redis_url)
    with SourceLoad(migrated_dsn, accounts) as load:
        load.wait_for(300)
        process.wait_caught_up()
        redis.Redis.from_url(redis_url).flushdb()
        load.wait_for(load.written + 300)
    process.wait_caught_up()
    _assert_reconciled(migrated_dsn, redis_url)
    assert "REBUILD" in process.log_path.read_text()
    assert _bootstraps(process) == 2


def test_postgres_restart_resumes_without_a_new_bootstrap(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator, postgres_server: PostgresServer
) -> None:
    accounts = _accounts(migrated_dsn)
    process = replicator(migrated_dsn, redis_url)
    process.wait_caught_up()
    with SourceLoad(migrated_dsn, accounts) as load:
        load.wait_for(200)
        postgres_server.restart()
        load.wait_for(load.written + 200)
    process.wait_caught_up()
    assert process.alive
    _assert_reconciled(migrated_dsn, redis_url)
    assert _bootstraps(process) == 1


def test_second_instance_waits_then_takes_over(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    accounts = _accounts(migrated_dsn)
    first = replicator(migrated_dsn, redis_url)
    first.wait_caught_up()
    second = replicator(migrated_dsn, redis_url)
    with Monotonic(redis_url, _watched(accounts, migrated_dsn)) as monotonic:
        with SourceLoad(migrated_dsn, accounts) as load:
            load.wait_for(300)
            first.wait_caught_up()
            second.wait_for_log("waiting for the lock")
            first.kill()
            load.wait_for(load.written + 300)
        second.wait_caught_up()
    assert monotonic.backwards == []
    _assert_reconciled(migrated_dsn, redis_url)
    # The second instance resumed from the first's checkpoint.
    assert _rebuilds(first, second) == 0
    assert _bootstraps(first, second) == 1


def test_paused_owner_is_fenced_after_a_takeover(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    accounts = _accounts(migrated_dsn)
    first = replicator(migrated_dsn, redis_url)
    first.wait_caught_up()
    second = replicator(migrated_dsn, redis_url)
    with Monotonic(redis_url, _watched(accounts, migrated_dsn)) as monotonic:
        with SourceLoad(migrated_dsn, accounts) as load:
            load.wait_for(200)
            first.pause()
            try:
                # The lock expires; the second instance takes the slot and streams.
                second.wait_caught_up()
                load.wait_for(load.written + 200)
                second.wait_caught_up()
            finally:
                first.resume()
            load.wait_for(load.written + 200)
        second.wait_caught_up()
    assert monotonic.backwards == []
    assert first.alive
    _assert_reconciled(migrated_dsn, redis_url)
    # Neither the takeover nor the fenced owner's return led to a rebuild.
    assert _rebuilds(first, second) == 0
    assert _bootstraps(first, second) == 1


def test_redis_paused_then_resumed_carries_on(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator, redis_server: RedisServer
) -> None:
    accounts = _accounts(migrated_dsn)
    process = replicator(migrated_dsn, redis_url)
    process.wait_caught_up()
    with SourceLoad(migrated_dsn, accounts) as load:
        load.wait_for(200)
        redis_server.pause()
        try:
            # The outage outlasts the lock's TTL (2 s), so the replicator must take the lock again.
            outage_ends = time.monotonic() + 3
            while time.monotonic() < outage_ends:
                load.wait_for(load.written + 1)
        finally:
            redis_server.resume()
        load.wait_for(load.written + 100)
    process.wait_caught_up()
    assert process.alive
    _assert_reconciled(migrated_dsn, redis_url)
    assert _bootstraps(process) == 1


def test_redis_restarted_empty_is_rebuilt(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator, redis_server: RedisServer
) -> None:
    accounts = _accounts(migrated_dsn)
    process = replicator(migrated_dsn, redis_url)
    process.wait_caught_up()
    with SourceLoad(migrated_dsn, accounts) as load:
        load.wait_for(200)
        redis_server.restart_empty()
        load.wait_for(load.written + 200)
    process.wait_caught_up()
    _assert_reconciled(migrated_dsn, redis_url)
    assert "REBUILD" in process.log_path.read_text()


def test_bootstrap_killed_midway_starts_again_cleanly(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    accounts = _accounts(migrated_dsn, 2)
    with SourceWriter(migrated_dsn) as source:
        source.execute(
            "INSERT INTO payments (payment_id, request_id, payer_account_id, payee_account_id, payer_name, "
            "payee_name, currency_code, amount_minor, status) "
            "SELECT gen_random_uuid(), 'r' || n, %s, %s, 'A', 'B', 'EUR', n, 'APPROVED' "
            "FROM generate_series(1, 20000) AS n",
            (accounts[0], accounts[1]),
        )
    first = replicator(migrated_dsn, redis_url)
    client = redis.Redis.from_url(redis_url)
    deadline = time.monotonic() + 60
    while client.dbsize() < 1000:  # part of the copy is in Redis
        assert time.monotonic() < deadline, first.log_tail()
        time.sleep(0.01)
    first.kill()
    assert checkpoint_lsn(redis_url, first.slot) == 0
    with SourceLoad(migrated_dsn, accounts) as load:
        second = replicator(migrated_dsn, redis_url)
        second.wait_for_log("bootstrap of slot")
        load.wait_for(100)
    second.wait_caught_up()
    _assert_reconciled(migrated_dsn, redis_url)
    # The first start was a plain bootstrap; the second found the slot without a checkpoint.
    assert _rebuilds(first) == 0
    assert _rebuilds(second) == 1
    assert _bootstraps(first, second) == 1
