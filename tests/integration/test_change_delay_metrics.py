"""The delay along the change stream, as the services time it: from a source commit to the walsender, the replicator and Redis, and on to history's watch streams.

`replicator_commit_to_send_seconds`, `replicator_commit_to_receive_seconds` and
`replicator_commit_to_apply_seconds` are observed once per source transaction applied, a
transaction applied in chunks included; `history_apply_to_watch_seconds` once per
change-stream entry a history process reads, from the time in the entry's id (Redis appending
it). The benchmark reads them at a commit-to-visible window's ends to tell where a payment's
delay arose (bench/phases/visibility.py). A real replicator and a real history process.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from bench import scrape
from payments_common.redisconn import sync_client
from stack.servers import free_port
from tests.support.history import HistoryProcess, history_processes
from tests.support.replicator import StartReplicator, replicator, schema_for
from tests.support.source import SourceWriter
from tests.support.waiting import wait_until

__all__ = ["replicator"]

SENT = "replicator_commit_to_send_seconds"
RECEIVED = "replicator_commit_to_receive_seconds"
REPLICATOR = "replicator_commit_to_apply_seconds"
HISTORY = "history_apply_to_watch_seconds"


@dataclass(frozen=True)
class Observed:
    """A histogram's count and sum, every series of it added up."""

    count: float
    total: float

    def since(self, before: Observed) -> Observed:
        return Observed(self.count - before.count, self.total - before.total)


def observed(metrics_port: int, name: str) -> Observed:
    (family,) = [f for f in scrape.families(f"127.0.0.1:{metrics_port}") if f.name == name]
    count = sum(s.value for s in family.samples if s.name == f"{name}_count")
    total = sum(s.value for s in family.samples if s.name == f"{name}_sum")
    return Observed(count, total)


def test_each_transaction_and_each_entry_is_timed_by_the_replicator_and_by_history(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator, tmp_path: Path
) -> None:
    replicator_metrics = free_port()
    # A transaction of more than 10 row changes is applied in chunks.
    process = replicator(
        migrated_dsn, redis_url, metrics_port=str(replicator_metrics), transaction_chunk_changes="10"
    )
    client = sync_client(redis_url)
    changes = schema_for(redis_url, process.slot).changes()
    with SourceWriter(migrated_dsn) as source:
        alice, bob = source.open_account("Alice"), source.open_account("Bob")
        process.wait_caught_up()
        history_metrics = free_port()

        def make(_: int) -> HistoryProcess:
            return HistoryProcess(
                redis_url,
                free_port(),
                tmp_path / "history.log",
                extra_env={"HISTORY_SLOT_NAME": process.slot, "HISTORY_METRICS_PORT": str(history_metrics)},
            )

        def replicator_observed() -> dict[str, Observed]:
            return {name: observed(replicator_metrics, name) for name in (SENT, RECEIVED, REPLICATOR)}

        with history_processes(make, 1):
            replicator_before = replicator_observed()
            history_before = observed(history_metrics, HISTORY)
            last = client.xrevrange(changes, count=1)
            assert last
            after = last[0][0]
            assert isinstance(after, bytes)
            started = time.time()
            for amount in range(1, 6):
                source.submit(alice, bob, amount)
            source.pay_many(alice, bob, 4)  # one transaction of four payments
            source.pay_many(alice, bob, 10)  # one of 40 row changes, applied in chunks
            process.wait_caught_up()
            # The checkpoint is in Redis a moment before the replicator reads Redis's reply.
            wait_until(
                lambda: (
                    observed(replicator_metrics, REPLICATOR).since(replicator_before[REPLICATOR]).count >= 7
                ),
                30,
                "the replicator observed the seven transactions",
            )
            replicated = {
                name: seen.since(replicator_before[name]) for name, seen in replicator_observed().items()
            }
            appended = client.xrange(changes, min=f"({after.decode()}") or []
            wait_until(
                lambda: observed(history_metrics, HISTORY).since(history_before).count >= len(appended),
                30,
                "history read every entry the replicator appended",
            )
            watched = observed(history_metrics, HISTORY).since(history_before)
            # Idle checkpoints may append entries at any time: the count lies between two readings.
            appended_by_now = client.xrange(changes, min=f"({after.decode()}") or []
            elapsed = time.time() - started
    client.close()

    # Seven transactions, whatever batches and chunks carried them, each once in each histogram.
    assert [seen.count for seen in replicated.values()] == [7, 7, 7]
    assert len(appended) <= watched.count <= len(appended_by_now)
    # Each delay lies between a moment after `started` and one before `elapsed` ran out: in
    # seconds (not microseconds or milliseconds). An entry's id holds the millisecond of its
    # append, rounded down: up to 1 ms more.
    sent, received, applied = replicated[SENT], replicated[RECEIVED], replicated[REPLICATOR]
    assert 0 < applied.total <= applied.count * elapsed
    assert 0 < watched.total <= watched.count * (elapsed + 0.001)
    # Sent, then read, then applied.
    assert 0 < sent.total <= received.total < applied.total
