"""The replication connection: PostgreSQL's streaming replication protocol, spoken by us over libpq.

We speak the protocol ourselves (libpq's low-level API, from psycopg 3) so that every flush
position PostgreSQL receives is one the replicator passed to `confirm`. psycopg2's
replication cursor moves its own flush position to a keepalive's WAL end when it believes
everything received was confirmed, which lets the slot run ahead of the read models.

The messages are described in the PostgreSQL manual, "Streaming Replication Protocol".
Integers are big-endian; times are microseconds since 2000-01-01 UTC.
"""

from __future__ import annotations

import select
import struct
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

import psycopg
from psycopg import pq
from psycopg.conninfo import make_conninfo

from payments_common.lsn import format_lsn, parse_lsn
from replicator.decoder import PG_EPOCH_OFFSET_US

XLOG_DATA: Final = ord("w")
KEEPALIVE: Final = ord("k")
# 'w', dataStart, walEnd, sendTime; then the payload.
XLOG_DATA_HEADER: Final = struct.Struct(">cQQq")
# 'k', walEnd, sendTime, replyRequested.
KEEPALIVE_MESSAGE: Final = struct.Struct(">cQqB")
# 'r', write, flush, apply, clock, replyRequested: the Standby Status Update.
STATUS_UPDATE: Final = struct.Struct(">cQQQqB")
_POSITIONS: Final = struct.Struct(">QQq")

DEFAULT_STATUS_INTERVAL_SECONDS: Final = 10.0
DEFAULT_SEND_TIMEOUT_SECONDS: Final = 30.0


class ReplicationError(OSError):
    """The replication connection failed, a command was refused, or the server ended the stream.

    An `OSError`, so that the runner's restart path handles it like a broken socket.
    """

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class ProtocolError(ValueError):
    """A message that the streaming replication protocol does not define: reconnecting cannot help."""


@dataclass(slots=True)
class XLogData:
    """One message of the logical decoding plugin, with its position in the WAL."""

    data_start: int
    wal_end: int
    send_time_us: int
    payload: bytes


@dataclass(frozen=True, slots=True)
class Keepalive:
    wal_end: int
    send_time_us: int
    reply_requested: bool


def parse_message(data: bytes | memoryview) -> XLogData | Keepalive:
    """Parses one CopyData message of the server (XLogData or Primary keepalive)."""
    kind = data[0] if len(data) else None
    if kind == XLOG_DATA and len(data) >= XLOG_DATA_HEADER.size:
        start, end, sent = _POSITIONS.unpack_from(data, 1)
        return XLogData(start, end, sent, bytes(data[XLOG_DATA_HEADER.size :]))
    if kind == KEEPALIVE and len(data) == KEEPALIVE_MESSAGE.size:
        _, end, sent, reply = KEEPALIVE_MESSAGE.unpack(data)
        return Keepalive(end, sent, bool(reply))
    raise ProtocolError(f"unexpected replication message {bytes(data[:32])!r} ({len(data)} bytes)")


def status_update(flush_lsn: int, clock_us: int, reply_requested: bool) -> bytes:
    """A Standby Status Update reporting `flush_lsn` as written, flushed and applied.

    Write and apply equal flush: the replicator applies a transaction to Redis before it
    reports anything, so no position beyond the flushed one is ever claimed.
    """
    return STATUS_UPDATE.pack(b"r", flush_lsn, flush_lsn, flush_lsn, clock_us, reply_requested)


def pg_clock_us(unix_seconds: float) -> int:
    return int(unix_seconds * 1_000_000) - PG_EPOCH_OFFSET_US


def _quote_literal(value: str) -> str:
    # The replication command parser knows only standard strings: double the quotes.
    return "'" + value.replace("'", "''") + "'"


def _quote_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


class WalStream:
    """One replication connection: creates a logical slot, streams it, reports our flush position.

    Not thread-safe. Errors of the connection or the server are raised as `ReplicationError`.
    """

    def __init__(
        self,
        pgconn: pq.abc.PGconn,
        status_interval_seconds: float = DEFAULT_STATUS_INTERVAL_SECONDS,
        send_timeout_seconds: float = DEFAULT_SEND_TIMEOUT_SECONDS,
    ) -> None:
        self._pgconn = pgconn
        self.status_interval_seconds = status_interval_seconds
        self.send_timeout_seconds = send_timeout_seconds
        self._streaming = False
        self._flush_lsn = 0
        self._wal_end = 0
        self._wal_end_time_us = 0
        self._next_status = 0.0

    @classmethod
    def connect(
        cls,
        dsn: str,
        status_interval_seconds: float = DEFAULT_STATUS_INTERVAL_SECONDS,
        send_timeout_seconds: float = DEFAULT_SEND_TIMEOUT_SECONDS,
        **params: str | int,
    ) -> WalStream:
        """Opens a logical replication connection; `params` are libpq connection parameters."""
        conninfo = make_conninfo(dsn, replication="database", **params)
        pgconn = pq.PGconn.connect(conninfo.encode())
        if pgconn.status != pq.ConnStatus.OK:
            message = pgconn.get_error_message()
            pgconn.finish()
            raise ReplicationError(f"replication connection failed: {message}")
        return cls(pgconn, status_interval_seconds, send_timeout_seconds)

    def close(self) -> None:
        self._streaming = False
        self._pgconn.finish()

    @property
    def backend_pid(self) -> int:
        return self._pgconn.backend_pid

    @property
    def server_version(self) -> int:
        return self._pgconn.server_version

    # -- commands before streaming ------------------------------------------------------------

    def _execute(self, command: str, expected: pq.ExecStatus) -> pq.abc.PGresult:
        if self._streaming:
            raise ReplicationError("the connection is streaming; it runs no other command")
        try:
            result = self._pgconn.exec_(command.encode())
        except psycopg.Error as error:
            raise ReplicationError(f"{command.split()[0]} failed: {error}") from error
        if result.status != expected:
            sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
            message = result.get_error_message() or self._pgconn.get_error_message()
            raise ReplicationError(
                f"{command.split()[0]} failed: {message.strip()}", sqlstate.decode() if sqlstate else None
            )
        return result

    def create_logical_slot(self, slot: str, plugin: str = "pgoutput") -> tuple[int, str]:
        """Creates a logical slot exporting its snapshot; returns (consistent point, snapshot name).

        The snapshot lives until this connection runs its next command, so the copy that
        uses it must end before `start_logical`.
        """
        export = "(SNAPSHOT 'export')" if self.server_version >= 150000 else "EXPORT_SNAPSHOT"
        result = self._execute(
            f"CREATE_REPLICATION_SLOT {_quote_identifier(slot)} LOGICAL {_quote_identifier(plugin)} {export}",
            pq.ExecStatus.TUPLES_OK,
        )
        consistent_point, snapshot = result.get_value(0, 1), result.get_value(0, 2)
        if consistent_point is None or snapshot is None:
            raise ProtocolError("CREATE_REPLICATION_SLOT returned no consistent point or snapshot")
        return parse_lsn(consistent_point.decode()), snapshot.decode()

    def start_logical(self, slot: str, options: Mapping[str, str], start_lsn: int = 0) -> None:
        """Starts streaming `slot`; 0 starts from the slot's confirmed position."""
        arguments = ", ".join(f"{_quote_identifier(k)} {_quote_literal(v)}" for k, v in options.items())
        command = f"START_REPLICATION SLOT {_quote_identifier(slot)} LOGICAL {format_lsn(start_lsn)}"
        self._execute(f"{command} ({arguments})" if arguments else command, pq.ExecStatus.COPY_BOTH)
        try:
            # Status messages are queued, then flushed with a deadline (see _send).
            self._pgconn.nonblocking = 1
        except psycopg.Error as error:
            raise ReplicationError(str(error)) from error
        self._streaming = True
        self._next_status = time.monotonic() + self.status_interval_seconds

    # -- streaming ----------------------------------------------------------------------------

    def fileno(self) -> int:
        try:
            return self._pgconn.socket
        except psycopg.Error as error:
            raise ReplicationError(str(error)) from error

    @property
    def wal_end(self) -> int:
        """The latest WAL end position the server sent, in a data message or a keepalive."""
        return self._wal_end

    @property
    def wal_end_time_us(self) -> int:
        """The server's clock (Unix microseconds) when it sent `wal_end`; 0 before any message."""
        return self._wal_end_time_us

    @property
    def flush_lsn(self) -> int:
        """The flush position reported to the server: the highest one given to `confirm`."""
        return self._flush_lsn

    def read_message(self) -> XLogData | None:
        """Returns the next XLogData, or None when none is buffered; never waits for the socket.

        Keepalives are consumed here; a status message is sent when the server asks for one
        and when `status_interval_seconds` has passed since the last one.
        """
        if not self._streaming:
            raise ReplicationError("the connection is not streaming")
        if time.monotonic() >= self._next_status:
            self._send_status(reply_requested=False)
        pgconn = self._pgconn
        consumed = False
        while True:
            try:
                size, data = pgconn.get_copy_data(1)
            except psycopg.Error as error:
                raise ReplicationError(f"replication stream broken: {error}") from error
            if size > 0:
                message = parse_message(data)
                self._wal_end = message.wal_end
                self._wal_end_time_us = message.send_time_us + PG_EPOCH_OFFSET_US
                if isinstance(message, XLogData):
                    return message
                if message.reply_requested:
                    self._send_status(reply_requested=False)
                continue
            if size == 0:
                if consumed:
                    return None
                try:
                    pgconn.consume_input()
                except psycopg.Error as error:
                    raise ReplicationError(f"replication stream broken: {error}") from error
                consumed = True
                continue
            self._end_of_stream()

    def _end_of_stream(self) -> None:
        """The server ended the COPY: raise with its reason (an error, or a clean end)."""
        self._streaming = False
        result = self._pgconn.get_result()
        if result is not None and result.status == pq.ExecStatus.FATAL_ERROR:
            sqlstate = result.error_field(pq.DiagnosticField.SQLSTATE)
            raise ReplicationError(
                f"the server ended the replication stream: {result.get_error_message().strip()}",
                sqlstate.decode() if sqlstate else None,
            )
        raise ReplicationError("the server ended the replication stream")

    def confirm(self, flush_lsn: int) -> None:
        """Reports everything up to `flush_lsn` as flushed (never lowering it), now."""
        if flush_lsn > self._flush_lsn:
            self._flush_lsn = flush_lsn
        self._send_status(reply_requested=False)

    def ping(self) -> None:
        """Sends a status message asking the server to reply with a keepalive (its WAL end)."""
        self._send_status(reply_requested=True)

    def _send_status(self, reply_requested: bool) -> None:
        if not self._streaming:
            raise ReplicationError("the connection is not streaming")
        self._send(status_update(self._flush_lsn, pg_clock_us(time.time()), reply_requested))
        self._next_status = time.monotonic() + self.status_interval_seconds

    def _send(self, message: bytes) -> None:
        """Queues `message` and flushes it, absorbing input meanwhile, within `send_timeout_seconds`."""
        pgconn = self._pgconn
        deadline = time.monotonic() + self.send_timeout_seconds
        try:
            # 0: libpq could not queue it without blocking.
            while not pgconn.put_copy_data(message):
                self._wait_writable(deadline)
            # 1: part of the queue is still unsent.
            while pgconn.flush():
                self._wait_writable(deadline)
        except psycopg.Error as error:
            raise ReplicationError(f"could not send a status message: {error}") from error

    def _wait_writable(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ReplicationError(f"could not send a status message within {self.send_timeout_seconds:.0f}s")
        socket = self.fileno()
        readable, _, _ = select.select([socket], [socket], [], remaining)
        if readable:
            # The server may be blocked sending to us: take its data into libpq's buffer.
            self._pgconn.consume_input()
