"""The offload that CQRS exists for: approval's writes while a heavy read load goes to PostgreSQL, or to Redis.

SubmitPayment runs closed loop at the plan's concurrency, as the approval figure
measures it, while an open-loop read load of `plan.offload_read_rate` reads/s, GetPayment
and ListPayments in turn, goes either to the CRUD baseline (one process, its reads on
PostgreSQL) or to history (one process, its reads on Redis). The two sides alternate
within the run: the first side of a repetition is the second of the next. Each window
gives the writes' throughput, latency and PostgreSQL's CPU per write, and whether the
read load was sustained; each repetition the ratios history ÷ CRUD of the write
throughput and CRUD ÷ history of the write p99.
"""

from __future__ import annotations

from typing import Final

from bench import stats
from bench.figures import Window
from bench.runner import Runner
from stack.clients import history_target

SIDES: Final = ("crud", "history")
# Reads served inside the window over reads offered, at or above which (and with no call
# failed or dropped) a read load counts as sustained: a queue that grows serves less.
SUSTAINED_SHARE: Final = 0.95


def run(runner: Runner) -> None:
    plan = runner.plan
    assert runner.pool is not None
    targets = {
        "crud": runner.endpoints["BENCH_CRUD_ADDR"],
        "history": history_target(runner.endpoints["HISTORY_ADDRS"].split(",")[:1]),
    }
    servers = {"crud": "crud", "history": "history-1"}
    # The writes take the plan's generators, as in the approval figure; the reads the others.
    read_workers = runner.pool.size - plan.workers
    for rep in range(plan.reps):
        windows: dict[str, dict[str, Window]] = {}
        for side in order(rep):
            print(
                f"== writes under {plan.offload_read_rate:.0f} reads/s on {side}, "
                f"repetition {rep + 1}/{plan.reps}",
                flush=True,
            )
            windows[side] = runner.measure_apart(
                {
                    "writes": runner.jobs(
                        "closed", "approval_submit", runner.endpoints["APPROVAL_ADDR"], plan.concurrency
                    ),
                    "reads": runner.jobs(
                        "open",
                        "history_mixed",
                        targets[side],
                        plan.offload_read_rate,
                        history_channel=True,
                        workers=read_workers,
                    ),
                },
                {"pg": runner.pg_cpu, "approval": runner.cpu_reader("approval")},
                plan.window_s,
                plan.warmup_s,
            )
            writes, reads = windows[side]["writes"], windows[side]["reads"]
            figures = side_metrics(writes, reads, plan.offload_read_rate)
            runner.collector.add(f"offload.{side}", **figures)
            runner.collector.add_errors(f"offload.{side}.writes", writes.errors, writes.dropped)
            runner.collector.add_errors(f"offload.{side}.reads", reads.errors, reads.dropped)
            print(
                f"   {figures['write_throughput_rps']:.0f} payments/s, "
                f"{figures['read_rate_achieved']:.0f} reads/s achieved, "
                f"read load {'sustained' if figures['read_sustained'] else 'NOT sustained'}",
                flush=True,
            )
            runner.settle()
            runner.wait_idle("approval")
            runner.wait_idle(servers[side])
        runner.collector.add("offload", **ratios(windows["crud"]["writes"], windows["history"]["writes"]))


def order(rep: int) -> tuple[str, ...]:
    """The sides in the order of repetition `rep`: CRUD first in even repetitions, history first in odd ones."""
    return SIDES if rep % 2 == 0 else SIDES[::-1]


def side_metrics(writes: Window, reads: Window, offered_rate: float) -> dict[str, float]:
    """One side's window: the writes' throughput, latency and CPU, and how much of the read load was served.

    The windows' CPU readings are named "pg" (the postmaster and its children) and
    "approval"; PostgreSQL's CPU per write is all of its CPU over the writes, the reads'
    share included: with the CRUD reads, PostgreSQL serves them too. The reads achieved
    are those served inside the window, whenever they were due; their latency is from the
    moment each was due.
    """
    write_lat, read_lat = writes.latency(), reads.latency()
    failed = sum(reads.errors.values()) + reads.dropped
    achieved = reads.served / reads.duration_s
    return {
        "write_throughput_rps": writes.throughput,
        "write_p50_ms": write_lat.p50_ms,
        "write_p99_ms": write_lat.p99_ms,
        "approval_cpu_us_per_write": writes.cpu_us_per_op("approval"),
        "postgres_cpu_us_per_write": writes.cpu_us_per_op("pg"),
        "postgres_cpu_cores": writes.cpu_s["pg"] / writes.duration_s,
        "read_rate_offered": offered_rate,
        "read_rate_achieved": achieved,
        "read_p50_ms": read_lat.p50_ms,
        "read_p99_ms": read_lat.p99_ms,
        "read_failed": float(failed),
        "read_sustained": float(failed == 0 and achieved >= SUSTAINED_SHARE * offered_rate),
    }


def ratios(crud: Window, history: Window) -> dict[str, float]:
    """The writes with history's reads against the writes with CRUD's, in one repetition."""
    return {
        "write_throughput_ratio": stats.ratio(history.throughput, crud.throughput),
        "write_p99_ratio": stats.ratio(crud.latency().p99_ms, history.latency().p99_ms),
    }
