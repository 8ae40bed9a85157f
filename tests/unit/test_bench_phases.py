"""The phases' own arithmetic: the CRUD comparison, the offload, commit-to-visible, a sweep point, the drain, the large transaction; their order; the targets."""

from __future__ import annotations

import math
import os

import pytest

from bench import report
from bench.__main__ import select
from bench.figures import Collector, Window
from bench.load import JobResult
from bench.phases import PHASES, crud, drain, large, offload, sweeps, visibility
from bench.report import REQUIRED_FIGURES


def _window(latency_s: float, completed: int, cpu_s: dict[str, float], duration_s: float = 2.0) -> Window:
    return Window(duration_s, [latency_s] * completed, completed, {}, 0, cpu_s)


def test_phases_run_in_the_order_of_the_results_phase_seconds() -> None:
    assert [name for name, _ in PHASES] == [
        "start",
        "seed",
        "floor_approval_history",
        "crud_baseline",
        "offload",
        "commit_to_visible",
        "sweeps",
        "drain",
        "tracing",
        "large_transaction",
    ]


def test_only_some_phases_run_after_the_stack_and_the_seed() -> None:
    assert select(PHASES, None) == list(PHASES)
    chosen = select(PHASES, "large_transaction, floor_approval_history")
    assert [name for name, _ in chosen] == ["start", "seed", "floor_approval_history", "large_transaction"]
    with pytest.raises(SystemExit):
        select(PHASES, "offload,nonsense")


def test_crud_comparison_takes_the_writes_baseline_off_each_side() -> None:
    base = _window(0.0, 0, {"pg": 0.2, "redis": 0.02, "crud": 0.0, "history": 0.01})
    crud_w = _window(0.004, 500, {"pg": 0.45, "redis": 0.02, "crud": 0.2, "history": 0.01})
    hist_w = _window(0.002, 500, {"pg": 0.2, "redis": 0.07, "crud": 0.0, "history": 0.11})
    figures = crud.compare(crud_w, hist_w, base)
    assert {f"crud_baseline.get_payment.{name}" for name in figures} >= {
        path for path in REQUIRED_FIGURES if path.startswith("crud_baseline.get_payment.")
    }
    assert figures["p50_ratio"] == pytest.approx(2.0)
    assert figures["p99_ratio"] == pytest.approx(2.0)
    assert figures["crud_throughput_rps"] == pytest.approx(250)
    assert figures["crud_server_cpu_us_per_rpc"] == pytest.approx(400)
    assert figures["pg_cpu_us_per_read_crud"] == pytest.approx(500)  # (0.45 - 0.2) s over 500 reads
    assert figures["pg_cpu_us_per_read_history"] == 0
    assert figures["redis_cpu_us_per_read_history"] == pytest.approx(100)
    assert figures["history_server_cpu_us_per_rpc"] == pytest.approx(220)
    assert figures["history_server_cpu_us_per_rpc_baseline_excluded"] == pytest.approx(200)
    assert figures["pg_cpu_share_baseline"] == pytest.approx(0.1)


def test_offload_figures_of_a_side_and_the_ratios_between_sides() -> None:
    crud_writes = _window(0.100, 400, {"pg": 0.8, "approval": 0.5})
    history_writes = _window(0.050, 600, {"pg": 0.6, "approval": 0.7})
    # 1,500 reads/s offered over 2 s: the CRUD side served 1,000/s, with 3 failures.
    crud_reads = Window(2.0, [1.5] * 2900, 2900, {"DEADLINE_EXCEEDED": 2}, 1, {}, served=2000)
    history_reads = Window(2.0, [0.004] * 3000, 3000, {}, 0, {}, served=2990)
    crud_side = offload.side_metrics(crud_writes, crud_reads, 1500.0)
    history_side = offload.side_metrics(history_writes, history_reads, 1500.0)
    assert {f"offload.crud.{name}" for name in crud_side} >= {
        path for path in REQUIRED_FIGURES if path.startswith("offload.crud.")
    }
    assert crud_side["write_throughput_rps"] == pytest.approx(200)
    assert crud_side["write_p99_ms"] == pytest.approx(100)
    assert crud_side["postgres_cpu_us_per_write"] == pytest.approx(2000)
    assert crud_side["approval_cpu_us_per_write"] == pytest.approx(1250)
    assert crud_side["read_rate_achieved"] == pytest.approx(1000)
    assert crud_side["read_failed"] == 3
    assert crud_side["read_sustained"] == 0
    assert history_side["read_rate_achieved"] == pytest.approx(1495)
    assert history_side["read_sustained"] == 1
    ratios = offload.ratios(crud_writes, history_writes)
    assert ratios["write_throughput_ratio"] == pytest.approx(1.5)
    assert ratios["write_p99_ratio"] == pytest.approx(2.0)


def test_offload_sides_alternate_from_one_repetition_to_the_next() -> None:
    assert [offload.order(rep) for rep in range(3)] == [
        ("crud", "history"),
        ("history", "crud"),
        ("crud", "history"),
    ]


def test_visibility_at_a_share_of_approval_takes_the_median_measured_so_far() -> None:
    collector = Collector()
    for throughput in (600.0, 700.0, 650.0):
        collector.add("approval_submit", throughput_rps=throughput)
    assert visibility.approval_rate(collector) == 650
    assert visibility.SHARE_OF_APPROVAL == 0.8
    with pytest.raises(RuntimeError):
        visibility.approval_rate(Collector())


def test_visibility_counts_every_generator_and_what_it_missed() -> None:
    results = [
        JobResult(completed=3, delays=[0.001, 0.002, 0.0], submit_delays=[0.005] * 3, missing=1),
        JobResult(completed=2, delays=[0.004, 0.003], submit_delays=[0.006] * 2, seen_before_ack=1),
    ]
    figures = visibility.metrics(results, offered_rate=500.0, window_s=2.0)
    assert figures["offered_rate"] == 500
    assert figures["achieved_rate"] == pytest.approx(2.5)
    assert figures["acknowledged"] == 5
    assert figures["missing"] == 1
    assert figures["seen_before_ack"] == 1
    assert figures["p50_ms"] == pytest.approx(2.0)
    assert figures["max_ms"] == pytest.approx(4.0)
    assert figures["submit_to_visible_p99_ms"] == pytest.approx(6.0, rel=0.01)


def test_visibility_with_nothing_seen_is_nan_not_an_error() -> None:
    figures = visibility.metrics([JobResult()], offered_rate=100.0, window_s=1.0)
    assert math.isnan(figures["p99_ms"])
    assert figures["acknowledged"] == 0


def test_a_sweep_point_is_what_the_chart_draws() -> None:
    window = Window(1.0, [0.001] * 90, 90, {"UNAVAILABLE": 2, "INTERNAL": 1}, 4, {})
    point = sweeps.point(100.0, window)
    assert point == {
        "offered_rps": 100.0,
        "achieved_rps": 90.0,
        "p50_ms": pytest.approx(1.0),
        "p90_ms": pytest.approx(1.0),
        "p99_ms": pytest.approx(1.0),
        "errors": 3,
        "dropped": 4,
    }


def test_drain_figures_from_restart_and_from_the_first_apply() -> None:
    drained = drain.Drain(
        changes=20_000,
        elapsed_s=2.0,
        startup_s=0.4,
        cpu_s=0.6,
        redis_cpu_s=0.2,
        pg_cpu_s=0.1,
        generation_s=3.0,
    )
    figures = drained.metrics()
    assert {f"replication.drain.{name}" for name in figures} >= {
        path for path in REQUIRED_FIGURES if path.startswith("replication.drain.")
    }
    assert figures["changes_per_s"] == pytest.approx(10_000)
    assert figures["changes_per_s_steady"] == pytest.approx(12_500)
    assert figures["cpu_us_per_change"] == pytest.approx(30)
    assert figures["redis_cpu_us_per_change"] == pytest.approx(10)
    assert figures["postgres_cpu_us_per_change"] == pytest.approx(5)
    assert figures["generation_s"] == 3.0


def test_large_transaction_figures() -> None:
    applied = large.Applied(
        changes=1_000_000,
        statement_s=12.0,
        elapsed_s=50.0,
        cpu_s=30.0,
        pg_cpu_s=10.0,
        rss_before_bytes=80 * 1024 * 1024,
        peak_rss_bytes=200 * 1024 * 1024,
    )
    figures = applied.metrics()
    assert {f"large_transaction.{name}" for name in figures} >= {
        path for path in REQUIRED_FIGURES if path.startswith("large_transaction.")
    }
    assert figures["changes_per_s"] == pytest.approx(20_000)
    assert figures["cpu_us_per_change"] == pytest.approx(30)
    assert figures["postgres_cpu_us_per_change"] == pytest.approx(10)
    assert figures["peak_rss_mb"] == pytest.approx(200)
    assert figures["peak_rss_growth_mb"] == pytest.approx(120)


def test_a_process_peak_rss_resets_to_its_rss_now() -> None:
    pid = os.getpid()
    grown = bytearray(64 * 1024 * 1024)
    for i in range(0, len(grown), 4096):
        grown[i] = 1
    del grown
    assert large.memory(pid, "VmHWM") - large.memory(pid, "VmRSS") > 32 * 1024 * 1024
    large.reset_peak(pid)
    assert large.memory(pid, "VmHWM") - large.memory(pid, "VmRSS") < 8 * 1024 * 1024


def test_targets_judge_the_median_and_leave_missing_figures_undecided() -> None:
    figures = {
        "replication": {
            "drain": {"changes_per_s": {"median": 31_000.0}, "cpu_us_per_change": {"median": 18.5}}
        },
        "approval_submit": {"throughput_rps": {"median": 480.0}, "cpu_ratio_to_floor": {"median": 2.5}},
    }
    found = {t["figure"]: t for t in report.targets(figures)}
    assert found["replication.drain.changes_per_s"]["met"] is True
    assert found["replication.drain.cpu_us_per_change"]["met"] is False
    assert found["approval_submit.cpu_ratio_to_floor"]["met"] is True
    assert found["approval_submit.throughput_rps"]["met"] is False
    assert found["approval_submit.throughput_rps"]["value"] == 480.0
    missing = found["history.get_payment_1.cpu_ratio_to_floor"]
    assert missing["met"] is None
    assert math.isnan(missing["value"])


def test_stages_that_cannot_be_read_are_nan_figures_not_a_failed_run() -> None:
    from stack.servers import free_port

    nobody = f"127.0.0.1:{free_port()}"  # nothing listens there
    stages = visibility.Stages({"REPLICATOR_METRICS_ADDR": nobody, "HISTORY_METRICS_ADDRS": nobody})
    stages.begin()
    stages.end()
    figures = stages.figures()
    # Every stage figure that the report requires of a window (the services' own), and no other.
    prefix = "replication.commit_to_visible."
    stage_figures = {
        name
        for name in REQUIRED_FIGURES
        if name.startswith(prefix + "replicator_") or name.startswith(prefix + "history_")
    }
    assert len(stage_figures) == 8
    assert {prefix + name for name in figures} == stage_figures
    assert all(math.isnan(value) for value in figures.values())
