"""Figure 3, the gRPC floor: bare echo RPCs through the same server stack, closed loop; every CPU ratio divides by it."""

from __future__ import annotations

from bench.runner import Runner


def measure(runner: Runner) -> float:
    """One repetition; returns the echo server's CPU µs per RPC, the floor of this repetition's ratios."""
    plan = runner.plan
    window = runner.measure(
        runner.jobs("closed", "echo", runner.endpoints["BENCH_ECHO_ADDR"], plan.concurrency),
        {"echo": runner.cpu_reader("echo")},
        plan.window_s,
        plan.warmup_s,
    )
    runner.collector.add_window("echo_floor", window, "echo", None)
    return window.cpu_us_per_op("echo")
