"""Operating the slot: `replicator status` against a real slot, its exit statuses, lag and retained WAL, invalidation."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from functools import partial

import psycopg2
import pytest
import redis

from payments_common.keys import DEFAULT_NAMESPACE, KeySchema
from payments_common.lsn import parse_lsn
from replicator.status import (
    CAUGHT_UP,
    EXIT_OK,
    EXIT_SLOT_LOST,
    EXIT_SLOT_MISSING,
    EXIT_UNREACHABLE,
    SOURCE_TIME,
)
from stack.replication import run_reconcile
from stack.servers import PostgresServer, free_port
from tests.support.replicator import (
    StartReplicator,
    checkpoint_lsn,
    current_wal_lsn,
    replicator,
    run_status,
    schema_for,
    slot_for,
    status_json,
    status_now,
)
from tests.support.source import SourceWriter
from tests.support.waiting import wait_until

__all__ = ["replicator"]

GIB = 1024**3


def _rows(text: str) -> dict[str, str]:
    """The table of `replicator status`: name -> value."""
    rows = {}
    for line in text.splitlines():
        name, _, value = line.partition("  ")
        rows[name.strip()] = value.strip()
    return rows


def test_status_of_a_running_replicator(
    migrated_dsn: str, any_redis_url: str, replicator: StartReplicator
) -> None:
    """Table and JSON, under a namespace that is not the default: status reads the settings `run` reads."""
    namespace = "rm:status"
    slot = slot_for(migrated_dsn)
    process = replicator(migrated_dsn, any_redis_url, key_namespace=namespace)
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        source.submit(alice, bob, 10)
    target = current_wal_lsn(migrated_dsn)
    wait_until(
        lambda: checkpoint_lsn(any_redis_url, slot, namespace) >= target,
        60,
        "the checkpoint of rm:status reaches the last write",
        detail=process.log_tail,
    )
    # Nothing was written under the default namespace.
    assert checkpoint_lsn(any_redis_url, slot) == 0

    code, document = status_json(migrated_dsn, any_redis_url, key_namespace=namespace)
    assert code == EXIT_OK
    assert document["format"] == 1
    assert (document["outcome"], document["exit_code"]) == ("ok", 0)
    assert (document["namespace"], document["slot_name"]) == (namespace, slot)
    assert document["postgres"]["reachable"]
    assert document["redis"]["reachable"]
    assert document["postgres"]["max_slot_wal_keep_size_bytes"] == 2 * GIB  # stack/servers.py sets 2GB
    found = document["slot"]
    assert found["plugin"] == "pgoutput"
    assert found["active"] is True
    assert isinstance(found["active_pid"], int)
    assert found["wal_status"] in ("reserved", "extended")
    assert isinstance(found["retained_wal_bytes"], int)
    assert found["retained_wal_bytes"] >= 0
    assert found["safe_wal_size_bytes"] > 0
    restart, confirmed = parse_lsn(found["restart_lsn"]), parse_lsn(found["confirmed_flush_lsn"])
    current = parse_lsn(document["postgres"]["current_wal_lsn"])
    assert restart <= confirmed <= current
    assert found["retained_wal_bytes"] == current - restart
    assert parse_lsn(document["checkpoint"]["lsn"]) >= target
    assert document["checkpoint"]["source_time"] is not None
    assert document["lag"]["bytes"] == max(0, current - parse_lsn(document["checkpoint"]["lsn"]))
    assert document["lag"]["seconds_basis"] in (CAUGHT_UP, SOURCE_TIME)
    lock = document["lock"]
    assert lock["key"] == schema_for(any_redis_url, slot, namespace).lock(slot)
    assert process.process is not None
    assert f":{process.process.pid}:" in lock["owner"]
    assert 0 < lock["ttl_seconds"] <= 2  # the fixture's REPLICATOR_LOCK_TTL_SECONDS

    done = run_status(migrated_dsn, any_redis_url, key_namespace=namespace)
    assert (done.returncode, done.stderr) == (EXIT_OK, "")
    rows = _rows(done.stdout)
    assert rows["namespace"] == namespace
    assert rows["slot"].startswith(f"{slot} (pgoutput), active (walsender pid ")
    assert rows["lock owner"].startswith(lock["owner"])
    assert rows["wal_status"].startswith(("reserved", "extended"))
    assert "max_slot_wal_keep_size 2.0 GiB" in rows["wal_status"]
    assert rows["outcome"] == "ok (exit status 0)"


def test_status_without_the_slot(migrated_dsn: str, redis_url: str) -> None:
    """Before the first run (or after the slot was dropped): exit status 3, in both forms."""
    code, document = status_json(migrated_dsn, redis_url)
    assert code == EXIT_SLOT_MISSING
    assert (document["outcome"], document["exit_code"]) == ("slot_missing", EXIT_SLOT_MISSING)
    assert document["slot"] is None
    assert document["checkpoint"] is None
    assert document["lock"]["owner"] is None
    assert document["lag"] == {"bytes": None, "seconds": None, "seconds_basis": "unknown"}
    done = run_status(migrated_dsn, redis_url)
    assert (done.returncode, done.stderr) == (EXIT_SLOT_MISSING, "")
    rows = _rows(done.stdout)
    assert "MISSING" in rows["slot"]
    assert rows["outcome"] == "slot_missing (exit status 3)"


@pytest.mark.parametrize("unreachable", ["postgres", "redis", "redis cluster"])
def test_status_when_a_side_cannot_be_reached(migrated_dsn: str, redis_url: str, unreachable: str) -> None:
    """Exit status 4, the side named, no traceback, and the password in the URL printed nowhere."""
    secret = "s3cret-in-the-url"
    port = free_port()
    side = unreachable.split()[0]
    if unreachable == "postgres":
        database_url, redis_at = f"postgresql://replicator:{secret}@127.0.0.1:{port}/payments", redis_url
    elif unreachable == "redis":
        database_url, redis_at = migrated_dsn, f"redis://default:{secret}@127.0.0.1:{port}/0"
    else:
        seeds = f"127.0.0.1:{port},127.0.0.1:{free_port()}"
        database_url, redis_at = migrated_dsn, f"redis+cluster://default:{secret}@{seeds}"
    done = run_status(database_url, redis_at, "--json", "--timeout", "2", slot=slot_for(migrated_dsn))
    assert done.returncode == EXIT_UNREACHABLE, done.stdout + done.stderr
    assert secret not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr
    code, document = status_json(database_url, redis_at, "--timeout", "2", slot=slot_for(migrated_dsn))
    assert code == EXIT_UNREACHABLE
    assert document["outcome"] == "unreachable"
    assert document[side]["reachable"] is False
    assert document[side]["error"]
    other = "redis" if side == "postgres" else "postgres"
    assert document[other]["reachable"] is True
    assert document[side]["refused"] is False
    table = run_status(database_url, redis_at, "--timeout", "2", slot=slot_for(migrated_dsn))
    assert table.returncode == EXIT_UNREACHABLE
    assert "not reached" in table.stdout
    assert secret not in table.stdout + table.stderr


@pytest.mark.parametrize("refusal", ["redis-password", "redis-acl", "postgres-database"])
def test_status_when_a_side_refuses(migrated_dsn: str, redis_url: str, refusal: str) -> None:
    """A server that answers with a refusal was reached: exit status 4 still, but "refused", and its reason."""
    secret = "s3cret-in-the-url"
    database_url, redis_at = migrated_dsn, redis_url
    admin = redis.Redis.from_url(redis_url)
    user = f"status-{refusal}"
    try:
        if refusal == "redis-password":
            redis_at = redis_url.replace("redis://", f"redis://{user}:{secret}@")
            reason = "invalid username-password pair"
        elif refusal == "redis-acl":
            # It may log in and select its database, but read none of the replicator's keys.
            admin.acl_setuser(
                user, enabled=True, passwords=[f"+{secret}"], categories=["+@all"], keys=["elsewhere:*"]
            )
            redis_at = redis_url.replace("redis://", f"redis://{user}:{secret}@")
            reason = "no permissions"
        else:
            database_url = migrated_dsn.rsplit("/", 1)[0] + "/no_such_database"
            reason = 'database "no_such_database" does not exist'
        side = "postgres" if refusal.startswith("postgres") else "redis"
        code, document = status_json(database_url, redis_at, slot=slot_for(migrated_dsn))
        assert code == EXIT_UNREACHABLE
        assert document["outcome"] == "unreachable"
        assert (document[side]["reachable"], document[side]["refused"]) == (False, True)
        assert reason in document[side]["error"]
        other = "redis" if side == "postgres" else "postgres"
        assert (document[other]["reachable"], document[other]["refused"]) == (True, False)
        done = run_status(database_url, redis_at, slot=slot_for(migrated_dsn))
        assert done.returncode == EXIT_UNREACHABLE
        rows = _rows(done.stdout)
        line = rows["checkpoint (Redis)"] if side == "redis" else rows["slot"]
        assert f"{'Redis' if side == 'redis' else 'PostgreSQL'} refused (" in line
        assert reason in line
        assert "not reached" not in done.stdout
        assert secret not in done.stdout + done.stderr
        assert "Traceback" not in done.stderr
    finally:
        admin.acl_deluser(user)
        admin.close()


def test_lag_and_retained_wal_grow_while_the_replicator_is_stopped(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    process = replicator(migrated_dsn, redis_url, ack_delay_seconds="0")
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        source.submit(alice, bob, 10)
        process.wait_caught_up()
        assert process.stop() == 0

        code, stopped = status_json(migrated_dsn, redis_url)
        assert code == EXIT_OK
        assert stopped["slot"]["active"] is False
        assert stopped["lock"]["owner"] is None  # a replicator that stops releases its lock
        rows = _rows(run_status(migrated_dsn, redis_url).stdout)
        assert rows["slot"].endswith("INACTIVE (no consumer streams it)")
        assert rows["lock owner"].startswith("NOBODY")

        looks = []
        for _ in range(2):
            for n in range(100):
                source.submit(alice, bob, 1 + n)
            code, look = status_json(migrated_dsn, redis_url)
            assert code == EXIT_OK
            looks.append(look)
    before, after = looks
    for look in looks:
        # The checkpoint and the confirmed position stand still while the WAL goes on.
        assert look["checkpoint"] == stopped["checkpoint"]
        assert look["slot"]["confirmed_flush_lsn"] == stopped["slot"]["confirmed_flush_lsn"]
        assert look["lag"]["seconds_basis"] == SOURCE_TIME
        assert look["lag"]["seconds"] > 0
    assert 0 < before["lag"]["bytes"] < after["lag"]["bytes"]
    assert stopped["slot"]["retained_wal_bytes"] < before["slot"]["retained_wal_bytes"]
    assert before["slot"]["retained_wal_bytes"] < after["slot"]["retained_wal_bytes"]
    assert before["lag"]["seconds"] <= after["lag"]["seconds"]
    assert "at most" in _rows(run_status(migrated_dsn, redis_url).stdout)["lag"]

    # Started again, it catches up; once it has confirmed, the slot lets the WAL go.
    restarted = replicator(migrated_dsn, redis_url, ack_delay_seconds="0")
    restarted.wait_caught_up()

    def keeps_less() -> bool:
        usage = status_now(migrated_dsn, redis_url).usage
        retained = usage.retained_bytes if usage is not None else None
        return retained is not None and retained < after["slot"]["retained_wal_bytes"]

    wait_until(
        keeps_less,
        60,
        "the slot keeps less WAL than while the replicator was stopped",
        detail=restarted.log_tail,
    )
    code, resumed = status_json(migrated_dsn, redis_url)
    assert code == EXIT_OK
    assert parse_lsn(resumed["checkpoint"]["lsn"]) >= parse_lsn(after["postgres"]["current_wal_lsn"])
    assert resumed["slot"]["active"] is True


@pytest.fixture
def capped_postgres() -> Iterator[PostgresServer]:
    """A private PostgreSQL whose slots may keep at most 1 MB of WAL: any segment switch loses them."""
    server = PostgresServer(extra_settings={"max_slot_wal_keep_size": "1MB"})
    try:
        yield server.start()
    finally:
        server.remove()


def test_an_invalidated_slot_is_reported_and_rebuilt(
    capped_postgres: PostgresServer, redis_url: str, replicator: StartReplicator
) -> None:
    """max_slot_wal_keep_size lets PostgreSQL drop the WAL of a stopped replicator's slot.

    status says so (exit status 5); the replicator, started again, rebuilds the read models
    from a new slot (reason slot_lost) and they equal the source.
    """
    from approval_svc.migrate import upgrade

    dsn = capped_postgres.create_database("capped")
    upgrade(dsn)
    process = replicator(dsn, redis_url)
    with SourceWriter(dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        source.submit(alice, bob, 10)
        process.wait_caught_up()
        assert process.stop() == 0

        def lost() -> bool:
            # Each round fills part of a segment, starts the next one and checkpoints, which
            # invalidates a slot whose oldest WAL is further back than the cap allows.
            source.submit(alice, bob, 1)
            source.execute("SELECT pg_switch_wal()")
            source.execute("CHECKPOINT")
            usage = status_now(dsn, redis_url).usage
            return usage is not None and usage.slot is not None and usage.slot.wal_status == "lost"

        wait_until(lost, 60, "the slot is invalidated")
        paid_meanwhile = source.submit(bob, alice, 3)

    code, document = status_json(dsn, redis_url)
    assert code == EXIT_SLOT_LOST
    assert document["outcome"] == "slot_lost"
    assert document["slot"]["wal_status"] == "lost"
    assert document["slot"]["retained_wal_bytes"] is None
    assert document["postgres"]["max_slot_wal_keep_size_bytes"] == 1024 * 1024
    assert "invalidated" in _rows(run_status(dsn, redis_url).stdout)["wal_status"]

    restarted = replicator(dsn, redis_url)
    restarted.wait_caught_up()
    assert "REBUILD: replication slot" in restarted.log_text()
    assert "(reason: slot_lost)" in restarted.log_text()
    result = run_reconcile(dsn, redis_url, slot_for(dsn), wait_seconds=30)
    assert result.returncode == 0, result.stdout + result.stderr
    client = redis.Redis.from_url(redis_url)
    assert client.hexists(KeySchema().payment(paid_meanwhile), "view")
    client.close()
    code, document = status_json(dsn, redis_url)
    assert code == EXIT_OK
    assert document["slot"]["wal_status"] in ("reserved", "extended")


def _scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """The replicator's samples: name, labels, value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = []
    for line in text.splitlines():
        if line.startswith("replicator_"):
            series, _, value = line.rpartition(" ")
            name, _, labels = series.partition("{")
            samples.append((name, dict(re.findall(r'(\w+)="([^"]*)"', labels)), float(value)))
    return samples


def _versions(port: int) -> list[dict[str, str]]:
    """The read-model version each sample names (`slot`, `key_namespace`), once per distinct one."""
    found: list[dict[str, str]] = []
    for _, labels, _ in _scrape(port):
        version = {key: labels.get(key, "") for key in ("slot", "key_namespace")}
        if version not in found:
            found.append(version)
    return found


def _metrics(port: int) -> dict[str, float]:
    """The samples by name and their own labels, e.g. 'replicator_slot_wal_status{wal_status="lost"}'.

    Every sample also carries the version's labels (`slot`, `key_namespace`); `_versions` checks them.
    """
    samples = {}
    for name, labels, value in _scrape(port):
        own = ",".join(f'{k}="{v}"' for k, v in labels.items() if k not in ("slot", "key_namespace"))
        samples[f"{name}{{{own}}}" if own else name] = value
    return samples


def test_the_slot_and_lock_gauges(migrated_dsn: str, any_redis_url: str, replicator: StartReplicator) -> None:
    """The owner and a standby both export the slot; only the owner holds the lock; the WAL a slot keeps shows."""
    owner_port, standby_port = free_port(), free_port()
    owner = replicator(migrated_dsn, any_redis_url, metrics_port=str(owner_port), slot_sample_seconds="0.2")
    owner.wait_caught_up()
    wait_until(
        lambda: _metrics(owner_port).get("replicator_slot_active") == 1, 30, "the owner sees its slot active"
    )
    seen = _metrics(owner_port)
    # Every series names the version: two replicators of different versions in one place differ.
    assert _versions(owner_port) == [{"slot": slot_for(migrated_dsn), "key_namespace": DEFAULT_NAMESPACE}]
    assert seen["replicator_lock_held"] == 1
    assert seen["replicator_slot_exists"] == 1
    assert seen["replicator_slot_safe_wal_size_bytes"] > 0
    assert seen['replicator_slot_wal_status{wal_status="reserved"}'] == 1
    assert seen['replicator_slot_wal_status{wal_status="lost"}'] == 0
    assert seen['replicator_bootstrap_in_progress{reason="new_deployment"}'] == 0
    assert seen['replicator_bootstraps_total{reason="new_deployment"}'] == 1
    assert seen['replicator_bootstraps_total{reason="slot_lost"}'] == 0

    standby = replicator(
        migrated_dsn, any_redis_url, metrics_port=str(standby_port), slot_sample_seconds="0.2"
    )
    standby.wait_for_log("waiting for the lock")
    wait_until(
        lambda: _metrics(standby_port).get("replicator_slot_exists") == 1, 30, "the standby reads the slot"
    )
    assert _metrics(standby_port)["replicator_lock_held"] == 0

    # A transaction left open holds the slot's restart_lsn back (logical decoding needs its
    # start), so the slot keeps the WAL written meanwhile even though the owner confirms it.
    holder = psycopg2.connect(migrated_dsn)
    try:
        with holder.cursor() as cursor:
            cursor.execute("SELECT txid_current()")
        kept = _metrics(owner_port)["replicator_slot_wal_retained_bytes"]
        with SourceWriter(migrated_dsn) as source:
            alice, bob = source.open_account("Alice"), source.open_account("Bob")
            for n in range(300):
                source.submit(alice, bob, 1 + n)
        owner.wait_caught_up()

        def grown(port: int) -> bool:
            return _metrics(port)["replicator_slot_wal_retained_bytes"] > kept + 100_000

        for port in (owner_port, standby_port):
            wait_until(partial(grown, port), 30, "the WAL kept by the slot grows")
        code, document = status_json(migrated_dsn, any_redis_url)
        assert code == EXIT_OK
        assert document["slot"]["retained_wal_bytes"] > kept + 100_000
    finally:
        holder.rollback()
        holder.close()

    assert owner.stop() == 0
    wait_until(lambda: _metrics(standby_port)["replicator_lock_held"] == 1, 30, "the standby holds the lock")
    standby.wait_caught_up()
