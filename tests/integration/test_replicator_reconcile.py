"""`replicator reconcile`, the suites' oracle, while the source is being written: no false drift, no missed drift."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

import psycopg2
import pytest

from payments.readmodel.v1 import read_model_pb2
from payments_common.redisconn import sync_client
from replicator.config import Settings
from replicator.reconcile import Report, compare, read_source, reconcile
from tests.support.replicator import StartReplicator, replicator, schema_for, slot_for
from tests.support.source import SourceLoad, SourceWriter
from tests.support.waiting import wait_until

__all__ = ["replicator"]

# No standby has this name, so a commit that asks for synchronous replication waits for ever.
NO_STANDBY = "reconcile_test_no_such_standby"


def _settings(database_url: str, redis_url: str) -> Settings:
    return Settings(database_url=database_url, redis_url=redis_url, slot_name=slot_for(database_url))


def _query(database_url: str, query: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    connection = psycopg2.connect(database_url)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(query, args)
            return list(cursor.fetchall()) if cursor.description else []
    finally:
        connection.close()


@contextlib.contextmanager
def _synchronous_standby_required(database_url: str) -> Iterator[None]:
    """Makes commits that ask for synchronous replication wait (cluster-wide) until the block ends.

    Such a commit has written and flushed its commit record, so logical decoding streams it
    to the replicator, but it stays invisible to every snapshot until it is released.
    """
    _query(database_url, "ALTER SYSTEM SET synchronous_standby_names = %s", (NO_STANDBY,))
    _query(database_url, "SELECT pg_reload_conf()")
    try:
        yield
    finally:
        _query(database_url, "ALTER SYSTEM RESET synchronous_standby_names")
        _query(database_url, "SELECT pg_reload_conf()")


def _waiting_backends(database_url: str, wait_event: str) -> list[tuple[object, ...]]:
    return _query(
        database_url,
        "SELECT pid, application_name FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event = %s AND pid <> pg_backend_pid()",
        (wait_event,),
    )


class _HeldCommit:
    """One payment submitted in a thread whose commit waits for a synchronous standby."""

    def __init__(self, database_url: str, payer: str, payee: str) -> None:
        self.writer = SourceWriter(database_url)
        with self.writer.connection.cursor() as cursor:
            cursor.execute("SET synchronous_commit = on")
        self.writer.connection.commit()
        self.payment_id = ""
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(payer, payee), daemon=True)
        self.thread.start()

    def _run(self, payer: str, payee: str) -> None:
        try:
            self.payment_id = self.writer.submit(payer, payee, 42)
        except BaseException as error:  # reported by the test
            self.error = error

    def join(self) -> None:
        self.thread.join(timeout=60)
        self.writer.close()
        assert self.error is None, self.error


def test_a_commit_streamed_before_it_is_visible_is_not_drift(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    """A transaction whose commit record is flushed (and applied to Redis) before it becomes
    visible in PostgreSQL: a snapshot taken in between does not see it, Redis has it."""
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        source.submit(alice, bob, 10)
    process = replicator(migrated_dsn, redis_url)
    process.wait_caught_up()
    client = sync_client(redis_url)
    keys = schema_for(redis_url, process.slot)
    payments_before = set(client.scan_iter(match=keys.payment("*")))
    result: list[Report | BaseException] = []
    held: list[_HeldCommit] = []
    with _synchronous_standby_required(migrated_dsn):
        # The reload reaches every backend a little later: until a commit waits, submit another.
        def a_commit_is_held() -> bool:
            if not held or not held[-1].thread.is_alive():
                held.append(_HeldCommit(migrated_dsn, alice, bob))
                return False
            return bool(_waiting_backends(migrated_dsn, "SyncRep"))

        wait_until(a_commit_is_held, 30, "a commit waiting for the synchronous standby")
        # The replicator applies the held transaction: its payment is in Redis, not in any snapshot.
        wait_until(
            lambda: len(set(client.scan_iter(match=keys.payment("*"))) - payments_before) == len(held),
            30,
            "the held commit applied to Redis",
        )
        assert _query(migrated_dsn, "SELECT count(*) FROM payments")[0][0] == 1  # only the first

        def run() -> None:
            try:
                result.append(reconcile(_settings(migrated_dsn, redis_url), wait_seconds=30))
            except BaseException as error:  # reported by the test
                result.append(error)

        checker = threading.Thread(target=run, daemon=True)
        checker.start()
        # Reconcile either finishes or waits for the held transaction to end (then the
        # transaction is released, and it must be visible in reconcile's snapshot).
        wait_until(
            lambda: not checker.is_alive() or _waiting_backends(migrated_dsn, "transactionid"),
            30,
            "reconcile finished or waiting",
        )
    for commit in held:
        commit.join()
    checker.join(timeout=60)
    client.close()
    assert len(result) == 1
    report = result[0]
    assert isinstance(report, Report), report
    assert report.clean, "\n".join(report.lines())
    assert report.in_flight == 0
    assert report.checked > 0


def test_reconcile_under_concurrent_writes_reports_no_false_drift(
    migrated_dsn: str, any_redis_url: str, replicator: StartReplicator
) -> None:
    with SourceWriter(migrated_dsn) as source:
        accounts = [source.open_account(f"Owner {i}") for i in range(4)]
    process = replicator(migrated_dsn, any_redis_url)
    process.wait_caught_up()
    reports: list[Report] = []
    with SourceLoad(migrated_dsn, accounts) as load:
        load.wait_for(50)
        for _ in range(8):
            reports.append(reconcile(_settings(migrated_dsn, any_redis_url), wait_seconds=30))
            load.wait_for(load.written + 20)
    dirty = ["\n".join(r.lines()) for r in reports if not r.clean]
    assert dirty == []
    process.wait_caught_up()
    final = reconcile(_settings(migrated_dsn, any_redis_url), wait_seconds=30)
    assert final.clean, "\n".join(final.lines())
    assert final.in_flight == 0


def test_reconcile_under_concurrent_writes_finds_drift(
    migrated_dsn: str, any_redis_url: str, replicator: StartReplicator
) -> None:
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        quiet = source.submit(alice, bob, 10)
        busy = [source.open_account(f"Busy {i}") for i in range(3)]
    process = replicator(migrated_dsn, any_redis_url)
    process.wait_caught_up()
    client = sync_client(any_redis_url)
    keys = schema_for(any_redis_url, process.slot)
    raw = client.hget(keys.payment(quiet), "view")
    assert isinstance(raw, bytes)
    view = read_model_pb2.PaymentView.FromString(raw)
    view.amount.amount_minor += 1
    client.hset(keys.payment(quiet), "view", view.SerializeToString())
    client.delete(keys.account(bob))
    client.close()
    with SourceLoad(migrated_dsn, busy) as load:
        load.wait_for(30)
        report = reconcile(_settings(migrated_dsn, any_redis_url), wait_seconds=30)
    text = "\n".join(report.lines())
    assert f"{keys.payment(quiet)}: differs" in text
    assert f"{keys.account(bob)}: missing in Redis" in text
    assert len(report.differences) == 2, text


@pytest.mark.parametrize("tables", ["payment_events", "payment_events, payments CASCADE"])
def test_rows_truncated_after_the_snapshot_are_checked_again(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator, tables: str
) -> None:
    """A truncate removes keys without leaving a position that is newer than the snapshot."""
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        paid = source.submit(alice, bob, 10)
        process = replicator(migrated_dsn, redis_url)
        process.wait_caught_up()
        snapshot = read_source(migrated_dsn, time.monotonic() + 30)
        source.execute(f"TRUNCATE {tables}")
    process.wait_caught_up()
    client = sync_client(redis_url)
    keys = schema_for(redis_url, process.slot)
    try:
        assert client.exists(keys.payment_timeline(paid)) == 0
        report = Report(snapshot_lsn=snapshot.position)
        unresolved = compare(client, keys, snapshot, report)
    finally:
        client.close()
    assert report.clean, "\n".join(report.lines())
    assert (keys.payment_timeline(paid), "1") in unresolved
    final = reconcile(_settings(migrated_dsn, redis_url), wait_seconds=30)
    assert final.clean, "\n".join(final.lines())
    assert final.rounds == 1


def test_drift_that_leaves_no_trace_is_reported_after_the_last_round(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        paid = source.submit(alice, bob, 10)
    process = replicator(migrated_dsn, redis_url)
    process.wait_caught_up()
    client = sync_client(redis_url)
    keys = schema_for(redis_url, process.slot)
    client.delete(keys.payment(paid), keys.payment_timeline(paid))
    client.close()
    report = reconcile(_settings(migrated_dsn, redis_url), wait_seconds=30, rounds=2)
    text = "\n".join(report.lines())
    assert report.rounds == 2
    assert f"{keys.payment(paid)}: missing in Redis" in text
    assert f"{keys.payment_timeline(paid)} entry 1: missing in Redis" in text
    assert len(report.differences) == 2, text


def test_reconcile_under_concurrent_writes_finds_a_review_queue_that_drifted(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    """The queue holds every held payment and nothing else; the load holds and decides payments meanwhile."""
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        held = source.submit(alice, bob, 10, status="PENDING_REVIEW")
        decided = source.submit(alice, bob, 20, status="PENDING_REVIEW")
        source.review(decided, approve=True)
        busy = [source.open_account(f"Busy {i}") for i in range(3)]
    process = replicator(migrated_dsn, redis_url)
    process.wait_caught_up()
    client = sync_client(redis_url)
    keys = schema_for(redis_url, process.slot)
    try:
        (member,) = client.zrange(keys.review_queue(), 0, -1)
        assert isinstance(member, bytes)
        assert member.decode().endswith(held)
        client.zrem(keys.review_queue(), member)
        client.zadd(keys.review_queue(), {member.decode().replace(held, decided): 0})
        with SourceLoad(migrated_dsn, busy) as load:
            load.wait_for(30)
            report = reconcile(_settings(migrated_dsn, redis_url), wait_seconds=30, rounds=2)
        text = "\n".join(report.lines())
        assert f"{keys.review_queue()}: payment {held} missing from the queue" in text
        assert f"{keys.review_queue()}: payment {decided} extra in the queue" in text
        assert len(report.differences) == 2, text
        # A namespace built without the queue is not served the queue, nor compared.
        client.delete(keys.meta())
        unchecked = reconcile(_settings(migrated_dsn, redis_url), wait_seconds=30, rounds=1)
        assert unchecked.clean, "\n".join(unchecked.lines())
        assert unchecked.not_compared == [
            f"{keys.review_queue()}: not compared: the namespace was built without the review queue"
        ]
    finally:
        client.close()
