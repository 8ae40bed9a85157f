"""Compares every source row with its read model in Redis and lists the differences.

It copes with writes still arriving: it reads the source in one REPEATABLE READ
transaction, notes the WAL position just before (`low`) and at (`high`) the snapshot,
waits until the replicator's checkpoint reaches `high`, and ignores keys last written
above `low`, whose state may be newer than the snapshot.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg2
import redis

from payments.readmodel.v1 import read_model_pb2
from payments_common.keys import KeySchema
from payments_common.lsn import format_lsn, parse_lsn
from replicator.config import Settings
from replicator.projector import (
    ACCOUNTS,
    PAYMENT_EVENTS,
    PAYMENTS,
    Projector,
    RowChange,
    SetIndexes,
    UpsertTimeline,
    UpsertView,
)
from replicator.source import SESSION_OPTIONS

_ENTITY = re.compile(r"\{([^}]*)\}")


class ReconcileError(RuntimeError):
    """The comparison could not be made (e.g. the checkpoint never reached the snapshot)."""


@dataclass
class Report:
    differences: list[str] = field(default_factory=list)
    checked: int = 0
    in_flight: int = 0
    snapshot_lsn: int = 0
    checkpoint_lsn: int = 0
    max_printed: int = 100

    @property
    def clean(self) -> bool:
        return not self.differences

    def lines(self) -> Iterator[str]:
        yield from self.differences[: self.max_printed]
        if len(self.differences) > self.max_printed:
            yield f"... and {len(self.differences) - self.max_printed} more"
        yield (
            f"{len(self.differences)} differences; {self.checked} keys checked, {self.in_flight} skipped as newer "
            f"than the snapshot; snapshot at {format_lsn(self.snapshot_lsn)}, "
            f"checkpoint at {format_lsn(self.checkpoint_lsn)}"
        )


def _entity(key: str) -> str:
    found = _ENTITY.search(key)
    return found.group(1) if found else ""


def _read_source(dsn: str, projector: Projector) -> tuple[int, int, list[RowChange]]:
    connection = psycopg2.connect(dsn, application_name="replicator-reconcile", options=SESSION_OPTIONS)
    try:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_current_wal_lsn()::text")
            low = parse_lsn(cursor.fetchone()[0])  # type: ignore[index]
        connection.autocommit = False
        connection.set_session(isolation_level="REPEATABLE READ", readonly=True)
        rows: list[RowChange] = []
        with connection.cursor() as cursor:
            # The first statement takes the snapshot; every commit in it ends at or below `high`.
            cursor.execute("SELECT pg_current_wal_lsn()::text")
            high = parse_lsn(cursor.fetchone()[0])  # type: ignore[index]
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
        return low, high, rows
    finally:
        connection.close()


def _wait_for_checkpoint(client: redis.Redis, key: str, target: int, wait_seconds: float) -> int:
    deadline = time.monotonic() + wait_seconds
    while True:
        raw = client.hget(key, "lsn")
        current = int(raw) if raw is not None else 0
        if current >= target:
            return current
        if time.monotonic() >= deadline:
            raise ReconcileError(
                f"the checkpoint {format_lsn(current)} did not reach the snapshot {format_lsn(target)} "
                f"within {wait_seconds:.0f}s; is the replicator running?"
            )
        time.sleep(0.05)


def _scan_hashes(client: redis.Redis, pattern: str, fields: list[str]) -> dict[str, list[bytes | None]]:
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


def compare(client: redis.Redis, schema: KeySchema, rows: list[RowChange], low: int, report: Report) -> None:
    """Adds to `report` every difference between the read models implied by `rows` and Redis."""
    projector = Projector(schema)
    expected_views: dict[str, UpsertView] = {}
    expected_timeline: dict[str, dict[str, bytes]] = defaultdict(dict)
    expected_index: dict[str, set[str]] = defaultdict(set)
    for row in rows:
        for op in projector.project(row):
            if isinstance(op, UpsertView):
                expected_views[op.key] = op
            elif isinstance(op, UpsertTimeline):
                expected_timeline[op.timeline_key][str(op.sequence)] = op.entry.SerializeToString()
            elif isinstance(op, SetIndexes):
                for key in op.add:
                    expected_index[key].add(op.member)
    ns = schema.namespace
    stored = _scan_hashes(client, f"{ns}:payment:{{*}}", ["lsn", "view"])
    stored.update(_scan_hashes(client, f"{ns}:account:{{*}}", ["lsn", "view"]))
    for key in sorted(set(expected_views) | set(stored)):
        lsn_raw, view_raw = stored.get(key, [None, None])
        report.checked += 1
        if lsn_raw is not None and int(lsn_raw) > low:
            report.in_flight += 1
            continue
        expected = expected_views.get(key)
        if expected is None:
            if view_raw is not None:
                report.differences.append(f"{key}: in Redis but not in the source")
            continue
        if view_raw is None:
            report.differences.append(f"{key}: missing in Redis")
            continue
        actual = type(expected.view).FromString(view_raw)
        wanted = type(expected.view).FromString(expected.view.SerializeToString())
        actual.source_lsn = wanted.source_lsn = 0
        if actual != wanted:
            report.differences.append(f"{key}: differs: expected {_short(wanted)} got {_short(actual)}")

    # Timelines: each entry carries its position in the payment hash (field tl:<sequence>).
    timeline_keys = {_text(raw) for raw in client.scan_iter(match=f"{ns}:payment:*:timeline", count=1000)}
    for key in sorted(timeline_keys | set(expected_timeline)):
        actual_entries = {_text(f): v for f, v in client.hgetall(key).items()}
        wanted_entries = expected_timeline.get(key, {})
        payment_key = schema.payment(_entity(key))
        for sequence in sorted(set(actual_entries) | set(wanted_entries), key=int):
            report.checked += 1
            position = client.hget(payment_key, f"tl:{sequence}")
            if position is not None and int(position) > low:
                report.in_flight += 1
                continue
            if actual_entries.get(sequence) != wanted_entries.get(sequence):
                state = (
                    "missing in Redis"
                    if sequence not in actual_entries
                    else "in Redis but not in the source"
                    if sequence not in wanted_entries
                    else "differs"
                )
                report.differences.append(f"{key} entry {sequence}: {state}")

    # Indexes: membership must match exactly, except for payments written above `low`.
    index_keys = {_text(raw) for raw in client.scan_iter(match=f"{ns}:account:*:idx:*", count=1000)}
    versions: dict[str, dict[str, int]] = {}
    for key in sorted(index_keys | set(expected_index)):
        account_id = _entity(key)
        if account_id not in versions:
            raw_versions = client.hgetall(schema.account_index_versions(account_id))
            versions[account_id] = {_text(f): int(v) for f, v in raw_versions.items()}
        actual_members = {_text(m) for m in client.zrange(key, 0, -1)}
        wanted_members = expected_index.get(key, set())
        report.checked += 1
        for member in sorted(actual_members ^ wanted_members):
            payment_id = member.partition(":")[2]
            if versions[account_id].get(payment_id, 0) > low:
                report.in_flight += 1
                continue
            state = "missing from" if member in wanted_members else "extra in"
            report.differences.append(f"{key}: payment {payment_id} {state} the index")


def _short(view: read_model_pb2.PaymentView | read_model_pb2.AccountView) -> str:
    return str(view).replace("\n", " ")[:300]


def reconcile(settings: Settings, wait_seconds: float = 30.0, max_printed: int = 100) -> Report:
    schema = KeySchema(settings.namespace)
    projector = Projector(schema)
    low, high, rows = _read_source(settings.database_url, projector)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        report = Report(snapshot_lsn=high, max_printed=max_printed)
        report.checkpoint_lsn = _wait_for_checkpoint(
            client, schema.checkpoint(settings.slot_name), high, wait_seconds
        )
        compare(client, schema, rows, low, report)
        return report
    finally:
        client.close()


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
