"""Figure 1, the write path: approval SubmitPayment, closed loop, every rule run and fsync on."""

from __future__ import annotations

from bench.runner import Runner


def measure(runner: Runner, floor_us: float) -> None:
    """One repetition; then waits for the replicator and for approval to work off what its callers gave up on."""
    plan = runner.plan
    window = runner.measure(
        runner.jobs("closed", "approval_submit", runner.endpoints["APPROVAL_ADDR"], plan.concurrency),
        {"approval": runner.cpu_reader("approval")},
        plan.window_s,
        plan.warmup_s,
    )
    runner.collector.add_window("approval_submit", window, "approval", floor_us)
    runner.settle()
    runner.wait_idle("approval")
