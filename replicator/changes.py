"""Decoded transactions as row changes, gathered into batches that keep each row's last state."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final

from replicator.decoder import UNCHANGED, Begin, RowKind, TupleData, Value

PAYMENTS: Final = "public.payments"
PAYMENT_EVENTS: Final = "public.payment_events"
ACCOUNTS: Final = "public.accounts"
TABLES: Final = (ACCOUNTS, PAYMENTS, PAYMENT_EVENTS)

# The primary key of each published table (taken from the schema, not from the replica
# identity flags, which mark every column under REPLICA IDENTITY FULL).
KEY_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    ACCOUNTS: ("account_id",),
    PAYMENTS: ("payment_id",),
    PAYMENT_EVENTS: ("payment_id", "sequence"),
}


# A plain dataclass rather than a frozen one: a frozen dataclass's __init__ sets each
# field through object.__setattr__, a measurable cost at one object per row change.
# Nothing mutates or hashes it.
@dataclass(slots=True)
class RowChange:
    """One row change of a published table, at its transaction's commit (a copied row: the snapshot's)."""

    table: str  # "schema.name"
    kind: RowKind
    # The new row for insert and update; the old key (or old row) for delete.
    row: Mapping[str, Value]
    lsn: int


@dataclass(frozen=True, slots=True)
class TruncateTables:
    """Every row of these published tables was removed."""

    tables: tuple[str, ...]
    lsn: int


@dataclass(frozen=True)
class Checkpoint:
    """Every source change at or below `lsn` is applied; `commit_time_us` is the last applied commit's time.

    `source_time_us` is the source's clock when its WAL ended at `lsn` (the walsender's
    send time of an idle position); without it, the commit time stands for it.
    """

    lsn: int
    commit_time_us: int | None
    source_time_us: int | None = None

    @property
    def covered_until_us(self) -> int | None:
        """Every transaction that committed before this source time is applied (None: unknown)."""
        return self.source_time_us if self.source_time_us is not None else self.commit_time_us


@dataclass
class Transaction:
    """One source transaction as it arrives: its row changes and truncates, until its commit.

    A large transaction is applied in chunks as it arrives (`chunked`, `chunks` count
    what was applied); `changes` holds what came since the last chunk.
    """

    begin: Begin
    # Its commit starts below the checkpoint: already applied, only read past.
    skip: bool
    # (table, kind, row) for a row change, its row as it arrived (TupleData) or decoded;
    # (tables, None, None) for a truncate.
    changes: list[tuple[str | tuple[str, ...], RowKind | None, TupleData | Mapping[str, Value] | None]] = (
        field(default_factory=list)
    )
    # The trace context that the transaction carried through the WAL (a traceparent), if any.
    trace: bytes | None = None
    # With tracing on, the payments its changes touched (kept across chunks), the first MAX_PAYMENT_IDS.
    payment_ids: dict[str, None] = field(default_factory=dict)
    payment_ids_cut: bool = False
    chunked: int = 0
    chunks: int = 0
    started: float = field(default_factory=time.monotonic)
    reported: float = field(default_factory=time.monotonic)

    def collect(self, batch: RowBatch, start: int = 0, stop: int | None = None) -> None:
        """Adds the changes held (or a slice of them) to `batch`, at the position of the transaction's commit.

        An entity's position is the start of the commit record (the same for every chunk
        of a transaction, so a replay rewrites them), which comes after every earlier
        commit and before every later one.
        """
        lsn = self.begin.final_lsn
        for table, kind, row in itertools.islice(self.changes, start, stop):
            if kind is None:
                assert isinstance(table, tuple)
                batch.truncate(table, lsn)
            else:
                assert isinstance(table, str)
                assert row is not None
                batch.add(table, kind, row, lsn)


class _Kept:
    """A row's change as a batch keeps it: its row decoded only when the batch is projected.

    `earlier` is the change of the same row that it replaced in the batch, from which its
    unchanged (TOAST) columns take their values.
    """

    __slots__ = ("earlier", "kind", "lsn", "row", "table")

    def __init__(
        self, table: str, kind: RowKind, row: TupleData | Mapping[str, Value], lsn: int, earlier: _Kept | None
    ) -> None:
        self.table = table
        self.kind = kind
        self.row = row
        self.lsn = lsn
        self.earlier = earlier

    def change(self) -> RowChange:
        """The change with its whole row: unchanged columns from the changes it replaced, the latest first."""
        rows: list[Mapping[str, Value]] = []
        kept: _Kept | None = self
        while kept is not None:
            row = kept.row.row() if type(kept.row) is TupleData else kept.row
            assert not isinstance(row, TupleData)
            rows.append(row)
            # `in` compares by identity first; no text or bytes value equals UNCHANGED.
            if UNCHANGED not in row.values():
                break
            kept = kept.earlier
        merged = rows.pop()
        for row in reversed(rows):
            merged = {
                name: merged.get(name, value) if value is UNCHANGED else value for name, value in row.items()
            }
        return RowChange(self.table, self.kind, merged, self.lsn)


@dataclass(slots=True)
class Segment:
    """Row changes to project in this order, then (unless None) a truncate that follows them."""

    early: list[_Kept]
    latest: dict[tuple[str, ...], _Kept]
    truncate: TruncateTables | None = None

    def rows(self) -> Iterator[RowChange]:
        for kept in self.early:
            yield kept.change()
        for kept in self.latest.values():
            yield kept.change()


class RowBatch:
    """The row changes of whole transactions, keeping only the last change of each row.

    Every view is a function of its row, so only a row's last state in a batch needs
    projecting, and only that state is decoded (a replaced change is read as far as its
    key). A delete followed by an insert of the same key keeps both, in order. An unchanged
    (TOAST) column takes its value from the row's earlier change in the batch. A truncate
    is a barrier: what came before it is projected before it.
    """

    def __init__(self) -> None:
        self.segments: list[Segment] = [Segment([], {})]
        self.changes = 0

    def add(self, table: str, kind: RowKind, row: TupleData | Mapping[str, Value], lsn: int) -> None:
        """Adds a row change of `table`, its row as it arrived or decoded, at position `lsn`."""
        self.changes += 1
        columns = KEY_COLUMNS.get(table)
        if columns is None:
            return
        if len(columns) == 1:
            key: tuple[str, ...] = (table, str(row.get(columns[0])))
        else:
            key = (table, *[str(row.get(c)) for c in columns])
        segment = self.segments[-1]
        previous = segment.latest.pop(key, None)
        earlier = None
        if previous is not None:
            if previous.kind == "delete":
                if kind != "delete":
                    segment.early.append(previous)
            elif kind != "delete":
                earlier = previous
        segment.latest[key] = _Kept(table, kind, row, lsn, earlier)

    def truncate(self, tables: tuple[str, ...], lsn: int) -> None:
        published = tuple(table for table in tables if table in TABLES)
        if not published:
            return
        self.segments[-1].truncate = TruncateTables(published, lsn)
        self.segments.append(Segment([], {}))
