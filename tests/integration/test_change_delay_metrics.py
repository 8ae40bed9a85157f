"""The delay along the change stream, as the services time it: from a source commit to the replicator's apply, and on to history's watch streams.

`replicator_commit_to_receive_seconds` and `replicator_commit_to_apply_seconds` are observed
once per source transaction applied, from its commit to the replicator reading it and to Redis
acknowledging it; `history_apply_to_watch_seconds` once per change-stream entry a history process
reads, from the time in the entry's id (Redis appending it). The benchmark reads both at a
commit-to-visible window's ends to tell where a payment's delay arose
(bench/phases/visibility.py). A real replicator and a real history process, on a source that
commits one payment per transaction.
"""

from __future__ import annotations

import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from payments_common.redisconn import sync_client
from stack.servers import free_port
from tests.support.history import HistoryProcess, history_processes
from tests.support.replicator import StartReplicator, replicator, schema_for
from tests.support.source import SourceWriter
from tests.support.waiting import wait_until

__all__ = ["replicator"]

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
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    count = total = 0.0
    found = False
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        found = True
        for sample in family.samples:
            if sample.name == f"{name}_count":
                count += sample.value
            elif sample.name == f"{name}_sum":
                total += sample.value
    assert found, f"no {name} at port {metrics_port}"
    return Observed(count, total)


def test_each_transaction_and_each_entry_is_timed_by_the_replicator_and_by_history(
    migrated_dsn: str, redis_url: str, replicator: StartReplicator, tmp_path: Path
) -> None:
    replicator_metrics = free_port()
    process = replicator(migrated_dsn, redis_url, metrics_port=str(replicator_metrics))
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

        with history_processes(make, 1):
            last = client.xrevrange(changes, count=1)
            assert last
            after = last[0][0]
            assert isinstance(after, bytes)
            received_before = observed(replicator_metrics, RECEIVED)
            replicator_before = observed(replicator_metrics, REPLICATOR)
            history_before = observed(history_metrics, HISTORY)
            started = time.time()
            for amount in range(1, 6):
                source.submit(alice, bob, amount)
            source.pay_many(alice, bob, 4)  # one transaction of four payments
            process.wait_caught_up()
            received = observed(replicator_metrics, RECEIVED).since(received_before)
            replicated = observed(replicator_metrics, REPLICATOR).since(replicator_before)
            entries = client.xrange(changes, min=f"({after.decode()}")
            assert entries
            wait_until(
                lambda: observed(history_metrics, HISTORY).since(history_before).count >= len(entries),
                30,
                "history read every entry the replicator appended",
            )
            watched = observed(history_metrics, HISTORY).since(history_before)
            elapsed = time.time() - started
    client.close()

    # Six transactions, whatever batches carried them; every entry the replicator appended.
    assert received.count == replicated.count == 6
    assert watched.count == len(entries)
    # Each delay lies between a moment after `started` and one before `elapsed` ran out: in
    # seconds (not microseconds or milliseconds), and never negative. An entry's id holds the
    # millisecond of its append, rounded down: up to 1 ms more.
    assert 0 < replicated.total <= replicated.count * elapsed
    # A transaction is read before it is applied.
    assert 0 < received.total < replicated.total
    assert 0 <= watched.total <= watched.count * (elapsed + 0.001)
