"""The spans of traced source transactions: a transaction's trace, continued from the WAL to Redis.

A transaction that the command side traced carries its trace context in a transactional
logical message (payments_common.tracing.WAL_MESSAGE_PREFIX). Once its batch is in Redis the
replicator records, in that trace:

- `replicate` (CONSUMER, child of the command side's `commit`): from the commit on the
  source to the moment Redis acknowledged the batch;
  - `replication lag`: from the commit to its arrival at the replicator;
  - `apply to Redis`: the batch's apply, with its size.

The spans are made after the fact with the times measured (the commit time is the source's
clock), so nothing of this costs the stream while no transaction is traced.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from opentelemetry import trace

from payments.readmodel.v1 import read_model_pb2
from payments_common import tracing
from payments_common.lsn import format_lsn
from replicator.changes import PAYMENT_EVENTS, PAYMENTS, Transaction

log = logging.getLogger(__name__)

# The payments named in a span and in the change stream, at most: a bulk transaction's
# thousands are counted, not listed.
MAX_PAYMENT_IDS: Final = 64


@dataclass(frozen=True)
class TracedCommit:
    """A committed transaction that carried a sampled trace context, waiting for its batch's apply."""

    parent: trace.SpanContext
    xid: int
    commit_lsn: int
    commit_time_ns: int
    received_ns: int
    changes: int
    payment_ids: tuple[str, ...]
    # More payments than MAX_PAYMENT_IDS: the list is their first ones.
    payment_ids_cut: bool


def gather_payment_ids(transaction: Transaction) -> None:
    """Keeps the ids of the payments that the transaction's changes held so far touch (MAX_PAYMENT_IDS at most).

    Called before a chunk's changes are let go, while tracing is on: the trace context comes
    last, just before the commit, so every chunked transaction is gathered.
    """
    ids = transaction.payment_ids
    for table, _, row in transaction.changes:
        if table in (PAYMENTS, PAYMENT_EVENTS) and row is not None:
            payment_id = row.get("payment_id")
            if isinstance(payment_id, str) and payment_id not in ids:
                if len(ids) >= MAX_PAYMENT_IDS:
                    transaction.payment_ids_cut = True
                    return
                ids[payment_id] = None


def traced_commit(
    transaction: Transaction, end_lsn: int, commit_time_us: int, changes: int
) -> TracedCommit | None:
    """The traced commit of `transaction`, or None when it carried no usable, sampled trace context."""
    if transaction.trace is None or not tracing.active():
        return None
    parent = tracing.parse_traceparent(transaction.trace)
    if parent is None:
        log.warning("a transaction carried a malformed trace context", extra={"xid": transaction.begin.xid})
        return None
    if not parent.trace_flags.sampled:
        return None
    gather_payment_ids(transaction)
    return TracedCommit(
        parent,
        transaction.begin.xid,
        end_lsn,
        commit_time_us * 1000,
        time.time_ns(),
        changes,
        tuple(transaction.payment_ids),
        transaction.payment_ids_cut,
    )


class Applying:
    """The `replicate` spans of a batch's traced transactions, from before its apply to Redis's acknowledgement."""

    def __init__(self, commits: Sequence[TracedCommit]) -> None:
        self.spans: list[tuple[TracedCommit, trace.Span]] = []
        if not commits or not tracing.active():
            return
        tracer = tracing.tracer()
        for commit in commits:
            span = tracer.start_span(
                "replicate",
                context=trace.set_span_in_context(trace.NonRecordingSpan(commit.parent)),
                kind=trace.SpanKind.CONSUMER,
                start_time=commit.commit_time_ns,
                attributes={
                    "db.transaction.xid": commit.xid,
                    "db.commit_lsn": format_lsn(commit.commit_lsn),
                    "replication.changes": commit.changes,
                    "payment.ids": list(commit.payment_ids),
                    "payment.ids_cut": commit.payment_ids_cut,
                },
            )
            self.spans.append((commit, span))
        self.apply_started_ns = time.time_ns()

    def announced(self) -> list[read_model_pb2.TracedTransaction]:
        """What the change stream says of them: the span each reader joins, the commit, the payments."""
        return [
            read_model_pb2.TracedTransaction(
                traceparent=tracing.traceparent(span.get_span_context()),
                commit_lsn=commit.commit_lsn,
                payment_ids=commit.payment_ids,
            )
            for commit, span in self.spans
        ]

    def applied(self, batch_changes: int, batch_transactions: int) -> None:
        """Ends the spans: Redis acknowledged the batch now."""
        if not self.spans:
            return
        tracer = tracing.tracer()
        applied_ns = time.time_ns()
        for commit, span in self.spans:
            context = trace.set_span_in_context(span)
            lag_seconds = max(0, commit.received_ns - commit.commit_time_ns) / 1e9
            tracer.start_span(
                "replication lag",
                context=context,
                start_time=min(commit.commit_time_ns, commit.received_ns),
                attributes={"replication.lag_seconds": lag_seconds},
            ).end(end_time=commit.received_ns)
            tracer.start_span(
                "apply to Redis",
                context=context,
                start_time=self.apply_started_ns,
                attributes={"batch.changes": batch_changes, "batch.transactions": batch_transactions},
            ).end(end_time=applied_ns)
            span.set_attributes(
                {
                    "replication.lag_seconds": lag_seconds,
                    "batch.changes": batch_changes,
                    "batch.transactions": batch_transactions,
                }
            )
            with trace.use_span(span, end_on_exit=False):
                log.info(
                    "applied a traced transaction",
                    extra={
                        "xid": commit.xid,
                        "commit_lsn": format_lsn(commit.commit_lsn),
                        "payment_ids": list(commit.payment_ids),
                        "lag_seconds": round(lag_seconds, 6),
                        "batch_changes": batch_changes,
                    },
                )
            span.end(end_time=applied_ns)
