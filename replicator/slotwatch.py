"""The slot's gauges: what pg_replication_slots says about the slot, sampled by a thread of its own.

The replicator exports them whatever its main loop does (streaming, waiting for the
lock, restarting after an error), so that WAL kept back by the slot is seen even when
nothing is replicated, which is when it grows.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from typing import Final

import psycopg2
import psycopg2.extensions

from replicator import metrics
from replicator.source import SlotUsage, read_slot_usage

log = logging.getLogger(__name__)

WAL_STATUSES: Final = ("reserved", "extended", "unreserved", "lost")


def export(usage: SlotUsage) -> None:
    """Sets the slot's gauges from one reading."""
    slot = usage.slot
    metrics.SLOT_EXISTS.set(0 if slot is None else 1)
    metrics.SLOT_ACTIVE.set(1 if slot is not None and slot.active else 0)
    retained = usage.retained_bytes
    metrics.SLOT_RETAINED_BYTES.set(math.nan if retained is None else retained)
    safe = slot.safe_wal_size if slot is not None else None
    metrics.SLOT_SAFE_WAL_BYTES.set(math.nan if safe is None else safe)
    for status in WAL_STATUSES:
        metrics.SLOT_WAL_STATUS.labels(status).set(1 if slot is not None and slot.wal_status == status else 0)
    metrics.SLOT_SAMPLED_AT.set(time.time())


def unknown() -> None:
    """The slot could not be read: no gauge keeps a value that may be stale."""
    for gauge in (
        metrics.SLOT_EXISTS,
        metrics.SLOT_ACTIVE,
        metrics.SLOT_RETAINED_BYTES,
        metrics.SLOT_SAFE_WAL_BYTES,
    ):
        gauge.set(math.nan)
    for status in WAL_STATUSES:
        metrics.SLOT_WAL_STATUS.labels(status).set(math.nan)


class SlotWatch:
    """Reads the slot every `interval_seconds` on a connection of its own and sets the gauges."""

    def __init__(self, dsn: str, slot: str, interval_seconds: float, timeout_seconds: float = 5.0) -> None:
        self.dsn = dsn
        self.slot = slot
        self.interval_seconds = interval_seconds
        self.timeout_seconds = timeout_seconds
        self._stop = threading.Event()
        self._connection: psycopg2.extensions.connection | None = None
        self._failing = False
        self._thread = threading.Thread(target=self._run, name="slot-watch", daemon=True)

    def start(self) -> SlotWatch:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.timeout_seconds + self.interval_seconds)

    def sample(self) -> None:
        """One reading; a failure sets the gauges to NaN and drops the connection."""
        try:
            if self._connection is None:
                self._connection = psycopg2.connect(
                    self.dsn,
                    connect_timeout=max(1, round(self.timeout_seconds)),
                    application_name="replicator-slot-watch",
                    options=f"-c statement_timeout={int(self.timeout_seconds * 1000)}",
                )
                self._connection.autocommit = True
            export(read_slot_usage(self._connection, self.slot))
        except psycopg2.Error as error:
            if not self._failing:
                log.warning("could not read replication slot %s: %s", self.slot, str(error).strip())
            self._failing = True
            unknown()
            self._close()
            return
        if self._failing:
            log.info("replication slot %s can be read again", self.slot)
        self._failing = False

    def _close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(psycopg2.Error):
                self._connection.close()
        self._connection = None

    def _run(self) -> None:
        try:
            while True:
                self.sample()
                if self._stop.wait(self.interval_seconds):
                    return
        finally:
            self._close()
