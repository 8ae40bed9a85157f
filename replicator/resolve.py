"""Resolution against stored state, pure: coalesced writes and the stored values they need become whole writes."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import NamedTuple

from payments.readmodel.v1 import read_model_pb2
from payments_common import keys
from payments_common.keys import KeySchema
from replicator.ops import SegmentOp, UnindexPayment, UpsertTimeline, UpsertView, Write
from replicator.projector import Projector

log = logging.getLogger(__name__)


class StoredField(NamedTuple):
    """One field of a Redis hash whose stored value resolution needs."""

    key: str
    field: str


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
) -> list[Write]:
    """`ops` completed from `stored` (the values of `stored_fields(ops)`, None where absent)."""
    writes: list[Write] = []
    for op in ops:
        if isinstance(op, UnindexPayment):
            raw = stored[StoredField(projector.schema.payment(op.payment_id), keys.VIEW_FIELD)]
            # Without a stored view the payment was never indexed, or was removed already.
            if raw is not None:
                writes.extend(projector.unindex(op, read_model_pb2.PaymentView.FromString(raw)))
        elif type(op) is UpsertView and op.keep:
            raw = stored[StoredField(op.key, keys.VIEW_FIELD)]
            if raw is None:
                log.warning("unchanged column of %s with no stored view to take it from", op.key)
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
    return writes
