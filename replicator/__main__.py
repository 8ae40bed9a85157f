"""The replicator's command line: `run` streams; `reconcile` checks for drift; `status` shows the slot; `retire` removes a version."""

from __future__ import annotations

import argparse
import logging
import math
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
    from payments_common import tracing
    from payments_common.metrics import metrics_served
    from replicator import metrics
    from replicator.health import HealthServer
    from replicator.runner import Replicator
    from replicator.slotwatch import SlotWatch

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
    tracing.configure_or_exit("replicator")
    # Every series names the version this process replicates, so that two side by side differ.
    metrics.identify(slot=settings.slot_name, key_namespace=settings.namespace)
    # The slot's gauges, read whatever the replication loop is doing; only worth it when served.
    watch = (
        SlotWatch(settings.database_url, settings.slot_name, settings.slot_sample_seconds)
        if settings.metrics_port
        else None
    )
    with metrics_served(settings.metrics_port):
        if watch:
            watch.start()
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
        if watch:
            watch.stop()
    tracing.shutdown()
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


def _namespace(value: str) -> str:
    """A key namespace that matches only its own keys: a glob character would reach others'."""
    from payments_common.keys import namespace_problem

    problem = namespace_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def _slot(value: str) -> str:
    from payments_common.keys import slot_problem

    problem = slot_problem(value)
    if problem:
        raise argparse.ArgumentTypeError(problem)
    return value


def _batch(value: str) -> int:
    from replicator.retire import MAX_BATCH

    number = int(value)
    if not 1 <= number <= MAX_BATCH:
        raise argparse.ArgumentTypeError(f"from 1 to {MAX_BATCH}, got {number}")
    return number


# The longest `status --timeout`: far beyond any useful wait, and well within what
# PostgreSQL's statement_timeout (milliseconds, a 32-bit integer) accepts.
MAX_TIMEOUT_SECONDS = 3600


def _timeout(value: str) -> float:
    """Seconds to wait for a server: above 0 (0 would not wait at all) and at most MAX_TIMEOUT_SECONDS."""
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of seconds, got {value!r}") from None
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT_SECONDS):
        raise argparse.ArgumentTypeError(
            f"a number of seconds above 0 and at most {MAX_TIMEOUT_SECONDS}, got {value!r}"
        )
    return seconds


def _retire(settings: Settings, args: argparse.Namespace) -> int:
    from replicator.retire import RetireFailed, Unreachable, VersionInUse, retire

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
    except RetireFailed as error:
        print(f"replicator retire: failed, run it again once fixed: {error}", file=sys.stderr)
        return 1
    print(done.summary())
    return 0


def _status(settings: Settings, args: argparse.Namespace) -> int:
    import json

    from replicator.status import as_json, read_status, table

    status = read_status(settings, timeout_seconds=args.timeout)
    if args.json:
        print(json.dumps(as_json(status), indent=2))
    else:
        print(table(status))
    return status.exit_code


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
        "to finish an interrupted retirement. Exit status: 0 done, 1 a step refused (run it again once "
        "fixed), 2 bad settings or arguments, 3 the version is in use (a replicator holds its lock or a "
        "walsender its slot) or the slot and namespace are not one version's, 4 PostgreSQL or Redis "
        "not reached.",
    )
    retiring.add_argument(
        "--namespace", required=True, type=_namespace, help="the key namespace of the version, e.g. rm:v1"
    )
    retiring.add_argument("--slot", required=True, type=_slot, help="the replication slot that feeds it")
    retiring.add_argument(
        "--batch", type=_batch, default=500, help="keys deleted per Redis call (default 500, at most 5000)"
    )
    retiring.add_argument(
        "--dry-run", action="store_true", help="count what would be removed; change nothing"
    )
    status = commands.add_parser(
        "status",
        help="the slot, the WAL it keeps, the checkpoint, the lag and the lock's owner",
        description="Exit status: 0 ok, 2 bad settings or arguments, 3 the slot is missing, 4 PostgreSQL "
        "or Redis not reached or refused, 5 the slot was invalidated (wal_status lost). See "
        "docs/operations.md.",
    )
    status.add_argument("--json", action="store_true", help="print the JSON document of docs/operations.md")
    status.add_argument(
        "--timeout",
        type=_timeout,
        default=5.0,
        help=f"seconds to wait for each of PostgreSQL and Redis: above 0, at most {MAX_TIMEOUT_SECONDS} "
        "(default 5)",
    )
    args = parser.parse_args(argv)
    # Imported here so that `--help` works without the service's dependencies loaded.
    from replicator.config import Settings

    settings = Settings.from_env_or_exit("replicator")
    if args.command == "status":
        # Its standard output is the report (JSON with --json): no log lines there.
        return _status(settings, args)
    configure_logging("replicator", settings.log_level)
    if args.command == "run":
        return _run(settings)
    if args.command == "retire":
        return _retire(settings, args)
    return _reconcile(settings, args)


if __name__ == "__main__":
    sys.exit(main())
