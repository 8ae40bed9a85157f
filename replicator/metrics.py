"""Prometheus metrics of the replicator, each labelled with the read-model version it replicates.

Two versions may run side by side in one Kubernetes namespace (docs/operations.md, "A new
read-model version beside the live one"), each with its own replicator, slot and key
namespace. So that an alert can tell them apart, every series below carries the labels
`slot` and `key_namespace` of the process that exports it, set once with `identify()` when
`replicator run` starts. The metrics live in a registry of their own; the default registry,
which `/metrics` serves, reads them through `_VersionLabels`, which adds those labels, so
the code that sets a gauge or counts names neither.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from payments_common.metrics import CHANGE_DELAY_BUCKETS

# The labels that name a read-model version: REPLICATOR_SLOT_NAME and REPLICATOR_KEY_NAMESPACE.
VERSION_LABELS: Final = ("slot", "key_namespace")

_OWN = CollectorRegistry(auto_describe=True)

LAG_BYTES = Gauge(
    "replicator_lag_bytes",
    "WAL bytes between the source's current position and the applied checkpoint.",
    registry=_OWN,
)
LAG_SECONDS = Gauge(
    "replicator_lag_seconds",
    "Seconds between the commit of the last applied transaction and its apply; 0 when caught up.",
    registry=_OWN,
)
COMMIT_TO_SEND_SECONDS = Histogram(
    "replicator_commit_to_send_seconds",
    "Seconds from the commit of each applied source transaction to the walsender sending its commit "
    "message, both on the source's clock: the WAL's flush, its decoding and the walsender's turn.",
    buckets=CHANGE_DELAY_BUCKETS,
    registry=_OWN,
)
COMMIT_TO_RECEIVE_SECONDS = Histogram(
    "replicator_commit_to_receive_seconds",
    "Seconds from the commit of each applied source transaction to this process reading its commit "
    "message (the source's clock against this host's): the above, and the message's wait in the "
    "socket for this process to read it.",
    buckets=CHANGE_DELAY_BUCKETS,
    registry=_OWN,
)
COMMIT_TO_APPLY_SECONDS = Histogram(
    "replicator_commit_to_apply_seconds",
    "Seconds from the commit of each applied source transaction to this process reading Redis's "
    "acknowledgement of the batch that carried it (the source's clock against this host's); the "
    "reply is read at once when the stream is drained, with the next batch while a backlog streams in.",
    buckets=CHANGE_DELAY_BUCKETS,
    registry=_OWN,
)
CHECKPOINT_LSN = Gauge(
    "replicator_checkpoint_lsn", "The applied checkpoint, as a WAL position.", registry=_OWN
)
CHANGES = Counter("replicator_changes_applied_total", "Row changes applied to Redis.", registry=_OWN)
TRANSACTIONS = Counter(
    "replicator_transactions_applied_total", "Source transactions applied to Redis.", registry=_OWN
)
BATCH_CHANGES = Histogram(
    "replicator_batch_changes",
    "Row changes per applied batch.",
    buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000),
    registry=_OWN,
)
APPLY_SECONDS = Histogram(
    "replicator_apply_seconds",
    "Time to apply one batch to Redis.",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
    registry=_OWN,
)
BOOTSTRAP_ROWS = Gauge(
    "replicator_bootstrap_rows_copied", "Rows copied by the current or last bootstrap.", registry=_OWN
)
BOOTSTRAP_ESTIMATE = Gauge(
    "replicator_bootstrap_rows_estimated",
    "The planner's estimate of the rows the bootstrap copies.",
    registry=_OWN,
)
BOOTSTRAPS = Counter(
    "replicator_bootstraps_total", "Bootstraps started, by reason.", ["reason"], registry=_OWN
)
RECONNECTS = Counter(
    "replicator_reconnects_total", "Restarts of the replication loop after an error.", registry=_OWN
)
STREAMING = Gauge("replicator_streaming", "1 while this instance owns the slot and streams.", registry=_OWN)
CONFIRMED_LSN = Gauge(
    "replicator_confirmed_lsn",
    "The last position confirmed to PostgreSQL (the slot may forget the WAL before it).",
    registry=_OWN,
)
LOCK_HELD = Gauge(
    "replicator_lock_held",
    "1 while this instance holds the slot's lock (bootstrap included), 0 while it waits or restarts.",
    registry=_OWN,
)
BOOTSTRAP_IN_PROGRESS = Gauge(
    "replicator_bootstrap_in_progress",
    "1 while this instance rebuilds the read models from a new slot's snapshot, by the reason of the rebuild.",
    ["reason"],
    registry=_OWN,
)
# The slot as pg_replication_slots shows it, read by a thread of its own every
# REPLICATOR_SLOT_SAMPLE_SECONDS, whether this instance streams, waits for the lock or
# restarts; NaN after a sample that failed (PostgreSQL not reached).
SLOT_EXISTS = Gauge(
    "replicator_slot_exists", "1 when the replication slot exists in the source database.", registry=_OWN
)
SLOT_ACTIVE = Gauge(
    "replicator_slot_active",
    "1 while a walsender streams the slot (this instance or another).",
    registry=_OWN,
)
SLOT_RETAINED_BYTES = Gauge(
    "replicator_slot_wal_retained_bytes",
    "WAL the slot keeps on the source: pg_current_wal_lsn() minus the slot's restart_lsn (0 without a slot).",
    registry=_OWN,
)
SLOT_SAFE_WAL_BYTES = Gauge(
    "replicator_slot_safe_wal_size_bytes",
    "WAL that can still be written before max_slot_wal_keep_size invalidates the slot; NaN without a cap.",
    registry=_OWN,
)
SLOT_WAL_STATUS = Gauge(
    "replicator_slot_wal_status",
    "1 for the slot's wal_status (reserved, extended, unreserved, lost), 0 for the others.",
    ["wal_status"],
    registry=_OWN,
)
SLOT_SAMPLED_AT = Gauge(
    "replicator_slot_sampled_timestamp_seconds",
    "When the slot was last read successfully (Unix time).",
    registry=_OWN,
)


class _VersionLabels(Collector):
    """The metrics above, each sample labelled with the version of this process (none until `identify`)."""

    def __init__(self) -> None:
        self.labels: dict[str, str] = {}

    def describe(self) -> Iterator[Metric]:
        # The names, for the default registry's check against duplicates.
        return iter(_OWN.collect())

    def collect(self) -> Iterator[Metric]:
        version = dict(self.labels)
        for family in _OWN.collect():
            if version:
                labelled = Metric(family.name, family.documentation, family.type, family.unit)
                labelled.samples = [
                    sample._replace(labels={**version, **sample.labels}) for sample in family.samples
                ]
                family = labelled
            yield family


_VERSION = _VersionLabels()
REGISTRY.register(_VERSION)


def identify(slot: str, key_namespace: str) -> None:
    """Labels every series of this process with its read-model version: `slot` and `key_namespace`."""
    _VERSION.labels = dict(zip(VERSION_LABELS, (slot, key_namespace), strict=True))


def version_labels() -> dict[str, str]:
    """The labels `identify` set; empty before (a replicator run in a test, for instance)."""
    return dict(_VERSION.labels)


def forget_version() -> None:
    """Exports the series without the version's labels again (for tests that identify)."""
    _VERSION.labels = {}
