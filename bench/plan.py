"""What a run does and how much: the full benchmark's sizes and `--quick`'s smoke-test sizes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Plan:
    """How much of everything a run does; `--quick` is the smoke-test size."""

    mode: str
    reps: int
    window_s: float
    warmup_s: float
    workers: int  # load-generator processes per measurement
    concurrency: int  # closed-loop callers in total, for every closed-loop figure
    accounts: int  # accounts that pay each other in the approval and replication figures
    list_accounts: int  # accounts whose histories the list queries page through
    list_payments: int  # payments seeded between the list accounts
    page_size: int
    write_rate: float  # the steady approval writes under the CRUD comparison
    read_rate: float  # the open-loop reads of the CRUD comparison, the same for both sides
    offload_read_rate: float  # the heavy open-loop reads under which the offload figure measures the writes
    visibility_rate: float
    visibility_low_rate: float  # a rate that approval sustains, to see replication without overload
    visibility_window_s: float
    watched_accounts: int
    drain_payments: int
    drain_reps: int
    tracing_drain_payments: int  # each drain of the tracing figures, under each configuration
    large_transaction_changes: int  # the row changes of the large transaction's one INSERT
    large_transaction_reps: int
    sweep_window_s: float
    sweep_rates: dict[str, tuple[float, ...]] = field(default_factory=dict)


FULL = Plan(
    mode="full",
    reps=3,
    window_s=6.0,
    warmup_s=1.5,
    workers=2,
    concurrency=32,
    accounts=1000,
    list_accounts=50,
    list_payments=5000,
    page_size=20,
    write_rate=100.0,
    read_rate=250.0,
    offload_read_rate=1500.0,
    visibility_rate=500.0,
    visibility_low_rate=100.0,
    visibility_window_s=10.0,
    watched_accounts=16,
    drain_payments=50_000,
    drain_reps=3,
    tracing_drain_payments=50_000,
    large_transaction_changes=1_000_000,
    large_transaction_reps=3,
    sweep_window_s=4.0,
    sweep_rates={
        "echo": (500, 1000, 2000, 3000, 4000),
        "history": (500, 1000, 2000, 3000, 4000),
        "crud": (500, 1000, 2000, 3000, 4000),
        "approval": (50, 100, 200, 300, 500),
    },
)

# The full plan at smoke-test sizes: the same load shapes and rates, shorter and smaller.
QUICK = dataclasses.replace(
    FULL,
    mode="quick",
    reps=1,
    window_s=1.5,
    warmup_s=0.5,
    accounts=200,
    list_accounts=20,
    list_payments=1000,
    visibility_window_s=2.0,
    watched_accounts=8,
    drain_payments=5_000,
    drain_reps=1,
    tracing_drain_payments=2_500,
    large_transaction_changes=20_000,
    large_transaction_reps=1,
    sweep_window_s=1.0,
    sweep_rates={"echo": (500, 2000), "history": (500, 2000), "crud": (500, 2000), "approval": (100, 200)},
)

# `python -m bench.topologies`: each repetition starts two stacks (one Redis, then a Redis
# Cluster), seeds each, measures history on 1, 2 and 3 processes and drains one backlog. The
# windows are a little shorter and the backlog smaller than the full run's, so that three
# repetitions of both take under 15 minutes on 2 cores; `drain_reps` is one drain per stack.
TOPOLOGIES = dataclasses.replace(FULL, window_s=4.0, warmup_s=1.0, drain_payments=25_000, drain_reps=1)
TOPOLOGIES_QUICK = dataclasses.replace(QUICK, drain_reps=1)
