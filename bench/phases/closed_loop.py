"""Figures 1-3 together: per repetition the echo floor, then approval, then history, each closed loop at one concurrency.

The floor comes first in each repetition, so that each ratio to it divides by a floor
measured in the same repetition, under the same conditions of the machine.
"""

from __future__ import annotations

from bench.phases import approval, echo, history
from bench.runner import Runner


def run(runner: Runner) -> None:
    reps = runner.plan.reps
    for rep in range(reps):
        print(f"== floor, approval and history, repetition {rep + 1}/{reps}", flush=True)
        floor_us = echo.measure(runner)
        approval.measure(runner, floor_us)
        history.measure(runner, floor_us)
