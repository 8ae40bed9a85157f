"""`replicator status`: the slot, the WAL it keeps, Redis's checkpoint, the lag and the lock's owner, read once.

Reading is one step (`read_status`, PostgreSQL and Redis); everything after it is pure:
the outcome and its exit code, the lag, the JSON document (`as_json`, its schema in
docs/operations.md) and the table (`table`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import psycopg2
import redis

from payments_common.keys import KeySchema
from payments_common.lsn import format_lsn
from payments_common.redisconn import SyncClient, sync_client
from replicator.changes import Checkpoint
from replicator.config import Settings
from replicator.lock import LockOwner, read_owner
from replicator.sink import read_checkpoint
from replicator.source import SlotUsage, read_slot_usage

# The version of the JSON document; a change that removes or renames a field raises it.
FORMAT: Final = 1

# Exit statuses; 2 is taken by the settings (and usage) errors of every command.
EXIT_OK: Final = 0
EXIT_SLOT_MISSING: Final = 3
EXIT_UNREACHABLE: Final = 4
EXIT_SLOT_LOST: Final = 5

# `unreachable`: a side could not be read, whether it was not reached or it refused (the
# report says which); the name stays that of format 1.
OUTCOMES: Final = {
    "ok": EXIT_OK,
    "slot_missing": EXIT_SLOT_MISSING,
    "unreachable": EXIT_UNREACHABLE,
    "slot_lost": EXIT_SLOT_LOST,
}

# Redis errors that are the server's answer (it was reached, and refused): a wrong password or
# unknown user, an ACL that denies a command or a key, any other error reply, a server still
# loading its data. Every other RedisError (nothing listening at the address, a timeout) is not reached.
REDIS_REFUSALS: Final = (
    redis.AuthenticationError,
    redis.exceptions.AuthorizationError,
    redis.ResponseError,
    redis.BusyLoadingError,
)

# How `lag.seconds` was found.
CAUGHT_UP: Final = "caught_up"  # no WAL after the checkpoint: 0, exactly
SOURCE_TIME: Final = "source_time"  # the source's clock now minus the source time the checkpoint covers
UNKNOWN: Final = "unknown"  # no checkpoint, no source time recorded yet, or a side not read


@dataclass(frozen=True)
class Status:
    """What one look at PostgreSQL and Redis found; an `*_error` says why a side is missing.

    `*_refused` tells the two kinds of error apart: the server answered and refused
    (authentication, permissions; the error is its reason), or it was not reached.
    """

    namespace: str
    slot_name: str
    publication: str
    checked_at: datetime
    usage: SlotUsage | None
    # The source's clock when the slot was read (Unix microseconds).
    source_now_us: int | None
    postgres_error: str | None
    checkpoint: Checkpoint | None
    lock_key: str
    lock: LockOwner | None
    redis_error: str | None
    postgres_refused: bool = False
    redis_refused: bool = False

    @property
    def outcome(self) -> str:
        """The first that applies: unreachable, slot_missing, slot_lost, ok."""
        if self.postgres_error is not None or self.redis_error is not None or self.usage is None:
            return "unreachable"
        if self.usage.slot is None:
            return "slot_missing"
        if self.usage.slot.wal_status == "lost":
            return "slot_lost"
        return "ok"

    @property
    def exit_code(self) -> int:
        return OUTCOMES[self.outcome]

    @property
    def lag_bytes(self) -> int | None:
        """The source's WAL position minus the checkpoint; None if either side is unknown."""
        if self.usage is None or self.checkpoint is None:
            return None
        return max(0, self.usage.current_wal_lsn - self.checkpoint.lsn)

    @property
    def lag_seconds(self) -> tuple[float | None, str]:
        """How long ago, by the source's clock, the read models were last complete; and how it is known.

        0 when no WAL follows the checkpoint. Otherwise the source's clock minus the source
        time the checkpoint covers: every transaction that committed before that time is in
        Redis, so the oldest one missing is at most this old (an upper bound, tight while
        the replicator runs: its idle advances move that time every few tens of ms).
        """
        lag = self.lag_bytes
        if lag is None:
            return None, UNKNOWN
        if lag == 0:
            return 0.0, CAUGHT_UP
        assert self.checkpoint is not None
        covered = self.checkpoint.covered_until_us
        if covered is None or self.source_now_us is None:
            return None, UNKNOWN
        return max(0.0, (self.source_now_us - covered) / 1e6), SOURCE_TIME


def read_status(settings: Settings, timeout_seconds: float = 5.0) -> Status:
    """Reads Redis, then PostgreSQL (so that the lag is never below the truth); each error is kept, not raised."""
    schema = KeySchema.for_redis(settings.namespace, settings.slot_name, settings.cluster)
    checked_at = datetime.now(UTC)
    lock_key = schema.lock(settings.slot_name)
    checkpoint: Checkpoint | None = None
    lock: LockOwner | None = None
    redis_error: str | None = None
    redis_refused = False
    client: SyncClient | None = None
    try:
        # A cluster's client reads the topology as it is made: an error here is Redis's too.
        client = sync_client(
            settings.redis_url, socket_timeout=timeout_seconds, socket_connect_timeout=timeout_seconds
        )
        checkpoint = read_checkpoint(client, schema.checkpoint(settings.slot_name))
        lock = read_owner(client, lock_key)
    except redis.RedisError as error:
        # The message of a connection error names host and port, never the password; a
        # refusal is the server's reason (WRONGPASS, NOPERM), which names no password either.
        redis_error = f"{type(error).__name__}: {error}"
        redis_refused = isinstance(error, REDIS_REFUSALS)
        checkpoint = None
    finally:
        if client is not None:
            client.close()
    usage: SlotUsage | None = None
    source_now_us: int | None = None
    postgres_error: str | None = None
    postgres_refused = False
    try:
        connection = psycopg2.connect(
            settings.database_url,
            connect_timeout=max(1, round(timeout_seconds)),
            application_name="replicator-status",
            # At least 1 ms: 0 would mean no timeout at all.
            options=f"-c statement_timeout={max(1, int(timeout_seconds * 1000))}",
        )
    except psycopg2.Error as error:
        postgres_error = _postgres_error(error)
        postgres_refused = _postgres_refused(error)
    else:
        try:
            connection.autocommit = True
            usage = read_slot_usage(connection, settings.slot_name)
            with connection.cursor() as cursor:
                cursor.execute("SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::bigint")
                row = cursor.fetchone()
            source_now_us = int(row[0]) if row else None
        except psycopg2.Error as error:
            postgres_error = _postgres_error(error)
            postgres_refused = _postgres_refused(error)
            usage = None
        finally:
            with contextlib.suppress(psycopg2.Error):
                connection.close()
    return Status(
        namespace=settings.namespace,
        slot_name=settings.slot_name,
        publication=settings.publication,
        checked_at=checked_at,
        usage=usage,
        source_now_us=source_now_us,
        postgres_error=postgres_error,
        checkpoint=checkpoint,
        lock_key=lock_key,
        lock=lock,
        redis_error=redis_error,
        postgres_refused=postgres_refused,
        redis_refused=redis_refused,
    )


def _postgres_error(error: psycopg2.Error) -> str:
    # libpq's messages name the host and the user, never the password; one line is enough.
    first = str(error).strip().splitlines()
    return f"{type(error).__name__}: {first[0] if first else 'no message'}"


def _postgres_refused(error: psycopg2.Error) -> bool:
    """The server answered: an SQL error (it has a SQLSTATE), or a connection it ended with FATAL.

    libpq reports the server's refusal of a connection (a wrong password, no pg_hba.conf
    entry, an unknown role or database) as `connection to server at … failed: FATAL:  …`,
    and an address it could not reach without any server message.
    """
    return error.pgcode is not None or "FATAL:" in str(error)


# -- the JSON document ----------------------------------------------------------------------


def _lsn(value: int | None) -> str | None:
    return None if value is None else format_lsn(value)


def _time(us: int | None) -> str | None:
    if us is None:
        return None
    return datetime.fromtimestamp(us / 1e6, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def as_json(status: Status) -> dict[str, Any]:
    """The documented JSON document (docs/operations.md, "replicator status --json")."""
    usage = status.usage
    slot = usage.slot if usage is not None else None
    seconds, basis = status.lag_seconds
    checkpoint = status.checkpoint
    return {
        "format": FORMAT,
        "outcome": status.outcome,
        "exit_code": status.exit_code,
        "checked_at": status.checked_at.isoformat(timespec="microseconds").replace("+00:00", "Z"),
        "namespace": status.namespace,
        "slot_name": status.slot_name,
        "publication": status.publication,
        "postgres": {
            "reachable": status.postgres_error is None,
            "refused": status.postgres_refused,
            "error": status.postgres_error,
            "current_wal_lsn": _lsn(usage.current_wal_lsn) if usage else None,
            "max_slot_wal_keep_size_bytes": usage.max_slot_wal_keep_size if usage else None,
        },
        "slot": None
        if slot is None or usage is None
        else {
            "plugin": slot.plugin,
            "active": slot.active,
            "active_pid": slot.active_pid,
            "restart_lsn": _lsn(slot.restart_lsn),
            "confirmed_flush_lsn": _lsn(slot.confirmed_flush_lsn),
            "wal_status": slot.wal_status,
            "safe_wal_size_bytes": slot.safe_wal_size,
            "retained_wal_bytes": usage.retained_bytes,
        },
        "redis": {
            "reachable": status.redis_error is None,
            "refused": status.redis_refused,
            "error": status.redis_error,
        },
        "checkpoint": None
        if checkpoint is None
        else {
            "lsn": format_lsn(checkpoint.lsn),
            "commit_time": _time(checkpoint.commit_time_us),
            "source_time": _time(checkpoint.covered_until_us),
        },
        "lag": {"bytes": status.lag_bytes, "seconds": seconds, "seconds_basis": basis},
        "lock": {
            "key": status.lock_key,
            "owner": status.lock.token if status.lock else None,
            "ttl_seconds": status.lock.ttl_ms / 1000
            if status.lock is not None and status.lock.ttl_ms is not None
            else None,
        },
    }


# -- the table ------------------------------------------------------------------------------


def size(value: int | None, exact: bool = False) -> str:
    """Bytes for a person: "1.5 GiB", or with `exact` "1.5 GiB (1,610,612,736 bytes)"; "unknown" for None."""
    if value is None:
        return "unknown"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(amount) < 1024 or unit == "TiB":
            break
        amount /= 1024
    if unit == "B":
        return f"{value} B"
    return f"{amount:.1f} {unit}" + (f" ({value:,} bytes)" if exact else "")


def duration(seconds: float | None) -> str:
    """Seconds for a person: "0 s", "4.2 s", "3 min 5 s", "2 h 10 min"."""
    if seconds is None:
        return "unknown"
    if seconds < 60:
        return "0 s" if seconds == 0 else f"{seconds:.1f} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s"
    return f"{whole // 3600} h {whole % 3600 // 60} min"


def table(status: Status) -> str:
    """The human form: one line per fact, the outcome last."""
    rows = [("namespace", status.namespace)]
    usage = status.usage
    if status.postgres_error is not None:
        failed = "refused" if status.postgres_refused else "not reached"
        rows += [("slot", f"{status.slot_name}: PostgreSQL {failed} ({status.postgres_error})")]
    elif usage is not None and usage.slot is None:
        rows += [
            ("slot", f"{status.slot_name}: MISSING (the replicator rebuilds the read models when it starts)")
        ]
    elif usage is not None and usage.slot is not None:
        slot = usage.slot
        state = (
            f"active (walsender pid {slot.active_pid})"
            if slot.active
            else "INACTIVE (no consumer streams it)"
        )
        rows += [
            ("slot", f"{status.slot_name} ({slot.plugin}), {state}"),
            ("confirmed position", _lsn(slot.confirmed_flush_lsn) or "none"),
            ("WAL retained", size(usage.retained_bytes, exact=True)),
            ("wal_status", _wal_status(slot.wal_status, slot.safe_wal_size, usage.max_slot_wal_keep_size)),
        ]
    if usage is not None:
        rows.append(("source position", format_lsn(usage.current_wal_lsn)))
    checkpoint = status.checkpoint
    if status.redis_error is not None:
        failed = "refused" if status.redis_refused else "not reached"
        rows.append(("checkpoint (Redis)", f"Redis {failed} ({status.redis_error})"))
    elif checkpoint is None:
        rows.append(("checkpoint (Redis)", "none (the read models are not built)"))
    else:
        committed = _time(checkpoint.commit_time_us)
        rows.append(
            (
                "checkpoint (Redis)",
                format_lsn(checkpoint.lsn) + (f", last commit {committed}" if committed else ""),
            )
        )
    seconds, basis = status.lag_seconds
    if status.lag_bytes is None:
        rows.append(("lag", "unknown"))
    elif basis == CAUGHT_UP:
        rows.append(("lag", "0 B, 0 s (caught up)"))
    elif basis == SOURCE_TIME:
        rows.append(
            (
                "lag",
                f"{size(status.lag_bytes, exact=True)}, at most {duration(seconds)} (by the source's clock)",
            )
        )
    else:
        rows.append(
            ("lag", f"{size(status.lag_bytes, exact=True)}, seconds unknown (no source time recorded yet)")
        )
    lock = status.lock
    if status.redis_error is None and lock is not None:
        owner = "NOBODY (no replicator holds the lock)" if lock.token is None else lock.token
        if lock.token is not None and lock.ttl_ms is not None:
            owner += f" (expires in {lock.ttl_ms / 1000:.1f} s unless renewed)"
        rows.append(("lock owner", owner))
    rows.append(("outcome", f"{status.outcome} (exit status {status.exit_code})"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def _wal_status(wal_status: str | None, safe: int | None, cap: int | None) -> str:
    text = wal_status or "unknown"
    if wal_status == "lost":
        return text + " (the slot was invalidated: the replicator rebuilds the read models when it starts)"
    if cap is None:
        return text + " (no max_slot_wal_keep_size: the slot may keep WAL until the disk is full)"
    return text + f"; {size(safe)} more WAL before the slot is lost (max_slot_wal_keep_size {size(cap)})"
