"""PostgreSQL is never told a position that Redis does not have.

A monitor samples the slot's `confirmed_flush_lsn` and then Redis's checkpoint every few
milliseconds while the replicator runs through idle periods, small transactions and a
transaction that takes the walsender many seconds to decode and send. Both only move
forward, so reading the slot first and the checkpoint second can only favour the
checkpoint: any sample with the slot ahead is a real violation.
"""

from __future__ import annotations

import threading
import time

import psycopg2
import pytest

from payments_common.redisconn import sync_client
from tests.support.replicator import StartReplicator, replicator, schema_for
from tests.support.source import SourceWriter

__all__ = ["replicator"]

pytestmark = pytest.mark.slow


class ConfirmedMonitor:
    """Records every sample where the slot's confirmed position is past Redis's checkpoint."""

    def __init__(self, database_url: str, redis_url: str, slot: str) -> None:
        self.connection = psycopg2.connect(database_url)
        self.connection.autocommit = True
        self.client = sync_client(redis_url)
        self.slot = slot
        # On a Redis Cluster, the slot's checkpoint: it moves once every master has the batch.
        self.checkpoint_key = schema_for(redis_url, slot).checkpoint(slot)
        self.samples = 0
        self.confirmed_moves = 0
        self.ahead: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ConfirmedMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.connection.close()
        self.client.close()

    def _run(self) -> None:
        last = 0
        with self.connection.cursor() as cursor:
            while not self._stop.is_set():
                cursor.execute(
                    "SELECT confirmed_flush_lsn - '0/0'::pg_lsn FROM pg_replication_slots WHERE slot_name = %s",
                    (self.slot,),
                )
                row = cursor.fetchone()
                raw = self.client.hget(self.checkpoint_key, "lsn")
                if row is None or row[0] is None or raw is None:
                    continue
                confirmed, checkpoint = int(row[0]), int(raw)
                self.samples += 1
                if confirmed != last:
                    self.confirmed_moves += 1
                    last = confirmed
                if confirmed > checkpoint:
                    self.ahead.append((confirmed, checkpoint))
                self._stop.wait(0.003)


def test_the_slot_never_confirms_past_the_checkpoint(
    migrated_dsn: str, any_redis_url: str, replicator: StartReplicator
) -> None:
    redis_url = any_redis_url
    process = replicator(migrated_dsn, redis_url)
    process.wait_caught_up()
    with ConfirmedMonitor(migrated_dsn, redis_url, process.slot) as monitor:
        # Idle, then small transactions.
        idle_until = time.monotonic() + 3
        while time.monotonic() < idle_until:
            process.wait_caught_up()
        with SourceWriter(migrated_dsn) as writer:
            accounts = [writer.open_account(f"Owner {i}") for i in range(4)]
            for i in range(100):
                writer.submit(accounts[i % 4], accounts[(i + 1) % 4], 1 + i)
            # A transaction the walsender needs seconds to decode before its first change arrives.
            writer.execute(
                "INSERT INTO accounts (account_id, owner_name, currency_code, status, ledger_balance_minor, "
                "per_payment_limit_minor, daily_limit_minor) "
                "SELECT md5(i::text)::uuid, 'owner ' || i, 'EUR', 'ACTIVE', i, 1000000, 1000000 "
                "FROM generate_series(1, 400000) AS i"
            )
            for i in range(50):
                writer.submit(accounts[i % 4], accounts[(i + 2) % 4], 1 + i)
        process.wait_caught_up(timeout=600)
        settle_until = time.monotonic() + 4
        while time.monotonic() < settle_until:
            process.wait_caught_up()
    assert monitor.samples > 1000
    assert monitor.confirmed_moves > 3, "the slot was confirmed as the replicator went"
    assert monitor.ahead == [], f"{len(monitor.ahead)} samples with the slot ahead, e.g. {monitor.ahead[:3]}"
