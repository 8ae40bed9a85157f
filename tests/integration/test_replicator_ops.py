"""Operating the replicator: idle checkpoints, change notifications, lost slots, reconcile, health, metrics."""

from __future__ import annotations

import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import payment_pb2
from payments_common.keys import KeySchema, index_member
from payments_common.redisconn import SyncClient, sync_client
from stack.replication import run_reconcile, slot_confirmed_lsn
from stack.servers import free_port
from tests.support.replicator import (
    StartReplicator,
    change_batches,
    checkpoint_lsn,
    current_wal_lsn,
    replicator,
    schema_for,
    slot_for,
)
from tests.support.source import SourceWriter
from tests.support.waiting import wait_until

__all__ = ["replicator"]


def test_idle_checkpoint_follows_writes_to_unpublished_tables(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    process = replicator(migrated_dsn, redis_url)
    process.wait_caught_up()
    with SourceWriter(migrated_dsn) as source:
        source.execute("CREATE TABLE unpublished (n int)")
        source.execute("INSERT INTO unpublished SELECT generate_series(1, 100)")
    target = current_wal_lsn(migrated_dsn)
    process.wait_caught_up()
    assert checkpoint_lsn(redis_url, process.slot) >= target
    # The slot is told too, so that it does not pin WAL.
    wait_until(
        lambda: slot_confirmed_lsn(migrated_dsn, process.slot) >= target,
        30,
        "the slot's confirmed position at the checkpoint",
    )
    client = sync_client(redis_url)
    batch, *_ = change_batches(client.xrevrange(schema_for(redis_url, process.slot).changes(), count=1))
    client.close()
    assert batch.checkpoint_lsn >= target
    assert not batch.payments


def test_change_stream_announces_every_payment(
    migrated_dsn: str, any_redis_url: str, replicator: StartReplicator
) -> None:
    process = replicator(migrated_dsn, any_redis_url)
    process.wait_caught_up()
    client = sync_client(any_redis_url)
    changes = schema_for(any_redis_url, process.slot).changes()
    last = client.xrevrange(changes, count=1)
    assert last is not None
    start = last[0][0]
    assert isinstance(start, bytes)
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        payments = {source.submit(alice, bob, 1 + i) for i in range(20)}
        process.wait_caught_up()
    seen: set[str] = set()
    checkpoints = []
    for batch in change_batches(client.xrange(changes, min=f"({start.decode()}")):
        checkpoints.append(batch.checkpoint_lsn)
        for view in batch.payments:
            assert view.status == payment_pb2.PAYMENT_STATUS_APPROVED
            assert view.payer_name == "Alice"
            assert [entry.sequence for entry in view.timeline] == [1]
            seen.add(view.payment_id)
    client.close()
    assert seen == payments
    assert checkpoints == sorted(checkpoints)


def test_dropped_slot_leads_to_a_fresh_bootstrap(
    migrated_dsn: str, any_redis_url: str, replicator: StartReplicator
) -> None:
    process = replicator(migrated_dsn, any_redis_url)
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        source.submit(alice, bob, 10)
        process.wait_caught_up()
        assert process.stop() == 0
        source.execute("SELECT pg_drop_replication_slot(%s)", (process.slot,))
        source.submit(bob, alice, 5)
        # A row deleted while no slot existed must not linger in Redis.
        source.execute(
            "DELETE FROM payment_events WHERE payment_id IN (SELECT payment_id FROM payments LIMIT 1)"
        )
        source.execute("DELETE FROM payments WHERE payment_id IN (SELECT payment_id FROM payments LIMIT 1)")
    restarted = replicator(migrated_dsn, any_redis_url)
    restarted.wait_caught_up()
    assert "REBUILD" in restarted.log_path.read_text()
    result = run_reconcile(migrated_dsn, any_redis_url, slot_for(migrated_dsn), wait_seconds=30)
    assert result.returncode == 0, result.stdout + result.stderr


MISSING_QUEUE = "were built without review_queue"


def test_a_bootstrap_records_its_features_and_a_namespace_without_them_is_streamed_into_and_said_once(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    client = sync_client(redis_url)
    keys = schema_for(redis_url, slot_for(migrated_dsn))
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        before = source.submit(alice, bob, 10, status="PENDING_REVIEW")
        process = replicator(migrated_dsn, redis_url)
        process.wait_caught_up()
        assert client.hget(keys.meta(), "features") == b"review_queue"
        assert client.zrange(keys.review_queue(), 0, -1) == [_member(client, keys, before)]
        assert process.stop() == 0
        # As a bootstrap by a version without the queue left the namespace: no features, no queue.
        client.delete(keys.meta(), keys.review_queue(), keys.review_queue_versions())
        restarted = replicator(migrated_dsn, redis_url)
        restarted.wait_caught_up()
        after = source.submit(alice, bob, 20, status="PENDING_REVIEW")
        restarted.wait_caught_up()
        # Streaming goes on, without a rebuild, and maintains the queue from now on.
        assert client.zrange(keys.review_queue(), 0, -1) == [_member(client, keys, after)]
        assert not client.exists(keys.meta())
        assert "REBUILD" not in restarted.log_text()
        # A new session of the same process (its walsender ended) does not say it again.
        source.execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = %s",
            (restarted.slot,),
        )
        wait_until(
            lambda: restarted.log_text().count("streaming slot") == 2,
            30,
            "a second streaming session",
            detail=restarted.log_tail,
        )
        restarted.wait_caught_up()
    client.close()
    assert restarted.log_text().count(MISSING_QUEUE) == 1
    assert MISSING_QUEUE not in process.log_text()


def _member(client: SyncClient, keys: KeySchema, payment_id: str) -> bytes:
    raw = client.hget(keys.payment(payment_id), "view")
    assert isinstance(raw, bytes)
    view = read_model_pb2.PaymentView.FromString(raw)
    return index_member(view.create_time.ToMicroseconds(), payment_id).encode()


@pytest.mark.parametrize("scheme", ["redis", "redis+cluster"])
def test_reconcile_without_redis_cannot_compare(migrated_dsn: str, scheme: str) -> None:
    """Exit status 2 (could not compare), not 1 (drift), when Redis does not answer (no seed of a cluster)."""
    url = f"{scheme}://127.0.0.1:{free_port()}" + ("/0" if scheme == "redis" else f",127.0.0.1:{free_port()}")
    result = run_reconcile(migrated_dsn, url, slot_for(migrated_dsn), 5)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "could not read Redis" in result.stderr
    assert "Traceback" not in result.stderr


def test_reconcile_reports_drift(migrated_dsn: str, redis_url: str, replicator: StartReplicator) -> None:
    process = replicator(migrated_dsn, redis_url)
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        paid = source.submit(alice, bob, 10)
        process.wait_caught_up()
    clean = run_reconcile(migrated_dsn, redis_url, slot_for(migrated_dsn), wait_seconds=30)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    # Tamper while the replicator runs (it must keep the checkpoint moving); it leaves unchanged rows alone.
    client = sync_client(redis_url)
    keys = schema_for(redis_url, process.slot)
    raw = client.hget(keys.account(bob), "view")
    assert isinstance(raw, bytes)
    view = read_model_pb2.AccountView.FromString(raw)
    view.owner_name = "Mallory"
    client.hset(keys.account(bob), "view", view.SerializeToString())
    client.hdel(keys.payment(paid), "view")
    client.zadd(
        keys.account_index(alice, "sent", payment_pb2.PAYMENT_STATUS_DECLINED), {"0000000000000001:x": 0}
    )
    client.close()
    drift = run_reconcile(migrated_dsn, redis_url, slot_for(migrated_dsn), wait_seconds=30)
    assert drift.returncode == 1, drift.stdout + drift.stderr
    assert keys.account(bob) in drift.stdout
    assert keys.payment(paid) in drift.stdout
    assert "payment x extra in the index" in drift.stdout


def test_health_and_metrics(migrated_dsn: str, redis_url: str, replicator: StartReplicator) -> None:
    health_port, metrics_port = free_port(), free_port()
    process = replicator(
        migrated_dsn, redis_url, health_port=str(health_port), metrics_port=str(metrics_port)
    )
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        process.wait_caught_up()
        source.submit(alice, bob, 10)
    process.wait_caught_up()
    with grpc.insecure_channel(f"127.0.0.1:{health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("liveness", "readiness", ""):
            deadline = time.monotonic() + 30
            while True:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
                except grpc.RpcError:
                    status = None
                if status == health_pb2.HealthCheckResponse.SERVING:
                    break
                assert time.monotonic() < deadline, f"{service!r} is not SERVING"
                time.sleep(0.05)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    # By name alone: every series also carries the version's labels (slot, key_namespace).
    values = {
        line.split(" ")[0].partition("{")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line.startswith("replicator_") and " " in line
    }
    assert values["replicator_changes_applied_total"] >= 1
    assert values["replicator_transactions_applied_total"] >= 1
    assert values["replicator_streaming"] == 1
    # The start of the process, which the alert ReplicatorRebuilt joins (deploy/k8s/components/alerts).
    assert any(line.startswith("process_start_time_seconds ") for line in text.splitlines())
    assert "replicator_lag_bytes" in values
    assert "replicator_lag_seconds" in values
    assert "replicator_bootstrap_rows_copied" in values
