"""The decision to rebuild the read models, a pure function of the slot's state and Redis's checkpoint."""

from __future__ import annotations

import pytest

from replicator.bootstrap import rebuild_needed
from replicator.changes import Checkpoint
from replicator.source import SlotState


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
def test_rebuild_needed(checkpoint: Checkpoint | None, state: SlotState | None, reason: str | None) -> None:
    rebuild = rebuild_needed("slot", state, checkpoint)
    assert (rebuild.reason if rebuild else None) == reason
    if rebuild is not None and reason != "new_deployment":
        assert rebuild.message.startswith("REBUILD: ")
