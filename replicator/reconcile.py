"""Compares every source row with its read model in Redis and lists the differences.

What the two sides cover, exactly, while writes go on:

- PostgreSQL: a snapshot exported by a temporary logical replication slot. Its consistent
  point `P` (the end of a running-transactions record) splits the WAL exactly: a
  transaction is visible in the snapshot if and only if its commit record starts before
  `P` (so ends at or before it). A snapshot taken with `pg_current_wal_lsn()` beside it
  has no such bound: a commit record can be flushed, and streamed to the replicator,
  while the transaction is not yet visible (it waits for a synchronous standby, or has
  not left the process array), and a visible one can end after a position read earlier.
- Redis: once the checkpoint is at or past `P`, every transaction that commits before
  `P` is applied. An entity (a view, a timeline entry, an index or queue membership) whose
  position is below `P` was last written by a transaction visible in the snapshot (its
  position is the start or the end of its commit record), so it must equal the snapshot
  exactly; one at or above `P` was written by a later transaction, and the snapshot says
  nothing about it (it is counted as in flight, not compared).
- Something the snapshot has and Redis lacks, or that Redis holds without a position,
  may have been removed by a TRUNCATE or a rebuild after the snapshot (they remove keys
  and leave no position, except a truncate of the events, which leaves the timeline
  positions); it is checked again against a newer snapshot, and reported only if it
  still differs after the last round.

Each item is read from Redis in one command, or its entries before their positions, so
a write between two reads can only make an item look newer (skipped), never older.
"""

from __future__ import annotations

import re
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg2
import psycopg2.errors
import psycopg2.extensions
import psycopg2.extras
import redis
from psycopg2 import sql

from payments.readmodel.v1 import read_model_pb2
from payments_common import keys
from payments_common.keys import KeySchema
from payments_common.lsn import format_lsn, parse_lsn
from payments_common.redisconn import SyncClient, sync_client
from replicator.changes import ACCOUNTS, PAYMENT_EVENTS, PAYMENTS, RowChange
from replicator.config import Settings
from replicator.ops import SetIndexes, UpsertTimeline, UpsertView
from replicator.projector import Projector
from replicator.source import SESSION_OPTIONS

_ENTITY = re.compile(r"\{([^}]*)\}")

# One compared item: (key, "") for a view, (timeline key, sequence), (index key, member).
Item = tuple[str, str]


class ReconcileError(RuntimeError):
    """The comparison could not be made (e.g. the checkpoint never reached the snapshot)."""


@dataclass
class Report:
    differences: list[str] = field(default_factory=list)
    # What was not compared, and why (a read model the namespace was built without).
    not_compared: list[str] = field(default_factory=list)
    checked: int = 0
    in_flight: int = 0
    snapshot_lsn: int = 0
    checkpoint_lsn: int = 0
    rounds: int = 0
    max_printed: int = 100

    @property
    def clean(self) -> bool:
        return not self.differences

    def lines(self) -> Iterator[str]:
        yield from self.differences[: self.max_printed]
        if len(self.differences) > self.max_printed:
            yield f"... and {len(self.differences) - self.max_printed} more"
        yield from self.not_compared
        yield (
            f"{len(self.differences)} differences; {self.checked} items checked, {self.in_flight} skipped as "
            f"written at or after the snapshot; snapshot at {format_lsn(self.snapshot_lsn)}, "
            f"checkpoint at {format_lsn(self.checkpoint_lsn)}, {self.rounds} round(s)"
        )


@dataclass(frozen=True)
class Snapshot:
    """Every source row as of `position`: visible iff its commit record starts before it."""

    position: int
    rows: list[RowChange]


def _entity(key: str) -> str:
    found = _ENTITY.search(key)
    return found.group(1) if found else ""


def _take_snapshot(replication: psycopg2.extensions.connection, deadline: float) -> tuple[int, str]:
    """Creates a temporary slot and exports its snapshot: (consistent point, snapshot name).

    The slot waits for the transactions running when it starts to end; the wait is
    cancelled at `deadline`. The slot goes when the connection closes.
    """
    slot = f"reconcile_{uuid.uuid4().hex[:20]}"
    if replication.server_version >= 150000:
        command = "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput (SNAPSHOT 'export')"
    else:
        command = "CREATE_REPLICATION_SLOT {} TEMPORARY LOGICAL pgoutput EXPORT_SNAPSHOT"
    timer = threading.Timer(max(deadline - time.monotonic(), 0.0), replication.cancel)
    timer.start()
    try:
        with replication.cursor() as cursor:
            cursor.execute(sql.SQL(command).format(sql.Identifier(slot)))
            row = cursor.fetchone()
    except psycopg2.errors.QueryCanceled:
        raise ReconcileError(
            "no snapshot in time: a transaction that was running when reconcile started did not end"
        ) from None
    except psycopg2.Error as error:
        # E.g. every replication slot or WAL sender in use, or no REPLICATION attribute.
        raise ReconcileError(f"could not create a temporary replication slot: {error}") from None
    finally:
        timer.cancel()
    assert row is not None
    _, consistent_point, snapshot_name, _ = row
    return parse_lsn(consistent_point), str(snapshot_name)


def read_source(dsn: str, deadline: float) -> Snapshot:
    replication = psycopg2.connect(
        dsn,
        connection_factory=psycopg2.extras.LogicalReplicationConnection,
        application_name="replicator-reconcile",
    )
    try:
        position, snapshot_name = _take_snapshot(replication, deadline)
        connection = psycopg2.connect(dsn, application_name="replicator-reconcile", options=SESSION_OPTIONS)
        try:
            connection.set_session(isolation_level="REPEATABLE READ", readonly=True)
            rows: list[RowChange] = []
            with connection.cursor() as cursor:
                # Must be the transaction's first statement; the exported snapshot lives
                # until the replication connection runs its next command.
                cursor.execute("SET TRANSACTION SNAPSHOT %s", (snapshot_name,))
                for table in (ACCOUNTS, PAYMENTS, PAYMENT_EVENTS):
                    schema, name = table.split(".")
                    cursor.execute(
                        "SELECT array_agg(attname::text ORDER BY attnum) FROM pg_attribute "
                        "WHERE attrelid = format('%%I.%%I', %s, %s)::regclass AND attnum > 0 AND NOT attisdropped",
                        (schema, name),
                    )
                    columns: list[str] = cursor.fetchone()[0]  # type: ignore[index]
                    select = ", ".join(f'"{c}"::text' for c in columns)
                    cursor.execute(f'SELECT {select} FROM "{schema}"."{name}"')
                    for values in cursor.fetchall():
                        rows.append(RowChange(table, "insert", dict(zip(columns, values, strict=True)), 0))
            connection.rollback()
        finally:
            connection.close()
        return Snapshot(position, rows)
    finally:
        replication.close()


def _wait_for_checkpoint(
    client: SyncClient, key: str, target: int, deadline: float, wait_seconds: float
) -> int:
    while True:
        raw = client.hget(key, keys.CHECKPOINT_LSN_FIELD)
        current = int(raw) if raw is not None else 0
        if current >= target:
            return current
        if time.monotonic() >= deadline:
            raise ReconcileError(
                f"the checkpoint {format_lsn(current)} did not reach the snapshot {format_lsn(target)} "
                f"within {wait_seconds:.0f}s; is the replicator running?"
            )
        time.sleep(0.05)


def _scan_hashes(client: SyncClient, pattern: str, fields: list[str]) -> dict[str, list[bytes | None]]:
    found: dict[str, list[bytes | None]] = {}
    batch: list[str] = []

    def fetch() -> None:
        with client.pipeline(transaction=False) as pipe:
            for key in batch:
                pipe.hmget(key, fields)
            for key, values in zip(batch, pipe.execute(), strict=True):
                found[key] = values
        batch.clear()

    for raw in client.scan_iter(match=pattern, count=1000):
        key = _text(raw)
        batch.append(key)
        if len(batch) >= 1000:
            fetch()
    if batch:
        fetch()
    return found


def compare(
    client: SyncClient,
    schema: KeySchema,
    snapshot: Snapshot,
    report: Report,
    only: set[Item] | None = None,
    review_queue: bool = True,
) -> dict[Item, str]:
    """Adds to `report` every difference between the read models implied by `snapshot` and Redis.

    Compares only the items in `only` when given, and the review queue (every held payment in
    it, nothing else) unless `review_queue` is False. Returns, with their difference, the
    items that Redis lacks, or holds without a position: a truncate or a rebuild after
    the snapshot removes keys that way (a truncate of the events leaves the timeline
    positions behind), so only a later snapshot can tell them from drift.
    """
    position = snapshot.position
    projector = Projector(schema)
    queue = schema.review_queue()
    expected_views: dict[str, UpsertView] = {}
    expected_timeline: dict[str, dict[str, bytes]] = defaultdict(dict)
    expected_index: dict[str, set[str]] = defaultdict(set)
    for row in snapshot.rows:
        for op in projector.project(row):
            if isinstance(op, UpsertView):
                expected_views[op.key] = op
            elif isinstance(op, UpsertTimeline):
                expected_timeline[op.timeline_key][str(op.sequence)] = op.entry.SerializeToString()
            elif isinstance(op, SetIndexes):
                for key in op.add:
                    if review_queue or key != queue:
                        expected_index[key].add(op.member)
    unresolved: dict[Item, str] = {}
    only_keys = None if only is None else {key for key, _ in only}

    def wanted(item: Item) -> bool:
        return only is None or item in only

    # Views: `lsn` and `view` come from one HMGET, so they belong to the same write.
    fields = [keys.LSN_FIELD, keys.VIEW_FIELD]
    stored = _scan_hashes(client, schema.payment_hashes_pattern(), fields)
    stored.update(_scan_hashes(client, schema.account_hashes_pattern(), fields))
    for key in sorted(set(expected_views) | set(stored)):
        if not wanted((key, "")):
            continue
        lsn_raw, view_raw = stored.get(key, [None, None])
        expected = expected_views.get(key)
        report.checked += 1
        if lsn_raw is None:
            if expected is not None:
                unresolved[(key, "")] = f"{key}: missing in Redis"
            continue
        if int(lsn_raw) >= position:
            report.in_flight += 1
            continue
        if expected is None:
            if view_raw is not None:
                report.differences.append(f"{key}: in Redis but not in the source")
            continue
        if view_raw is None:
            unresolved[(key, "")] = f"{key}: missing in Redis (deleted at {format_lsn(int(lsn_raw))})"
            continue
        actual = type(expected.view).FromString(view_raw)
        wanted_view = type(expected.view).FromString(expected.view.SerializeToString())
        actual.source_lsn = wanted_view.source_lsn = 0
        if actual != wanted_view:
            report.differences.append(f"{key}: differs: expected {_short(wanted_view)} got {_short(actual)}")

    # Timelines: the entries first, then their positions (field tl:<sequence> of the
    # payment hash, written in the same script): a position below the snapshot read after
    # an entry means no write at or above it came before the entry was read.
    timeline_keys = {
        _text(raw) for raw in client.scan_iter(match=schema.payment_timelines_pattern(), count=1000)
    }
    for key in sorted(timeline_keys | set(expected_timeline)):
        if only_keys is not None and key not in only_keys:
            continue
        actual_entries = {_text(f): v for f, v in client.hgetall(key).items()}
        wanted_entries = expected_timeline.get(key, {})
        sequences = [
            s for s in sorted(set(actual_entries) | set(wanted_entries), key=int) if wanted((key, s))
        ]
        if not sequences:
            continue
        positions = client.hmget(
            schema.payment(_entity(key)), [keys.timeline_position_field(s) for s in sequences]
        )
        for sequence, position_raw in zip(sequences, positions, strict=True):
            report.checked += 1
            actual_entry, wanted_entry = actual_entries.get(sequence), wanted_entries.get(sequence)
            if position_raw is not None and int(position_raw) >= position:
                report.in_flight += 1
                continue
            if actual_entry == wanted_entry:
                continue
            state = (
                "missing in Redis"
                if actual_entry is None
                else "in Redis but not in the source"
                if wanted_entry is None
                else "differs"
            )
            difference = f"{key} entry {sequence}: {state}"
            if position_raw is None or actual_entry is None:
                unresolved[(key, sequence)] = difference
            else:
                report.differences.append(difference)

    # Indexes and the review queue: the members first, then the versions (the position of
    # each payment's last write of the index or queue), for the same reason.
    index_keys = {_text(raw) for raw in client.scan_iter(match=schema.account_indexes_pattern(), count=1000)}
    if review_queue:
        index_keys.add(queue)
    for key in sorted(index_keys | set(expected_index)):
        if only_keys is not None and key not in only_keys:
            continue
        actual_members = {_text(m) for m in client.zrange(key, 0, -1)}
        wanted_members = expected_index.get(key, set())
        if only is None:
            report.checked += 1
        differing = [m for m in sorted(actual_members ^ wanted_members) if wanted((key, m))]
        if not differing:
            continue
        payment_ids = [member.partition(":")[2] for member in differing]
        versions_key = (
            schema.review_queue_versions() if key == queue else schema.account_index_versions(_entity(key))
        )
        versions = client.hmget(versions_key, payment_ids)
        for member, payment_id, version in zip(differing, payment_ids, versions, strict=True):
            if only is not None:
                report.checked += 1
            if version is not None and int(version) >= position:
                report.in_flight += 1
                continue
            state = "missing from" if member in wanted_members else "extra in"
            difference = f"{key}: payment {payment_id} {state} the {'queue' if key == queue else 'index'}"
            if version is None or member in wanted_members:
                unresolved[(key, member)] = difference
            else:
                report.differences.append(difference)
    return unresolved


def _short(view: read_model_pb2.PaymentView | read_model_pb2.AccountView) -> str:
    return str(view).replace("\n", " ")[:300]


def reconcile(
    settings: Settings, wait_seconds: float = 30.0, max_printed: int = 100, rounds: int = 3
) -> Report:
    """Compares PostgreSQL with Redis; each round waits at most `wait_seconds` for its snapshot and checkpoint.

    The first round compares everything; a further round, with a newer snapshot, looks
    again only at what Redis lacked without a trace.
    """
    schema = KeySchema.for_redis(settings.namespace, settings.slot_name, settings.cluster)
    report = Report(max_printed=max_printed)
    only: set[Item] | None = None
    client: SyncClient | None = None
    try:
        # A Redis that stops answering ends the run instead of hanging it (it restarts a replicator's
        # session). A cluster's client reads the topology as it is made: an error here is Redis's too.
        client = sync_client(settings.redis_url, socket_timeout=settings.redis_timeout_seconds)
        for round_ in range(1, rounds + 1):
            deadline = time.monotonic() + wait_seconds
            snapshot = read_source(settings.database_url, deadline)
            report.snapshot_lsn = snapshot.position
            report.checkpoint_lsn = _wait_for_checkpoint(
                client, schema.checkpoint(settings.slot_name), snapshot.position, deadline, wait_seconds
            )
            report.rounds = round_
            # A namespace built without the queue holds only what was held since a newer
            # replicator streamed into it: the queue is not served from it, nor compared.
            built = keys.parse_features(client.hget(schema.meta(), keys.META_FEATURES_FIELD))
            review_queue = keys.FEATURE_REVIEW_QUEUE in built
            if not review_queue and not report.not_compared:
                report.not_compared.append(
                    f"{schema.review_queue()}: not compared: the namespace was built without the review queue"
                )
            unresolved = compare(client, schema, snapshot, report, only, review_queue)
            if not unresolved:
                break
            if round_ == rounds:
                report.differences.extend(unresolved[item] for item in sorted(unresolved))
            only = set(unresolved)
        return report
    except redis.RedisError as error:
        # Exit status 1 means drift: a Redis that cannot be read is "could not compare".
        raise ReconcileError(f"could not read Redis: {type(error).__name__}: {error}") from None
    finally:
        if client is not None:
            client.close()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
