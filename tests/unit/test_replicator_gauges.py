"""The gauges of the slot, the lock and the bootstrap, set without servers."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from prometheus_client import REGISTRY, generate_latest

from replicator import metrics, slotwatch
from replicator.bootstrap import REBUILD_REASONS, Rebuild, bootstrap, rebuild_needed
from replicator.changes import Checkpoint
from replicator.source import SlotDetails, SlotState, SlotUsage

SLOT = SlotDetails("pgoutput", True, 42, 1_000, 1_500, "extended", None)


def _value(name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_the_slot_gauges_follow_one_reading() -> None:
    slotwatch.export(SlotUsage(current_wal_lsn=5_000, max_slot_wal_keep_size=None, slot=SLOT))
    assert _value("replicator_slot_exists") == 1
    assert _value("replicator_slot_active") == 1
    assert _value("replicator_slot_wal_retained_bytes") == 4_000
    assert math.isnan(_value("replicator_slot_safe_wal_size_bytes") or 0.0)  # no cap
    statuses = {s: _value("replicator_slot_wal_status", wal_status=s) for s in slotwatch.WAL_STATUSES}
    assert statuses == {"reserved": 0, "extended": 1, "unreserved": 0, "lost": 0}
    lost = SlotDetails("pgoutput", False, None, None, 1_500, "lost", None)
    slotwatch.export(SlotUsage(current_wal_lsn=9_000, max_slot_wal_keep_size=1 << 20, slot=lost))
    assert _value("replicator_slot_active") == 0
    assert math.isnan(_value("replicator_slot_wal_retained_bytes") or 0.0)  # a lost slot keeps nothing known
    assert _value("replicator_slot_wal_status", wal_status="lost") == 1
    slotwatch.export(SlotUsage(current_wal_lsn=9_000, max_slot_wal_keep_size=1 << 20, slot=None))
    assert _value("replicator_slot_exists") == 0
    assert _value("replicator_slot_wal_retained_bytes") == 0  # no slot, no WAL kept for it
    assert all(_value("replicator_slot_wal_status", wal_status=s) == 0 for s in slotwatch.WAL_STATUSES)


def test_a_failed_reading_leaves_no_stale_value() -> None:
    slotwatch.export(SlotUsage(current_wal_lsn=5_000, max_slot_wal_keep_size=None, slot=SLOT))
    slotwatch.unknown()
    for name in ("replicator_slot_exists", "replicator_slot_active", "replicator_slot_wal_retained_bytes"):
        assert math.isnan(_value(name) or 0.0), name
    assert math.isnan(_value("replicator_slot_wal_status", wal_status="extended") or 0.0)


@pytest.fixture
def next_version() -> Iterator[dict[str, str]]:
    """This process exports as the replicator of a second version does (`replicator run` identifies)."""
    metrics.identify(slot="payments_read_model_v2", key_namespace="rm:v2")
    try:
        yield metrics.version_labels()
    finally:
        metrics.forget_version()


def test_every_series_names_the_version_it_replicates(next_version: dict[str, str]) -> None:
    """Two versions side by side in one Kubernetes namespace export series that differ by slot and key namespace."""
    assert next_version == {"slot": "payments_read_model_v2", "key_namespace": "rm:v2"}
    slotwatch.export(SlotUsage(current_wal_lsn=5_000, max_slot_wal_keep_size=None, slot=SLOT))
    metrics.LOCK_HELD.set(1)
    assert _value("replicator_lock_held", **next_version) == 1
    assert _value("replicator_lock_held") is None
    assert _value("replicator_slot_wal_retained_bytes", **next_version) == 4_000
    assert _value("replicator_slot_wal_status", wal_status="extended", **next_version) == 1
    for reason in REBUILD_REASONS:
        assert _value("replicator_bootstraps_total", reason=reason, **next_version) is not None
    exported = [
        line for line in generate_latest(REGISTRY).decode().splitlines() if line.startswith("replicator_")
    ]
    assert len(exported) > 20
    for line in exported:
        assert 'slot="payments_read_model_v2"' in line, line
        assert 'key_namespace="rm:v2"' in line, line
    metrics.forget_version()
    assert _value("replicator_lock_held") == 1


def test_every_reason_of_a_rebuild_is_a_series_from_the_start() -> None:
    """An alert on `increase(...)` needs the series before its first bootstrap of that reason."""
    decided = {
        rebuild.reason
        for state, checkpoint in [
            (None, None),
            (SlotState(None, "reserved", 1), None),
            (None, Checkpoint(1, None)),
            (SlotState(None, "lost", 1), Checkpoint(1, None)),
            (SlotState(None, "reserved", 2), Checkpoint(1, None)),
        ]
        if (rebuild := rebuild_needed("s", state, checkpoint)) is not None
    }
    assert decided == set(REBUILD_REASONS)
    for reason in REBUILD_REASONS:
        assert _value("replicator_bootstraps_total", reason=reason) is not None
        assert _value("replicator_bootstrap_in_progress", reason=reason) is not None


class _Sink:
    def clear_checkpoint(self) -> None:
        pass

    def wipe(self) -> int:
        return 0

    def write_features(self, features: tuple[str, ...]) -> None:
        pass


class _Writer:
    sink = _Sink()

    def __init__(self) -> None:
        self.checkpoints: list[Checkpoint | None] = []

    def write(self, ops: list[Any], checkpoint: Checkpoint | None, omits: bool = False) -> None:
        self.checkpoints.append(checkpoint)


class _Source:
    """A source with no published rows, that records the gauge while the copy runs."""

    def __init__(self, seen: Callable[[], None], fail: bool = False) -> None:
        self.seen = seen
        self.fail = fail

    def drop_slot(self, fence: Callable[[], None]) -> None:
        pass

    def server_time_us(self) -> int:
        return 7

    def create_slot_with_snapshot(self) -> tuple[int, str]:
        if self.fail:
            raise OSError("the replication connection broke")
        return 100, "snapshot"

    def published_tables(self) -> list[Any]:
        return []

    def copy(self, snapshot: str, tables: list[Any], batch_rows: int) -> Iterator[Any]:
        self.seen()
        yield from ()


class _Keeper:
    def check(self) -> None:
        pass


class _Lock:
    def fence(self) -> None:
        pass


def _bootstrap(source: _Source, writer: _Writer) -> Checkpoint:
    return bootstrap(
        "s",
        cast(Any, source),
        cast(Any, writer),
        cast(Any, None),
        cast(Any, _Lock()),
        cast(Any, _Keeper()),
        Rebuild("slot_lost", "REBUILD: test"),
        lambda: False,
    )


def test_the_bootstrap_gauge_is_1_while_it_runs_and_0_after() -> None:
    during: list[float | None] = []
    source = _Source(lambda: during.append(_value("replicator_bootstrap_in_progress", reason="slot_lost")))
    writer = _Writer()
    before = _value("replicator_bootstraps_total", reason="slot_lost") or 0.0
    assert _bootstrap(source, writer) == Checkpoint(100, None, 7)
    assert during == [1]
    assert _value("replicator_bootstrap_in_progress", reason="slot_lost") == 0
    assert _value("replicator_bootstraps_total", reason="slot_lost") == before + 1
    # The checkpoint covers what committed before the slot was created: the source's clock then.
    assert writer.checkpoints[-1] == Checkpoint(100, None, 7)


def test_the_bootstrap_gauge_falls_back_when_the_bootstrap_fails() -> None:
    with pytest.raises(OSError, match="broke"):
        _bootstrap(_Source(lambda: None, fail=True), _Writer())
    assert _value("replicator_bootstrap_in_progress", reason="slot_lost") == 0
