"""A large transaction: one INSERT of `plan.large_transaction_changes` accounts, timed from its commit until the replicator's checkpoint passes it.

The transaction is one statement over generate_series, as
tests/integration/test_replicator_large.py makes it: PostgreSQL decodes it only once it
commits, and the replicator applies it in chunks of REPLICATOR_TRANSACTION_CHUNK_CHANGES
as it arrives, moving its checkpoint with the last chunk. The replicator keeps running
(no restart): its peak resident set (VmHWM) is reset just before the commit by writing
5 to /proc/<pid>/clear_refs, so the peak is that of this transaction, beside the
resident set it had before. The accounts stay (in PostgreSQL and Redis): the phase
runs last.
"""

from __future__ import annotations

import contextlib
import re
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg2
import redis

from bench import cpu
from bench.runner import Runner
from payments_common.lsn import parse_lsn
from stack.replication import wait_for_checkpoint

TIMEOUT_S = 1800.0
_MB = 1024 * 1024

# Each account new (gen_random_uuid), so that a repetition adds its own; the columns of
# the integration test, every CHECK held.
INSERT = """
INSERT INTO accounts (account_id, owner_name, currency_code, status, ledger_balance_minor,
                      per_payment_limit_minor, daily_limit_minor)
SELECT gen_random_uuid(), 'bulk owner ' || i, 'EUR', 'ACTIVE', i, 1000000, 1000000
FROM generate_series(1, %(count)s) AS i
"""


@dataclass(frozen=True)
class Applied:
    """One large transaction: its size, how long it took to commit and to apply, what the replicator spent."""

    changes: int
    statement_s: float  # the INSERT and its commit, before the timed part
    elapsed_s: float  # from the commit's return until the checkpoint passed the transaction
    cpu_s: float  # the replicator's, over `elapsed_s`
    pg_cpu_s: float  # PostgreSQL's (the WAL sender decoding the transaction among it)
    rss_before_bytes: int
    peak_rss_bytes: int  # VmHWM, reset at the commit

    def metrics(self) -> dict[str, float]:
        """The figures of `large_transaction`."""
        return {
            "changes": self.changes,
            "statement_s": self.statement_s,
            "commit_to_applied_s": self.elapsed_s,
            "changes_per_s": self.changes / self.elapsed_s,
            "cpu_us_per_change": self.cpu_s * 1e6 / self.changes,
            "postgres_cpu_us_per_change": self.pg_cpu_s * 1e6 / self.changes,
            "rss_before_mb": self.rss_before_bytes / _MB,
            "peak_rss_mb": self.peak_rss_bytes / _MB,
            "peak_rss_growth_mb": (self.peak_rss_bytes - self.rss_before_bytes) / _MB,
        }


def run(runner: Runner) -> None:
    plan = runner.plan
    for rep in range(plan.large_transaction_reps):
        print(
            f"== one transaction of {plan.large_transaction_changes:,} row changes, "
            f"repetition {rep + 1}/{plan.large_transaction_reps}",
            flush=True,
        )
        applied = once(runner, plan.large_transaction_changes)
        runner.collector.add("large_transaction", **applied.metrics())
        print(
            f"   applied in {applied.elapsed_s:.1f}s after its commit, "
            f"replicator peak RSS {applied.peak_rss_bytes / _MB:.0f} MB",
            flush=True,
        )


def once(runner: Runner, count: int) -> Applied:
    """Commits one INSERT of `count` accounts and waits until the replicator's checkpoint passes it."""
    runner.settle()
    pid = runner.pid("replicator")
    with contextlib.closing(psycopg2.connect(runner.dsn)) as connection:
        began = time.monotonic()
        with connection.cursor() as cursor:
            cursor.execute(INSERT, {"count": count})
            changes = cursor.rowcount
            # A position that the commit record passes, as the drain's backlog reads it.
            cursor.execute("SELECT pg_current_wal_insert_lsn()::text")
            row = cursor.fetchone()
            assert row is not None
        rss_before = memory(pid, "VmRSS")
        reset_peak(pid)
        cpu_before, pg_before = cpu.process_cpu_s(pid), runner.pg_cpu()
        connection.commit()
        committed = time.monotonic()
    client = redis.Redis.from_url(runner.redis_url)
    try:
        wait_for_checkpoint(
            client, parse_lsn(row[0]), TIMEOUT_S, runner.slot, runner.replicator_alive, poll_s=0.005
        )
    finally:
        client.close()
    done = time.monotonic()
    return Applied(
        changes=changes,
        statement_s=committed - began,
        elapsed_s=done - committed,
        cpu_s=cpu.process_cpu_s(pid) - cpu_before,
        pg_cpu_s=cpu.spent(pg_before, runner.pg_cpu()),
        rss_before_bytes=rss_before,
        peak_rss_bytes=memory(pid, "VmHWM"),
    )


def memory(pid: int, field: str) -> int:
    """A process's VmRSS or VmHWM from /proc/<pid>/status, in bytes."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB$", status, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no {field} in /proc/{pid}/status")
    return int(match.group(1)) * 1024


def reset_peak(pid: int) -> None:
    """Resets the process's VmHWM to its resident set now (Linux: 5 to /proc/<pid>/clear_refs)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
