"""The line from projected ops to Redis: coalesce, resolve against stored state, encode, apply."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence

from payments.readmodel.v1 import read_model_pb2
from replicator.changes import Checkpoint, TruncateTables
from replicator.coalesce import coalesce
from replicator.encode import encode
from replicator.ops import Op, SegmentOp
from replicator.projector import Projector
from replicator.resolve import resolve, stored_fields
from replicator.sink import Sink

log = logging.getLogger(__name__)


class Writer:
    """The line from projected ops to Redis: coalesce, resolve against stored state, encode, apply.

    A truncate splits the ops: what comes before it is applied first (without the
    checkpoint; a replay is harmless), then the truncated keys are removed, and the change
    notification says that it omits payments.
    """

    def __init__(self, projector: Projector, sink: Sink) -> None:
        self.projector = projector
        self.sink = sink

    def write(
        self,
        ops: Iterable[Op],
        checkpoint: Checkpoint | None,
        omits_payments: bool = False,
        traced: Sequence[read_model_pb2.TracedTransaction] = (),
        on_applied: Callable[[], None] | None = None,
    ) -> None:
        """Applies `ops` and, if given, moves the checkpoint, in one fenced script call per segment.

        `traced` are the batch's traced transactions, announced with the checkpoint. With
        `on_applied`, the last call is not waited for: `on_applied` runs once Redis has applied
        it (Sink.apply).
        """
        segment: list[SegmentOp] = []
        for op in ops:
            if isinstance(op, TruncateTables):
                self._write_segment(segment, None)
                segment = []
                self.sink.truncate(op.tables)
                omits_payments = True
            else:
                segment.append(op)
        self._write_segment(segment, checkpoint, omits_payments, traced, on_applied)

    def _write_segment(
        self,
        ops: list[SegmentOp],
        checkpoint: Checkpoint | None,
        omits_payments: bool = False,
        traced: Sequence[read_model_pb2.TracedTransaction] = (),
        on_applied: Callable[[], None] | None = None,
    ) -> None:
        if not ops and checkpoint is None:
            if on_applied is not None:
                self.sink.settle()
                on_applied()
            return
        coalesced = coalesce(ops, self.projector)
        stored = self.sink.read_fields(stored_fields(coalesced, self.projector.schema))
        resolution = resolve(coalesced, stored, self.projector)
        for key in resolution.unfilled:
            log.warning("unchanged column of %s with no stored view to take it from", key)
        self.sink.apply(encode(resolution.writes, checkpoint, omits_payments, traced), on_applied)
