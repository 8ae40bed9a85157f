"""Transactions of a million row changes: applied in chunks, within bounded memory, without losing the lock.

The replicators here run with a 5-second lock TTL: a lock renewed by message count, or
not during a long apply (two minutes at this size), is lost many times over; a renewing
thread starved of the CPU for a moment on a loaded machine is not.
"""

from __future__ import annotations

import hashlib
import random
import re
import uuid
from pathlib import Path

import psycopg2
import pytest
import redis

from payments.readmodel.v1 import read_model_pb2
from payments_common.keys import DEFAULT_SCHEMA as KEYS
from payments_common.redisconn import sync_client
from payments_common.redisurl import is_cluster
from stack.replication import run_reconcile
from tests.support.replicator import (
    ReplicatorProcess,
    StartReplicator,
    checkpoint_lsn,
    current_wal_lsn,
    replicator,
)
from tests.support.source import SourceWriter
from tests.support.waiting import wait_until

__all__ = ["replicator"]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1500)]

MILLION = 1_000_000
LOCK_TTL = "5"
RSS_LIMIT_BYTES = 512 * 1024 * 1024
# What must never appear in a replicator's log while it applies a large transaction.
TROUBLE = ("LOCKLOST", "REBUILD", "replication stopped", "lost the lock", "Traceback")


def peak_rss(process: ReplicatorProcess) -> int:
    """The process's peak resident set size so far (VmHWM), in bytes."""
    assert process.process is not None
    status = Path(f"/proc/{process.process.pid}/status").read_text()
    match = re.search(r"^VmHWM:\s+(\d+) kB$", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) * 1024


def assert_clean_log(process: ReplicatorProcess) -> None:
    text = process.log_path.read_text(errors="replace")
    found = [word for word in TROUBLE if word in text]
    assert not found, f"{found} in the replicator's log:\n{process.log_tail(80)}"
    assert text.count("bootstrap of slot") == 2, "one bootstrap (started, done) and no other"


def test_an_insert_of_a_million_accounts_is_applied_in_chunks_within_bounded_memory(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    process = replicator(migrated_dsn, redis_url, lock_ttl_seconds=LOCK_TTL)
    process.wait_caught_up()
    _execute(
        migrated_dsn,
        "INSERT INTO accounts (account_id, owner_name, currency_code, status, ledger_balance_minor, "
        "per_payment_limit_minor, daily_limit_minor) "
        "SELECT md5(i::text)::uuid, 'owner ' || i, 'EUR', 'ACTIVE', i, 1000000, 1000000 "
        f"FROM generate_series(1, {MILLION}) AS i",
    )
    process.wait_caught_up(timeout=1200)

    assert peak_rss(process) < RSS_LIMIT_BYTES
    assert_clean_log(process)
    assert "applying transaction" in process.log_path.read_text(), "progress is logged"
    client = redis.Redis.from_url(redis_url)
    try:
        for i in random.Random(7).sample(range(1, MILLION + 1), 200):
            account_id = str(_md5_uuid(i))
            raw = client.hget(KEYS.account(account_id), "view")
            assert isinstance(raw, bytes), account_id
            view = read_model_pb2.AccountView.FromString(raw)
            assert view.owner_name == f"owner {i}"
    finally:
        client.close()


def test_an_update_of_every_payment_of_a_million_is_applied_within_bounded_memory(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    with SourceWriter(migrated_dsn) as writer:
        accounts = [writer.open_account(f"owner {i}") for i in range(100)]
    _execute(
        migrated_dsn,
        "WITH a AS (SELECT array_agg(account_id ORDER BY account_id) AS ids, "
        "array_agg(owner_name ORDER BY account_id) AS names FROM accounts) "
        "INSERT INTO payments (payment_id, request_id, payer_account_id, payee_account_id, payer_name, "
        "payee_name, currency_code, amount_minor, status) "
        "SELECT md5(i::text)::uuid, i::text, a.ids[1 + i % 100], a.ids[1 + (i + 1) % 100], "
        "a.names[1 + i % 100], a.names[1 + (i + 1) % 100], 'EUR', 1 + i % 1000, 'APPROVED' "
        f"FROM generate_series(1, {MILLION}) AS i, a",
    )
    assert len(accounts) == 100
    # The million payments come by the bootstrap's copy; the update by the stream.
    process = replicator(migrated_dsn, redis_url, lock_ttl_seconds=LOCK_TTL)
    process.wait_caught_up(timeout=1200)
    _execute(migrated_dsn, "UPDATE payments SET reference = 'batch ' || request_id, updated_at = now()")
    process.wait_caught_up(timeout=1200)

    assert peak_rss(process) < RSS_LIMIT_BYTES
    assert_clean_log(process)
    client = redis.Redis.from_url(redis_url)
    try:
        for i in random.Random(11).sample(range(1, MILLION + 1), 200):
            raw = client.hget(KEYS.payment(str(_md5_uuid(i))), "view")
            assert isinstance(raw, bytes)
            assert read_model_pb2.PaymentView.FromString(raw).reference == f"batch {i}"
    finally:
        client.close()


def test_a_kill_in_the_middle_of_a_large_transaction_resumes_from_the_checkpoint(
    migrated_dsn: str, any_redis_url: str, replicator: StartReplicator, tmp_path: Path
) -> None:
    """On a Redis Cluster too, where each chunk goes to every master (the replicas of the
    masters that earlier chunks wrote are waited for before the checkpoint moves:
    test_replicator_cluster_sink.py covers the waits, this the chunks and the kill)."""
    redis_url = any_redis_url
    # Enough rows that the kill lands between chunks: fewer on a cluster, whose apply is slower.
    rows = 60_000 if is_cluster(redis_url) else 200_000
    first = replicator(migrated_dsn, redis_url, transaction_chunk_changes="5000", lock_ttl_seconds=LOCK_TTL)
    first.wait_caught_up()
    before = checkpoint_lsn(redis_url, first.slot)
    _execute(
        migrated_dsn,
        "INSERT INTO accounts (account_id, owner_name, currency_code, status, ledger_balance_minor, "
        "per_payment_limit_minor, daily_limit_minor) "
        "SELECT md5(i::text)::uuid, 'owner ' || i, 'EUR', 'ACTIVE', i, 1000000, 1000000 "
        f"FROM generate_series(1, {rows}) AS i",
    )
    commit_end = current_wal_lsn(migrated_dsn)
    client = sync_client(redis_url)
    try:
        # Kill it once some chunks are in Redis, before the last: the checkpoint has not moved.
        wait_until(
            lambda: _keys(client) > 20_000 or not first.alive,
            600,
            "chunks applied",
            interval=0.01,
            detail=first.log_tail,
        )
        assert first.alive, first.log_tail()
        first.kill()
        assert checkpoint_lsn(redis_url, first.slot) < commit_end
        assert checkpoint_lsn(redis_url, first.slot) >= before
        _assert_slot_behind_checkpoint(migrated_dsn, first.slot, redis_url)

        second = replicator(
            migrated_dsn, redis_url, transaction_chunk_changes="5000", lock_ttl_seconds=LOCK_TTL
        )
        second.wait_caught_up(timeout=600)
        text = second.log_path.read_text()
        assert "REBUILD" not in text
        assert "bootstrap of slot" not in text
        assert "REBUILD" not in first.log_path.read_text()
        assert client.exists(KEYS.account(str(_md5_uuid(rows))))
    finally:
        client.close()
    report = run_reconcile(migrated_dsn, redis_url, first.slot)
    assert report.returncode == 0, report.stdout


def _keys(client: redis.Redis | redis.RedisCluster) -> int:
    """How many keys Redis holds: on a cluster, on every master."""
    if isinstance(client, redis.RedisCluster):
        return int(client.dbsize(target_nodes=redis.RedisCluster.PRIMARIES))
    return int(client.dbsize())


def _assert_slot_behind_checkpoint(database_url: str, slot: str, redis_url: str) -> None:
    connection = psycopg2.connect(database_url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
                (slot,),
            )
            row = cursor.fetchone()
            assert row is not None
            assert int(row[0]) <= checkpoint_lsn(redis_url, slot)
    finally:
        connection.close()


def _execute(database_url: str, statement: str) -> None:
    with SourceWriter(database_url) as writer:
        writer.execute(statement)


def _md5_uuid(i: int) -> uuid.UUID:
    return uuid.UUID(hashlib.md5(str(i).encode()).hexdigest())
