"""The replication protocol messages, and what the stream sends, against a stand-in for libpq."""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass, field

import psycopg
import pytest
from psycopg import pq

from replicator.decoder import PG_EPOCH_OFFSET_US
from replicator.walstream import (
    Keepalive,
    ProtocolError,
    ReplicationError,
    WalStream,
    XLogData,
    parse_message,
    pg_clock_us,
    status_update,
)


def xlog_data(start: int, end: int, payload: bytes, sent: int = 7) -> bytes:
    return b"w" + struct.pack(">QQq", start, end, sent) + payload


def keepalive(end: int, reply: bool, sent: int = 7) -> bytes:
    return b"k" + struct.pack(">Qq?", end, sent, reply)


def parse_status(message: bytes) -> tuple[int, int, int, int, bool]:
    """(write, flush, apply, clock, reply requested) of a Standby Status Update."""
    assert message[:1] == b"r"
    assert len(message) == 34
    write, flush, apply, clock, reply = struct.unpack(">QQQq?", message[1:])
    return write, flush, apply, clock, reply


def test_xlog_data_is_parsed_with_its_positions_and_payload() -> None:
    message = parse_message(xlog_data(0x16_B374D848, 0x16_B374D900, b"C\x00payload", sent=123))
    assert message == XLogData(0x16_B374D848, 0x16_B374D900, 123, b"C\x00payload")
    assert isinstance(message.payload, bytes)


def test_xlog_data_from_a_memoryview_and_with_an_empty_payload() -> None:
    message = parse_message(memoryview(xlog_data(1, 2, b"")))
    assert message == XLogData(1, 2, 7, b"")


def test_keepalive_is_parsed_with_its_reply_flag() -> None:
    assert parse_message(keepalive(2**63 + 5, True, sent=-1)) == Keepalive(2**63 + 5, -1, True)
    assert parse_message(keepalive(9, False)) == Keepalive(9, 7, False)


@pytest.mark.parametrize(
    "data",
    [b"", b"x" + bytes(24), xlog_data(1, 2, b"")[:-1], keepalive(1, True)[:-1], keepalive(1, True) + b"\x00"],
)
def test_unknown_or_truncated_messages_are_protocol_errors(data: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_message(data)


def test_status_update_reports_one_position_as_written_flushed_and_applied() -> None:
    message = status_update(0x16_B374D848, 1_000_000, reply_requested=True)
    assert message == b"r" + struct.pack(">QQQq?", *[0x16_B374D848] * 3, 1_000_000, True)
    assert parse_status(message) == (0x16_B374D848, 0x16_B374D848, 0x16_B374D848, 1_000_000, True)
    assert parse_status(status_update(0, 5, reply_requested=False))[4] is False


def test_the_clock_counts_microseconds_since_2000() -> None:
    assert pg_clock_us(946_684_800.0) == 0
    assert pg_clock_us(946_684_801.5) == 1_500_000


@dataclass
class _Result:
    status: int
    values: dict[tuple[int, int], bytes] = field(default_factory=dict)
    message: str = ""
    sqlstate: bytes | None = None

    def get_value(self, row: int, column: int) -> bytes | None:
        return self.values.get((row, column))

    def error_field(self, code: int) -> bytes | None:
        return self.sqlstate if code == pq.DiagnosticField.SQLSTATE else None

    def get_error_message(self) -> str:
        return self.message


@dataclass
class _FakePGconn:
    """Hands out queued CopyData messages (only after consume_input) and records what is sent."""

    server_version: int = 150000
    backend_pid: int = 42
    socket: int = 99
    nonblocking: int = 0
    commands: list[bytes] = field(default_factory=list)
    results: deque[_Result] = field(default_factory=deque)
    arriving: deque[bytes | Exception | int] = field(default_factory=deque)
    buffered: deque[bytes | int] = field(default_factory=deque)
    sent: list[bytes] = field(default_factory=list)
    end_result: _Result | None = None

    def exec_(self, command: bytes) -> _Result:
        self.commands.append(command)
        return self.results.popleft()

    def consume_input(self) -> None:
        while self.arriving:
            item = self.arriving.popleft()
            if isinstance(item, Exception):
                raise item
            self.buffered.append(item)

    def get_copy_data(self, async_: int) -> tuple[int, memoryview | bytes]:
        assert async_ == 1
        if not self.buffered:
            return 0, b""
        item = self.buffered.popleft()
        if isinstance(item, int):
            return item, b""
        return len(item), memoryview(item)

    def get_result(self) -> _Result | None:
        result, self.end_result = self.end_result, None
        return result

    def put_copy_data(self, buffer: bytes) -> int:
        self.sent.append(bytes(buffer))
        return 1

    def flush(self) -> int:
        return 0

    def finish(self) -> None:
        pass


def _streaming(status_interval_seconds: float = 3600.0) -> tuple[WalStream, _FakePGconn]:
    pgconn = _FakePGconn()
    pgconn.results.append(_Result(pq.ExecStatus.COPY_BOTH))
    stream = WalStream(pgconn, status_interval_seconds=status_interval_seconds)  # type: ignore[arg-type]
    stream.start_logical('my "slot"', {"proto_version": "1", "publication_names": "it's"})
    return stream, pgconn


def test_start_logical_quotes_the_command_and_turns_nonblocking() -> None:
    stream, pgconn = _streaming()
    assert pgconn.commands == [
        b'START_REPLICATION SLOT "my ""slot""" LOGICAL 0/0 '
        b"(\"proto_version\" '1', \"publication_names\" 'it''s')"
    ]
    assert pgconn.nonblocking == 1
    assert pgconn.sent == []
    assert stream.fileno() == 99


def test_create_logical_slot_returns_the_consistent_point_and_snapshot() -> None:
    pgconn = _FakePGconn()
    pgconn.results.append(
        _Result(pq.ExecStatus.TUPLES_OK, {(0, 0): b"s", (0, 1): b"16/B374D848", (0, 2): b"00000003-1"})
    )
    stream = WalStream(pgconn)  # type: ignore[arg-type]
    assert stream.create_logical_slot("s") == (0x16_B374D848, "00000003-1")
    assert pgconn.commands == [b'CREATE_REPLICATION_SLOT "s" LOGICAL "pgoutput" (SNAPSHOT \'export\')']


def test_a_refused_command_raises_a_replication_error_with_its_sqlstate() -> None:
    pgconn = _FakePGconn()
    pgconn.results.append(_Result(pq.ExecStatus.FATAL_ERROR, message="slot is active\n", sqlstate=b"55006"))
    stream = WalStream(pgconn)  # type: ignore[arg-type]
    with pytest.raises(ReplicationError) as raised:
        stream.start_logical("s", {})
    assert raised.value.sqlstate == "55006"
    assert isinstance(raised.value, OSError)


def test_messages_are_read_without_waiting_and_keepalives_move_wal_end() -> None:
    stream, pgconn = _streaming()
    assert stream.read_message() is None
    pgconn.arriving.extend([keepalive(50, False), xlog_data(10, 10, b"B"), keepalive(60, False)])
    message = stream.read_message()
    assert message == XLogData(10, 10, 7, b"B")
    assert stream.wal_end == 10
    assert stream.read_message() is None
    assert stream.wal_end == 60
    assert pgconn.sent == []


def test_wal_end_comes_with_the_servers_clock_when_it_sent_it() -> None:
    """The time an idle checkpoint covers: the server's send time, in Unix microseconds."""
    stream, pgconn = _streaming()
    assert stream.wal_end_time_us == 0
    pgconn.arriving.extend([xlog_data(10, 10, b"B", sent=1_000), keepalive(60, False, sent=2_000)])
    stream.read_message()
    assert stream.wal_end_time_us == 1_000 + PG_EPOCH_OFFSET_US
    stream.read_message()
    assert (stream.wal_end, stream.wal_end_time_us) == (60, 2_000 + PG_EPOCH_OFFSET_US)


def test_a_requested_reply_carries_only_the_confirmed_position() -> None:
    stream, pgconn = _streaming()
    pgconn.arriving.append(keepalive(500, True))
    assert stream.read_message() is None
    assert parse_status(pgconn.sent[-1])[:3] == (0, 0, 0)
    stream.confirm(100)
    assert parse_status(pgconn.sent[-1])[:3] == (100, 100, 100)
    # A later data message below the confirmed position, then a keepalive far ahead:
    # the reply still says 100.
    pgconn.arriving.extend([xlog_data(40, 40, b"I"), keepalive(10_000, True)])
    assert stream.read_message() is not None
    assert stream.read_message() is None
    write, flush, apply, _, reply = parse_status(pgconn.sent[-1])
    assert (write, flush, apply, reply) == (100, 100, 100, False)
    assert len(pgconn.sent) == 3


def test_confirm_never_lowers_the_position_and_ping_asks_for_a_reply() -> None:
    stream, pgconn = _streaming()
    stream.confirm(300)
    stream.confirm(200)
    assert stream.flush_lsn == 300
    assert parse_status(pgconn.sent[-1])[1] == 300
    stream.ping()
    _, flush, _, _, reply = parse_status(pgconn.sent[-1])
    assert (flush, reply) == (300, True)


def test_a_status_message_is_sent_from_read_message_when_due() -> None:
    stream, pgconn = _streaming(status_interval_seconds=0.0)
    stream.confirm(70)
    pgconn.sent.clear()
    assert stream.read_message() is None
    assert stream.read_message() is None
    assert [parse_status(m)[1] for m in pgconn.sent] == [70, 70]
    assert not any(parse_status(m)[4] for m in pgconn.sent)


def test_a_broken_connection_raises_a_replication_error() -> None:
    stream, pgconn = _streaming()
    pgconn.arriving.append(psycopg.OperationalError("server closed the connection unexpectedly"))
    with pytest.raises(ReplicationError, match="server closed"):
        stream.read_message()


def test_the_end_of_the_copy_raises_with_the_servers_reason() -> None:
    stream, pgconn = _streaming()
    pgconn.arriving.append(-1)
    pgconn.end_result = _Result(
        pq.ExecStatus.FATAL_ERROR,
        message="terminating connection due to administrator command",
        sqlstate=b"57P01",
    )
    with pytest.raises(ReplicationError, match="administrator command") as raised:
        stream.read_message()
    assert raised.value.sqlstate == "57P01"
    with pytest.raises(ReplicationError):
        stream.confirm(1)
