"""The writer without Redis: the stages after the projection in order, with a sink that records what it is given."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import cast

import pytest

from payments.readmodel.v1 import read_model_pb2
from payments_common.keys import DEFAULT_SCHEMA as KEYS
from replicator.changes import Checkpoint
from replicator.encode import EncodedBatch, EncodedView
from replicator.ops import StoredField, UpsertView
from replicator.sink import Sink
from replicator.writer import Writer
from tests.support.rows import PROJECTOR, P


class _Sink:
    """Answers every read with nothing stored and keeps every batch it is given."""

    def __init__(self) -> None:
        self.read: list[StoredField] = []
        self.applied: list[EncodedBatch] = []

    def read_fields(self, fields: Sequence[StoredField]) -> dict[StoredField, bytes | None]:
        self.read += fields
        return dict.fromkeys(fields)

    def apply(self, batch: EncodedBatch, on_applied: Callable[[], None] | None = None) -> None:
        self.applied.append(batch)
        if on_applied is not None:
            on_applied()

    def settle(self) -> None:
        pass


def test_a_view_without_the_stored_state_for_its_unsent_fields_is_written_and_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    sink = _Sink()
    view = read_model_pb2.PaymentView(payment_id=P, reference="")
    with caplog.at_level(logging.WARNING, logger="replicator.writer"):
        Writer(PROJECTOR, cast(Sink, sink)).write(
            [UpsertView(KEYS.payment(P), 50, view, ("reference",))], Checkpoint(60, None)
        )
    assert sink.read == [StoredField(KEYS.payment(P), "view")]
    [batch] = sink.applied
    assert [type(write) for write in batch.writes] == [EncodedView]
    assert batch.checkpoint == Checkpoint(60, None)
    assert [record.levelno for record in caplog.records] == [logging.WARNING]
    assert caplog.records[0].args == (KEYS.payment(P),)
