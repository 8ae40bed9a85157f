"""The benchmark's figures: windows from the generators' results, the metrics drawn from them, and the figure tree."""

from __future__ import annotations

import math

import pytest

from bench.figures import Collector, Window, excess_per_read, latency_of, read_metrics
from bench.load import JobResult


def _window(
    completed: int = 100,
    duration_s: float = 2.0,
    cpu_s: dict[str, float] | None = None,
    latency_s: float = 0.01,
) -> Window:
    return Window(
        duration_s=duration_s,
        latencies=[latency_s] * completed,
        completed=completed,
        errors={},
        dropped=0,
        cpu_s=cpu_s or {"server": 0.05},
    )


def test_a_window_merges_its_generators() -> None:
    results = [
        JobResult(latencies=[0.001, 0.002], completed=2, errors={"UNAVAILABLE": 1}, dropped=3),
        JobResult(latencies=[0.003], completed=1, errors={"UNAVAILABLE": 2, "INTERNAL": 1}),
    ]
    window = Window.of(results, 1.5, {"server": 0.3})
    assert sorted(window.latencies) == [0.001, 0.002, 0.003]
    assert window.completed == 3
    assert window.errors == {"UNAVAILABLE": 3, "INTERNAL": 1}
    assert window.dropped == 3
    assert window.throughput == pytest.approx(2.0)
    assert window.cpu_us_per_op("server") == pytest.approx(100_000)


def test_an_empty_window_has_nan_latencies_not_an_error() -> None:
    window = Window.of([], 1.0, {"server": 0.0})
    assert window.completed == 0
    assert math.isnan(window.latency().p99_ms)
    assert math.isnan(window.cpu_us_per_op("server"))
    assert latency_of([]).count == 0


def test_read_metrics_divide_by_the_floor_only_when_given() -> None:
    window = _window(completed=100, cpu_s={"server": 0.05})
    with_floor = read_metrics(window, "server", 250.0)
    assert with_floor["server_cpu_us_per_rpc"] == pytest.approx(500)
    assert with_floor["cpu_ratio_to_floor"] == pytest.approx(2.0)
    assert with_floor["throughput_rps"] == pytest.approx(50)
    assert with_floor["p50_ms"] == pytest.approx(10)
    assert "cpu_ratio_to_floor" not in read_metrics(window, "server", None)
    assert set(read_metrics(window, "server", None)) == {
        "throughput_rps",
        "p50_ms",
        "p99_ms",
        "p999_ms",
        "server_cpu_us_per_rpc",
    }


def test_excess_per_read_takes_off_the_baseline_rate() -> None:
    base = _window(completed=0, duration_s=2.0, cpu_s={"pg": 0.2})  # 0.1 s of CPU per second
    reads = _window(completed=100, duration_s=4.0, cpu_s={"pg": 0.5})  # 0.4 s expected, 0.1 s more
    assert excess_per_read(reads, base, "pg") == pytest.approx(1000)
    cheaper = _window(completed=100, duration_s=4.0, cpu_s={"pg": 0.3})
    assert excess_per_read(cheaper, base, "pg") == 0


def test_collector_builds_the_figure_tree_with_spreads_and_errors() -> None:
    collector = Collector()
    collector.add("history.get_payment_1", p99_ms=3.0)
    collector.add("history.get_payment_1", p99_ms=1.0)
    collector.add("history.get_payment_1", p99_ms=2.0)
    collector.add("crud_baseline", write_rate_achieved=100)
    collector.add_errors("history.get_payment_1", {"UNAVAILABLE": 2}, dropped=1)
    collector.add_errors("history.get_payment_1", {"UNAVAILABLE": 1})
    tree = collector.figures()
    assert tree["history"]["get_payment_1"]["p99_ms"] == {
        "median": 2.0,
        "min": 1.0,
        "max": 3.0,
        "reps": [3.0, 1.0, 2.0],
    }
    assert tree["history"]["get_payment_1"]["errors"] == {"UNAVAILABLE": 3, "DROPPED_BY_GENERATOR": 1}
    assert tree["crud_baseline"]["write_rate_achieved"]["median"] == 100.0


def test_add_window_records_the_metrics_and_the_errors() -> None:
    collector = Collector()
    window = Window(0.5, [0.002], 1, {"DEADLINE_EXCEEDED": 1}, 2, {"echo": 0.001})
    collector.add_window("echo_floor", window, "echo", None)
    tree = collector.figures()
    assert tree["echo_floor"]["server_cpu_us_per_rpc"]["median"] == pytest.approx(1000)
    assert tree["echo_floor"]["errors"] == {"DEADLINE_EXCEEDED": 1, "DROPPED_BY_GENERATOR": 2}
