"""One version, one slot: settings that pair a slot or a namespace with another version's are refused, and nothing is written."""

from __future__ import annotations

from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stack.replication import checkpoint_lsn
from stack.servers import free_port
from tests.support.faults import history_process
from tests.support.replicator import StartReplicator, keys_of, replicator, retire, slot_exists, slot_for
from tests.support.source import SourceWriter
from tests.support.waiting import wait_until

__all__ = ["replicator"]


def _live_version(migrated_dsn: str, redis_url: str, replicator: StartReplicator) -> tuple[str, int]:
    """The live version rm:v1 on its slot, caught up; its slot and key count."""
    with SourceWriter(migrated_dsn) as source:
        a, b = source.open_account("A"), source.open_account("B")
        for n in range(5):
            source.pay(a, b, 10 + n)
    slot = slot_for(migrated_dsn)
    replicator(migrated_dsn, redis_url, slot=slot, key_namespace="rm:v1").wait_caught_up()
    return slot, keys_of(redis_url, "rm:v1")


def test_a_replicator_whose_slot_feeds_another_version_is_refused(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    slot, live_keys = _live_version(migrated_dsn, redis_url, replicator)
    checkpoint = checkpoint_lsn(redis_url, slot, "rm:v1")
    stray = replicator(migrated_dsn, redis_url, slot=slot, key_namespace="rm:v2")
    wait_until(lambda: not stray.alive, 60, "the replicator with another version's slot to exit")
    assert stray.returncode == 2
    assert f"slot {slot} feeds version rm:v1, not this replicator's rm:v2" in stray.log_text()
    assert keys_of(redis_url, "rm:v2") == 0
    assert keys_of(redis_url, "rm:v1") == live_keys
    assert checkpoint_lsn(redis_url, slot, "rm:v1") >= checkpoint


def test_a_replicator_of_a_version_fed_by_another_slot_is_refused(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    slot, live_keys = _live_version(migrated_dsn, redis_url, replicator)
    other = f"{slot}_b"
    stray = replicator(migrated_dsn, redis_url, slot=other, key_namespace="rm:v1")
    wait_until(lambda: not stray.alive, 60, "the replicator of a version fed by another slot to exit")
    assert stray.returncode == 2
    assert f"version rm:v1 is fed by slot {slot}, not by this replicator's slot {other}" in stray.log_text()
    assert keys_of(redis_url, "rm:v1") == live_keys
    assert not slot_exists(migrated_dsn, other)


def test_retire_refuses_a_slot_and_namespace_that_are_not_one_version(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator
) -> None:
    slot, live_keys = _live_version(migrated_dsn, redis_url, replicator)
    wrong_slot = retire(migrated_dsn, redis_url, "--namespace", "rm:v1", "--slot", f"{slot}_typo")
    assert wrong_slot.returncode == 3, wrong_slot
    assert f"rm:v1 is fed by slot {slot}" in wrong_slot.stderr
    wrong_version = retire(migrated_dsn, redis_url, "--namespace", "rm:v9", "--slot", slot)
    assert wrong_version.returncode == 3, wrong_version
    assert f"slot {slot} feeds rm:v1" in wrong_version.stderr
    assert keys_of(redis_url, "rm:v1") == live_keys
    assert slot_exists(migrated_dsn, slot)


def _serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service="readiness"), timeout=5
            )
        except grpc.RpcError:
            return False
    return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)


def test_history_reads_pin_the_version_and_refuse_another_versions_slot(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator, tmp_path: Path
) -> None:
    """A history process on the version keeps retire away; one whose slot is not the version's never serves."""
    slot, live_keys = _live_version(migrated_dsn, redis_url, replicator)
    reader = history_process(redis_url, free_port(), tmp_path / "history.log", slot, key_namespace="rm:v1")
    mistaken = history_process(
        redis_url,
        free_port(),
        tmp_path / "history-mistaken.log",
        f"{slot}_v2",
        key_namespace="rm:v1",
    )
    try:
        reader.start()
        mistaken.start()
        reader.wait_serving(60)
        wait_until(
            lambda: "does not feed rm:v1" in mistaken.log_text(),
            60,
            "the mistaken process to say why it does not serve",
        )
        assert not _serving(mistaken.address)
        # The version is read: retiring it is refused, even once its replicator has stopped.
        refused = retire(migrated_dsn, redis_url, "--namespace", "rm:v1", "--slot", slot, "--dry-run")
        assert refused.returncode == 3, refused
        assert "connections of history processes read rm:v1" in refused.stderr
        assert keys_of(redis_url, "rm:v1") == live_keys
    finally:
        reader.stop(15)
        mistaken.stop(15)
