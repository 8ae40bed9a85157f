"""`python -m bench --quick` and `python -m bench.topologies --quick` as smoke tests: they run and report every figure.

The values are not asserted: they depend on the machine and its load. Only that each
figure is there, as finite (for the topologies, positive) numbers, and that the chart was drawn.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench import topologies
from bench.report import REQUIRED_FIGURES, missing_figures
from tests.support import ROOT


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_quick_benchmark_reports_every_figure(tmp_path: Path) -> None:
    out, chart = tmp_path / "r.json", tmp_path / "c.png"
    run = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out), "--chart", str(chart)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, f"bench --quick failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"

    results = json.loads(out.read_text())
    assert results["mode"] == "quick"
    assert missing_figures(results) == []
    assert len(REQUIRED_FIGURES) > 50
    for section in ("machine", "versions", "settings", "targets", "sweeps"):
        assert results[section], section
    for target in results["targets"]:
        assert isinstance(target["value"], float), target["name"]
        assert math.isfinite(target["value"]), target["name"]
    for points in results["sweeps"].values():
        assert points
        assert all(isinstance(p["p99_ms"], float) for p in points)
    assert chart.stat().st_size > 10_000
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_quick_topologies_report_every_figure_of_both(tmp_path: Path) -> None:
    out = tmp_path / "topologies.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.topologies", "--quick", "--reps", "1", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert run.returncode == 0, (
        f"bench.topologies --quick failed:\n{run.stdout[-4000:]}\n{run.stderr[-4000:]}"
    )

    results = json.loads(out.read_text())
    assert results["mode"] == "quick"
    assert results["settings"]["reps"] == 1
    assert [r["topology"] for r in results["runs"]] == ["single", "cluster"]
    assert topologies.missing_figures(results) == []
    assert len(topologies.required_figures()) > 100
    for section in ("machine", "versions", "settings"):
        assert results[section], section
    for topology in ("single", "cluster"):
        for node in topologies.NODES[topology]:
            assert results["figures"][topology]["commands"][node]["all"]["calls_per_payment"]["median"] > 0
    assert "| History GetPayment x3, throughput |" in run.stdout
    assert "| `evalsha` |" in run.stdout
