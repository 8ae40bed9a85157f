"""Figure 1, the write path: approval SubmitPayment, closed loop, every rule run and fsync on."""

from __future__ import annotations

from bench.runner import Runner


def measure(runner: Runner, floor_us: float) -> None:
    """One repetition; then waits for the replicator and for approval to work off what its callers gave up on."""
    runner.closed_loop_figure(
        "approval_submit",
        "approval_submit",
        runner.endpoints["APPROVAL_ADDR"],
        server="approval",
        floor_us=floor_us,
        postgres_cpu=True,
    )
    runner.settle()
    runner.wait_idle("approval")
