"""`python -m bench --quick` as a smoke test: it runs and reports every figure.

The values are not asserted: they depend on the machine and its load. Only that each
figure is there, as finite numbers, and that the chart was drawn.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

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
        timeout=230,
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
