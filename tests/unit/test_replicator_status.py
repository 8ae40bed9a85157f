"""`replicator status` without servers: the outcome and its exit status, the lag, the JSON document, the table."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime

import psycopg2
import pytest
import redis

from replicator import status as status_module
from replicator.changes import Checkpoint
from replicator.config import Settings
from replicator.lock import LockOwner
from replicator.source import SlotDetails, SlotUsage
from replicator.status import (
    CAUGHT_UP,
    EXIT_OK,
    EXIT_SLOT_LOST,
    EXIT_SLOT_MISSING,
    EXIT_UNREACHABLE,
    SOURCE_TIME,
    UNKNOWN,
    Status,
    as_json,
    duration,
    read_status,
    size,
    table,
)
from tests.support import ROOT

MIB = 1024 * 1024
NOW_US = 1_800_000_000_000_000

SLOT = SlotDetails(
    plugin="pgoutput",
    active=True,
    active_pid=4242,
    restart_lsn=0x1000,
    confirmed_flush_lsn=0x1800,
    wal_status="reserved",
    safe_wal_size=2000 * MIB,
)
USAGE = SlotUsage(current_wal_lsn=0x2000, max_slot_wal_keep_size=2048 * MIB, slot=SLOT)
HEALTHY = Status(
    namespace="rm:v1",
    slot_name="payments_read_model",
    publication="payments_read_model",
    checked_at=datetime(2027, 1, 15, 8, 0, tzinfo=UTC),
    usage=USAGE,
    source_now_us=NOW_US,
    postgres_error=None,
    checkpoint=Checkpoint(0x2000, NOW_US - 5_000_000, NOW_US - 1_000_000),
    lock_key="rm:v1:lock:{payments_read_model}",
    lock=LockOwner("pod-1:7:0badcafe", 8_500),
    redis_error=None,
)


def _rows(status: Status) -> dict[str, str]:
    rows = {}
    for line in table(status).splitlines():
        name, _, value = line.partition("  ")
        rows[name.strip()] = value.strip()
    return rows


@pytest.mark.parametrize(
    ("status", "outcome", "code"),
    [
        (HEALTHY, "ok", EXIT_OK),
        (replace(HEALTHY, usage=replace(USAGE, slot=None)), "slot_missing", EXIT_SLOT_MISSING),
        (
            replace(HEALTHY, usage=replace(USAGE, slot=replace(SLOT, wal_status="lost", restart_lsn=None))),
            "slot_lost",
            EXIT_SLOT_LOST,
        ),
        (
            replace(HEALTHY, usage=None, postgres_error="OperationalError: refused"),
            "unreachable",
            EXIT_UNREACHABLE,
        ),
        (
            replace(HEALTHY, checkpoint=None, lock=None, redis_error="ConnectionError: refused"),
            "unreachable",
            4,
        ),
        # A side that answered but refused (a wrong password, an ACL) cannot be read either.
        (
            replace(
                HEALTHY, checkpoint=None, lock=None, redis_error="NoPermissionError: no", redis_refused=True
            ),
            "unreachable",
            EXIT_UNREACHABLE,
        ),
        # Not reaching one side wins over what the other side shows: the report is incomplete.
        (
            replace(HEALTHY, usage=replace(USAGE, slot=None), redis_error="ConnectionError: refused"),
            "unreachable",
            EXIT_UNREACHABLE,
        ),
        # A slot that keeps WAL without a cap, or no lock holder, is still a status that could be read.
        (
            replace(HEALTHY, usage=replace(USAGE, max_slot_wal_keep_size=None), lock=LockOwner(None, None)),
            "ok",
            0,
        ),
    ],
    ids=[
        "ok",
        "slot-missing",
        "slot-lost",
        "postgres-unreachable",
        "redis-unreachable",
        "redis-refused",
        "both",
        "no-cap",
    ],
)
def test_outcome_and_exit_status(status: Status, outcome: str, code: int) -> None:
    assert (status.outcome, status.exit_code) == (outcome, code)
    assert as_json(status)["outcome"] == outcome
    assert as_json(status)["exit_code"] == code
    assert _rows(status)["outcome"] == f"{outcome} (exit status {code})"


def test_the_exit_statuses_are_distinct_and_leave_2_to_the_settings() -> None:
    assert len({EXIT_OK, EXIT_SLOT_MISSING, EXIT_UNREACHABLE, EXIT_SLOT_LOST, 2}) == 5


def test_no_wal_after_the_checkpoint_is_no_lag() -> None:
    assert HEALTHY.lag_bytes == 0
    assert HEALTHY.lag_seconds == (0.0, CAUGHT_UP)


def test_lag_in_seconds_is_measured_from_the_source_time_the_checkpoint_covers() -> None:
    behind = replace(HEALTHY, checkpoint=Checkpoint(0x1F00, NOW_US - 5_000_000, NOW_US - 1_500_000))
    assert behind.lag_bytes == 0x100
    assert behind.lag_seconds == (1.5, SOURCE_TIME)
    # Without a source time of its own (a checkpoint written before it was recorded), the commit time stands in.
    older = replace(HEALTHY, checkpoint=Checkpoint(0x1F00, NOW_US - 5_000_000))
    assert older.lag_seconds == (5.0, SOURCE_TIME)


def test_lag_is_unknown_without_a_time_or_a_side() -> None:
    no_time = replace(HEALTHY, checkpoint=Checkpoint(0x1F00, None))
    assert no_time.lag_seconds == (None, UNKNOWN)
    assert replace(HEALTHY, checkpoint=None).lag_bytes is None
    assert replace(HEALTHY, checkpoint=None).lag_seconds == (None, UNKNOWN)
    assert replace(HEALTHY, usage=None, postgres_error="x").lag_seconds == (None, UNKNOWN)


def test_a_checkpoint_past_the_write_position_is_no_negative_lag() -> None:
    # An idle checkpoint can sit just past a page header, beyond pg_current_wal_lsn().
    ahead = replace(HEALTHY, checkpoint=Checkpoint(0x2018, None, NOW_US))
    assert ahead.lag_bytes == 0
    assert ahead.lag_seconds == (0.0, CAUGHT_UP)


def test_the_json_document_has_the_documented_fields() -> None:
    document = as_json(HEALTHY)
    json.dumps(document)  # plain JSON types only
    assert set(document) == {
        "format",
        "outcome",
        "exit_code",
        "checked_at",
        "namespace",
        "slot_name",
        "publication",
        "postgres",
        "slot",
        "redis",
        "checkpoint",
        "lag",
        "lock",
    }
    assert document["format"] == 1
    assert document["checked_at"] == "2027-01-15T08:00:00.000000Z"
    assert document["postgres"] == {
        "reachable": True,
        "refused": False,
        "error": None,
        "current_wal_lsn": "0/2000",
        "max_slot_wal_keep_size_bytes": 2048 * MIB,
    }
    assert document["slot"] == {
        "plugin": "pgoutput",
        "active": True,
        "active_pid": 4242,
        "restart_lsn": "0/1000",
        "confirmed_flush_lsn": "0/1800",
        "wal_status": "reserved",
        "safe_wal_size_bytes": 2000 * MIB,
        "retained_wal_bytes": 0x1000,
    }
    assert document["redis"] == {"reachable": True, "refused": False, "error": None}
    assert document["checkpoint"] == {
        "lsn": "0/2000",
        "commit_time": "2027-01-15T07:59:55.000000Z",
        "source_time": "2027-01-15T07:59:59.000000Z",
    }
    assert document["lag"] == {"bytes": 0, "seconds": 0.0, "seconds_basis": "caught_up"}
    assert document["lock"] == {
        "key": "rm:v1:lock:{payments_read_model}",
        "owner": "pod-1:7:0badcafe",
        "ttl_seconds": 8.5,
    }


def test_the_json_document_of_missing_parts_has_nulls_not_absent_fields() -> None:
    document = as_json(replace(HEALTHY, usage=None, postgres_error="OperationalError: refused"))
    assert document["postgres"] == {
        "reachable": False,
        "refused": False,
        "error": "OperationalError: refused",
        "current_wal_lsn": None,
        "max_slot_wal_keep_size_bytes": None,
    }
    assert document["slot"] is None
    assert document["lag"] == {"bytes": None, "seconds": None, "seconds_basis": "unknown"}
    lost = as_json(
        replace(HEALTHY, usage=replace(USAGE, slot=replace(SLOT, wal_status="lost", restart_lsn=None)))
    )
    assert lost["slot"]["restart_lsn"] is None
    assert lost["slot"]["retained_wal_bytes"] is None


def test_the_table_of_a_healthy_slot() -> None:
    rows = _rows(HEALTHY)
    assert list(rows) == [
        "namespace",
        "slot",
        "confirmed position",
        "WAL retained",
        "wal_status",
        "source position",
        "checkpoint (Redis)",
        "lag",
        "lock owner",
        "outcome",
    ]
    assert rows["slot"] == "payments_read_model (pgoutput), active (walsender pid 4242)"
    assert rows["WAL retained"] == "4.0 KiB (4,096 bytes)"
    assert rows["wal_status"] == (
        "reserved; 2.0 GiB more WAL before the slot is lost (max_slot_wal_keep_size 2.0 GiB)"
    )
    assert rows["checkpoint (Redis)"] == "0/2000, last commit 2027-01-15T07:59:55.000000Z"
    assert rows["lag"] == "0 B, 0 s (caught up)"
    assert rows["lock owner"] == "pod-1:7:0badcafe (expires in 8.5 s unless renewed)"


def test_the_table_says_what_is_wrong() -> None:
    stopped = replace(
        HEALTHY,
        usage=replace(
            USAGE,
            max_slot_wal_keep_size=None,
            slot=replace(SLOT, active=False, active_pid=None, safe_wal_size=None),
        ),
        checkpoint=Checkpoint(0x1000, None, NOW_US - 200_000_000),
        lock=LockOwner(None, None),
    )
    rows = _rows(stopped)
    assert rows["slot"].endswith("INACTIVE (no consumer streams it)")
    assert "no max_slot_wal_keep_size" in rows["wal_status"]
    assert rows["lag"] == "4.0 KiB (4,096 bytes), at most 3 min 20 s (by the source's clock)"
    assert rows["lock owner"] == "NOBODY (no replicator holds the lock)"
    assert "MISSING" in _rows(replace(HEALTHY, usage=replace(USAGE, slot=None)))["slot"]
    lost = _rows(
        replace(HEALTHY, usage=replace(USAGE, slot=replace(SLOT, wal_status="lost", restart_lsn=None)))
    )
    assert rows["outcome"] == "ok (exit status 0)"
    assert lost["WAL retained"] == "unknown"
    assert "invalidated" in lost["wal_status"]
    unreachable = _rows(replace(HEALTHY, checkpoint=None, lock=None, redis_error="ConnectionError: refused"))
    assert unreachable["checkpoint (Redis)"] == "Redis not reached (ConnectionError: refused)"
    assert "lock owner" not in unreachable
    assert _rows(replace(HEALTHY, checkpoint=None))["checkpoint (Redis)"].startswith("none")


def test_a_side_that_answered_is_refused_not_unreached() -> None:
    """A server that answers with an error was reached: the report says it refused, and why."""
    reason = "AuthenticationError: invalid username-password pair or user is disabled."
    refused = replace(HEALTHY, checkpoint=None, lock=None, redis_error=reason, redis_refused=True)
    rows = _rows(refused)
    assert rows["checkpoint (Redis)"] == f"Redis refused ({reason})"
    assert "not reached" not in table(refused)
    assert as_json(refused)["redis"] == {"reachable": False, "refused": True, "error": reason}
    fatal = 'OperationalError: connection to server at "db" (10.0.0.9), port 5432 failed: FATAL:  no'
    rows = _rows(replace(HEALTHY, usage=None, postgres_error=fatal, postgres_refused=True))
    assert rows["slot"] == f"payments_read_model: PostgreSQL refused ({fatal})"


SETTINGS = Settings(
    database_url="postgresql://replicator@db.invalid/payments", redis_url="redis://r.invalid/0"
)


@pytest.mark.parametrize(
    ("error", "refused"),
    [
        (redis.AuthenticationError("invalid username-password pair or user is disabled."), True),
        (redis.exceptions.NoPermissionError("this user has no permissions to access one of the keys"), True),
        (redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"), True),
        (redis.BusyLoadingError("Redis is loading the dataset in memory"), True),
        (redis.ConnectionError("Error 111 connecting to r.invalid:6379. Connection refused."), False),
        (redis.TimeoutError("Timeout reading from socket"), False),
    ],
)
def test_which_redis_errors_are_refusals(
    monkeypatch: pytest.MonkeyPatch, error: Exception, refused: bool
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(status_module, "read_checkpoint", fail)
    monkeypatch.setattr(psycopg2, "connect", _unreachable_postgres)
    found = read_status(SETTINGS, timeout_seconds=0.5)
    assert found.redis_error == f"{type(error).__name__}: {error}"
    assert found.redis_refused is refused
    assert (found.outcome, found.exit_code) == ("unreachable", EXIT_UNREACHABLE)
    assert ("Redis refused (" if refused else "Redis not reached (") in table(found)


def _unreachable_postgres(*args: object, **kwargs: object) -> None:
    raise psycopg2.OperationalError(
        'connection to server at "db.invalid" (10.0.0.9), port 5432 failed: Connection refused\n'
        "\tIs the server running on that host and accepting TCP/IP connections?\n"
    )


@pytest.mark.parametrize(
    ("message", "refused"),
    [
        (
            'connection to server at "db" (10.0.0.9), port 5432 failed: FATAL:  password authentication '
            'failed for user "replicator"\n',
            True,
        ),
        (
            'connection to server at "db" (10.0.0.9), port 5432 failed: FATAL:  database "x" does not exist\n',
            True,
        ),
        ('connection to server at "db" (10.0.0.9), port 5432 failed: timeout expired\n', False),
        ('could not translate host name "db.invalid" to address: Name or service not known\n', False),
    ],
)
def test_which_postgres_connection_errors_are_refusals(
    monkeypatch: pytest.MonkeyPatch, message: str, refused: bool
) -> None:
    def connect(*args: object, **kwargs: object) -> None:
        raise psycopg2.OperationalError(message)

    monkeypatch.setattr(status_module, "read_checkpoint", lambda client, key: None)
    monkeypatch.setattr(status_module, "read_owner", lambda client, key: None)
    monkeypatch.setattr(psycopg2, "connect", connect)
    found = read_status(SETTINGS, timeout_seconds=0.5)
    assert found.postgres_refused is refused
    assert found.exit_code == EXIT_UNREACHABLE
    assert ("PostgreSQL refused (" if refused else "PostgreSQL not reached (") in table(found)


@pytest.mark.parametrize(
    ("value", "text"),
    [(None, "unknown"), (0, "0 B"), (1023, "1023 B"), (1536, "1.5 KiB"), (3 * 1024**3, "3.0 GiB")],
)
def test_size(value: int | None, text: str) -> None:
    assert size(value) == text


def test_exact_size_adds_the_bytes() -> None:
    assert size(1536, exact=True) == "1.5 KiB (1,536 bytes)"
    assert size(12, exact=True) == "12 B"


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "unknown"), (0.0, "0 s"), (4.25, "4.2 s"), (185.0, "3 min 5 s"), (7830.0, "2 h 10 min")],
)
def test_duration(seconds: float | None, text: str) -> None:
    assert duration(seconds) == text


def test_status_reads_the_settings_of_run_and_stops_on_a_bad_one() -> None:
    """The same settings as `replicator run`: a missing one is exit status 2 with its name."""
    done = subprocess.run(
        [sys.executable, "-m", "replicator", "status", "--json"],
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "REPLICATOR_REDIS_URL": "redis://x:1/0"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "REPLICATOR_DATABASE_URL" in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf", "soon", "3601"])
def test_a_timeout_that_is_no_positive_number_of_seconds_is_a_usage_error(timeout: str) -> None:
    """Exit status 2, as for every bad argument: not a stack reported unreachable, nor a traceback."""
    done = subprocess.run(
        [sys.executable, "-m", "replicator", "status", "--timeout", timeout],
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "PYTHONPATH": str(ROOT),
            "REPLICATOR_DATABASE_URL": "postgresql://replicator@127.0.0.1:1/payments",
            "REPLICATOR_REDIS_URL": "redis://127.0.0.1:1/0",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "argument --timeout" in done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""
