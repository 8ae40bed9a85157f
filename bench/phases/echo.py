"""Figure 3, the gRPC floor: bare echo RPCs through the same server stack, closed loop; every CPU ratio divides by it."""

from __future__ import annotations

from bench.runner import Runner


def measure(runner: Runner) -> float:
    """One repetition; returns the echo server's CPU µs per RPC, the floor of this repetition's ratios."""
    window = runner.closed_loop_figure(
        "echo_floor", "echo", runner.endpoints["BENCH_ECHO_ADDR"], server="echo", floor_us=None
    )
    return window.cpu_us_per_op("echo")
