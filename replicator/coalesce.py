"""Coalescing, a pure function: a segment's writes reduced to the last write of each entity."""

from __future__ import annotations

from collections.abc import Iterable

from payments.readmodel.v1 import read_model_pb2
from replicator.ops import Identity, SegmentOp, UnindexPayment, UpsertTimeline, UpsertView, view_identity
from replicator.projector import Projector


def coalesce(ops: Iterable[SegmentOp], projector: Projector) -> list[SegmentOp]:
    """Keeps the last write of each entity, in the order of those last writes.

    Each write is a whole state, so the last one is all that needs applying. Fields that
    the source did not send (unchanged TOAST) come from the write it replaces; a deleted
    payment whose view an earlier op wrote leaves the indexes that view names. What the
    batch cannot fill in is left to resolution against the stored state.
    """
    latest: dict[Identity, SegmentOp] = {}
    for op in ops:
        if type(op) is UnindexPayment:
            earlier = latest.get(view_identity(projector.schema.payment(op.payment_id)))
            if type(earlier) is UpsertView and isinstance(earlier.view, read_model_pb2.PaymentView):
                for removal in projector.unindex(op, earlier.view):
                    _put(latest, removal)
                continue
        elif type(op) is UpsertView and op.keep:
            earlier = latest.get(op.identity)
            if type(earlier) is UpsertView:
                op = op.filled_from(earlier.view)
        elif type(op) is UpsertTimeline and op.keep:
            earlier = latest.get(op.identity)
            if type(earlier) is UpsertTimeline:
                op = op.filled_from(earlier.entry)
        _put(latest, op)
    return list(latest.values())


def _put(latest: dict[Identity, SegmentOp], op: SegmentOp) -> None:
    identity = op.identity
    # Re-inserted, so that the order of the batch is the order of the last writes.
    latest.pop(identity, None)
    latest[identity] = op
