"""Figure 4: the CRUD baseline against history (one process each) under steady approval writes.

Both sides get the same open-loop read rate, below saturation, so that latency shows
the cost of a read and its interference with the writes rather than a queue. Five
windows follow each other while the writer runs: writes only (the baseline), then CRUD
GetPayment, history GetPayment, CRUD ListPayments, history ListPayments.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from bench import stats
from bench.figures import Window, excess_per_read
from bench.load import Job
from bench.runner import Runner, sleep_until
from stack.clients import history_target

WINDOWS = ("baseline", "crud_get", "history_get", "crud_list", "history_list")
QUERIES = (("get", "get_payment"), ("list", "list_payments"))


def run(runner: Runner) -> None:
    plan = runner.plan
    assert runner.pool is not None
    crud = runner.endpoints["BENCH_CRUD_ADDR"]
    history = history_target(runner.endpoints["HISTORY_ADDRS"].split(",")[:1])
    step = plan.warmup_s + plan.window_s + 0.5
    for rep in range(plan.reps):
        print(
            f"== CRUD baseline: {plan.read_rate:.0f} reads/s under {plan.write_rate:.0f} writes/s, "
            f"repetition {rep + 1}/{plan.reps}",
            flush=True,
        )
        # The writer runs through every window of this repetition, on a worker of its own.
        writer_start = time.monotonic() + 0.5 + plan.warmup_s
        writer_span = step * len(WINDOWS) + 2.0
        writer = runner.pool.submit(
            runner.jobs(
                "open",
                "approval_submit",
                runner.endpoints["APPROVAL_ADDR"],
                plan.write_rate,
                duration_s=writer_span,
                workers=1,
            )(writer_start)
        )
        sleep_until(writer_start)
        windows: dict[str, Window] = {}
        readers = {
            "pg": runner.pg_cpu,
            "redis": runner.cpu_reader("redis"),
            "crud": runner.cpu_reader("crud"),
            "history": runner.cpu_reader("history-1"),
        }
        for name in WINDOWS:
            if name == "baseline":
                jobs: Callable[[float], list[Job]] = lambda start_at: []  # noqa: E731
            else:
                source, call = name.split("_")
                jobs = runner.jobs(
                    "open",
                    f"history_{call}",
                    crud if source == "crud" else history,
                    plan.read_rate,
                    history_channel=True,
                )
            windows[name] = runner.measure(jobs, readers, plan.window_s, plan.warmup_s)
        written = runner.pool.collect(writer)[0]
        runner.collector.add("crud_baseline", write_rate_achieved=written.completed / writer_span)
        runner.collector.add_errors("crud_baseline", written.errors, written.dropped)
        for call, figure in QUERIES:
            crud_w, hist_w = windows[f"crud_{call}"], windows[f"history_{call}"]
            runner.collector.add(f"crud_baseline.{figure}", **compare(crud_w, hist_w, windows["baseline"]))
            runner.collector.add_errors(f"crud_baseline.{figure}.crud", crud_w.errors, crud_w.dropped)
            runner.collector.add_errors(f"crud_baseline.{figure}.history", hist_w.errors, hist_w.dropped)
        runner.settle()


def compare(crud: Window, history: Window, base: Window) -> dict[str, float]:
    """One query's figures: each side's latency and CPU, their ratios, and what each read cost PostgreSQL and Redis.

    The windows' CPU readings are named "pg", "redis", "crud" and "history"; `base` is the
    writes-only window whose rate of CPU is taken off the others'.
    """
    crud_lat, hist_lat = crud.latency(), history.latency()
    return {
        "crud_throughput_rps": crud.throughput,
        "crud_p50_ms": crud_lat.p50_ms,
        "crud_p99_ms": crud_lat.p99_ms,
        "history_throughput_rps": history.throughput,
        "history_p50_ms": hist_lat.p50_ms,
        "history_p99_ms": hist_lat.p99_ms,
        "p50_ratio": stats.ratio(crud_lat.p50_ms, hist_lat.p50_ms),
        "p99_ratio": stats.ratio(crud_lat.p99_ms, hist_lat.p99_ms),
        "crud_server_cpu_us_per_rpc": crud.cpu_us_per_op("crud"),
        "history_server_cpu_us_per_rpc": history.cpu_us_per_op("history"),
        "history_server_cpu_us_per_rpc_baseline_excluded": excess_per_read(history, base, "history"),
        "pg_cpu_us_per_read_crud": excess_per_read(crud, base, "pg"),
        "pg_cpu_us_per_read_history": excess_per_read(history, base, "pg"),
        "redis_cpu_us_per_read_history": excess_per_read(history, base, "redis"),
        "pg_cpu_share_baseline": base.cpu_s["pg"] / base.duration_s,
        "pg_cpu_share_crud": crud.cpu_s["pg"] / crud.duration_s,
        "pg_cpu_share_history": history.cpu_s["pg"] / history.duration_s,
    }
