"""Prometheus metrics of the replicator."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LAG_BYTES = Gauge(
    "replicator_lag_bytes", "WAL bytes between the source's current position and the applied checkpoint."
)
LAG_SECONDS = Gauge(
    "replicator_lag_seconds",
    "Seconds between the commit of the last applied transaction and its apply; 0 when caught up.",
)
CHECKPOINT_LSN = Gauge("replicator_checkpoint_lsn", "The applied checkpoint, as a WAL position.")
CHANGES = Counter("replicator_changes_applied_total", "Row changes applied to Redis.")
TRANSACTIONS = Counter("replicator_transactions_applied_total", "Source transactions applied to Redis.")
BATCH_CHANGES = Histogram(
    "replicator_batch_changes",
    "Row changes per applied batch.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000),
)
APPLY_SECONDS = Histogram(
    "replicator_apply_seconds",
    "Time to apply one batch to Redis.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
BOOTSTRAP_ROWS = Gauge("replicator_bootstrap_rows_copied", "Rows copied by the current or last bootstrap.")
BOOTSTRAP_ESTIMATE = Gauge(
    "replicator_bootstrap_rows_estimated", "The planner's estimate of the rows the bootstrap copies."
)
BOOTSTRAPS = Counter("replicator_bootstraps_total", "Bootstraps started, by reason.", ["reason"])
RECONNECTS = Counter("replicator_reconnects_total", "Restarts of the replication loop after an error.")
STREAMING = Gauge("replicator_streaming", "1 while this instance owns the slot and streams.")
CONFIRMED_LSN = Gauge(
    "replicator_confirmed_lsn",
    "The last position confirmed to PostgreSQL (the slot may forget the WAL before it).",
)
LOCK_HELD = Gauge(
    "replicator_lock_held",
    "1 while this instance holds the slot's lock (bootstrap included), 0 while it waits or restarts.",
)
BOOTSTRAP_IN_PROGRESS = Gauge(
    "replicator_bootstrap_in_progress",
    "1 while this instance rebuilds the read models from a new slot's snapshot, by the reason of the rebuild.",
    ["reason"],
)
# The slot as pg_replication_slots shows it, read by a thread of its own every
# REPLICATOR_SLOT_SAMPLE_SECONDS, whether this instance streams, waits for the lock or
# restarts; NaN after a sample that failed (PostgreSQL not reached).
SLOT_EXISTS = Gauge("replicator_slot_exists", "1 when the replication slot exists in the source database.")
SLOT_ACTIVE = Gauge(
    "replicator_slot_active", "1 while a walsender streams the slot (this instance or another)."
)
SLOT_RETAINED_BYTES = Gauge(
    "replicator_slot_wal_retained_bytes",
    "WAL the slot keeps on the source: pg_current_wal_lsn() minus the slot's restart_lsn (0 without a slot).",
)
SLOT_SAFE_WAL_BYTES = Gauge(
    "replicator_slot_safe_wal_size_bytes",
    "WAL that can still be written before max_slot_wal_keep_size invalidates the slot; NaN without a cap.",
)
SLOT_WAL_STATUS = Gauge(
    "replicator_slot_wal_status",
    "1 for the slot's wal_status (reserved, extended, unreserved, lost), 0 for the others.",
    ["wal_status"],
)
SLOT_SAMPLED_AT = Gauge(
    "replicator_slot_sampled_timestamp_seconds", "When the slot was last read successfully (Unix time)."
)
