"""Encoding, pure: resolved writes become the bytes Redis stores, and the batch its change notification."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias

from payments.readmodel.v1 import read_model_pb2
from replicator.changes import Checkpoint
from replicator.ops import DeleteTimeline, DeleteView, SetIndexes, UpsertTimeline, UpsertView, Write
from replicator.projector import timestamp


@dataclass(slots=True)
class EncodedView:
    """`UpsertView` with its view serialized."""

    key: str
    lsn: int
    view: bytes


@dataclass(slots=True)
class EncodedEntry:
    """`UpsertTimeline` with its entry serialized."""

    payment_key: str
    timeline_key: str
    sequence: int
    lsn: int
    entry: bytes


# Writes without a message to serialize pass through as they are.
EncodedWrite: TypeAlias = EncodedView | DeleteView | SetIndexes | EncodedEntry | DeleteTimeline


@dataclass(frozen=True, slots=True)
class EncodedBatch:
    """What one apply writes: each entity's write, the checkpoint to move to, and its notification.

    The notification's `previous_checkpoint_lsn` is left for the apply stage, which alone
    knows the checkpoint that the batch moves from.
    """

    writes: list[EncodedWrite]
    checkpoint: Checkpoint | None
    notification: read_model_pb2.ChangeBatch | None


def encode(
    writes: Sequence[Write],
    checkpoint: Checkpoint | None,
    omits_payments: bool = False,
    traced: Sequence[read_model_pb2.TracedTransaction] = (),
) -> EncodedBatch:
    """Serializes `writes`; a batch that moves the checkpoint is announced with the payments it writes."""
    encoded: list[EncodedWrite] = []
    payments: list[read_model_pb2.PaymentView] = []
    timelines: dict[str, dict[int, read_model_pb2.TimelineEntry]] = {}
    for write in writes:
        if isinstance(write, UpsertView):
            encoded.append(EncodedView(write.key, write.lsn, write.view.SerializeToString()))
            if isinstance(write.view, read_model_pb2.PaymentView):
                payments.append(write.view)
        elif isinstance(write, UpsertTimeline):
            encoded.append(
                EncodedEntry(
                    write.payment_key,
                    write.timeline_key,
                    write.sequence,
                    write.lsn,
                    write.entry.SerializeToString(),
                )
            )
            timelines.setdefault(write.payment_id, {})[write.sequence] = write.entry
        else:
            encoded.append(write)
    if checkpoint is None:
        return EncodedBatch(encoded, None, None)
    notification = _notification(checkpoint, payments, timelines, omits_payments)
    notification.traced.extend(traced)
    return EncodedBatch(encoded, checkpoint, notification)


def _notification(
    checkpoint: Checkpoint,
    payments: list[read_model_pb2.PaymentView],
    timelines: dict[str, dict[int, read_model_pb2.TimelineEntry]],
    omits_payments: bool,
) -> read_model_pb2.ChangeBatch:
    batch = read_model_pb2.ChangeBatch(checkpoint_lsn=checkpoint.lsn, omits_payments=omits_payments)
    if checkpoint.commit_time_us is not None:
        batch.commit_time.CopyFrom(timestamp(checkpoint.commit_time_us))
    if checkpoint.covered_until_us is not None:
        batch.source_time.CopyFrom(timestamp(checkpoint.covered_until_us))
    for view in payments:
        entries = timelines.get(view.payment_id)
        item = batch.payments.add()
        item.CopyFrom(view)
        # Only a complete timeline is worth sending; otherwise readers fetch it.
        if entries and sorted(entries) == list(range(1, len(entries) + 1)):
            item.timeline.extend(entries[s] for s in sorted(entries))
    return batch
