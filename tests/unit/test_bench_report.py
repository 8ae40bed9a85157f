"""The benchmark's report: the list of required figures, strict JSON, the table, and the load split."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from bench import report
from bench.load import split


def _results(value: float = 1.0) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for path in report.REQUIRED_FIGURES:
        node = figures
        *parents, leaf = path.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = {"median": value, "min": value, "max": value, "reps": [value]}
    return {"mode": "quick", "settings": {"reps": 1}, "figures": figures, "targets": [], "sweeps": {}}


def test_every_figure_present_means_nothing_missing() -> None:
    assert report.missing_figures(_results()) == []


def test_an_absent_figure_is_missing() -> None:
    results = _results()
    del results["figures"]["replication"]["drain"]["changes_per_s"]
    assert report.missing_figures(results) == ["replication.drain.changes_per_s"]


def test_a_nan_or_null_figure_is_missing() -> None:
    results = _results()
    results["figures"]["echo_floor"]["p99_ms"]["median"] = math.nan
    results["figures"]["echo_floor"]["p50_ms"]["max"] = None
    assert report.missing_figures(results) == ["echo_floor.p50_ms", "echo_floor.p99_ms"]


def test_json_is_strict_with_nan_as_null(tmp_path: Path) -> None:
    results = _results()
    results["figures"]["echo_floor"]["p99_ms"]["median"] = math.inf
    path = tmp_path / "r.json"
    report.write_json(results, path)
    loaded = json.loads(path.read_text(), parse_constant=lambda name: pytest.fail(f"non-JSON {name}"))
    assert loaded["figures"]["echo_floor"]["p99_ms"]["median"] is None


def test_table_has_a_row_per_figure_line() -> None:
    table = report.markdown_table(_results(1234.5))
    assert table.splitlines()[0].startswith("| figure | median of 1 |")
    assert "| gRPC floor (echo), throughput | 1,234 | 1,234-1,234 | RPC/s |" in table


def test_table_can_leave_out_the_figures_not_measured() -> None:
    results = _results(1234.5)
    del results["figures"]["echo_floor"]
    assert "| gRPC floor (echo), throughput | n/a |  | RPC/s |" in report.markdown_table(results)
    table = report.markdown_table(results, skip_absent=True)
    assert "gRPC floor" not in table
    assert "| Approval SubmitPayment, throughput | 1,234 |" in table


def test_targets_table_shows_misses() -> None:
    results = _results()
    results["targets"] = [{"name": "drain", "goal": ">= 1", "value": 0.5, "met": False}]
    assert "| drain | >= 1 | 0.50 | **no** |" in report.targets_table(results)


def test_chart_is_a_png(tmp_path: Path) -> None:
    results = _results()
    results["sweeps"] = {
        "echo": [
            {"offered_rps": 100.0, "p50_ms": 1.0, "p90_ms": 2.0, "p99_ms": 3.0},
            {"offered_rps": 200.0, "p50_ms": 1.5, "p90_ms": 2.5, "p99_ms": 9.0},
        ]
    }
    path = tmp_path / "c.png"
    report.write_chart(results, path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_split_shares_a_total_evenly() -> None:
    assert split(32, 2) == [16.0, 16.0]
    assert split(5, 2) == [3.0, 2.0]
    assert split(500.5, 2) == [250.25, 250.25]
    with pytest.raises(ValueError, match="positive"):
        split(1, 0)
