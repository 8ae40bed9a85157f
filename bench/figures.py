"""From measurements to figures: a measured window, the metrics drawn from it, and the tree of every figure's repetitions."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from bench import stats
from bench.load import JobResult


@dataclass
class Window:
    """One measured window: what the load generators saw and what the servers spent."""

    duration_s: float
    latencies: list[float]
    completed: int
    errors: dict[str, int]
    dropped: int
    cpu_s: dict[str, float]
    served: int = 0  # open loop: the calls that returned OK inside the window (`JobResult.served`)

    @classmethod
    def of(cls, results: Iterable[JobResult], duration_s: float, cpu_s: dict[str, float]) -> Window:
        """The window of several generators' results, with the servers' CPU across it."""
        results = list(results)
        errors: Counter[str] = Counter()
        for result in results:
            errors.update(result.errors)
        return cls(
            duration_s=duration_s,
            latencies=stats.merge(r.latencies for r in results),
            completed=sum(r.completed for r in results),
            errors=dict(errors),
            dropped=sum(r.dropped for r in results),
            cpu_s=cpu_s,
            served=sum(r.served for r in results),
        )

    @property
    def throughput(self) -> float:
        return self.completed / self.duration_s

    def latency(self) -> stats.Latency:
        return latency_of(self.latencies)

    def cpu_us_per_op(self, name: str) -> float:
        return stats.per_op(self.cpu_s[name] * 1e6, self.completed)


def latency_of(seconds: list[float]) -> stats.Latency:
    """The percentiles of a sample; NaN (a missing figure) for an empty one."""
    return stats.latency(seconds) if seconds else stats.Latency(0, *([math.nan] * 6))


def read_metrics(window: Window, server: str, floor_us: float | None) -> dict[str, float]:
    """A closed-loop figure: throughput, latency, the server's CPU per RPC and, given the floor's, their ratio."""
    lat = window.latency()
    per_rpc = window.cpu_us_per_op(server)
    metrics = {
        "throughput_rps": window.throughput,
        "p50_ms": lat.p50_ms,
        "p99_ms": lat.p99_ms,
        "p999_ms": lat.p999_ms,
        "server_cpu_us_per_rpc": per_rpc,
    }
    if floor_us is not None:
        metrics["cpu_ratio_to_floor"] = stats.ratio(per_rpc, floor_us)
    return metrics


def excess_per_read(window: Window, baseline: Window, resource: str) -> float:
    """CPU µs per read that `resource` spent beyond what the baseline window's writes cost."""
    extra = stats.excess(
        window.cpu_s[resource], window.duration_s, baseline.cpu_s[resource], baseline.duration_s
    )
    return stats.per_op(extra * 1e6, window.completed)


class Collector:
    """Gathers one value per repetition for each metric of each figure."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}
        self.errors: dict[str, Counter[str]] = {}

    def add(self, figure: str, **metrics: float) -> None:
        for name, value in metrics.items():
            self.values.setdefault(f"{figure}.{name}", []).append(float(value))

    def add_errors(self, figure: str, errors: dict[str, int], dropped: int = 0) -> None:
        counter = self.errors.setdefault(figure, Counter())
        counter.update(errors)
        if dropped:
            counter["DROPPED_BY_GENERATOR"] += dropped

    def add_window(self, figure: str, window: Window, server: str, floor_us: float | None) -> None:
        """A closed-loop figure's metrics (`read_metrics`) and its errors."""
        self.add(figure, **read_metrics(window, server, floor_us))
        self.add_errors(figure, window.errors, window.dropped)

    def figures(self) -> dict[str, Any]:
        tree: dict[str, Any] = {}
        for path, values in self.values.items():
            node = tree
            *parents, leaf = path.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = stats.spread(values).as_dict()
        for figure, counter in self.errors.items():
            node = tree
            for part in figure.split("."):
                node = node.setdefault(part, {})
            node["errors"] = dict(counter)
        return tree
