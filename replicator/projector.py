"""The projection, a pure function: row changes of the published tables in, read-model writes out."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from datetime import datetime
from typing import Final

from google.protobuf.timestamp_pb2 import Timestamp

from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import payment_pb2
from payments_common.keys import DIRECTIONS, STATUS_NAMES, KeySchema, index_member
from replicator.changes import ACCOUNTS, PAYMENT_EVENTS, PAYMENTS, RowBatch, RowChange
from replicator.decoder import UNCHANGED, Value
from replicator.ops import (
    DeleteTimeline,
    DeleteView,
    Op,
    SetIndexes,
    UnindexPayment,
    UpsertTimeline,
    UpsertView,
)


class ProjectionError(ValueError):
    """A row that cannot be projected (a required column missing or unchanged)."""


_STATUSES: Final = (
    payment_pb2.PAYMENT_STATUS_APPROVED,
    payment_pb2.PAYMENT_STATUS_DECLINED,
    payment_pb2.PAYMENT_STATUS_PENDING_REVIEW,
)


# A transaction's rows share its now() (a payment's creation and update, its event, the
# accounts' update), and an account's creation time comes with each of its updates: most
# texts were parsed a moment before.
@functools.lru_cache(maxsize=4096)
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


# The views are built by their constructors from plain values, their sub-messages given as
# mappings: the constructor builds those in C, where a sub-message built first in Python
# would be built and then copied (about half an account view's cost).
def _timestamp_fields(us: int) -> dict[str, int]:
    seconds, micros = divmod(us, 1_000_000)
    return {"seconds": seconds, "nanos": micros * 1000}


def _money_fields(currency: str, amount: int) -> dict[str, str | int]:
    return {"currency_code": currency, "amount_minor": amount}


def payment_status(text: str) -> int:
    """PAYMENT_STATUS_<text>, or UNSPECIFIED for a value this version does not know."""
    return _PAYMENT_STATUS.get(text, payment_pb2.PAYMENT_STATUS_UNSPECIFIED)


def decline_reason(text: str | None) -> int:
    if text is None:
        return payment_pb2.DECLINE_REASON_UNSPECIFIED
    return _DECLINE_REASON.get(text, payment_pb2.DECLINE_REASON_UNSPECIFIED)


def hold_reason(text: str | None) -> int:
    """HOLD_REASON_<text>; UNSPECIFIED for none, or for a value this version does not know."""
    if text is None:
        return payment_pb2.HOLD_REASON_UNSPECIFIED
    return _HOLD_REASON.get(text, payment_pb2.HOLD_REASON_UNSPECIFIED)


_PAYMENT_STATUS: Final = {
    name.removeprefix("PAYMENT_STATUS_"): number for name, number in payment_pb2.PaymentStatus.items()
}
_DECLINE_REASON: Final = {
    name.removeprefix("DECLINE_REASON_"): number for name, number in payment_pb2.DeclineReason.items()
}
_HOLD_REASON: Final = {
    name.removeprefix("HOLD_REASON_"): number for name, number in payment_pb2.HoldReason.items()
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

    def added(self, column: str) -> str | None:
        """A nullable column added by a later migration: rows from before it lack it, as NULL."""
        value = self.row.get(column)
        if value is None or type(value) is str:
            return value
        if value is UNCHANGED:
            self.unchanged.append(column)
            return None
        raise ProjectionError(f"{self.table}.{column}: expected text or NULL, got {value!r}")

    def integer(self, column: str) -> int:
        return int(self.required(column))

    def time_us(self, column: str) -> int:
        return parse_timestamp_us(self.required(column))


_MISSING: Final = object()


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
                # Unindex first: resolution finds the accounts in the view that the delete removes.
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

    def project_batch(self, batch: RowBatch) -> list[Op]:
        """The writes of a batch's rows, in order, with each truncate after what came before it."""
        ops: list[Op] = []
        for segment in batch.segments:
            for change in segment.rows():
                ops.extend(self.project(change))
            if segment.truncate is not None:
                ops.append(segment.truncate)
        return ops

    def unindex(self, op: UnindexPayment, view: read_model_pb2.PaymentView) -> list[SetIndexes]:
        """The writes that remove a deleted payment from every index of the accounts in `view`, its last view,
        and from the review queue."""
        created_us = view.create_time.seconds * 1_000_000 + view.create_time.nanos // 1000
        member = index_member(created_us, op.payment_id)
        removals = [
            SetIndexes(
                self.schema.account_index_versions(account_id),
                op.payment_id,
                op.lsn,
                member,
                (),
                self._all_index_keys(account_id),
            )
            for account_id in dict.fromkeys((view.payer_account_id, view.payee_account_id))
        ]
        removals.append(self._queue(op.payment_id, op.lsn, member, held=False))
        return removals

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
            amount=_money_fields(row.required("currency_code"), row.integer("amount_minor")),
            reference=row.text("reference"),
            status=status,  # type: ignore[arg-type]
            decline_reason=decline_reason(row.optional("decline_reason")),  # type: ignore[arg-type]
            create_time=_timestamp_fields(created_us),
            update_time=_timestamp_fields(row.time_us("updated_at")),
            source_lsn=change.lsn,
            hold_reason=hold_reason(row.added("hold_reason")),  # type: ignore[arg-type]
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
        held = status == payment_pb2.PAYMENT_STATUS_PENDING_REVIEW
        # A new row that is not held is in no queue: nothing to write (most payments).
        if held or change.kind != "insert":
            ops.append(self._queue(payment_id, change.lsn, member, held))
        return ops

    def _queue(self, payment_id: str, lsn: int, member: str, held: bool) -> SetIndexes:
        """The payment's membership of the review queue: in it while held, fenced by position as an index is."""
        queue = (self.schema.review_queue(),)
        return SetIndexes(
            self.schema.review_queue_versions(),
            payment_id,
            lsn,
            member,
            queue if held else (),
            () if held else queue,
        )

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

    def _all_index_keys(self, account_id: str) -> tuple[str, ...]:
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
            event_time=_timestamp_fields(row.time_us("created_at")),
        )
        return UpsertTimeline(
            payment_key, timeline_key, payment_id, sequence, change.lsn, entry, tuple(row.unchanged)
        )

    def _account(self, change: RowChange) -> Op:
        row = _Row(change.table, change.row)
        account_id = row.required("account_id")
        currency = row.required("currency_code")
        ledger = row.integer("ledger_balance_minor")

        def money(amount: int) -> dict[str, str | int]:
            return _money_fields(currency, amount)

        view = read_model_pb2.AccountView(
            account_id=account_id,
            owner_name=row.text("owner_name"),
            currency_code=currency,
            status=_ACCOUNT_STATUS.get(row.required("status"), payment_pb2.ACCOUNT_STATUS_UNSPECIFIED),  # type: ignore[arg-type]
            ledger_balance=money(ledger),
            available_balance=money(ledger - row.integer("held_minor")),
            total_sent=money(row.integer("total_sent_minor")),
            total_received=money(row.integer("total_received_minor")),
            counts={
                "sent_approved": row.integer("sent_approved"),
                "sent_declined": row.integer("sent_declined"),
                "sent_pending_review": row.integer("sent_pending_review"),
                "received_approved": row.integer("received_approved"),
                "received_declined": row.integer("received_declined"),
                "received_pending_review": row.integer("received_pending_review"),
            },
            per_payment_limit=money(row.integer("per_payment_limit_minor")),
            daily_limit=money(row.integer("daily_limit_minor")),
            create_time=_timestamp_fields(row.time_us("created_at")),
            update_time=_timestamp_fields(row.time_us("updated_at")),
            source_lsn=change.lsn,
        )
        return UpsertView(self.schema.account(account_id), change.lsn, view, tuple(row.unchanged))
