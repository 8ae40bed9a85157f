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
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench import report, runner
from bench.phases import PHASES
from bench.plan import FULL, QUICK
from bench.runner import Phase

ROOT = Path(__file__).resolve().parent.parent
# What every other phase needs: the stack, the accounts and the histories.
ALWAYS = ("start", "seed")


def select(phases: Sequence[tuple[str, Phase]], only: str | None) -> list[tuple[str, Phase]]:
    """The phases to run, in their order: all of them, or ALWAYS and those named in `only` (comma-separated)."""
    if only is None:
        return list(phases)
    wanted = {name.strip() for name in only.split(",") if name.strip()}
    unknown = wanted - {name for name, _ in phases}
    if unknown:
        raise SystemExit(f"unknown phases: {', '.join(sorted(unknown))}")
    return [(name, phase) for name, phase in phases if name in ALWAYS or name in wanted]


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the smoke-test size: under two minutes")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/latest.json")
    parser.add_argument("--chart", type=Path, default=None, help="default: bench/results/latency.png")
    parser.add_argument("--root", type=Path, default=None, help="where the stack's state and logs go")
    parser.add_argument(
        "--only",
        metavar="PHASE[,PHASE...]",
        help="run only these phases (after start and seed), e.g. one figure at full size; "
        "the figures of the others are then absent, which is not an error; the results go "
        "to bench/results/only.json and no chart is drawn unless --out and --chart say otherwise",
    )
    args = parser.parse_args(list(argv) if argv is not None else None)
    plan = QUICK if args.quick else FULL
    phases = select(PHASES, args.only)
    out = args.out or ROOT / ("bench/results/latest.json" if args.only is None else "bench/results/only.json")
    chart = args.chart or (ROOT / "bench/results/latency.png" if args.only is None else None)
    root = args.root or Path(tempfile.mkdtemp(prefix="payments-bench-"))
    results = runner.run(plan, root, phases, command=" ".join(["python -m bench", *sys.argv[1:]]))
    report.write_json(results, out)
    if chart is not None:
        report.write_chart(results, chart)
    print()
    print(report.markdown_table(results, skip_absent=args.only is not None))
    print()
    print(report.targets_table(results))
    print(f"\nresults: {out}\nchart:   {chart or 'none'}\nlogs:    {root}")
    missing = report.missing_figures(results)
    if missing and args.only is None:
        print(f"missing figures: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
