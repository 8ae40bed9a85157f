"""The replicator against private PostgreSQL and Redis: streaming, bootstrap, DDL, TOAST, truncate."""

from __future__ import annotations

import secrets
import threading
import time
import uuid

from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import payment_pb2
from payments_common.keys import DEFAULT_PUBLICATION, KeySchema
from payments_common.redisconn import SyncClient, sync_client
from replicator.config import Settings
from replicator.reconcile import reconcile
from replicator.source import Source
from tests.support.replicator import StartReplicator, replicator, schema_for, slot_for
from tests.support.source import SourceWriter
from tests.support.waiting import wait_until

__all__ = ["replicator"]


def _settings(database_url: str, redis_url: str) -> Settings:
    return Settings(database_url=database_url, redis_url=redis_url, slot_name=slot_for(database_url))


def _assert_reconciled(database_url: str, redis_url: str) -> None:
    report = reconcile(_settings(database_url, redis_url), wait_seconds=30)
    assert report.clean, "\n".join(report.lines())
    assert report.checked > 0


def _payment(client: SyncClient, keys: KeySchema, payment_id: str) -> read_model_pb2.PaymentView:
    raw = client.hget(keys.payment(payment_id), "view")
    assert isinstance(raw, bytes)
    return read_model_pb2.PaymentView.FromString(raw)


def test_streams_inserts_updates_and_deletes(
    migrated_dsn: str, any_redis_url: str, replicator: StartReplicator
) -> None:
    process = replicator(migrated_dsn, any_redis_url)
    process.wait_caught_up()
    client = sync_client(any_redis_url)
    keys = schema_for(any_redis_url, process.slot)
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        paid = source.submit(alice, bob, 1250, reference="rent")
        held = source.submit(alice, bob, 900_000, status="PENDING_REVIEW")
        declined = source.submit(bob, alice, 5, status="DECLINED")
        process.wait_caught_up()
        view = _payment(client, keys, paid)
        assert view.payer_name == "Alice"
        assert view.payee_name == "Bob"
        assert view.amount.amount_minor == 1250
        assert view.reference == "rent"
        assert view.status == payment_pb2.PAYMENT_STATUS_APPROVED
        assert (
            _payment(client, keys, declined).decline_reason == payment_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS
        )
        source.review(held, approve=False, note="too large")
        process.wait_caught_up()
        assert _payment(client, keys, held).status == payment_pb2.PAYMENT_STATUS_DECLINED
        pending = keys.account_index(alice, "sent", payment_pb2.PAYMENT_STATUS_PENDING_REVIEW)
        assert client.zcard(pending) == 0
        assert client.hlen(keys.payment_timeline(held)) == 2
        _assert_reconciled(migrated_dsn, any_redis_url)
        source.execute("DELETE FROM payment_events WHERE payment_id = %s", (paid,))
        source.execute("DELETE FROM payments WHERE payment_id = %s", (paid,))
        process.wait_caught_up()
        assert client.hget(keys.payment(paid), "view") is None
        _assert_reconciled(migrated_dsn, any_redis_url)
    client.close()


def test_bootstrap_under_concurrent_writes_equals_the_source(
    migrated_dsn: str, any_redis_url: str, replicator: StartReplicator
) -> None:
    with SourceWriter(migrated_dsn) as source:
        accounts = [source.open_account(f"Owner {i}") for i in range(8)]
        for i in range(400):
            source.submit(accounts[i % 8], accounts[(i + 3) % 8], 100 + i)
    stop = threading.Event()
    written = []

    def write() -> None:
        with SourceWriter(migrated_dsn) as writer:
            i = 0
            while not stop.is_set():
                status = ("APPROVED", "PENDING_REVIEW", "DECLINED")[i % 3]
                payment = writer.submit(accounts[i % 8], accounts[(i + 1) % 8], 10 + i, status=status)
                if status == "PENDING_REVIEW":
                    writer.review(payment, approve=i % 2 == 0)
                written.append(payment)
                i += 1

    thread = threading.Thread(target=write)
    thread.start()
    try:
        process = replicator(migrated_dsn, any_redis_url)
        process.wait_caught_up()
        deadline = time.monotonic() + 30
        while len(written) < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        stop.set()
        thread.join()
    process.wait_caught_up()
    _assert_reconciled(migrated_dsn, any_redis_url)
    client = sync_client(any_redis_url)
    keys = schema_for(any_redis_url, process.slot)
    everything = sum(
        client.zcard(keys.account_index(a, "sent", payment_pb2.PAYMENT_STATUS_UNSPECIFIED)) for a in accounts
    )
    client.close()
    assert everything == 400 + len(written)


def test_unchanged_toast_column_is_kept(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    process = replicator(migrated_dsn, redis_url)
    client = sync_client(redis_url)
    keys = schema_for(redis_url, process.slot)
    big = secrets.token_hex(6000)  # incompressible: stored out of line, sent as "unchanged" on update
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        held = source.submit(alice, bob, 900_000, status="PENDING_REVIEW", reference=big)
        process.wait_caught_up()
        source.review(held, approve=True)
        # Inserted and updated in one transaction: the unchanged value comes from the same batch.
        both = str(uuid.uuid4())
        with source.connection, source.connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO payments (payment_id, request_id, payer_account_id, payee_account_id, payer_name, "
                "payee_name, currency_code, amount_minor, reference, status) "
                "VALUES (%s, %s, %s, %s, 'Alice', 'Bob', 'EUR', 5, %s, 'PENDING_REVIEW')",
                (both, both, alice, bob, big),
            )
            cursor.execute("UPDATE payments SET status = 'APPROVED' WHERE payment_id = %s", (both,))
        process.wait_caught_up()
    for payment_id in (held, both):
        view = _payment(client, keys, payment_id)
        assert view.status == payment_pb2.PAYMENT_STATUS_APPROVED
        assert view.reference == big
    _assert_reconciled(migrated_dsn, redis_url)


def test_column_added_while_streaming(migrated_dsn: str, redis_url: str, replicator: StartReplicator) -> None:
    process = replicator(migrated_dsn, redis_url)
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        source.submit(alice, bob, 10)
        process.wait_caught_up()
        source.execute("ALTER TABLE payments ADD COLUMN channel text NOT NULL DEFAULT 'web'")
        source.execute("ALTER TABLE accounts ADD COLUMN nickname text")
        late = source.submit(alice, bob, 20, reference="after the DDL")
        source.execute("UPDATE accounts SET nickname = 'Al' WHERE account_id = %s", (alice,))
        process.wait_caught_up()
    assert (
        _payment(sync_client(redis_url), schema_for(redis_url, process.slot), late).reference
        == "after the DDL"
    )
    _assert_reconciled(migrated_dsn, redis_url)


def test_truncate_removes_the_read_models(
    migrated_dsn: str, any_redis_url: str, replicator: StartReplicator
) -> None:
    process = replicator(migrated_dsn, any_redis_url)
    client = sync_client(any_redis_url)
    keys = schema_for(any_redis_url, process.slot)
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        gone = source.submit(alice, bob, 10)
        process.wait_caught_up()
        source.execute("TRUNCATE payment_events, payments CASCADE")
        process.wait_caught_up()
        assert not client.exists(keys.payment(gone))
        assert not client.exists(keys.account_index(alice, "all", payment_pb2.PAYMENT_STATUS_UNSPECIFIED))
        assert client.exists(keys.account(alice))
        kept = source.submit(bob, alice, 3)
        process.wait_caught_up()
    assert _payment(client, keys, kept).payer_name == "Bob"
    client.close()
    _assert_reconciled(migrated_dsn, any_redis_url)


def test_server_date_style_and_time_zone_do_not_matter(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    with SourceWriter(migrated_dsn) as source:
        source.connection.autocommit = True
        with source.connection.cursor() as cursor:
            cursor.execute("SELECT current_database()")
            row = cursor.fetchone()
            assert row is not None
            (name,) = row
            cursor.execute(f"ALTER DATABASE \"{name}\" SET DateStyle = 'SQL, DMY'")
            cursor.execute(f"ALTER DATABASE \"{name}\" SET TimeZone = 'Asia/Kolkata'")
        source.connection.autocommit = False
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        before = source.submit(alice, bob, 10)
    process = replicator(migrated_dsn, redis_url)
    process.wait_caught_up()
    with SourceWriter(migrated_dsn) as source:
        after = source.submit(bob, alice, 20)
    process.wait_caught_up()
    client = sync_client(redis_url)
    keys = schema_for(redis_url, process.slot)
    with SourceWriter(migrated_dsn) as source, source.connection.cursor() as cursor:
        cursor.execute(
            "SELECT payment_id::text, (extract(epoch FROM created_at) * 1000000)::bigint FROM payments"
        )
        created = dict(cursor.fetchall())
    for payment_id in (before, after):
        assert _payment(client, keys, payment_id).create_time.ToMicroseconds() == created[payment_id]
    _assert_reconciled(migrated_dsn, redis_url)


def test_the_bootstrap_estimates_the_rows_of_a_table_never_analysed(migrated_dsn: str) -> None:
    """Its progress says "copied N rows of about M": M counts rows committed since the last ANALYZE."""
    with SourceWriter(migrated_dsn) as writer:
        for i in range(30):
            writer.open_account(f"Owner {i}")
    source = Source(migrated_dsn, slot_for(migrated_dsn), DEFAULT_PUBLICATION)
    source.connect()
    try:

        def accounts_estimate() -> int:
            # Each query is a transaction of its own, so it sees counts reported since the last.
            tables = {table.qualified: table for table in source.published_tables()}
            return tables["public.accounts"].estimated_rows

        wait_until(lambda: accounts_estimate() == 30, 30, "an estimate of 30 accounts")
    finally:
        source.close()
