"""The replicator's settings and its decision to bootstrap."""

from __future__ import annotations

from typing import Any

import pytest

from payments_common.settings import SettingsError
from replicator.config import Settings
from replicator.runner import Replicator
from replicator.sink import Checkpoint
from replicator.source import SlotState

REQUIRED = {"REPLICATOR_DATABASE_URL": "postgresql://db/x", "REPLICATOR_REDIS_URL": "redis://r:6379/0"}


def test_defaults() -> None:
    settings = Settings.from_env(REQUIRED)
    assert settings.slot_name == "payments_read_model"
    assert settings.publication == "payments_read_model"
    assert (settings.health_port, settings.metrics_port) == (50053, 9103)
    assert settings.stream_maxlen == 10_000
    assert settings.lock_ttl_seconds == 10.0


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_required_settings(missing: str) -> None:
    env = {k: v for k, v in REQUIRED.items() if k != missing}
    with pytest.raises(SettingsError, match=missing):
        Settings.from_env(env)


def test_rejects_malformed_values() -> None:
    with pytest.raises(SettingsError):
        Settings.from_env({**REQUIRED, "REPLICATOR_DATABASE_URL": "mysql://x"})
    with pytest.raises(SettingsError):
        Settings.from_env({**REQUIRED, "REPLICATOR_LOCK_TTL_SECONDS": "0.5"})
    with pytest.raises(SettingsError):
        Settings.from_env({**REQUIRED, "REPLICATOR_STREAM_MAXLEN": "0"})
    with pytest.raises(SettingsError):
        Settings.from_env({**REQUIRED, "REPLICATOR_SLOT_NAME": "Bad-Name"})


class _FakeSource:
    def __init__(self, state: SlotState | None) -> None:
        self.state = state

    def slot_state(self) -> SlotState | None:
        return self.state


@pytest.mark.parametrize(
    ("checkpoint", "state", "reason"),
    [
        (None, None, "new_deployment"),
        (None, SlotState(None, "reserved", 100), "redis_empty"),
        (Checkpoint(100, None), None, "slot_missing"),
        (Checkpoint(100, None), SlotState(None, "lost", 50), "slot_lost"),
        (Checkpoint(100, None), SlotState(None, "reserved", 150), "redis_behind_slot"),
        (Checkpoint(100, None), SlotState(None, "reserved", 100), None),
        (Checkpoint(100, None), SlotState(7, "extended", 40), None),
    ],
)
def test_bootstrap_reason(checkpoint: Checkpoint | None, state: SlotState | None, reason: str | None) -> None:
    replicator = Replicator(Settings.from_env(REQUIRED))
    source: Any = _FakeSource(state)
    assert replicator._bootstrap_reason(source, checkpoint) == reason
