"""The read-model writes that pass from the projection through coalescing and resolution to encoding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

from payments.readmodel.v1 import read_model_pb2
from replicator.changes import TruncateTables

View: TypeAlias = read_model_pb2.PaymentView | read_model_pb2.AccountView
# What a later write of a batch replaces: writes with the same identity touch the same data.
Identity: TypeAlias = tuple[str | int, ...]


def view_identity(key: str) -> Identity:
    """The identity of every write of the view in the entity hash `key`."""
    return ("view", key)


# Every write is a full state of one entity at a WAL position, never an increment, so that
# applying one twice gives the same result and the apply script can skip a write older
# than what the entity holds.
#
# Plain dataclasses rather than frozen ones: a frozen dataclass's __init__ sets each field
# through object.__setattr__, a measurable cost at several objects per row change.
# Nothing mutates or hashes them.
@dataclass(slots=True)
class UpsertView:
    """Store `view` in the entity hash `key` unless the hash holds a newer position.

    `keep` names view fields whose source column was not sent (unchanged TOAST): they are
    taken from an earlier write of the batch, or from the stored view.
    """

    key: str
    lsn: int
    view: View
    keep: tuple[str, ...] = ()

    @property
    def identity(self) -> Identity:
        return view_identity(self.key)

    def filled_from(self, earlier: View) -> UpsertView:
        """This write with its `keep` fields taken from `earlier`, the entity's previous view."""
        view = type(self.view).FromString(self.view.SerializeToString())
        for name in self.keep:
            setattr(view, name, getattr(earlier, name))
        return UpsertView(self.key, self.lsn, view, ())


@dataclass(slots=True)
class DeleteView:
    """Remove the view of `key`, keeping its position as a tombstone."""

    key: str
    lsn: int

    @property
    def identity(self) -> Identity:
        return view_identity(self.key)


@dataclass(slots=True)
class SetIndexes:
    """Set the index membership of one payment in one account's indexes."""

    versions_key: str
    payment_id: str
    lsn: int
    member: str
    add: tuple[str, ...]
    remove: tuple[str, ...]

    @property
    def identity(self) -> Identity:
        return ("idx", self.versions_key, self.payment_id)


@dataclass(frozen=True, slots=True)
class UnindexPayment:
    """Remove a deleted payment from its accounts' indexes, which its last view names.

    Resolved into `SetIndexes` from an earlier write of the batch or the stored view.
    """

    payment_id: str
    lsn: int

    @property
    def identity(self) -> Identity:
        return ("unindex", self.payment_id)


@dataclass(slots=True)
class UpsertTimeline:
    """Store one timeline entry of a payment unless a newer write of that entry exists.

    `keep` names entry fields whose source column was not sent, as in `UpsertView`.
    """

    payment_key: str
    timeline_key: str
    payment_id: str
    sequence: int
    lsn: int
    entry: read_model_pb2.TimelineEntry
    keep: tuple[str, ...] = ()

    @property
    def identity(self) -> Identity:
        return ("tl", self.timeline_key, self.sequence)

    def filled_from(self, earlier: read_model_pb2.TimelineEntry) -> UpsertTimeline:
        """This write with its `keep` fields taken from `earlier`, the entry's previous state."""
        entry = read_model_pb2.TimelineEntry.FromString(self.entry.SerializeToString())
        for name in self.keep:
            setattr(entry, name, getattr(earlier, name))
        return UpsertTimeline(
            self.payment_key, self.timeline_key, self.payment_id, self.sequence, self.lsn, entry, ()
        )


@dataclass(slots=True)
class DeleteTimeline:
    """Remove one timeline entry, keeping its position in the payment hash."""

    payment_key: str
    timeline_key: str
    sequence: int
    lsn: int

    @property
    def identity(self) -> Identity:
        return ("tl", self.timeline_key, self.sequence)


# What the projection makes: a truncate passes through as a barrier between segments.
Op: TypeAlias = (
    UpsertView | DeleteView | SetIndexes | UnindexPayment | UpsertTimeline | DeleteTimeline | TruncateTables
)
# What one segment (the ops between truncates) holds, before and after coalescing.
SegmentOp: TypeAlias = UpsertView | DeleteView | SetIndexes | UnindexPayment | UpsertTimeline | DeleteTimeline
# What resolution leaves: whole states, with no field left to fill in (`keep` is empty).
Write: TypeAlias = UpsertView | DeleteView | SetIndexes | UpsertTimeline | DeleteTimeline


class StoredField(NamedTuple):
    """One field of a Redis hash whose stored value resolution needs (the sink reads it)."""

    key: str
    field: str
