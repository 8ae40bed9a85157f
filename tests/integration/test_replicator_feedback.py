"""The replication stream against a real PostgreSQL: the slot moves only to positions we confirmed.

No Redis and no replicator process: the tests drive `replicator.walstream.WalStream` directly
and watch the slot from another connection.
"""

from __future__ import annotations

import select
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg2
import psycopg2.extensions
import pytest

from payments_common.lsn import parse_lsn
from replicator.decoder import Commit, Decoder
from replicator.walstream import ReplicationError, WalStream

PUBLICATION = "feedback"
OPTIONS = {"proto_version": "1", "publication_names": PUBLICATION}
BIG_TRANSACTION_ROWS = 300_000
DEADLINE_SECONDS = 120.0


def _connect(dsn: str) -> psycopg2.extensions.connection:
    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    return connection


def _query(connection: psycopg2.extensions.connection, query: str, args: tuple[Any, ...] = ()) -> Any:
    with connection.cursor() as cursor:
        cursor.execute(query, args)
        row = cursor.fetchone()
        return None if row is None else row[0]


def _wal_lsn(connection: psycopg2.extensions.connection) -> int:
    return parse_lsn(_query(connection, "SELECT pg_current_wal_lsn()::text"))


@pytest.fixture
def source(database_dsn: str) -> tuple[str, str]:
    """(dsn, slot name): a published table `t`, an unpublished `u`, and a slot name of its own."""
    setup = _connect(database_dsn)
    with setup.cursor() as cursor:
        cursor.execute("CREATE TABLE t (id bigint PRIMARY KEY, note text)")
        cursor.execute("CREATE TABLE u (id bigserial PRIMARY KEY)")
        cursor.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE t")
    setup.close()
    return database_dsn, f"feedback_{uuid.uuid4().hex[:12]}"


class _SlotSampler(threading.Thread):
    """Reads the slot's confirmed_flush_lsn every few milliseconds, labelling samples by phase."""

    def __init__(self, dsn: str, slot: str) -> None:
        super().__init__(daemon=True)
        self.connection = _connect(dsn)
        self.slot = slot
        self.phase = "start"
        self.samples: list[tuple[str, int]] = []
        self.error: BaseException | None = None
        self._done = threading.Event()

    def confirmed(self) -> int:
        value = _query(
            self.connection,
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = %s",
            (self.slot,),
        )
        return parse_lsn(value)

    def run(self) -> None:
        try:
            while not self._done.is_set():
                self.samples.append((self.phase, self.confirmed()))
                self._done.wait(0.002)
        except BaseException as error:
            self.error = error

    def sampled(self, phase: str) -> bool:
        return any(label == phase for label, _ in self.samples)

    def finish(self) -> None:
        self._done.set()
        self.join(timeout=30)
        self.connection.close()
        assert self.error is None, self.error


class _Reader:
    """Reads a stream the way the replicator does (non-blocking reads, select when drained)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.decoder = Decoder()
        self.commits: list[int] = []

    def read_until(self, condition: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + DEADLINE_SECONDS
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            message = self.stream.read_message()
            if message is None:
                select.select([self.stream.fileno()], [], [], 0.05)
                continue
            if message.payload[:1] == b"C":
                commit = self.decoder.decode(message.payload)
                assert isinstance(commit, Commit)
                self.commits.append(commit.end_lsn)


def _read_for_a_while(stream: WalStream) -> None:
    deadline = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        if stream.read_message() is None:
            select.select([stream.fileno()], [], [], 0.05)


def check_slot_stays_at_the_confirmed_position(stream: Any, dsn: str, slot: str) -> None:
    """Confirms one commit, then reads idle keepalives, a big and small transactions without confirming.

    `stream` has started replication of `slot`; it is ours, or (in an experiment) an adapter
    of psycopg2's ReplicationCursor with the same methods.
    """
    reader = _Reader(stream)
    writer = _connect(dsn)
    big = _connect(dsn)
    sampler = _SlotSampler(dsn, slot)
    try:
        # A big transaction begins before the confirmed commit: its changes will arrive later,
        # below the confirmed position (the interleaving that misleads psycopg2).
        big.autocommit = False
        _query(big, "INSERT INTO t VALUES (-1, 'big') RETURNING id")
        _query(writer, "INSERT INTO t VALUES (0, 'first') RETURNING id")
        reader.read_until(lambda: len(reader.commits) == 1, "the first commit")
        confirmed = reader.commits[0]
        stream.confirm(confirmed)
        reader.read_until(lambda: sampler.confirmed() == confirmed, "the slot to take the confirmation")
        sampler.start()

        def unpublished_write_and_keepalive() -> None:
            before = _wal_lsn(writer)
            _query(writer, "INSERT INTO u DEFAULT VALUES RETURNING id")
            stream.ping()
            reader.read_until(lambda: stream.wal_end > before, "a keepalive past an unpublished write")

        def phase(name: str) -> None:
            reader.read_until(lambda: sampler.sampled(sampler.phase), f"a sample in phase {sampler.phase}")
            sampler.phase = name

        # Idle: WAL the publication does not carry, so only keepalives come, ahead of us.
        phase("idle")
        for _ in range(5):
            unpublished_write_and_keepalive()

        # The big transaction, decoded and sent while nothing newer than the confirmed
        # commit has arrived: keepalives meanwhile carry positions inside it.
        phase("big")
        failures: list[BaseException] = []

        def insert_big() -> None:
            try:
                with big.cursor() as cursor:
                    cursor.execute(
                        "INSERT INTO t SELECT g, repeat('x', 40) FROM generate_series(1000, %s) g",
                        (1000 + BIG_TRANSACTION_ROWS - 1,),
                    )
                big.commit()
            except BaseException as error:
                failures.append(error)

        thread = threading.Thread(target=insert_big, daemon=True)
        thread.start()
        reader.read_until(lambda: len(reader.commits) == 2, "the big commit")
        thread.join(timeout=DEADLINE_SECONDS)
        assert not failures, failures

        phase("small")
        for i in range(1, 21):
            _query(writer, "INSERT INTO t VALUES (%s, 'small') RETURNING id", (i,))
        reader.read_until(lambda: len(reader.commits) == 22, "20 small commits")

        phase("after")
        unpublished_write_and_keepalive()
        phase("end")
    finally:
        sampler.finish()
        writer.close()
        big.close()

    assert reader.commits[-1] > confirmed
    for name in ("idle", "big", "small", "after"):
        assert sampler.sampled(name), name
    ahead: dict[str, list[int]] = {}
    for label, lsn in sampler.samples:
        if lsn > confirmed:
            ahead.setdefault(label, []).append(lsn - confirmed)
    report = {label: f"{len(d)} samples, up to {max(d)} bytes" for label, d in ahead.items()}
    assert not ahead, f"of {len(sampler.samples)} samples, ahead of the confirmed position: {report}"


def test_the_slot_never_passes_the_confirmed_position(source: tuple[str, str]) -> None:
    dsn, slot = source
    # Frequent status messages: each of them must carry the confirmed position, nothing more.
    stream = WalStream.connect(dsn, status_interval_seconds=0.1, application_name="feedback-test")
    try:
        stream.create_logical_slot(slot)
        stream.start_logical(slot, OPTIONS)
        check_slot_stays_at_the_confirmed_position(stream, dsn, slot)
    finally:
        stream.close()


def test_reply_requested_keepalives_are_answered(source: tuple[str, str]) -> None:
    dsn, slot = source
    # The walsender asks for a reply after half its timeout without one, and gives up after
    # the whole; our own status messages are kept out of the way.
    stream = WalStream.connect(
        dsn,
        status_interval_seconds=3600,
        application_name="feedback-test",
        options="-c wal_sender_timeout=1000",
    )
    monitor = _connect(dsn)
    try:
        consistent_point, _ = stream.create_logical_slot(slot)
        stream.start_logical(slot, OPTIONS)
        walsender = stream.backend_pid
        replies: set[str] = set()
        deadline = time.monotonic() + DEADLINE_SECONDS
        while len(replies) < 4:
            assert time.monotonic() < deadline, f"only {len(replies)} replies seen"
            # Raises ReplicationError if the walsender timed out and ended the stream.
            while stream.read_message() is not None:
                pass
            reply = _query(
                monitor, "SELECT reply_time::text FROM pg_stat_replication WHERE pid = %s", (walsender,)
            )
            if reply is not None:
                replies.add(reply)
            select.select([stream.fileno()], [], [], 0.05)
        state = _query(
            monitor,
            "SELECT format('%%s %%s', active_pid, confirmed_flush_lsn) FROM pg_replication_slots "
            "WHERE slot_name = %s",
            (slot,),
        )
        active_pid, confirmed = state.split()
        assert int(active_pid) == walsender
        # The replies carried no position: nothing was confirmed.
        assert stream.flush_lsn == 0
        assert parse_lsn(confirmed) == consistent_point
    finally:
        monitor.close()
        stream.close()


def test_a_terminated_walsender_ends_the_stream_with_a_replication_error(source: tuple[str, str]) -> None:
    dsn, slot = source
    stream = WalStream.connect(dsn, application_name="feedback-test")
    second = WalStream.connect(dsn, application_name="feedback-test")
    monitor = _connect(dsn)
    try:
        stream.create_logical_slot(slot)
        stream.start_logical(slot, OPTIONS)
        with pytest.raises(ReplicationError) as in_use:
            second.start_logical(slot, OPTIONS)
        assert in_use.value.sqlstate == "55006"  # object_in_use: the slot is active
        _query(monitor, "SELECT pg_terminate_backend(%s)", (stream.backend_pid,))
        with pytest.raises(ReplicationError):
            _read_for_a_while(stream)
    finally:
        monitor.close()
        second.close()
        stream.close()
