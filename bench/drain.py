"""The replicator's drain alone: a backlog committed while it is stopped, then timed until applied.

```sh
python -m bench.drain [--payments 50000] [--reps 3] [--profile /tmp/drain.svg]
```

Starts a private PostgreSQL (fsync off) and Redis, migrates, opens accounts, lets the
replicator bootstrap, stops it, commits the backlog (`bench.backlog`, 4 row changes per
payment), starts `python -m replicator run` again and polls the checkpoint until it
reaches the backlog's last position. Prints changes/s (wall clock, from the restart) and
the replicator process's CPU µs per change (user + system, from /proc), the stable
figure on a shared machine; the last line is the median of the repetitions.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psycopg2
import redis

from approval_svc import migrate
from bench import backlog, cpu
from payments_common.keys import KeySchema
from stack.servers import running_postgres, running_redis

ROOT = Path(__file__).resolve().parent.parent
SLOT = "rm_drain"


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


def _checkpoint(client: redis.Redis) -> int:
    raw = client.hget(KeySchema("rm:v1").checkpoint(SLOT), "lsn")
    return int(raw) if raw is not None else 0


def _wal_lsn(dsn: str) -> int:
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
            row = cursor.fetchone()
            assert row is not None
            return int(row[0])
    finally:
        connection.close()


def _start(dsn: str, redis_url: str, log: Path, extra_env: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REPLICATOR_DATABASE_URL": dsn,
        "REPLICATOR_REDIS_URL": redis_url,
        "REPLICATOR_SLOT_NAME": SLOT,
        "REPLICATOR_HEALTH_PORT": "0",
        "REPLICATOR_METRICS_PORT": "0",
        "REPLICATOR_LOG_LEVEL": "WARNING",
        **extra_env,
    }
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "replicator", "run"],
            env=env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def _wait(client: redis.Redis, target: int, process: subprocess.Popen[bytes], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _checkpoint(client) < target:
        if process.poll() is not None:
            raise RuntimeError(f"the replicator exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the replicator did not reach {target} in {timeout:.0f}s")
        time.sleep(0.005)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.drain", description=__doc__.split("\n")[0])
    parser.add_argument("--payments", type=int, default=50_000, help="payments per backlog (4 changes each)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--accounts", type=int, default=200)
    parser.add_argument("--profile", type=Path, help="record the replicator with py-spy into this file")
    parser.add_argument("--env", action="append", default=[], help="extra NAME=value for the replicator")
    args = parser.parse_args(argv)
    extra_env = dict(item.split("=", 1) for item in args.env)
    rates: list[float] = []
    cpus: list[float] = []
    with tempfile.TemporaryDirectory(prefix="drain-") as tmp, running_postgres() as pg, running_redis() as rd:
        log = Path(tmp) / "replicator.log"
        dsn = pg.create_database("drain")
        migrate.upgrade(dsn)
        accounts = _open_accounts(dsn, args.accounts)
        redis_url = rd.url()
        client = redis.Redis.from_url(redis_url)
        process = _start(dsn, redis_url, log, extra_env)
        try:
            _wait(client, _wal_lsn(dsn), process, 120)
            for rep in range(args.reps):
                _stop(process)
                made = backlog.generate(dsn, accounts, args.payments)
                started = time.monotonic()
                process = _start(dsn, redis_url, log, extra_env)
                profiler = None
                if args.profile is not None and rep == args.reps - 1:
                    profiler = subprocess.Popen(
                        [
                            str(Path(sys.executable).parent / "py-spy"),
                            "record",
                            "--pid",
                            str(process.pid),
                            "-o",
                            str(args.profile),
                            *(["--format", "raw"] if args.profile.suffix == ".txt" else []),
                        ],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                _wait(client, made.target_lsn, process, 600)
                elapsed = time.monotonic() - started
                spent = cpu.process_cpu_s(process.pid)
                if profiler is not None:
                    profiler.send_signal(signal.SIGINT)
                    profiler.wait(timeout=60)
                rates.append(made.changes / elapsed)
                cpus.append(spent * 1e6 / made.changes)
                print(
                    f"rep {rep + 1}: {made.changes:,} changes in {elapsed:.2f}s = {rates[-1]:,.0f} changes/s, "
                    f"replicator CPU {spent:.2f}s = {cpus[-1]:.1f} µs/change",
                    flush=True,
                )
        finally:
            _stop(process)
            client.close()
            if process.returncode not in (0, None):
                print(log.read_text()[-4000:], file=sys.stderr)
    print(
        f"median of {len(rates)}: {statistics.median(rates):,.0f} changes/s, "
        f"{statistics.median(cpus):.1f} µs CPU/change (min {min(cpus):.1f}, max {max(cpus):.1f}); "
        f"load average {os.getloadavg()[0]:.2f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
