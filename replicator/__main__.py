"""The replicator's command line: `replicator run` streams; `replicator reconcile` checks for drift."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from types import FrameType
from typing import TYPE_CHECKING

from payments_common.logs import configure_logging

if TYPE_CHECKING:
    from replicator.config import Settings

log = logging.getLogger("replicator")


def _run(settings: Settings) -> int:
    from payments_common.metrics import metrics_served
    from replicator.health import HealthServer
    from replicator.runner import Replicator

    health = (
        HealthServer(settings.health_port, credentials=settings.tls.server_credentials())
        if settings.health_port
        else None
    )
    replicator = Replicator(settings, on_ready=health.set_ready if health else None)

    def on_signal(signum: int, frame: FrameType | None) -> None:
        log.info("signal %s received; stopping", signum)
        replicator.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with metrics_served(settings.metrics_port):
        if health:
            health.start()
        log.info(
            "replicator starting",
            extra={
                "slot": settings.slot_name,
                "publication": settings.publication,
                "health_port": health.port if health else 0,
                "metrics_port": settings.metrics_port,
            },
        )
        outcome: list[int] = []
        worker = threading.Thread(target=lambda: outcome.append(replicator.run_forever()), name="replication")
        worker.start()
        while worker.is_alive():
            worker.join(timeout=0.5)
        if health:
            health.stop()
    return outcome[0] if outcome else 1


def _reconcile(settings: Settings, args: argparse.Namespace) -> int:
    from replicator.reconcile import ReconcileError, reconcile

    try:
        report = reconcile(settings, wait_seconds=args.wait_seconds, max_printed=args.max_printed)
    except ReconcileError as error:
        print(f"replicator reconcile: {error}", file=sys.stderr)
        return 2
    for line in report.lines():
        print(line)
    return 0 if report.clean else 1


def _retire(settings: Settings, args: argparse.Namespace) -> int:
    from replicator.retire import Unreachable, VersionInUse, retire

    def progress(line: str) -> None:
        print(f"replicator retire: {line}", file=sys.stderr, flush=True)

    try:
        done = retire(
            settings, args.namespace, args.slot, batch=args.batch, dry_run=args.dry_run, progress=progress
        )
    except VersionInUse as error:
        print(f"replicator retire: {error}", file=sys.stderr)
        return 3
    except Unreachable as error:
        print(f"replicator retire: cannot reach {error}", file=sys.stderr)
        return 4
    print(done.summary())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="replicator", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("run", help="stream the source into the Redis read models")
    check = commands.add_parser("reconcile", help="compare every source row with its read model")
    check.add_argument("--wait-seconds", type=float, default=30.0, help="how long to wait for the checkpoint")
    check.add_argument("--max-printed", type=int, default=100, help="print at most this many differences")
    retiring = commands.add_parser(
        "retire",
        help="remove a read-model version: drop its slot, then delete its keys in batches",
        description="Takes the version's lock, drops its replication slot, then deletes every key of "
        "its namespace, at most --batch keys per Redis call, reporting progress on stderr. Run again "
        "to finish an interrupted retirement. Exit status: 0 done, 2 bad settings, 3 the version is "
        "in use (a replicator holds its lock or a walsender its slot), 4 PostgreSQL or Redis not reached.",
    )
    retiring.add_argument("--namespace", required=True, help="the key namespace of the version, e.g. rm:v1")
    retiring.add_argument("--slot", required=True, help="the replication slot that feeds it")
    retiring.add_argument("--batch", type=int, default=500, help="keys deleted per Redis call (default 500)")
    retiring.add_argument(
        "--dry-run", action="store_true", help="count what would be removed; change nothing"
    )
    args = parser.parse_args(argv)
    # Imported here so that `--help` works without the service's dependencies loaded.
    from replicator.config import Settings

    settings = Settings.from_env_or_exit("replicator")
    configure_logging("replicator", settings.log_level)
    if args.command == "run":
        return _run(settings)
    if args.command == "retire":
        return _retire(settings, args)
    return _reconcile(settings, args)


if __name__ == "__main__":
    sys.exit(main())
