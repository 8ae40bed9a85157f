"""Figure 5a, commit-to-visible: payments submitted at a steady rate, timed until they arrive on WatchPayments streams.

Measured at the target rate, at a rate that approval sustains on this machine, so
that replication's own delay shows apart from an overloaded approval service, and at
SHARE_OF_APPROVAL of the payments/s that approval sustained closed loop earlier in the
same run (the median of the approval figure's repetitions): a rate near what this
machine's write path can give, whatever the machine.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Final

from bench import scrape, stats
from bench.figures import Collector, latency_of
from bench.load import Job, JobResult, split
from bench.runner import Runner
from stack.clients import history_target

# The share of approval's closed-loop throughput at which `commit_to_visible_80pct` submits.
SHARE_OF_APPROVAL: Final = 0.8
APPROVAL_THROUGHPUT: Final = "approval_submit.throughput_rps"


def run(runner: Runner) -> None:
    plan = runner.plan
    share_rate = SHARE_OF_APPROVAL * approval_rate(runner.collector)
    for rep in range(plan.reps):
        # The lower rates first: an overloaded approval keeps working off abandoned
        # requests for a while after its clients have given up.
        for figure, rate in (
            ("commit_to_visible_sustained", plan.visibility_low_rate),
            ("commit_to_visible_80pct", share_rate),
            ("commit_to_visible", plan.visibility_rate),
        ):
            print(f"== {figure} at {rate:.0f} payments/s, repetition {rep + 1}/{plan.reps}", flush=True)
            measure(runner, f"replication.{figure}", rate)
            runner.settle()
            runner.wait_idle("approval")


def approval_rate(collector: Collector) -> float:
    """The median of approval's closed-loop throughput over the repetitions measured so far in this run."""
    measured = collector.values.get(APPROVAL_THROUGHPUT)
    if not measured:
        raise RuntimeError(
            f"commit-to-visible at a share of approval's rate needs {APPROVAL_THROUGHPUT} first"
        )
    return stats.spread(measured).median


def measure(runner: Runner, figure: str, total_rate: float) -> None:
    """One window at `total_rate` payments/s, split over the generators, each watching its own payees."""
    plan = runner.plan
    history = history_target(runner.endpoints["HISTORY_ADDRS"].split(","))
    workers = plan.workers
    watched = [runner.watched[i::workers] for i in range(workers)]

    def build(start_at: float) -> list[Job]:
        return [
            Job(
                mode="visibility",
                call="approval_submit",
                target=runner.endpoints["APPROVAL_ADDR"],
                start_at=start_at,
                duration_s=plan.visibility_window_s,
                warmup_s=plan.warmup_s,
                history_channel=True,
                rate=rate,
                payer_ids=runner.payers,
                payee_ids=tuple(watched[index]),
                watch_target=history,
                seed=int(start_at * 1000) + index,
                token=runner.token,
            )
            for index, rate in enumerate(split(total_rate, workers))
        ]

    assert runner.pool is not None
    start_at = time.monotonic() + 1.0 + plan.warmup_s  # streams open before the window
    pending = runner.pool.submit(build(start_at))
    stages = Stages(runner.endpoints)
    try:
        _sleep_until(start_at)
        stages.begin()
    finally:
        results = runner.pool.collect(pending, timeout=120)
    # Once every payment of the window has arrived or been given up on: its last ones are in.
    stages.end()
    runner.collector.add(figure, **metrics(results, total_rate, plan.visibility_window_s), **stages.figures())
    errors: Counter[str] = Counter()
    for r in results:
        errors.update(r.errors)
    runner.collector.add_errors(figure, dict(errors), sum(r.dropped for r in results))


def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


class Stages:
    """Where a window's delay arose: the services' own histograms of it, read at the window's ends.

    Per source transaction, from its commit: to the walsender sending its commit message
    (`replicator_commit_to_send_seconds`, on the source's clock: the WAL's flush and its
    decoding), to the replicator reading it (`replicator_commit_to_receive_seconds`: and
    the wait in the socket) and to the replicator reading Redis's acknowledgement of its
    batch (`replicator_commit_to_apply_seconds`); per change-stream entry, from Redis
    appending it to a history process handing its changes to the watch streams
    (`history_apply_to_watch_seconds`, over every history process). The readings span
    from the window's start to the last arrival of its payments: they include the
    warm-up's last applies. A reading that fails, or a histogram reset between the two,
    gives NaN figures rather than ending the run.
    """

    SENT: Final = "replicator_commit_to_send_seconds"
    RECEIVED: Final = "replicator_commit_to_receive_seconds"
    APPLIED: Final = "replicator_commit_to_apply_seconds"
    HISTORY: Final = "history_apply_to_watch_seconds"

    def __init__(self, endpoints: Mapping[str, str]) -> None:
        self._replicator = [endpoints["REPLICATOR_METRICS_ADDR"]]
        self._history = endpoints["HISTORY_METRICS_ADDRS"].split(",")
        self._before: dict[str, scrape.Buckets] | None = None
        self._after: dict[str, scrape.Buckets] | None = None

    def _read(self) -> dict[str, scrape.Buckets] | None:
        try:
            return scrape.histograms(self._replicator, (self.SENT, self.RECEIVED, self.APPLIED)) | (
                scrape.histograms(self._history, (self.HISTORY,))
            )
        except (OSError, LookupError) as error:
            print(f"   (could not read the stages' histograms: {error})", flush=True)
            return None

    def begin(self) -> None:
        self._before = self._read()

    def end(self) -> None:
        self._after = self._read()

    def figures(self) -> dict[str, float]:
        stages = {
            "replicator_commit_to_send": self.SENT,
            "replicator_commit_to_receive": self.RECEIVED,
            "replicator_commit_to_apply": self.APPLIED,
            "history_apply_to_watch": self.HISTORY,
        }
        figures: dict[str, float] = {}
        for stage, name in stages.items():
            p50 = p99 = math.nan
            if self._before is not None and self._after is not None:
                try:
                    buckets = scrape.window(self._before[name], self._after[name])
                    p50, p99 = scrape.quantile_ms(buckets, 0.5), scrape.quantile_ms(buckets, 0.99)
                except ValueError as error:
                    print(f"   ({name}: {error})", flush=True)
            figures[f"{stage}_p50_ms"], figures[f"{stage}_p99_ms"] = p50, p99
        return figures


def metrics(results: Sequence[JobResult], offered_rate: float, window_s: float) -> dict[str, float]:
    """The delays from acknowledgement (and from submission) to arrival, over every generator of the window."""
    lat = latency_of(stats.merge(r.delays for r in results))
    from_submit = latency_of(stats.merge(r.submit_delays for r in results))
    acked = sum(r.completed for r in results)
    return {
        "offered_rate": offered_rate,
        "p50_ms": lat.p50_ms,
        "p90_ms": lat.p90_ms,
        "p99_ms": lat.p99_ms,
        "max_ms": lat.max_ms,
        "submit_to_visible_p50_ms": from_submit.p50_ms,
        "submit_to_visible_p99_ms": from_submit.p99_ms,
        "achieved_rate": acked / window_s,
        "acknowledged": acked,
        "missing": sum(r.missing for r in results),
        "seen_before_ack": sum(r.seen_before_ack for r in results),
    }
