"""When the read models must be rebuilt, and the rebuild: every published row copied under a new slot's snapshot."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from payments_common.keys import FEATURES
from payments_common.lsn import format_lsn
from replicator import metrics
from replicator.changes import TABLES, Checkpoint, RowChange
from replicator.lock import LockKeeper, SlotLock
from replicator.ops import Op
from replicator.projector import Projector
from replicator.source import SlotState, Source
from replicator.writer import Writer

log = logging.getLogger(__name__)

COPY_BATCH_ROWS = 1000
# Long work (a rebuild, a transaction applied in chunks) logs its progress this often.
PROGRESS_INTERVAL_SECONDS = 5.0


# Why a bootstrap runs: a first start, or data gone (rebuild_needed). Each labels a series of
# the metrics from the start, so that an alert sees its first increase.
REBUILD_REASONS = ("new_deployment", "redis_empty", "slot_missing", "slot_lost", "redis_behind_slot")
for _reason in REBUILD_REASONS:
    metrics.BOOTSTRAPS.labels(_reason)
    metrics.BOOTSTRAP_IN_PROGRESS.labels(_reason)


class Stopped(Exception):
    """The replicator was asked to stop."""


@dataclass(frozen=True)
class Rebuild:
    """Why the read models must be rebuilt: `reason` labels the metric, `message` is logged as an error."""

    reason: str
    message: str = ""


def rebuild_needed(slot: str, state: SlotState | None, checkpoint: Checkpoint | None) -> Rebuild | None:
    """Whether the slot and Redis's checkpoint can go on together, or why they cannot.

    A rebuild is only for data really gone: Redis without a checkpoint, a slot missing or
    invalidated, or a checkpoint behind what PostgreSQL was told (Redis lost writes).
    """
    if checkpoint is None and state is not None:
        return Rebuild(
            "redis_empty",
            f"REBUILD: Redis has no checkpoint for slot {slot} although the slot exists (Redis lost its "
            "data, or an earlier bootstrap was interrupted); the read models are rebuilt from a fresh snapshot",
        )
    if checkpoint is None:
        return Rebuild("new_deployment")
    if state is None:
        return Rebuild(
            "slot_missing",
            f"REBUILD: replication slot {slot} does not exist although Redis has checkpoint "
            f"{format_lsn(checkpoint.lsn)}; the read models are rebuilt from a fresh snapshot",
        )
    if state.wal_status == "lost":
        return Rebuild(
            "slot_lost",
            f"REBUILD: replication slot {slot} lost WAL it needed (wal_status=lost); "
            "the read models are rebuilt from a fresh snapshot",
        )
    if state.confirmed_flush_lsn is not None and state.confirmed_flush_lsn > checkpoint.lsn:
        return Rebuild(
            "redis_behind_slot",
            f"REBUILD: Redis checkpoint {format_lsn(checkpoint.lsn)} is behind the slot's confirmed position "
            f"{format_lsn(state.confirmed_flush_lsn)} (Redis lost writes); "
            "the read models are rebuilt from a fresh snapshot",
        )
    return None


def bootstrap(
    slot: str,
    source: Source,
    writer: Writer,
    projector: Projector,
    lock: SlotLock,
    keeper: LockKeeper,
    rebuild: Rebuild,
    stopping: Callable[[], bool],
) -> Checkpoint:
    """Copies every published row under the new slot's snapshot; the checkpoint is written last.

    Interrupted at any point, it leaves no checkpoint, so the next start bootstraps again.
    """
    if rebuild.message:
        log.error("%s", rebuild.message)
    metrics.BOOTSTRAPS.labels(rebuild.reason).inc()
    in_progress = metrics.BOOTSTRAP_IN_PROGRESS.labels(rebuild.reason)
    in_progress.set(1)
    try:
        return _bootstrap(slot, source, writer, projector, lock, keeper, rebuild, stopping)
    finally:
        in_progress.set(0)


def _bootstrap(
    slot: str,
    source: Source,
    writer: Writer,
    projector: Projector,
    lock: SlotLock,
    keeper: LockKeeper,
    rebuild: Rebuild,
    stopping: Callable[[], bool],
) -> Checkpoint:
    """The rebuild itself: keys removed, a new slot, the copy, the checkpoint."""
    log.warning("bootstrap of slot %s started (reason: %s)", slot, rebuild.reason)
    started = time.monotonic()
    sink = writer.sink
    sink.clear_checkpoint()
    removed = sink.wipe()
    log.info("bootstrap removed %d existing read-model keys", removed)
    # What this version builds, for readers to check: the rows below are copied into every
    # read model of it (an interrupted bootstrap leaves no checkpoint and runs again).
    sink.write_features(FEATURES)
    keeper.check()
    source.drop_slot(fence=lock.fence)
    # Every transaction that committed before this moment ends before the consistent point:
    # one still writing its commit record now is running, and the new slot waits for it.
    started_at_us = source.server_time_us()
    consistent_point, snapshot = source.create_slot_with_snapshot()
    log.info(
        "created slot %s at consistent point %s with snapshot %s",
        slot,
        format_lsn(consistent_point),
        snapshot,
    )
    tables = [table for table in source.published_tables() if table.qualified in TABLES]
    estimate = sum(table.estimated_rows for table in tables)
    metrics.BOOTSTRAP_ESTIMATE.set(estimate)
    metrics.BOOTSTRAP_ROWS.set(0)
    copied = 0
    last_report = time.monotonic()
    for table, rows in source.copy(snapshot, tables, batch_rows=COPY_BATCH_ROWS):
        if stopping():
            raise Stopped
        keeper.check()
        ops: list[Op] = []
        for row in rows:
            ops.extend(projector.project(RowChange(table.qualified, "insert", row, consistent_point)))
        writer.write(ops, None)
        copied += len(rows)
        metrics.BOOTSTRAP_ROWS.set(copied)
        now = time.monotonic()
        if now - last_report >= PROGRESS_INTERVAL_SECONDS:
            log.info(
                "bootstrap copied %d rows of about %d (%s)",
                copied,
                estimate,
                table.qualified,
                extra={"rows_copied": copied, "rows_estimated": estimate},
            )
            last_report = now
    checkpoint = Checkpoint(consistent_point, None, started_at_us)
    writer.write([], checkpoint)
    log.warning(
        "bootstrap of slot %s done: %d rows in %.1fs, checkpoint %s",
        slot,
        copied,
        time.monotonic() - started,
        format_lsn(consistent_point),
        extra={"rows_copied": copied},
    )
    return checkpoint
