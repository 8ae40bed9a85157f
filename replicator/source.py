"""The PostgreSQL side: the slot, the snapshot copy, and the replication stream (replicator.walstream)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg2
import psycopg2.extensions
from psycopg2 import sql

from payments_common import tracing
from payments_common.lsn import parse_lsn
from replicator.walstream import DEFAULT_STATUS_INTERVAL_SECONDS, WalStream

log = logging.getLogger(__name__)

SESSION_OPTIONS = "-c DateStyle=ISO -c TimeZone=UTC -c IntervalStyle=postgres"
WAL_PAGE_BYTES = 8192
SHORT_PAGE_HEADER_BYTES = 24
LONG_PAGE_HEADER_BYTES = 40


@dataclass(frozen=True)
class SlotState:
    active_pid: int | None
    wal_status: str | None
    confirmed_flush_lsn: int | None


@dataclass(frozen=True)
class SlotDetails:
    """One row of pg_replication_slots, positions as integers."""

    plugin: str
    active: bool
    active_pid: int | None
    # The oldest WAL the slot keeps (None once it is lost), and what its consumer confirmed.
    restart_lsn: int | None
    confirmed_flush_lsn: int | None
    # reserved, extended, unreserved or lost (PostgreSQL manual, pg_replication_slots).
    wal_status: str | None
    # Bytes of WAL that can still be written before the slot is lost; None without a cap.
    safe_wal_size: int | None


@dataclass(frozen=True)
class SlotUsage:
    """The slot and the source's WAL position, read in one statement."""

    current_wal_lsn: int
    # max_slot_wal_keep_size in bytes; None when unlimited (-1, PostgreSQL's default).
    max_slot_wal_keep_size: int | None
    slot: SlotDetails | None

    @property
    def retained_bytes(self) -> int | None:
        """The WAL that the slot keeps on the source's disk: current position minus restart_lsn."""
        if self.slot is None:
            return 0
        if self.slot.restart_lsn is None:
            return None
        return max(0, self.current_wal_lsn - self.slot.restart_lsn)


# pg_current_wal_lsn() once, so that retained bytes compare positions of one moment. A
# slot's name is cluster-wide; like the runner, only a slot of this database is ours.
SLOT_USAGE_QUERY = """
SELECT pg_current_wal_lsn()::text,
       (SELECT CASE WHEN setting::bigint < 0 THEN NULL ELSE setting::bigint * 1024 * 1024 END
          FROM pg_settings WHERE name = 'max_slot_wal_keep_size'),
       s.slot_name IS NOT NULL, s.plugin, s.active, s.active_pid, s.restart_lsn::text,
       s.confirmed_flush_lsn::text, s.wal_status, s.safe_wal_size
FROM (SELECT 1) AS one
LEFT JOIN pg_replication_slots AS s ON s.slot_name = %s AND s.database = current_database()
"""


def read_slot_usage(connection: psycopg2.extensions.connection, slot: str) -> SlotUsage:
    """The slot's row of pg_replication_slots (None: no such slot) and the source's WAL position."""
    with connection.cursor() as cursor:
        cursor.execute(SLOT_USAGE_QUERY, (slot,))
        row = cursor.fetchone()
    assert row is not None
    current, keep, exists, plugin, active, pid, restart, confirmed, wal_status, safe = row
    details = (
        SlotDetails(
            plugin=plugin,
            active=bool(active),
            active_pid=pid,
            restart_lsn=parse_lsn(restart) if restart else None,
            confirmed_flush_lsn=parse_lsn(confirmed) if confirmed else None,
            wal_status=wal_status,
            safe_wal_size=int(safe) if safe is not None else None,
        )
        if exists
        else None
    )
    return SlotUsage(parse_lsn(current), int(keep) if keep is not None else None, details)


@dataclass(frozen=True)
class CopyTable:
    schema: str
    name: str
    columns: tuple[str, ...]
    estimated_rows: int

    @property
    def qualified(self) -> str:
        return f"{self.schema}.{self.name}"


class Source:
    """One replication connection and one ordinary connection to the source database."""

    def __init__(
        self,
        dsn: str,
        slot: str,
        publication: str,
        connect_timeout: int = 10,
        status_interval_seconds: float = DEFAULT_STATUS_INTERVAL_SECONDS,
    ) -> None:
        self.dsn = dsn
        self.slot = slot
        self.publication = publication
        self.connect_timeout = connect_timeout
        self.status_interval_seconds = status_interval_seconds
        self._stream: WalStream | None = None
        self._sql: psycopg2.extensions.connection | None = None
        self.wal_segment_bytes = 16 * 1024 * 1024
        self.wal_page_bytes = WAL_PAGE_BYTES

    # -- connections ------------------------------------------------------------------------

    def connect(self) -> None:
        keepalive: dict[str, Any] = {
            # The projection parses timestamps in ISO form; fix it whatever the server's defaults.
            "options": SESSION_OPTIONS,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
        }
        self._sql = psycopg2.connect(
            self.dsn, connect_timeout=self.connect_timeout, application_name="replicator", **keepalive
        )
        self._sql.autocommit = True
        sizes = dict(
            self._query(
                "SELECT name, setting::bigint FROM pg_settings WHERE name IN ('wal_segment_size', 'wal_block_size')"
            )
        )
        self.wal_segment_bytes = int(sizes.get("wal_segment_size", self.wal_segment_bytes))
        self.wal_page_bytes = int(sizes.get("wal_block_size", self.wal_page_bytes))
        self._stream = WalStream.connect(
            self.dsn,
            status_interval_seconds=self.status_interval_seconds,
            connect_timeout=self.connect_timeout,
            application_name="replicator",
            **keepalive,
        )

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
        if self._sql is not None:
            with contextlib.suppress(psycopg2.Error):
                self._sql.close()
        self._stream = self._sql = None

    @property
    def stream(self) -> WalStream:
        """The replication connection: slot creation, then the stream and its feedback."""
        assert self._stream is not None, "not connected"
        return self._stream

    def _query(self, query: str | sql.Composable, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        assert self._sql is not None, "not connected"
        with self._sql.cursor() as cursor:
            cursor.execute(query, args)
            return list(cursor.fetchall()) if cursor.description else []

    # -- the slot ---------------------------------------------------------------------------

    def slot_state(self) -> SlotState | None:
        rows = self._query(
            "SELECT active_pid, wal_status, confirmed_flush_lsn::text FROM pg_replication_slots "
            "WHERE slot_name = %s AND database = current_database()",
            (self.slot,),
        )
        if not rows:
            return None
        pid, wal_status, confirmed = rows[0]
        return SlotState(pid, wal_status, parse_lsn(confirmed) if confirmed else None)

    def past_page_header(self, position: int) -> int:
        """A position at a WAL page boundary moved past the page header, where no record ends.

        pg_current_wal_lsn() never points into a page header, so a consistency token taken
        when the last record ended at a page boundary lies just past the header.
        """
        if position % self.wal_page_bytes:
            return position
        if position % self.wal_segment_bytes == 0:
            return position + LONG_PAGE_HEADER_BYTES
        return position + SHORT_PAGE_HEADER_BYTES

    def server_wal_lsn(self) -> int:
        return parse_lsn(self._query("SELECT pg_current_wal_lsn()::text")[0][0])

    def clock_then_insert_position(self) -> tuple[int, int]:
        """The source's clock (Unix microseconds), then the WAL position it inserts at, read in that order.

        Every transaction that committed before that time has its commit record below that
        position (up to the microseconds between a commit's timestamp and its record).
        """
        clock_us, position = self._query(
            "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint,"
            " pg_current_wal_insert_lsn()::text"
        )[0]
        return int(clock_us), parse_lsn(position)

    def server_time_us(self) -> int:
        """The source's clock, in Unix microseconds."""
        return int(self._query("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")[0][0])

    def end_other_consumer(self, fence: Callable[[], None]) -> None:
        """Ends a walsender that still uses the slot: this instance holds the lock, so it is a zombie.

        `fence` raises unless this instance holds the slot's lock; it runs right before the
        walsender is ended, so that an instance that lost the lock ends nobody's.
        """
        state = self.slot_state()
        if state is None or state.active_pid is None:
            return
        if self._stream is not None and state.active_pid == self._stream.backend_pid:
            return
        fence()
        log.warning("ending walsender %s that still holds slot %s", state.active_pid, self.slot)
        self._query("SELECT pg_terminate_backend(%s)", (state.active_pid,))

    def drop_slot(self, fence: Callable[[], None]) -> None:
        """Drops the slot (ending a walsender that holds it); `fence` runs right before each step."""
        self.end_other_consumer(fence)
        fence()
        rows = self._query(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
            "WHERE slot_name = %s AND database = current_database()",
            (self.slot,),
        )
        if rows:
            log.warning("dropped replication slot %s", self.slot)

    def create_slot_with_snapshot(self) -> tuple[int, str]:
        """Creates the slot and exports its snapshot; returns (consistent point, snapshot name).

        The snapshot lives until the replication connection runs its next command.
        """
        return self.stream.create_logical_slot(self.slot, "pgoutput")

    def start_replication(self, fence: Callable[[], None]) -> None:
        """Streams the slot from its confirmed position; the runner then acknowledges its checkpoint."""
        self.end_other_consumer(fence)
        options = {"proto_version": "1", "publication_names": self.publication}
        if tracing.active():
            # The command side's transactional messages (the trace context of a traced
            # transaction) arrive inside their transaction. Only while tracing: any role may
            # emit messages, of any size, which the replicator would otherwise take in.
            options["messages"] = "true"
        self.stream.start_logical(self.slot, options)

    def acknowledge(self, lsn: int) -> None:
        """Tells PostgreSQL that everything up to `lsn` is applied and durable: the slot may forget it."""
        self.stream.confirm(lsn)

    # -- the copy ---------------------------------------------------------------------------

    def published_tables(self) -> list[CopyTable]:
        rows = self._query(
            # reltuples is -1 until the table is first vacuumed or analysed, and stale after a
            # bulk load; the statistics' live-row count follows every commit.
            "SELECT t.schemaname, t.tablename, "
            "  greatest(c.reltuples, coalesce(pg_stat_get_live_tuples(c.oid), 0))::bigint, "
            "  array_agg(a.attname::text ORDER BY a.attnum) "
            "FROM pg_publication_tables t "
            "JOIN pg_class c ON c.oid = format('%%I.%%I', t.schemaname, t.tablename)::regclass "
            "JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped "
            "WHERE t.pubname = %s GROUP BY 1, 2, 3 ORDER BY 1, 2",
            (self.publication,),
        )
        return [
            CopyTable(schema, name, tuple(columns), max(int(estimate), 0))
            for schema, name, estimate, columns in rows
        ]

    def copy(
        self, snapshot: str, tables: list[CopyTable], batch_rows: int = 5000
    ) -> Iterator[tuple[CopyTable, list[dict[str, str | None]]]]:
        """Yields every row of `tables` as seen by `snapshot`, as text, in batches."""
        connection = psycopg2.connect(
            self.dsn,
            connect_timeout=self.connect_timeout,
            application_name="replicator-copy",
            options=SESSION_OPTIONS,
        )
        try:
            connection.set_session(isolation_level="REPEATABLE READ", readonly=True)
            with connection.cursor() as setup:
                setup.execute("SET TRANSACTION SNAPSHOT %s", (snapshot,))
                setup.execute("SET LOCAL TimeZone = 'UTC'")
            for table in tables:
                select = sql.SQL("SELECT {} FROM {}").format(
                    sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(c)) for c in table.columns),
                    sql.Identifier(table.schema, table.name),
                )
                with connection.cursor(name=f"copy_{table.name}") as cursor:
                    cursor.itersize = batch_rows
                    cursor.execute(select)
                    while True:
                        rows = cursor.fetchmany(batch_rows)
                        if not rows:
                            break
                        yield table, [dict(zip(table.columns, row, strict=True)) for row in rows]
            connection.rollback()
        finally:
            connection.close()
