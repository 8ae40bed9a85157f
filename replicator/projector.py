"""The projection: a pure function from one source row change to the Redis writes of the read models.

Every write is a full upsert of an entity's state at a WAL position, never an increment,
so applying a change twice gives the same result and an older write never replaces a newer
one (the sink's scripts compare positions).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal

from google.protobuf.timestamp_pb2 import Timestamp

from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import money_pb2, payment_pb2
from payments_common.keys import DIRECTIONS, STATUS_NAMES, KeySchema, index_member
from replicator.decoder import UNCHANGED, Value

PAYMENTS: Final = "public.payments"
PAYMENT_EVENTS: Final = "public.payment_events"
ACCOUNTS: Final = "public.accounts"
TABLES: Final = (ACCOUNTS, PAYMENTS, PAYMENT_EVENTS)

View = read_model_pb2.PaymentView | read_model_pb2.AccountView


class ProjectionError(ValueError):
    """A row that cannot be projected (a required column missing or unchanged)."""


# RowChange and the ops made per change are plain dataclasses rather than frozen ones:
# a frozen dataclass's __init__ sets each field through object.__setattr__, a measurable
# cost at several objects per row change. Nothing mutates or hashes them.
@dataclass(slots=True)
class RowChange:
    """One row change of a published table, at the end position of its transaction."""

    table: str  # "schema.name"
    kind: Literal["insert", "update", "delete"]
    # The new row for insert and update; the old key (or old row) for delete.
    row: Mapping[str, Value]
    lsn: int


@dataclass(slots=True)
class UpsertView:
    """Store `view` in the entity hash `key` unless the hash holds a newer position.

    `keep` names view fields whose source column was not sent (unchanged TOAST): the sink
    copies them from the stored view.
    """

    key: str
    lsn: int
    view: View
    keep: tuple[str, ...] = ()


@dataclass(slots=True)
class DeleteView:
    """Remove the view of `key`, keeping its position as a tombstone."""

    key: str
    lsn: int


@dataclass(slots=True)
class SetIndexes:
    """Set the index membership of one payment in one account's indexes."""

    versions_key: str
    payment_id: str
    lsn: int
    member: str
    add: tuple[str, ...]
    remove: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class UnindexPayment:
    """Remove a deleted payment from its accounts' indexes; the sink finds them in the stored view."""

    payment_id: str
    lsn: int


@dataclass(slots=True)
class UpsertTimeline:
    """Store one timeline entry of a payment unless a newer write of that entry exists."""

    payment_key: str
    timeline_key: str
    payment_id: str
    sequence: int
    lsn: int
    entry: read_model_pb2.TimelineEntry
    keep: tuple[str, ...] = ()


@dataclass(slots=True)
class DeleteTimeline:
    payment_key: str
    timeline_key: str
    sequence: int
    lsn: int


@dataclass(frozen=True, slots=True)
class TruncateTables:
    """Every row of these tables was removed."""

    tables: tuple[str, ...]
    lsn: int


Op = UpsertView | DeleteView | SetIndexes | UnindexPayment | UpsertTimeline | DeleteTimeline | TruncateTables

_STATUSES: Final = (
    payment_pb2.PAYMENT_STATUS_APPROVED,
    payment_pb2.PAYMENT_STATUS_DECLINED,
    payment_pb2.PAYMENT_STATUS_PENDING_REVIEW,
)


def parse_timestamp_us(text: str) -> int:
    """Microseconds since the Unix epoch of a timestamptz in PostgreSQL's ISO text form."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise ProjectionError(f"timestamp without a time zone: {text!r}")
    delta = moment - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


_EPOCH: Final = datetime.fromisoformat("1970-01-01T00:00:00+00:00")


def timestamp(us: int) -> Timestamp:
    seconds, micros = divmod(us, 1_000_000)
    return Timestamp(seconds=seconds, nanos=micros * 1000)


def payment_status(text: str) -> int:
    """PAYMENT_STATUS_<text>, or UNSPECIFIED for a value this version does not know."""
    return _PAYMENT_STATUS.get(text, payment_pb2.PAYMENT_STATUS_UNSPECIFIED)


def decline_reason(text: str | None) -> int:
    if text is None:
        return payment_pb2.DECLINE_REASON_UNSPECIFIED
    return _DECLINE_REASON.get(text, payment_pb2.DECLINE_REASON_UNSPECIFIED)


_PAYMENT_STATUS: Final = {
    name.removeprefix("PAYMENT_STATUS_"): number for name, number in payment_pb2.PaymentStatus.items()
}
_DECLINE_REASON: Final = {
    name.removeprefix("DECLINE_REASON_"): number for name, number in payment_pb2.DeclineReason.items()
}
_ACCOUNT_STATUS: Final = {
    name.removeprefix("ACCOUNT_STATUS_"): number for name, number in payment_pb2.AccountStatus.items()
}


class _Row:
    """Typed access to a row's text values; collects the text columns that were not sent."""

    def __init__(self, table: str, row: Mapping[str, Value]) -> None:
        self.table = table
        self.row = row
        self.unchanged: list[str] = []

    def _value(self, column: str) -> Value:
        try:
            return self.row[column]
        except KeyError:
            raise ProjectionError(f"{self.table}: column {column!r} missing") from None

    # The accessors read the mapping directly and check the common case first: they run
    # for every column of every projected row.
    def text(self, column: str) -> str:
        value = self.row.get(column, _MISSING)
        if type(value) is str:
            return value
        if value is UNCHANGED:
            self.unchanged.append(column)
            return ""
        self._value(column)
        raise ProjectionError(f"{self.table}.{column}: expected text, got {value!r}")

    def required(self, column: str) -> str:
        value = self.row.get(column, _MISSING)
        if type(value) is str:
            return value
        self._value(column)
        raise ProjectionError(f"{self.table}.{column}: expected a value, got {value!r}")

    def optional(self, column: str) -> str | None:
        value = self.row.get(column, _MISSING)
        if value is None or type(value) is str:
            return value
        self._value(column)
        raise ProjectionError(f"{self.table}.{column}: expected text or NULL, got {value!r}")

    def integer(self, column: str) -> int:
        return int(self.required(column))

    def time_us(self, column: str) -> int:
        return parse_timestamp_us(self.required(column))


_MISSING: Final = object()


# The primary key of each published table (taken from the schema, not from the replica
# identity flags, which mark every column under REPLICA IDENTITY FULL).
KEY_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    ACCOUNTS: ("account_id",),
    PAYMENTS: ("payment_id",),
    PAYMENT_EVENTS: ("payment_id", "sequence"),
}


class RowBatch:
    """The row changes of whole transactions, keeping only the last change of each row.

    Every view is a function of its row, so only a row's last state in a batch needs
    projecting. A delete followed by an insert of the same key keeps both, in order. An
    unchanged (TOAST) column takes its value from the row's earlier change in the batch.
    A truncate is a barrier: what came before it is projected before it.
    """

    def __init__(self) -> None:
        self._segments: list[
            tuple[list[RowChange], dict[tuple[str, ...], RowChange], TruncateTables | None]
        ] = []
        self._new_segment()
        self.changes = 0

    def _new_segment(self) -> None:
        self._early: list[RowChange] = []
        self._latest: dict[tuple[str, ...], RowChange] = {}
        self._segments.append((self._early, self._latest, None))

    def add(self, change: RowChange) -> None:
        self.changes += 1
        columns = KEY_COLUMNS.get(change.table)
        if columns is None:
            return
        row = change.row
        if len(columns) == 1:
            key: tuple[str, ...] = (change.table, str(row.get(columns[0])))
        else:
            key = (change.table, *[str(row.get(c)) for c in columns])
        previous = self._latest.get(key)
        if previous is not None:
            if previous.kind == "delete":
                if change.kind != "delete":
                    self._early.append(previous)
            # `in` compares by identity first; no text or bytes value equals UNCHANGED.
            elif change.kind != "delete" and UNCHANGED in row.values():
                merged = {
                    name: previous.row.get(name, value) if value is UNCHANGED else value
                    for name, value in change.row.items()
                }
                change = RowChange(change.table, change.kind, merged, change.lsn)
            del self._latest[key]
        self._latest[key] = change

    def truncate(self, tables: tuple[str, ...], lsn: int) -> None:
        published = tuple(table for table in tables if table in TABLES)
        if not published:
            return
        early, latest, _ = self._segments[-1]
        self._segments[-1] = (early, latest, TruncateTables(published, lsn))
        self._new_segment()

    def project(self, projector: Projector) -> list[Op]:
        ops: list[Op] = []
        for early, latest, truncate in self._segments:
            for change in early:
                ops.extend(projector.project(change))
            for change in latest.values():
                ops.extend(projector.project(change))
            if truncate is not None:
                ops.append(truncate)
        return ops


INDEX_CACHE_ENTRIES: Final = 65_536


class Projector:
    """Maps row changes of the published tables to read-model writes under one key schema."""

    def __init__(self, schema: KeySchema) -> None:
        self.schema = schema
        # (account, directions, status) -> (add, remove): the same few keys for every payment
        # of an account, so they are formatted once. Cleared when large, to bound memory.
        self._index_cache: dict[
            tuple[str, tuple[str, ...], int], tuple[tuple[str, ...], tuple[str, ...]]
        ] = {}

    def project(self, change: RowChange) -> list[Op]:
        if change.table == PAYMENTS:
            if change.kind == "delete":
                payment_id = _Row(change.table, change.row).required("payment_id")
                # Unindex first: the sink finds the accounts in the view that the delete removes.
                return [
                    UnindexPayment(payment_id, change.lsn),
                    DeleteView(self.schema.payment(payment_id), change.lsn),
                ]
            return self._payment(change)
        if change.table == PAYMENT_EVENTS:
            return [self._timeline(change)]
        if change.table == ACCOUNTS:
            if change.kind == "delete":
                account_id = _Row(change.table, change.row).required("account_id")
                return [DeleteView(self.schema.account(account_id), change.lsn)]
            return [self._account(change)]
        return []

    def truncate(self, tables: tuple[str, ...], lsn: int) -> list[Op]:
        published = tuple(table for table in tables if table in TABLES)
        return [TruncateTables(published, lsn)] if published else []

    def _payment(self, change: RowChange) -> list[Op]:
        row = _Row(change.table, change.row)
        payment_id = row.required("payment_id")
        status = payment_status(row.required("status"))
        created_us = row.time_us("created_at")
        view = read_model_pb2.PaymentView(
            payment_id=payment_id,
            payer_account_id=row.required("payer_account_id"),
            payer_name=row.text("payer_name"),
            payee_account_id=row.required("payee_account_id"),
            payee_name=row.text("payee_name"),
            amount=money_pb2.Money(
                currency_code=row.required("currency_code"), amount_minor=row.integer("amount_minor")
            ),
            reference=row.text("reference"),
            status=status,  # type: ignore[arg-type]
            decline_reason=decline_reason(row.optional("decline_reason")),  # type: ignore[arg-type]
            create_time=timestamp(created_us),
            update_time=timestamp(row.time_us("updated_at")),
            source_lsn=change.lsn,
        )
        ops: list[Op] = [UpsertView(self.schema.payment(payment_id), change.lsn, view, tuple(row.unchanged))]
        member = index_member(created_us, payment_id)
        payer, payee = view.payer_account_id, view.payee_account_id
        roles: dict[str, tuple[str, ...]] = (
            {payer: ("sent",)} if payer != payee else {payer: ("sent", "received")}
        )
        if payee != payer:
            roles[payee] = ("received",)
        for account_id, directions in roles.items():
            add, remove = self._index_keys(account_id, (*directions, "all"), status)
            if change.kind == "insert":
                # A new row is in no index yet (a deleted one was removed from all of them).
                remove = ()
            ops.append(
                SetIndexes(
                    self.schema.account_index_versions(account_id),
                    payment_id,
                    change.lsn,
                    member,
                    add,
                    remove,
                )
            )
        return ops

    def _index_keys(
        self, account_id: str, directions: tuple[str, ...], status: int
    ) -> tuple[tuple[str, ...], tuple[str, ...]]:
        cache_key = (account_id, directions, status)
        cached = self._index_cache.get(cache_key)
        if cached is not None:
            return cached
        if len(self._index_cache) >= INDEX_CACHE_ENTRIES:
            self._index_cache.clear()
        add: list[str] = []
        remove: list[str] = []
        for direction in directions:
            add.append(
                self.schema.account_index(account_id, direction, payment_pb2.PAYMENT_STATUS_UNSPECIFIED)
            )
            for candidate in _STATUSES:
                key = self.schema.account_index(account_id, direction, candidate)
                (add if candidate == status else remove).append(key)
        result = (tuple(add), tuple(remove))
        self._index_cache[cache_key] = result
        return result

    def all_index_keys(self, account_id: str) -> tuple[str, ...]:
        """Every index key of an account, for removing a payment from all of them."""
        return tuple(
            self.schema.account_index(account_id, direction, status)
            for direction in DIRECTIONS
            for status in STATUS_NAMES
        )

    def _timeline(self, change: RowChange) -> Op:
        row = _Row(change.table, change.row)
        payment_id = row.required("payment_id")
        sequence = row.integer("sequence")
        payment_key = self.schema.payment(payment_id)
        timeline_key = self.schema.payment_timeline(payment_id)
        if change.kind == "delete":
            return DeleteTimeline(payment_key, timeline_key, sequence, change.lsn)
        entry = read_model_pb2.TimelineEntry(
            sequence=sequence,
            status=payment_status(row.required("status")),  # type: ignore[arg-type]
            decline_reason=decline_reason(row.optional("decline_reason")),  # type: ignore[arg-type]
            actor=row.text("actor"),
            note=row.text("note"),
            event_time=timestamp(row.time_us("created_at")),
        )
        return UpsertTimeline(
            payment_key, timeline_key, payment_id, sequence, change.lsn, entry, tuple(row.unchanged)
        )

    def _account(self, change: RowChange) -> Op:
        row = _Row(change.table, change.row)
        account_id = row.required("account_id")
        currency = row.required("currency_code")
        ledger = row.integer("ledger_balance_minor")

        def money(amount: int) -> money_pb2.Money:
            return money_pb2.Money(currency_code=currency, amount_minor=amount)

        view = read_model_pb2.AccountView(
            account_id=account_id,
            owner_name=row.text("owner_name"),
            currency_code=currency,
            status=_ACCOUNT_STATUS.get(row.required("status"), payment_pb2.ACCOUNT_STATUS_UNSPECIFIED),  # type: ignore[arg-type]
            ledger_balance=money(ledger),
            available_balance=money(ledger - row.integer("held_minor")),
            total_sent=money(row.integer("total_sent_minor")),
            total_received=money(row.integer("total_received_minor")),
            counts=read_model_pb2.PaymentCounts(
                sent_approved=row.integer("sent_approved"),
                sent_declined=row.integer("sent_declined"),
                sent_pending_review=row.integer("sent_pending_review"),
                received_approved=row.integer("received_approved"),
                received_declined=row.integer("received_declined"),
                received_pending_review=row.integer("received_pending_review"),
            ),
            per_payment_limit=money(row.integer("per_payment_limit_minor")),
            daily_limit=money(row.integer("daily_limit_minor")),
            create_time=timestamp(row.time_us("created_at")),
            update_time=timestamp(row.time_us("updated_at")),
            source_lsn=change.lsn,
        )
        return UpsertView(self.schema.account(account_id), change.lsn, view, tuple(row.unchanged))
