"""Runs the replicator as a real subprocess in tests, and waits for it to catch up.

Use the `replicator` fixture (import it into a test module or a conftest) to start one or
more replicators for a database and a Redis database; every process it started is
stopped at the end of the test. `wait_caught_up` polls until Redis's checkpoint reaches the
source's current WAL position.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import psycopg2
import pytest
import redis
from redis.typing import StreamRangeResponse

from payments.readmodel.v1 import read_model_pb2
from payments_common.lsn import format_lsn
from stack.replication import checkpoint_lsn as checkpoint_lsn
from stack.replication import current_wal_lsn as current_wal_lsn
from stack.replication import replicator_env, start_replicator

ROOT = Path(__file__).resolve().parents[2]


def slot_for(database_url: str) -> str:
    """A replication slot name unique to a test database (slot names are cluster-wide)."""
    return "rm_" + (urlparse(database_url).path.lstrip("/") or "postgres").lower()


def wait_caught_up(
    database_url: str,
    redis_url: str,
    slot: str | None = None,
    timeout: float = 60.0,
    process: ReplicatorProcess | None = None,
) -> int:
    """Waits until the checkpoint in Redis reaches the source's WAL position of now; returns it."""
    slot = slot or slot_for(database_url)
    target = current_wal_lsn(database_url)
    deadline = time.monotonic() + timeout
    while True:
        reached = checkpoint_lsn(redis_url, slot)
        if reached >= target:
            return reached
        if process is not None and not process.alive:
            raise AssertionError(f"the replicator exited with {process.returncode}:\n{process.log_tail()}")
        if time.monotonic() >= deadline:
            tail = process.log_tail() if process else ""
            raise AssertionError(
                f"checkpoint {format_lsn(reached)} did not reach {format_lsn(target)} in {timeout}s\n{tail}"
            )
        time.sleep(0.02)


@dataclass
class ReplicatorProcess:
    """One `python -m replicator run` child process."""

    database_url: str
    redis_url: str
    log_path: Path
    slot: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.slot = self.slot or slot_for(self.database_url)

    def env(self) -> dict[str, str]:
        return replicator_env(
            self.database_url,
            self.redis_url,
            slot=self.slot,
            extra={"REPLICATOR_LOCK_TTL_SECONDS": "2", "REPLICATOR_LOG_LEVEL": "INFO", **self.extra_env},
        )

    def start(self) -> ReplicatorProcess:
        self.process = start_replicator(self.env(), self.log_path)
        return self

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        return self.process.returncode

    def kill(self) -> None:
        """kill -9: no chance to flush, acknowledge or release the lock."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        """Waits until the process has logged `text`."""
        deadline = time.monotonic() + timeout
        while text not in self.log_path.read_text(errors="replace"):
            if not self.alive or time.monotonic() >= deadline:
                raise AssertionError(f"the replicator did not log {text!r}:\n{self.log_tail()}")
            time.sleep(0.02)

    def wait_caught_up(self, timeout: float = 60.0) -> int:
        return wait_caught_up(self.database_url, self.redis_url, self.slot, timeout, process=self)


def change_batches(entries: StreamRangeResponse | None) -> list[read_model_pb2.ChangeBatch]:
    """The batches that entries of the change stream (XRANGE, XREVRANGE) announce."""
    assert entries is not None
    batches = []
    for _, fields in entries:
        assert fields is not None
        raw = fields[b"batch"]
        assert isinstance(raw, bytes)
        batches.append(read_model_pb2.ChangeBatch.FromString(raw))
    return batches


StartReplicator = Callable[..., ReplicatorProcess]


@pytest.fixture
def replicator(tmp_path: Path) -> Iterator[StartReplicator]:
    """A factory: `replicator(database_url, redis_url, **env)` starts a replicator subprocess."""
    started: list[ReplicatorProcess] = []

    def start(database_url: str, redis_url: str, slot: str = "", **extra_env: str) -> ReplicatorProcess:
        process = ReplicatorProcess(
            database_url,
            redis_url,
            tmp_path / f"replicator-{len(started)}.log",
            slot=slot,
            extra_env={f"REPLICATOR_{k.upper()}": v for k, v in extra_env.items()},
        )
        started.append(process.start())
        return process

    yield start
    for process in started:
        if process.process is not None and process.process.poll() is None:
            process.resume()
        process.stop()


class SourceWriter:
    """Writes rows of the system of record with plain SQL, the way the command side would."""

    def __init__(self, database_url: str) -> None:
        self.connection = psycopg2.connect(database_url)

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> SourceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, query: str, args: tuple[object, ...] = ()) -> None:
        with self.connection, self.connection.cursor() as cursor:
            # Without arguments, a literal % (the modulo operator) is no placeholder.
            cursor.execute(query, args or None)

    def open_account(
        self,
        owner: str,
        balance_minor: int = 10_000_000,
        currency: str = "EUR",
        account_id: str | None = None,
    ) -> str:
        account_id = account_id or str(uuid.uuid4())
        self.execute(
            "INSERT INTO accounts (account_id, owner_name, currency_code, status, ledger_balance_minor, "
            "per_payment_limit_minor, daily_limit_minor) VALUES (%s, %s, %s, 'ACTIVE', %s, 1000000000, 1000000000)",
            (account_id, owner, currency, balance_minor),
        )
        return account_id

    def submit(
        self,
        payer: str,
        payee: str,
        amount_minor: int,
        status: str = "APPROVED",
        decline_reason: str | None = None,
        reference: str = "",
        payment_id: str | None = None,
    ) -> str:
        """Inserts a payment with its first event and updates both accounts, in one transaction."""
        payment_id = payment_id or str(uuid.uuid4())
        if status == "DECLINED" and decline_reason is None:
            decline_reason = "INSUFFICIENT_FUNDS"
        with self.connection, self.connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO payments (payment_id, request_id, payer_account_id, payee_account_id, payer_name, "
                "payee_name, currency_code, amount_minor, reference, status, decline_reason) "
                "SELECT %s, %s, p.account_id, q.account_id, p.owner_name, q.owner_name, p.currency_code, %s, %s, "
                "%s, %s FROM accounts p, accounts q WHERE p.account_id = %s AND q.account_id = %s",
                (payment_id, payment_id, amount_minor, reference, status, decline_reason, payer, payee),
            )
            cursor.execute(
                "INSERT INTO payment_events (payment_id, sequence, status, decline_reason, actor) "
                "VALUES (%s, 1, %s, %s, 'system')",
                (payment_id, status, decline_reason),
            )
            self._book(cursor, payer, payee, amount_minor, status, +1)
        return payment_id

    def review(self, payment_id: str, approve: bool, actor: str = "reviewer", note: str = "") -> None:
        """Approves or declines a payment held for review, with its next timeline event."""
        status = "APPROVED" if approve else "DECLINED"
        reason = None if approve else "DECLINED_BY_REVIEWER"
        with self.connection, self.connection.cursor() as cursor:
            cursor.execute(
                "UPDATE payments SET status = %s, decline_reason = %s, updated_at = now() "
                "WHERE payment_id = %s AND status = 'PENDING_REVIEW' "
                "RETURNING payer_account_id, payee_account_id, amount_minor",
                (status, reason, payment_id),
            )
            row = cursor.fetchone()
            assert row is not None, "the payment is not pending review"
            payer, payee, amount = row
            cursor.execute(
                "INSERT INTO payment_events (payment_id, sequence, status, decline_reason, actor, note) "
                "SELECT %s, max(sequence) + 1, %s, %s, %s, %s FROM payment_events WHERE payment_id = %s",
                (payment_id, status, reason, actor, note, payment_id),
            )
            self._book(cursor, payer, payee, amount, "PENDING_REVIEW", -1)
            self._book(cursor, payer, payee, amount, status, +1)

    @staticmethod
    def _book(cursor: Any, payer: str, payee: str, amount: int, status: str, sign: int) -> None:
        column = status.lower()
        if status == "APPROVED":
            cursor.execute(
                "UPDATE accounts SET ledger_balance_minor = ledger_balance_minor - %s, "
                "total_sent_minor = total_sent_minor + %s, sent_approved = sent_approved + %s, "
                "updated_at = now() WHERE account_id = %s",
                (sign * amount, sign * amount, sign, payer),
            )
            cursor.execute(
                "UPDATE accounts SET ledger_balance_minor = ledger_balance_minor + %s, "
                "total_received_minor = total_received_minor + %s, received_approved = received_approved + %s, "
                "updated_at = now() WHERE account_id = %s",
                (sign * amount, sign * amount, sign, payee),
            )
            return
        held = sign * amount if status == "PENDING_REVIEW" else 0
        cursor.execute(
            f"UPDATE accounts SET held_minor = held_minor + %s, sent_{column} = sent_{column} + %s, "
            "updated_at = now() WHERE account_id = %s",
            (held, sign, payer),
        )
        cursor.execute(
            f"UPDATE accounts SET received_{column} = received_{column} + %s, updated_at = now() "
            "WHERE account_id = %s",
            (sign, payee),
        )


class SourceLoad:
    """A background thread that keeps submitting and reviewing payments until stopped."""

    def __init__(self, database_url: str, accounts: list[str]) -> None:
        self.database_url = database_url
        self.accounts = accounts
        self.written = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="source-load", daemon=True)

    def __enter__(self) -> SourceLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def wait_for(self, rows: int, timeout: float = 60.0) -> None:
        """Waits until at least `rows` payments were written in total."""
        deadline = time.monotonic() + timeout
        while self.written < rows:
            if time.monotonic() >= deadline:
                raise AssertionError(f"the load wrote {self.written} payments, not {rows}, in {timeout}s")
            time.sleep(0.02)

    def _run(self) -> None:
        writer: SourceWriter | None = None
        i = 0
        count = len(self.accounts)
        while not self._stop.is_set():
            try:
                if writer is None:
                    writer = SourceWriter(self.database_url)
                status = ("APPROVED", "PENDING_REVIEW", "DECLINED", "APPROVED")[i % 4]
                payment = writer.submit(
                    self.accounts[i % count],
                    self.accounts[(i + 1 + i // count) % count],
                    1 + i % 97,
                    status=status,
                )
                if status == "PENDING_REVIEW" and i % 8 == 1:
                    writer.review(payment, approve=i % 16 == 1)
                self.written += 1
                i += 1
            except psycopg2.Error:
                # The source restarts in some tests: reconnect and go on.
                self.errors += 1
                if writer is not None:
                    with contextlib.suppress(psycopg2.Error):
                        writer.close()
                writer = None
                self._stop.wait(0.1)
        if writer is not None:
            writer.close()


class Monotonic:
    """Samples the `lsn` of some hashes while a test runs and records any that moved backwards."""

    def __init__(self, redis_url: str, keys: list[str]) -> None:
        self.client = redis.Redis.from_url(redis_url)
        self.keys = keys
        self.highest: dict[str, int] = {}
        self.backwards: list[str] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="monotonic", daemon=True)

    def __enter__(self) -> Monotonic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.client.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self.client.pipeline(transaction=False) as pipe:
                for key in self.keys:
                    pipe.hget(key, "lsn")
                values = pipe.execute()
            for key, raw in zip(self.keys, values, strict=True):
                if raw is None:
                    continue
                value = int(raw)
                if value < self.highest.get(key, 0):
                    self.backwards.append(f"{key}: {self.highest[key]} -> {value}")
                self.highest[key] = max(value, self.highest.get(key, 0))
            self.samples += 1
            self._stop.wait(0.005)
