"""Resolution against stored state, pure: coalesced writes and the stored values they need become whole writes."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from payments.readmodel.v1 import read_model_pb2
from payments_common import keys
from payments_common.keys import KeySchema
from replicator.ops import SegmentOp, StoredField, UnindexPayment, UpsertTimeline, UpsertView, Write
from replicator.projector import Projector


class Resolution(NamedTuple):
    """The whole writes of a segment, and the keys of the views whose unsent fields stay empty.

    A view in `unfilled` had a column that was not sent (unchanged TOAST) and no stored
    view to take it from; the caller says so in its log.
    """

    writes: list[Write]
    unfilled: list[str]


def stored_fields(ops: Iterable[SegmentOp], schema: KeySchema) -> list[StoredField]:
    """The stored values that `resolve` needs for `ops`.

    Views and timeline entries to take unsent fields from, and the last views of deleted
    payments, which name the accounts whose indexes hold them.
    """
    wanted: dict[StoredField, None] = {}
    for op in ops:
        if type(op) is UpsertView and op.keep:
            wanted[StoredField(op.key, keys.VIEW_FIELD)] = None
        elif type(op) is UnindexPayment:
            wanted[StoredField(schema.payment(op.payment_id), keys.VIEW_FIELD)] = None
        elif type(op) is UpsertTimeline and op.keep:
            wanted[StoredField(op.timeline_key, str(op.sequence))] = None
    return list(wanted)


def resolve(
    ops: Sequence[SegmentOp], stored: Mapping[StoredField, bytes | None], projector: Projector
) -> Resolution:
    """`ops` completed from `stored` (the values of `stored_fields(ops)`, None where absent)."""
    writes: list[Write] = []
    unfilled: list[str] = []
    for op in ops:
        if isinstance(op, UnindexPayment):
            raw = stored[StoredField(projector.schema.payment(op.payment_id), keys.VIEW_FIELD)]
            # Without a stored view the payment was never indexed, or was removed already.
            if raw is not None:
                writes.extend(projector.unindex(op, read_model_pb2.PaymentView.FromString(raw)))
        elif type(op) is UpsertView and op.keep:
            raw = stored[StoredField(op.key, keys.VIEW_FIELD)]
            if raw is None:
                unfilled.append(op.key)
                writes.append(UpsertView(op.key, op.lsn, op.view, ()))
            else:
                writes.append(op.filled_from(type(op.view).FromString(raw)))
        elif type(op) is UpsertTimeline and op.keep:
            raw = stored[StoredField(op.timeline_key, str(op.sequence))]
            if raw is None:
                writes.append(
                    UpsertTimeline(
                        op.payment_key, op.timeline_key, op.payment_id, op.sequence, op.lsn, op.entry
                    )
                )
            else:
                writes.append(op.filled_from(read_model_pb2.TimelineEntry.FromString(raw)))
        else:
            writes.append(op)
    return Resolution(writes, unfilled)
