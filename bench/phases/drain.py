"""Figure 5b, the drain: stop the replicator, commit a backlog, start it again, time it until the backlog is applied.

`python -m bench` runs it on the benchmark's stack; `python -m bench.drain` runs the same
code on a stack of its own (PostgreSQL, Redis and the replicator, nothing else) and
`python -m bench.profile` samples the replicator while it drains. What each needs of
its stack is the `Replication` protocol.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Protocol

from bench import backlog, cpu
from bench.runner import Runner
from payments_common.redisconn import sync_client
from stack.replication import read_checkpoint

# A context around the timed catch-up, given the new replicator's pid (e.g. a profiler).
Observer = Callable[[int], AbstractContextManager[object]]

TIMEOUT_S = 600.0


class Replication(Protocol):
    """What the drain needs of a stack: its replicator, and the CPU of PostgreSQL and Redis."""

    @property
    def dsn(self) -> str: ...

    @property
    def redis_url(self) -> str: ...

    @property
    def slot(self) -> str: ...

    def settle(self) -> None:
        """Waits until the replicator has applied every write so far."""

    def stop_replicator(self) -> None: ...

    def start_replicator(self, extra_env: Mapping[str, str] | None = None) -> int:
        """Starts the replicator, `extra_env` added to its settings, and returns its pid."""
        ...

    def replicator_alive(self) -> bool: ...

    def replicator_ready(self) -> None:
        """Waits until the new replicator reports SERVING, after the timed part."""

    def redis_cpu(self) -> cpu.Snapshot: ...

    def pg_cpu(self) -> cpu.Snapshot: ...


@dataclass(frozen=True)
class Drain:
    """One timed drain; times from the replicator's start, CPU seconds over the catch-up."""

    changes: int
    elapsed_s: float  # until the checkpoint reached the backlog's end
    startup_s: float  # until the checkpoint first moved (process start, connecting, the first batch)
    cpu_s: float  # the replicator process, from its start
    redis_cpu_s: float
    pg_cpu_s: float
    generation_s: float  # committing the backlog, before the replicator started
    traced: int = 0  # the backlog's transactions that carried a sampled trace context
    startup_cpu_s: float = math.nan  # the replicator's CPU when the checkpoint first moved
    # The reads of the checkpoint while timing (one HGET each): Redis counts them among its commands.
    checkpoint_reads: int = 0

    @property
    def changes_per_s(self) -> float:
        return self.changes / self.elapsed_s

    @property
    def changes_per_s_steady(self) -> float:
        return self.changes / (self.elapsed_s - self.startup_s)

    @property
    def cpu_us_per_change(self) -> float:
        return self.cpu_s * 1e6 / self.changes

    @property
    def cpu_us_per_change_steady(self) -> float:
        """CPU per change after the first apply: without the process's start-up (imports, connections)."""
        return (self.cpu_s - self.startup_cpu_s) * 1e6 / self.changes

    def metrics(self) -> dict[str, float]:
        """The figures of `replication.drain`."""
        return {
            "changes": self.changes,
            "changes_per_s": self.changes_per_s,
            "changes_per_s_steady": self.changes_per_s_steady,
            "startup_s": self.startup_s,
            "elapsed_s": self.elapsed_s,
            "cpu_us_per_change": self.cpu_us_per_change,
            "redis_cpu_us_per_change": self.redis_cpu_s * 1e6 / self.changes,
            "postgres_cpu_us_per_change": self.pg_cpu_s * 1e6 / self.changes,
            "generation_s": self.generation_s,
        }


def run(runner: Runner) -> None:
    plan = runner.plan
    for rep in range(plan.drain_reps):
        print(
            f"== drain of {plan.drain_payments * backlog.CHANGES_PER_PAYMENT:,} row changes, "
            f"repetition {rep + 1}/{plan.drain_reps}",
            flush=True,
        )
        drained = once(runner, runner.payers, plan.drain_payments)
        runner.collector.add("replication.drain", **drained.metrics())


def once(
    stack: Replication,
    payers: Sequence[str],
    payments: int,
    observe: Observer | None = None,
    *,
    replicator_env: Mapping[str, str] | None = None,
    traced_share: float = 0.0,
) -> Drain:
    """Stops the replicator, commits `payments` payments between `payers`, starts it again and times the catch-up.

    The new replicator gets `replicator_env` on top of its settings; `traced_share` of the
    backlog's transactions carry a sampled trace context (`bench.backlog.generate`).
    """
    stack.settle()
    stack.stop_replicator()
    made = backlog.generate(stack.dsn, payers, payments, traced_share=traced_share)
    client = sync_client(stack.redis_url)
    try:
        before = read_checkpoint(client, stack.slot)
        redis_before, pg_before = stack.redis_cpu(), stack.pg_cpu()
        started = time.monotonic()
        pid = stack.start_replicator(replicator_env)
        with observe(pid) if observe is not None else contextlib.nullcontext():
            first = first_cpu = math.nan
            deadline = started + TIMEOUT_S
            reads = 0
            while True:
                position = read_checkpoint(client, stack.slot)
                reads += 1
                now = time.monotonic()
                if math.isnan(first) and position > before:
                    first = now
                    first_cpu = cpu.process_cpu_s(pid)
                if position >= made.target_lsn:
                    break
                if not stack.replicator_alive():
                    raise RuntimeError("the replicator exited before it drained the backlog")
                if now > deadline:
                    raise TimeoutError(f"the replicator did not drain the backlog within {TIMEOUT_S:.0f}s")
                time.sleep(0.005)
            done = time.monotonic()
            # A new process starts from zero.
            spent = cpu.process_cpu_s(pid)
            redis_spent = cpu.spent(redis_before, stack.redis_cpu())
            pg_spent = cpu.spent(pg_before, stack.pg_cpu())
    finally:
        client.close()
    stack.replicator_ready()
    return Drain(
        changes=made.changes,
        elapsed_s=done - started,
        startup_s=first - started,
        cpu_s=spent,
        redis_cpu_s=redis_spent,
        pg_cpu_s=pg_spent,
        generation_s=made.elapsed_s,
        traced=made.traced,
        startup_cpu_s=first_cpu,
        checkpoint_reads=reads,
    )
