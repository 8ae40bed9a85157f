"""The benchmark's phases, one module each, in the order that `python -m bench` runs them.

Each phase is a function of the `bench.runner.Runner`; its name is the key of
`phase_seconds` in the results.
"""

from __future__ import annotations

from bench.phases import closed_loop, crud, drain, large, offload, seed, sweeps, tracing, visibility
from bench.runner import Phase, Runner

PHASES: tuple[tuple[str, Phase], ...] = (
    ("start", Runner.start),
    ("seed", seed.run),
    ("floor_approval_history", closed_loop.run),
    ("crud_baseline", crud.run),
    ("offload", offload.run),
    ("commit_to_visible", visibility.run),
    ("sweeps", sweeps.run),
    ("drain", drain.run),
    ("tracing", tracing.run),
    ("large_transaction", large.run),
)
