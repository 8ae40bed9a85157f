"""The history service's command line: `history-svc serve` (or `python -m history_svc serve`)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from payments_common import tracing
from payments_common.logs import configure_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="history-svc",
        description="The payments query side: answers payment history from the Redis read models.",
        epilog="Settings come from HISTORY_* environment variables; see docs/history.md.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the gRPC server until SIGTERM")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    _parser().parse_args(argv)
    # Imported here so that `--help` works without the service's dependencies loaded.
    from history_svc.config import Settings

    settings = Settings.from_env_or_exit("history-svc")
    configure_logging("history-svc", settings.log_level)

    import uvloop

    from history_svc.server import serve

    tracing.configure_or_exit("history-svc")
    try:
        uvloop.run(serve(settings))
    finally:
        tracing.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
