"""Which figures a run of `python -m bench.topologies` must have: present, and positive but for the CPU at rest."""

from __future__ import annotations

from typing import Any

from bench import topologies


def _results(value: float = 1.0) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for path in topologies.required_figures():
        node = figures
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = {"median": value, "min": value, "max": value}
    return {"figures": figures}


def _set(results: dict[str, Any], path: str, value: float) -> None:
    node = results["figures"]
    *parents, leaf = path.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = {"median": value, "min": value, "max": value}


def test_a_run_with_every_figure_positive_misses_none() -> None:
    assert topologies.missing_figures(_results()) == []


def test_an_idle_redis_may_use_no_cpu_at_rest_but_a_measured_figure_may_not_be_zero() -> None:
    results = _results()
    # Less than one tick of the CPU clock in the window: zero, a value.
    _set(results, "single.redis_at_rest.cpu_ms_per_s", 0.0)
    assert topologies.missing_figures(results) == []
    _set(results, "single.drain.changes_per_s", 0.0)
    _set(results, "cluster.redis_at_rest.cpu_ms_per_s", float("nan"))
    assert topologies.missing_figures(results) == [
        "single.drain.changes_per_s",
        "cluster.redis_at_rest.cpu_ms_per_s",
    ]
