"""Command line: `approval-svc serve` runs the gRPC server, `approval-svc migrate` and `downgrade` the migrations."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from payments_common import tracing
from payments_common.logs import configure_logging

log = logging.getLogger("approval_svc")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="approval-svc", description="The command side of the payments platform."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="run the gRPC server until SIGTERM")
    migrate = commands.add_parser("migrate", help="bring the database schema up to date, then exit")
    migrate.add_argument("--revision", default="head", help="the target revision (default: head)")
    downgrade = commands.add_parser(
        "downgrade", help="take the database schema back down to a revision, then exit"
    )
    downgrade.add_argument("--revision", required=True, help="the revision to go back to (0001 at least)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    # Imported here so that `--help` works without the service's dependencies loaded.
    from approval_svc.config import Settings

    # A migration serves no calls: it reads no authentication settings.
    settings = Settings.from_env_or_exit("approval-svc", serving=args.command == "serve")
    configure_logging("approval-svc", settings.log_level)

    if args.command in ("migrate", "downgrade"):
        from approval_svc import migrate

        if args.command == "downgrade" and args.revision == "base":
            # Below the first revision there are no tables: that is not a downgrade.
            log.error("downgrade stops at 0001: the base revision drops every table")
            return 2
        try:
            if args.command == "migrate":
                reached = migrate.upgrade(settings.database_url, args.revision)
            else:
                reached = migrate.downgrade(settings.database_url, args.revision)
        except Exception as error:
            log.error("migration failed: %s", error, exc_info=error)
            return 1
        # The revision reached, which is not the one asked for when the schema was past it.
        log.info("schema is at %s", reached)
        return 0

    import uvloop

    from approval_svc.server import serve

    tracing.configure_or_exit("approval-svc")
    try:
        uvloop.run(serve(settings))
    finally:
        tracing.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
