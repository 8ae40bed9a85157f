"""`python -m stack up|down|demo`: the local stack and the demo scenario."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stack import local

ROOT = Path(__file__).resolve().parent.parent / ".stack"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "demo"])
    parser.add_argument("--root", type=Path, default=ROOT, help="where state, data and logs go")
    parser.add_argument("--history", type=int, default=2, help="number of history processes")
    args = parser.parse_args(argv)
    if args.command == "up":
        try:
            local.up(args.root, history_count=args.history)
        except Exception as error:
            print(f"make up failed: {error}", file=sys.stderr)
            return 1
        return 0
    if args.command == "down":
        local.down(args.root)
        return 0
    from stack.demo import run  # imports the generated stubs only when needed

    return run(args.root, history_count=args.history)


if __name__ == "__main__":
    sys.exit(main())
