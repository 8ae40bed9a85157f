"""The chart: open-loop latency percentiles against offered load, for the floor, history, the CRUD baseline and approval."""

from __future__ import annotations

from typing import Any

from bench.figures import Window
from bench.runner import Runner
from stack.clients import history_target


def run(runner: Runner) -> None:
    plan = runner.plan
    endpoints = runner.endpoints
    # key in plan.sweep_rates: (the chart's title, call, target, history channel)
    series = {
        "echo": ("gRPC floor: echo", "echo", endpoints["BENCH_ECHO_ADDR"], False),
        "history": (
            "History GetPayment (2 processes)",
            "history_get",
            history_target(endpoints["HISTORY_ADDRS"].split(",")),
            True,
        ),
        "crud": ("CRUD baseline GetPayment (PostgreSQL)", "history_get", endpoints["BENCH_CRUD_ADDR"], True),
        "approval": (
            "Approval SubmitPayment (fsync on)",
            "approval_submit",
            endpoints["APPROVAL_ADDR"],
            False,
        ),
    }
    warmup_s = min(1.0, plan.warmup_s)
    for key, (title, call, target, history_channel) in series.items():
        points = []
        for rate in plan.sweep_rates[key]:
            print(f"== sweep {title} at {rate:.0f}/s", flush=True)
            window = runner.measure(
                runner.jobs(
                    "open",
                    call,
                    target,
                    float(rate),
                    duration_s=plan.sweep_window_s,
                    warmup_s=warmup_s,
                    history_channel=history_channel,
                ),
                {},
                plan.sweep_window_s,
                warmup_s,
            )
            points.append(point(float(rate), window))
        runner.sweeps[title] = points
        if key == "approval":
            runner.settle()
            runner.wait_idle("approval")


def point(offered_rps: float, window: Window) -> dict[str, Any]:
    """One point of a chart's line: the offered and achieved rates, the latency percentiles, what failed."""
    lat = window.latency()
    return {
        "offered_rps": offered_rps,
        "achieved_rps": window.throughput,
        "p50_ms": lat.p50_ms,
        "p90_ms": lat.p90_ms,
        "p99_ms": lat.p99_ms,
        "errors": sum(window.errors.values()),
        "dropped": window.dropped,
    }
