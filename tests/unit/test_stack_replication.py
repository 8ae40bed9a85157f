"""The shared replication helpers: the replicator's environment and the reading of its checkpoint."""

from __future__ import annotations

from typing import cast

import pytest
import redis

from payments_common.keys import CHECKPOINT_LSN_FIELD, DEFAULT_SCHEMA, DEFAULT_SLOT_NAME, KeySchema
from stack.replication import ROOT, read_checkpoint, replicator_env


class _Hashes:
    """Just enough of a Redis client for HGET."""

    def __init__(self, hashes: dict[str, dict[str, bytes]]) -> None:
        self.hashes = hashes

    def hget(self, key: str, field: str) -> bytes | None:
        return self.hashes.get(key, {}).get(field)


def test_checkpoint_is_read_from_the_slots_key_and_is_zero_before_the_first_batch() -> None:
    keys = KeySchema("rm:v9")
    client = cast(redis.Redis, _Hashes({keys.checkpoint("rm_x"): {CHECKPOINT_LSN_FIELD: b"12345"}}))
    assert read_checkpoint(client, "rm_x", keys) == 12345
    assert read_checkpoint(client, "rm_other", keys) == 0
    assert read_checkpoint(client) == 0


def test_checkpoint_defaults_to_the_replicators_slot_and_namespace() -> None:
    client = cast(
        redis.Redis, _Hashes({DEFAULT_SCHEMA.checkpoint(DEFAULT_SLOT_NAME): {CHECKPOINT_LSN_FIELD: b"7"}})
    )
    assert read_checkpoint(client) == 7


def test_replicator_env_sets_the_connections_and_lets_extra_settings_win(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("REPLICATOR_BATCH_MAX_CHANGES", "1")
    env = replicator_env(
        "postgresql://db",
        "redis://r/0",
        slot="rm_test",
        health_port=4000,
        extra={"REPLICATOR_LOG_LEVEL": "INFO", "REPLICATOR_HEALTH_PORT": "4001"},
    )
    assert env["REPLICATOR_DATABASE_URL"] == "postgresql://db"
    assert env["REPLICATOR_REDIS_URL"] == "redis://r/0"
    assert env["REPLICATOR_SLOT_NAME"] == "rm_test"
    assert env["REPLICATOR_HEALTH_PORT"] == "4001"
    assert env["REPLICATOR_METRICS_PORT"] == "0"
    assert env["REPLICATOR_LOG_LEVEL"] == "INFO"
    assert env["REPLICATOR_BATCH_MAX_CHANGES"] == "1"  # inherited from this process
    assert env["PYTHONPATH"] == str(ROOT)


def test_replicator_env_leaves_the_default_slot_to_the_replicator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REPLICATOR_SLOT_NAME", raising=False)
    assert "REPLICATOR_SLOT_NAME" not in replicator_env("postgresql://db", "redis://r/0")
