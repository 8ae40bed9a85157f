"""The replicator against private PostgreSQL and Redis: streaming, bootstrap, DDL, TOAST, truncate."""

from __future__ import annotations

import redis

from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import payment_pb2
from payments_common.keys import DEFAULT_SCHEMA as KEYS
from replicator.config import Settings
from replicator.reconcile import reconcile
from tests.replicator_fixtures import SourceWriter, StartReplicator, replicator, slot_for

__all__ = ["replicator"]


def _settings(database_url: str, redis_url: str) -> Settings:
    return Settings(database_url=database_url, redis_url=redis_url, slot_name=slot_for(database_url))


def _assert_reconciled(database_url: str, redis_url: str) -> None:
    report = reconcile(_settings(database_url, redis_url), wait_seconds=30)
    assert report.clean, "\n".join(report.lines())
    assert report.checked > 0


def _payment(client: redis.Redis, payment_id: str) -> read_model_pb2.PaymentView:
    raw = client.hget(KEYS.payment(payment_id), "view")
    assert raw is not None
    return read_model_pb2.PaymentView.FromString(raw)


def test_streams_inserts_updates_and_deletes(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    process = replicator(migrated_dsn, redis_url)
    process.wait_caught_up()
    client = redis.Redis.from_url(redis_url)
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        paid = source.submit(alice, bob, 1250, reference="rent")
        held = source.submit(alice, bob, 900_000, status="PENDING_REVIEW")
        declined = source.submit(bob, alice, 5, status="DECLINED")
        process.wait_caught_up()
        view = _payment(client, paid)
        assert view.payer_name == "Alice"
        assert view.payee_name == "Bob"
        assert view.amount.amount_minor == 1250
        assert view.reference == "rent"
        assert view.status == payment_pb2.PAYMENT_STATUS_APPROVED
        assert _payment(client, declined).decline_reason == payment_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS
        source.review(held, approve=False, note="too large")
        process.wait_caught_up()
        assert _payment(client, held).status == payment_pb2.PAYMENT_STATUS_DECLINED
        pending = KEYS.account_index(alice, "sent", payment_pb2.PAYMENT_STATUS_PENDING_REVIEW)
        assert client.zcard(pending) == 0
        assert client.hlen(KEYS.payment_timeline(held)) == 2
        _assert_reconciled(migrated_dsn, redis_url)
        source.execute("DELETE FROM payment_events WHERE payment_id = %s", (paid,))
        source.execute("DELETE FROM payments WHERE payment_id = %s", (paid,))
        process.wait_caught_up()
        assert client.hget(KEYS.payment(paid), "view") is None
        _assert_reconciled(migrated_dsn, redis_url)
