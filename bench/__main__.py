"""`python -m bench [--quick]`: read side, write side, gRPC floor, CRUD baseline and replication, in one run.

Starts the local stack (fsync on) plus the echo floor and the CRUD baseline servers,
drives them from load-generator processes, and writes bench/results/latest.json, a
table on stdout and a PNG chart. docs/benchmark.md explains each figure; the runner is
bench/runner.py, each phase a module of bench/phases/.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path

from bench import report, runner
from bench.phases import PHASES
from bench.plan import FULL, QUICK

ROOT = Path(__file__).resolve().parent.parent


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the smoke-test size: under two minutes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/latest.json")
    parser.add_argument("--chart", type=Path, default=ROOT / "bench/results/latency.png")
    parser.add_argument("--root", type=Path, default=None, help="where the stack's state and logs go")
    args = parser.parse_args(list(argv) if argv is not None else None)
    plan = QUICK if args.quick else FULL
    root = args.root or Path(tempfile.mkdtemp(prefix="payments-bench-"))
    results = runner.run(plan, root, PHASES, command=" ".join(["python -m bench", *sys.argv[1:]]))
    report.write_json(results, args.out)
    report.write_chart(results, args.chart)
    print()
    print(report.markdown_table(results))
    print()
    print(report.targets_table(results))
    print(f"\nresults: {args.out}\nchart:   {args.chart}\nlogs:    {root}")
    missing = report.missing_figures(results)
    if missing:
        print(f"missing figures: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
