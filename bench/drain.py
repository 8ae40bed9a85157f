"""The replicator's drain alone: the benchmark's drain phase on a stack of PostgreSQL, Redis and the replicator only.

```sh
python -m bench.drain [--payments 50000] [--reps 3] [--profile /tmp/drain.svg] [--env NAME=value]
```

Starts a private PostgreSQL (fsync off) and Redis, migrates, opens accounts, lets the
replicator bootstrap, then repeats `bench.phases.drain.once`, the code of the figure
in `python -m bench`: stop the replicator, commit the backlog (`bench.backlog`, 4 row
changes per payment), start `python -m replicator run` again and poll the checkpoint
until it reaches the backlog's last position. Prints changes/s (wall clock, from the
restart) and the replicator process's CPU µs per change (user + system, from /proc),
the stable figure on a shared machine; the last line is the median of the repetitions.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

import psycopg2
import redis

from approval_svc import migrate
from bench import cpu
from bench.phases import drain
from bench.runner import settle
from payments_common.keys import DEFAULT_SLOT_NAME
from stack.replication import (
    current_wal_lsn,
    replicator_env,
    start_replicator,
    wait_for_checkpoint,
)
from stack.servers import running_postgres, running_redis


def _open_accounts(dsn: str, count: int) -> list[str]:
    ids = [str(uuid.uuid4()) for _ in range(count)]
    connection = psycopg2.connect(dsn)
    try:
        with connection, connection.cursor() as cursor:
            for i, account_id in enumerate(ids):
                cursor.execute(
                    "INSERT INTO accounts (account_id, owner_name, currency_code, status, ledger_balance_minor, "
                    "per_payment_limit_minor, daily_limit_minor) "
                    "VALUES (%s, %s, 'EUR', 'ACTIVE', 1000000000000000, 1000000000, 1000000000000)",
                    (account_id, f"drain owner {i}"),
                )
    finally:
        connection.close()
    return ids


class ReplicationOnly:
    """PostgreSQL, Redis and one replicator process: the `drain.Replication` of this command."""

    def __init__(
        self,
        dsn: str,
        redis_url: str,
        postgres_pid: int,
        redis_pid: int,
        accounts: list[str],
        log: Path,
        extra_env: Mapping[str, str],
    ) -> None:
        self.dsn = dsn
        self.redis_url = redis_url
        self.slot = DEFAULT_SLOT_NAME
        self.accounts = accounts
        self.log = log
        self.env = replicator_env(
            dsn, redis_url, slot=self.slot, extra={"REPLICATOR_LOG_LEVEL": "WARNING", **extra_env}
        )
        self.postgres_pid = postgres_pid
        self.redis_pid = redis_pid
        self.process: subprocess.Popen[bytes] | None = None

    def settle(self) -> None:
        settle(self.dsn, self.redis_url, self.accounts[0], self.slot, alive=self.replicator_alive)

    def stop_replicator(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)

    def start_replicator(self, extra_env: Mapping[str, str] | None = None) -> int:
        self.process = start_replicator({**self.env, **(extra_env or {})}, self.log)
        return self.process.pid

    def replicator_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def replicator_ready(self) -> None:
        """Nothing to wait for: this replicator's health port is not watched."""

    def redis_cpu(self) -> cpu.Snapshot:
        return cpu.snapshot([self.redis_pid])

    def pg_cpu(self) -> cpu.Snapshot:
        return cpu.tree_snapshot(self.postgres_pid)


@contextlib.contextmanager
def _profiled(pid: int, out: Path) -> Iterator[None]:
    """Records `pid` with py-spy into `out` (raw stacks for a .txt, else a flame graph) until the block ends."""
    profiler = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "-o",
            str(out),
            *(["--format", "raw"] if out.suffix == ".txt" else []),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield
    finally:
        profiler.send_signal(signal.SIGINT)
        profiler.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__.split("\n")[0])
    parser.add_argument("--payments", type=int, default=50_000, help="payments per backlog (4 changes each)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--profile", type=Path, help="record the replicator with py-spy into this file")
    parser.add_argument("--env", action="append", default=[], help="extra NAME=value for the replicator")
    args = parser.parse_args(argv)
    extra_env = dict(item.split("=", 1) for item in args.env)
    drains: list[drain.Drain] = []
    with tempfile.TemporaryDirectory(prefix="drain-") as tmp, running_postgres() as pg, running_redis() as rd:
        assert pg.process is not None
        assert rd.process is not None
        dsn = pg.create_database("drain")
        migrate.upgrade(dsn)
        stack = ReplicationOnly(
            dsn,
            rd.url(),
            pg.process.pid,
            rd.process.pid,
            _open_accounts(dsn, args.accounts),
            Path(tmp) / "replicator.log",
            extra_env,
        )
        stack.start_replicator()
        try:
            # The bootstrap: the slot is created and the read model built from the accounts.
            client = redis.Redis.from_url(stack.redis_url)
            try:
                wait_for_checkpoint(
                    client, current_wal_lsn(dsn), 120, stack.slot, alive=stack.replicator_alive
                )
            finally:
                client.close()
            for rep in range(args.reps):
                last = args.profile is not None and rep == args.reps - 1
                observe = (lambda pid: _profiled(pid, args.profile)) if last else None
                d = drain.once(stack, stack.accounts, args.payments, observe)
                drains.append(d)
                print(
                    f"rep {rep + 1}: {d.changes:,} changes in {d.elapsed_s:.2f}s = {d.changes_per_s:,.0f} changes/s, "
                    f"replicator CPU {d.cpu_s:.2f}s = {d.cpu_us_per_change:.1f} µs/change",
                    flush=True,
                )
        finally:
            failed = stack.process is not None and stack.process.poll() not in (0, None)
            stack.stop_replicator()
            if failed:
                print(stack.log.read_text()[-4000:], file=sys.stderr)
    rates = [d.changes_per_s for d in drains]
    cpus = [d.cpu_us_per_change for d in drains]
    print(
        f"median of {len(rates)}: {statistics.median(rates):,.0f} changes/s, "
        f"{statistics.median(cpus):.1f} µs CPU/change (min {min(cpus):.1f}, max {max(cpus):.1f}); "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
