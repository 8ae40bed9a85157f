"""`python -m bench [--quick]`: read side, write side, gRPC floor, CRUD baseline and replication, in one run.

Starts the local stack (fsync on) plus the echo floor and the CRUD baseline servers,
drives them from load-generator processes, and writes bench/results/latest.json, a
table on stdout and a PNG chart. docs/benchmark.md explains each figure.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg2
import redis

from bench import backlog, cpu, report, stats
from bench.load import Job, JobResult, LoadPool, split
from payments.approval.v1 import approval_service_pb2 as approval
from payments.approval.v1 import approval_service_pb2_grpc as approval_grpc
from payments_common.keys import CHECKPOINT_LSN_FIELD, DEFAULT_SCHEMA
from payments_common.lsn import parse_lsn
from stack import local
from stack.clients import history_target
from stack.servers import free_port, process_alive

ROOT = Path(__file__).resolve().parent.parent
SLOT = "payments_read_model"


@dataclass(frozen=True)
class Plan:
    """How much of everything a run does; `--quick` is the smoke-test size."""

    mode: str
    reps: int
    window_s: float
    warmup_s: float
    workers: int  # load-generator processes per measurement
    concurrency: int  # closed-loop callers in total, for every closed-loop figure
    accounts: int  # accounts that pay each other in the approval and replication figures
    list_accounts: int  # accounts whose histories the list queries page through
    list_payments: int  # payments seeded between the list accounts
    page_size: int
    write_rate: float  # the steady approval writes under the CRUD comparison
    read_rate: float  # the open-loop reads of the CRUD comparison, the same for both sides
    visibility_rate: float
    visibility_low_rate: float  # a rate that approval sustains, to see replication without overload
    visibility_window_s: float
    watched_accounts: int
    drain_payments: int
    drain_reps: int
    sweep_window_s: float
    sweep_rates: dict[str, tuple[float, ...]] = field(default_factory=dict)


FULL = Plan(
    mode="full",
    reps=3,
    window_s=6.0,
    warmup_s=1.5,
    workers=2,
    concurrency=32,
    accounts=1000,
    list_accounts=50,
    list_payments=5000,
    page_size=20,
    write_rate=100.0,
    read_rate=250.0,
    visibility_rate=500.0,
    visibility_low_rate=100.0,
    visibility_window_s=10.0,
    watched_accounts=16,
    drain_payments=50_000,
    drain_reps=3,
    sweep_window_s=4.0,
    sweep_rates={
        "echo": (500, 1000, 2000, 3000, 4000),
        "history": (500, 1000, 2000, 3000, 4000),
        "crud": (500, 1000, 2000, 3000, 4000),
        "approval": (50, 100, 200, 300, 500),
    },
)

QUICK = Plan(
    mode="quick",
    reps=1,
    window_s=1.5,
    warmup_s=0.5,
    workers=2,
    concurrency=32,
    accounts=200,
    list_accounts=20,
    list_payments=1000,
    page_size=20,
    write_rate=100.0,
    read_rate=250.0,
    visibility_rate=500.0,
    visibility_low_rate=100.0,
    visibility_window_s=2.0,
    watched_accounts=8,
    drain_payments=5_000,
    drain_reps=1,
    sweep_window_s=1.0,
    sweep_rates={"echo": (500, 2000), "history": (500, 2000), "crud": (500, 2000), "approval": (100, 200)},
)


@dataclass
class Window:
    """One measured window: what the load generators saw and what the servers spent."""

    duration_s: float
    latencies: list[float]
    completed: int
    errors: dict[str, int]
    dropped: int
    cpu_s: dict[str, float]

    @property
    def throughput(self) -> float:
        return self.completed / self.duration_s

    def latency(self) -> stats.Latency:
        return stats.latency(self.latencies) if self.latencies else stats.Latency(0, *([math.nan] * 6))

    def cpu_us_per_op(self, name: str) -> float:
        return stats.per_op(self.cpu_s[name] * 1e6, self.completed)


class Collector:
    """Gathers one value per repetition for each metric of each figure."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}
        self.errors: dict[str, Counter[str]] = {}

    def add(self, figure: str, **metrics: float) -> None:
        for name, value in metrics.items():
            self.values.setdefault(f"{figure}.{name}", []).append(float(value))

    def add_errors(self, figure: str, errors: dict[str, int], dropped: int = 0) -> None:
        counter = self.errors.setdefault(figure, Counter())
        counter.update(errors)
        if dropped:
            counter["DROPPED_BY_GENERATOR"] += dropped

    def figures(self) -> dict[str, Any]:
        tree: dict[str, Any] = {}
        for path, values in self.values.items():
            node = tree
            *parents, leaf = path.split(".")
            for part in parents:
                node = node.setdefault(part, {})
            node[leaf] = stats.spread(values).as_dict()
        for figure, counter in self.errors.items():
            node = tree
            for part in figure.split("."):
                node = node.setdefault(part, {})
            node["errors"] = dict(counter)
        return tree


def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


class Bench:
    """One run: the stack, the extra servers, the load pool, and every phase in order."""

    def __init__(self, plan: Plan, root: Path) -> None:
        self.plan = plan
        self.root = root
        self.collector = Collector()
        self.sweeps: dict[str, list[dict[str, Any]]] = {}
        self.notes: dict[str, str] = {}
        self.phase_s: dict[str, float] = {}
        self.state: local.StackState | None = None
        self.servers: dict[str, subprocess.Popen[bytes]] = {}
        self.pool: LoadPool | None = None
        self.payers: tuple[str, ...] = ()
        self.watched: tuple[str, ...] = ()
        self.list_accounts: tuple[str, ...] = ()
        self.payment_ids: tuple[str, ...] = ()

    # -- set-up ---------------------------------------------------------------------------

    @property
    def endpoints(self) -> dict[str, str]:
        assert self.state is not None
        return self.state.endpoints

    def pid(self, name: str) -> int:
        assert self.state is not None
        if name == "postgres":
            return self.state.postgres_pid
        if name == "redis":
            return self.state.redis_pid
        if name in self.servers:
            return self.servers[name].pid
        for process in self.state.processes:
            if process.name == name:
                return process.pid
        raise KeyError(name)

    def start(self) -> None:
        print(f"== starting the stack under {self.root} (fsync on, 2 history processes)", flush=True)
        self.state = local.up(self.root, history_count=2, fsync=True)
        for name, module, extra in (
            ("echo", "bench.echo_server", []),
            ("crud", "bench.crud_history", ["--dsn", self.endpoints["POSTGRES_DSN"]]),
        ):
            port = free_port()
            log = open(self.root / f"bench-{name}.log", "ab")  # noqa: SIM115 - the child keeps it
            self.servers[name] = subprocess.Popen(
                [sys.executable, "-m", module, "--port", str(port), *extra],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=ROOT,
                start_new_session=True,
            )
            log.close()
            self.endpoints[f"BENCH_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
        for name in self.servers:
            local.wait_serving(self.endpoints[f"BENCH_{name.upper()}_ADDR"], 30)
        self.pool = LoadPool(self.plan.workers + 1)

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.close()
        for server in self.servers.values():
            with contextlib.suppress(ProcessLookupError):
                server.send_signal(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
        local.down(self.root, quiet=True)

    def seed(self) -> None:
        plan = self.plan
        started = time.monotonic()
        total = plan.accounts + plan.watched_accounts + plan.list_accounts
        ids = self._create_accounts(total)
        self.payers = tuple(ids[: plan.accounts])
        self.watched = tuple(ids[plan.accounts : plan.accounts + plan.watched_accounts])
        self.list_accounts = tuple(ids[plan.accounts + plan.watched_accounts :])
        made = backlog.generate(self.endpoints["POSTGRES_DSN"], self.list_accounts, plan.list_payments)
        self._wait_checkpoint(made.target_lsn, timeout=180)
        with (
            contextlib.closing(psycopg2.connect(self.endpoints["POSTGRES_DSN"])) as connection,
            connection.cursor() as cursor,
        ):
            cursor.execute("SELECT payment_id::text FROM payments ORDER BY random() LIMIT 2000")
            self.payment_ids = tuple(row[0] for row in cursor.fetchall())
        print(
            f"== seeded {total} accounts and {plan.list_payments} payments in {time.monotonic() - started:.1f}s",
            flush=True,
        )

    def _create_accounts(self, count: int) -> list[str]:
        ids: list[str] = []
        with grpc.insecure_channel(self.endpoints["APPROVAL_ADDR"]) as channel:
            stub = approval_grpc.ApprovalServiceStub(channel)
            for first in range(0, count, 64):
                futures = [
                    stub.CreateAccount.future(
                        approval.CreateAccountRequest(
                            request_id=str(uuid.uuid4()),
                            owner_name=f"Benchmark owner {first + i}",
                            currency_code="EUR",
                            opening_balance_minor=10**12,
                            per_payment_limit_minor=10**9,
                            daily_limit_minor=10**15,
                        ),
                        timeout=30,
                    )
                    for i in range(min(64, count - first))
                ]
                ids += [future.result().account.account_id for future in futures]
        return ids

    def _checkpoint(self, client: redis.Redis) -> int:
        raw = client.hget(DEFAULT_SCHEMA.checkpoint(SLOT), CHECKPOINT_LSN_FIELD)
        return int(raw) if raw is not None else 0

    def _wait_checkpoint(self, target: int, timeout: float) -> None:
        client = redis.Redis.from_url(self.endpoints["REDIS_URL"])
        try:
            deadline = time.monotonic() + timeout
            while self._checkpoint(client) < target:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"the replicator did not reach {target} within {timeout:.0f}s")
                time.sleep(0.01)
        finally:
            client.close()

    def settle(self) -> None:
        """Waits until the replicator has applied every write so far, so that no lag spills into a window."""
        with contextlib.closing(psycopg2.connect(self.endpoints["POSTGRES_DSN"])) as connection:
            with connection.cursor() as cursor:
                cursor.execute(
                    "UPDATE accounts SET updated_at = now() WHERE account_id = %s", (self.payers[0],)
                )
                cursor.execute("SELECT pg_current_wal_insert_lsn()::text")
                row = cursor.fetchone()
                assert row is not None
            connection.commit()
        self._wait_checkpoint(parse_lsn(row[0]), timeout=120)

    def wait_idle(self, name: str, busy_cores: float = 0.15, timeout: float = 60.0) -> None:
        """Waits until a process uses less than `busy_cores` of CPU, e.g. approval after an overload."""
        read = self.cpu_reader(name)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = read()
            time.sleep(0.5)
            if cpu.spent(before, read()) / 0.5 < busy_cores:
                return
        print(f"   ({name} still busy after {timeout:.0f}s; going on)", flush=True)

    # -- measuring ------------------------------------------------------------------------

    def measure(
        self,
        jobs_for: Callable[[float], list[Job]],
        cpu_of: dict[str, Callable[[], cpu.Snapshot]],
        duration_s: float,
        warmup_s: float,
    ) -> Window:
        """Runs one window: the jobs start together, the CPU readings bracket the measured part."""
        assert self.pool is not None
        start_at = time.monotonic() + 0.3 + warmup_s
        handles = self.pool.submit(jobs_for(start_at))
        _sleep_until(start_at)
        before = {name: read() for name, read in cpu_of.items()}
        _sleep_until(start_at + duration_s)
        after = {name: read() for name, read in cpu_of.items()}
        results = self.pool.collect(handles)
        return self._window(
            results, duration_s, {name: cpu.spent(before[name], after[name]) for name in cpu_of}
        )

    @staticmethod
    def _window(results: list[JobResult], duration_s: float, cpu_s: dict[str, float]) -> Window:
        errors: Counter[str] = Counter()
        for result in results:
            errors.update(result.errors)
        return Window(
            duration_s=duration_s,
            latencies=stats.merge(r.latencies for r in results),
            completed=sum(r.completed for r in results),
            errors=dict(errors),
            dropped=sum(r.dropped for r in results),
            cpu_s=cpu_s,
        )

    def jobs(
        self,
        mode: str,
        call: str,
        target: str,
        total: float,
        duration_s: float | None = None,
        warmup_s: float | None = None,
        history_channel: bool = False,
        workers: int | None = None,
    ) -> Callable[[float], list[Job]]:
        """A closed-loop (`total` callers) or open-loop (`total` calls/s) load spread over the workers."""
        count = workers or self.plan.workers
        duration = self.plan.window_s if duration_s is None else duration_s
        warmup = self.plan.warmup_s if warmup_s is None else warmup_s

        def build(start_at: float) -> list[Job]:
            return [
                Job(
                    mode=mode,  # type: ignore[arg-type]
                    call=call,  # type: ignore[arg-type]
                    target=target,
                    start_at=start_at,
                    duration_s=duration,
                    warmup_s=warmup,
                    history_channel=history_channel,
                    concurrency=int(share) if mode == "closed" else 0,
                    rate=share if mode == "open" else 0.0,
                    payment_ids=self.payment_ids,
                    account_ids=self.list_accounts,
                    payer_ids=self.payers,
                    page_size=self.plan.page_size,
                    seed=int(start_at * 1000) + index,
                )
                for index, share in enumerate(split(total, count))
            ]

        return build

    def cpu_reader(self, *names: str) -> Callable[[], cpu.Snapshot]:
        pids = [self.pid(name) for name in names]
        return lambda: cpu.snapshot(pids)

    def pg_cpu(self) -> cpu.Snapshot:
        return cpu.tree_snapshot(self.pid("postgres"))

    def _read_figure(self, figure: str, window: Window, server: str, floor_us: float | None) -> None:
        lat = window.latency()
        per_rpc = window.cpu_us_per_op(server)
        metrics = {
            "throughput_rps": window.throughput,
            "p50_ms": lat.p50_ms,
            "p99_ms": lat.p99_ms,
            "p999_ms": lat.p999_ms,
            "server_cpu_us_per_rpc": per_rpc,
        }
        if floor_us is not None:
            metrics["cpu_ratio_to_floor"] = stats.ratio(per_rpc, floor_us)
        self.collector.add(figure, **metrics)
        self.collector.add_errors(figure, window.errors, window.dropped)

    # -- phases ---------------------------------------------------------------------------

    def phase_floor_approval_history(self) -> None:
        """Figures 1-3: echo floor, approval writes, history reads, each closed loop at the same concurrency."""
        plan = self.plan
        echo = self.endpoints["BENCH_ECHO_ADDR"]
        history = self.endpoints["HISTORY_ADDRS"].split(",")
        for rep in range(plan.reps):
            print(f"== floor, approval and history, repetition {rep + 1}/{plan.reps}", flush=True)
            window = self.measure(
                self.jobs("closed", "echo", echo, plan.concurrency),
                {"echo": self.cpu_reader("echo")},
                plan.window_s,
                plan.warmup_s,
            )
            floor = window.cpu_us_per_op("echo")
            self._read_figure("echo_floor", window, "echo", None)

            window = self.measure(
                self.jobs("closed", "approval_submit", self.endpoints["APPROVAL_ADDR"], plan.concurrency),
                {"approval": self.cpu_reader("approval")},
                plan.window_s,
                plan.warmup_s,
            )
            self._read_figure("approval_submit", window, "approval", floor)
            self.settle()
            self.wait_idle("approval")

            for processes in (1, 2):
                target = history_target(history[:processes])
                names = [f"history-{i}" for i in range(1, processes + 1)]
                for call, figure in (("history_get", "get_payment"), ("history_list", "list_payments")):
                    window = self.measure(
                        self.jobs("closed", call, target, plan.concurrency, history_channel=True),
                        {"history": self.cpu_reader(*names)},
                        plan.window_s,
                        plan.warmup_s,
                    )
                    self._read_figure(f"history.{figure}_{processes}", window, "history", floor)

    def phase_crud(self) -> None:
        """Figure 4: CRUD baseline against history (one process each) under steady approval writes.

        Both sides get the same open-loop read rate, below saturation, so that latency
        shows the cost of a read and its interference with the writes rather than a queue.
        """
        plan = self.plan
        assert self.pool is not None
        crud = self.endpoints["BENCH_CRUD_ADDR"]
        history = history_target(self.endpoints["HISTORY_ADDRS"].split(",")[:1])
        windows = ("baseline", "crud_get", "history_get", "crud_list", "history_list")
        step = plan.warmup_s + plan.window_s + 0.5
        for rep in range(plan.reps):
            print(
                f"== CRUD baseline: {plan.read_rate:.0f} reads/s under {plan.write_rate:.0f} writes/s, "
                f"repetition {rep + 1}/{plan.reps}",
                flush=True,
            )
            # The writer runs through every window of this repetition, on a worker of its own.
            writer_start = time.monotonic() + 0.5 + plan.warmup_s
            writer_span = step * len(windows) + 2.0
            writer = self.pool.submit(
                self.jobs(
                    "open",
                    "approval_submit",
                    self.endpoints["APPROVAL_ADDR"],
                    plan.write_rate,
                    duration_s=writer_span,
                    workers=1,
                )(writer_start)
            )
            _sleep_until(writer_start)
            results: dict[str, Window] = {}
            readers = {
                "pg": self.pg_cpu,
                "redis": self.cpu_reader("redis"),
                "crud": self.cpu_reader("crud"),
                "history": self.cpu_reader("history-1"),
            }
            for name in windows:
                if name == "baseline":
                    jobs: Callable[[float], list[Job]] = lambda start_at: []  # noqa: E731
                else:
                    source, call = name.split("_")
                    jobs = self.jobs(
                        "open",
                        f"history_{call}",
                        crud if source == "crud" else history,
                        plan.read_rate,
                        history_channel=True,
                    )
                results[name] = self.measure(jobs, readers, plan.window_s, plan.warmup_s)
            written = self.pool.collect(writer)[0]
            self.collector.add("crud_baseline", write_rate_achieved=written.completed / writer_span)
            self.collector.add_errors("crud_baseline", written.errors, written.dropped)
            base = results["baseline"]
            for call, figure in (("get", "get_payment"), ("list", "list_payments")):
                crud_w, hist_w = results[f"crud_{call}"], results[f"history_{call}"]
                crud_lat, hist_lat = crud_w.latency(), hist_w.latency()

                self.collector.add(
                    f"crud_baseline.{figure}",
                    crud_throughput_rps=crud_w.throughput,
                    crud_p50_ms=crud_lat.p50_ms,
                    crud_p99_ms=crud_lat.p99_ms,
                    history_throughput_rps=hist_w.throughput,
                    history_p50_ms=hist_lat.p50_ms,
                    history_p99_ms=hist_lat.p99_ms,
                    p50_ratio=stats.ratio(crud_lat.p50_ms, hist_lat.p50_ms),
                    p99_ratio=stats.ratio(crud_lat.p99_ms, hist_lat.p99_ms),
                    crud_server_cpu_us_per_rpc=crud_w.cpu_us_per_op("crud"),
                    history_server_cpu_us_per_rpc=hist_w.cpu_us_per_op("history"),
                    history_server_cpu_us_per_rpc_baseline_excluded=stats.per_op(
                        stats.excess(
                            hist_w.cpu_s["history"], hist_w.duration_s, base.cpu_s["history"], base.duration_s
                        )
                        * 1e6,
                        hist_w.completed,
                    ),
                    pg_cpu_us_per_read_crud=_excess_per_read(crud_w, base, "pg"),
                    pg_cpu_us_per_read_history=_excess_per_read(hist_w, base, "pg"),
                    redis_cpu_us_per_read_history=_excess_per_read(hist_w, base, "redis"),
                    pg_cpu_share_baseline=base.cpu_s["pg"] / base.duration_s,
                    pg_cpu_share_crud=crud_w.cpu_s["pg"] / crud_w.duration_s,
                    pg_cpu_share_history=hist_w.cpu_s["pg"] / hist_w.duration_s,
                )
                self.collector.add_errors(f"crud_baseline.{figure}.crud", crud_w.errors, crud_w.dropped)
                self.collector.add_errors(f"crud_baseline.{figure}.history", hist_w.errors, hist_w.dropped)
            self.settle()

    def phase_visibility(self) -> None:
        """Figure 5a: commit-to-visible at a steady rate, timed on WatchPayments streams.

        Measured at the target rate and at a rate that approval sustains on this machine,
        so that replication's own delay shows apart from an overloaded approval service.
        """
        plan = self.plan
        for rep in range(plan.reps):
            # The sustained rate first: an overloaded approval keeps working off abandoned
            # requests for a while after its clients have given up.
            for figure, rate in (
                ("commit_to_visible_sustained", plan.visibility_low_rate),
                ("commit_to_visible", plan.visibility_rate),
            ):
                print(f"== {figure} at {rate:.0f} payments/s, repetition {rep + 1}/{plan.reps}", flush=True)
                self._visibility(f"replication.{figure}", rate)
                self.settle()
                self.wait_idle("approval")

    def _visibility(self, figure: str, total_rate: float) -> None:
        plan = self.plan
        history = history_target(self.endpoints["HISTORY_ADDRS"].split(","))
        workers = plan.workers
        watched = [self.watched[i::workers] for i in range(workers)]

        def build(start_at: float) -> list[Job]:
            return [
                Job(
                    mode="visibility",
                    call="approval_submit",
                    target=self.endpoints["APPROVAL_ADDR"],
                    start_at=start_at,
                    duration_s=plan.visibility_window_s,
                    warmup_s=plan.warmup_s,
                    history_channel=True,
                    rate=rate,
                    payer_ids=self.payers,
                    payee_ids=tuple(watched[index]),
                    watch_target=history,
                    seed=int(start_at * 1000) + index,
                )
                for index, rate in enumerate(split(total_rate, workers))
            ]

        assert self.pool is not None
        start_at = time.monotonic() + 1.0 + plan.warmup_s  # streams open before the window
        results = self.pool.collect(self.pool.submit(build(start_at)), timeout=120)
        delays = stats.merge(r.delays for r in results)
        lat = stats.latency(delays) if delays else stats.Latency(0, *([math.nan] * 6))
        submitted = stats.merge(r.submit_delays for r in results)
        from_submit = stats.latency(submitted) if submitted else stats.Latency(0, *([math.nan] * 6))
        acked = sum(r.completed for r in results)
        self.collector.add(
            figure,
            offered_rate=total_rate,
            p50_ms=lat.p50_ms,
            p90_ms=lat.p90_ms,
            p99_ms=lat.p99_ms,
            max_ms=lat.max_ms,
            submit_to_visible_p50_ms=from_submit.p50_ms,
            submit_to_visible_p99_ms=from_submit.p99_ms,
            achieved_rate=acked / plan.visibility_window_s,
            acknowledged=acked,
            missing=sum(r.missing for r in results),
            seen_before_ack=sum(r.seen_before_ack for r in results),
        )
        errors: Counter[str] = Counter()
        for r in results:
            errors.update(r.errors)
        self.collector.add_errors(figure, dict(errors), sum(r.dropped for r in results))

    def phase_sweeps(self) -> None:
        """The chart: open-loop latency percentiles against offered load."""
        plan = self.plan
        series = {
            "echo": ("gRPC floor: echo", "echo", self.endpoints["BENCH_ECHO_ADDR"], False),
            "history": (
                "History GetPayment (2 processes)",
                "history_get",
                history_target(self.endpoints["HISTORY_ADDRS"].split(",")),
                True,
            ),
            "crud": (
                "CRUD baseline GetPayment (PostgreSQL)",
                "history_get",
                self.endpoints["BENCH_CRUD_ADDR"],
                True,
            ),
            "approval": (
                "Approval SubmitPayment (fsync on)",
                "approval_submit",
                self.endpoints["APPROVAL_ADDR"],
                False,
            ),
        }
        for key, (title, call, target, history_channel) in series.items():
            points = []
            for rate in plan.sweep_rates[key]:
                print(f"== sweep {title} at {rate:.0f}/s", flush=True)
                window = self.measure(
                    self.jobs(
                        "open",
                        call,
                        target,
                        float(rate),
                        duration_s=plan.sweep_window_s,
                        warmup_s=min(1.0, plan.warmup_s),
                        history_channel=history_channel,
                    ),
                    {},
                    plan.sweep_window_s,
                    min(1.0, plan.warmup_s),
                )
                lat = window.latency()
                points.append(
                    {
                        "offered_rps": float(rate),
                        "achieved_rps": window.throughput,
                        "p50_ms": lat.p50_ms,
                        "p90_ms": lat.p90_ms,
                        "p99_ms": lat.p99_ms,
                        "errors": sum(window.errors.values()),
                        "dropped": window.dropped,
                    }
                )
            self.sweeps[title] = points
            if key == "approval":
                self.settle()
                self.wait_idle("approval")

    def phase_drain(self) -> None:
        """Figure 5b: stop the replicator, commit a backlog, restart it, time the catch-up."""
        plan = self.plan
        assert self.state is not None
        for rep in range(plan.drain_reps):
            print(
                f"== drain of {plan.drain_payments * backlog.CHANGES_PER_PAYMENT:,} row changes, "
                f"repetition {rep + 1}/{plan.drain_reps}",
                flush=True,
            )
            self.settle()
            process = next(p for p in self.state.processes if p.name == "replicator")
            os.kill(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + 30
            while process_alive(process.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            if process_alive(process.pid):
                os.kill(process.pid, signal.SIGKILL)
            made = backlog.generate(self.endpoints["POSTGRES_DSN"], self.payers, plan.drain_payments)
            client = redis.Redis.from_url(self.endpoints["REDIS_URL"])
            try:
                before = self._checkpoint(client)
                others_before = {"redis": self.cpu_reader("redis")(), "pg": self.pg_cpu()}
                started = time.monotonic()
                new = self._spawn_replicator(process)
                cpu_before = 0.0  # a new process starts from zero
                first = math.nan
                deadline = started + 600
                while True:
                    position = self._checkpoint(client)
                    now = time.monotonic()
                    if math.isnan(first) and position > before:
                        first = now
                    if position >= made.target_lsn:
                        break
                    if now > deadline:
                        raise TimeoutError("the replicator did not drain the backlog within 600s")
                    time.sleep(0.005)
                done = time.monotonic()
                spent = cpu.process_cpu_s(new.pid) - cpu_before
                redis_spent = cpu.spent(others_before["redis"], self.cpu_reader("redis")())
                pg_spent = cpu.spent(others_before["pg"], self.pg_cpu())
            finally:
                client.close()
            local.wait_serving(new.health_addr, 60)
            self.collector.add(
                "replication.drain",
                changes=made.changes,
                changes_per_s=made.changes / (done - started),
                changes_per_s_steady=made.changes / (done - first),
                startup_s=first - started,
                elapsed_s=done - started,
                cpu_us_per_change=spent * 1e6 / made.changes,
                redis_cpu_us_per_change=redis_spent * 1e6 / made.changes,
                postgres_cpu_us_per_change=pg_spent * 1e6 / made.changes,
                generation_s=made.elapsed_s,
            )

    def _spawn_replicator(self, old: local.Process) -> local.Process:
        assert self.state is not None
        log = open(old.log, "ab")  # noqa: SIM115 - the child keeps it
        process = subprocess.Popen(
            [sys.executable, "-m", "replicator", "run"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env={
                **os.environ,
                "REPLICATOR_DATABASE_URL": self.endpoints["POSTGRES_DSN"],
                "REPLICATOR_REDIS_URL": self.endpoints["REDIS_URL"],
                "REPLICATOR_HEALTH_PORT": old.health_addr.rsplit(":", 1)[1],
                "REPLICATOR_METRICS_PORT": str(free_port()),
            },
            start_new_session=True,
        )
        log.close()
        new = local.Process(name=old.name, pid=process.pid, log=old.log, health_addr=old.health_addr)
        self.state.processes[self.state.processes.index(old)] = new
        self.state.save()  # so that `down` stops the new process
        return new

    # -- results --------------------------------------------------------------------------

    def results(self, started: float, began_at: str) -> dict[str, Any]:
        figures = self.collector.figures()
        return {
            "schema_version": 1,
            "mode": self.plan.mode,
            "note": (
                "quick run: one short repetition per figure, a small drain backlog "
                f"({self.plan.drain_payments * backlog.CHANGES_PER_PAYMENT:,} changes instead of 200,000+) "
                "and a coarse sweep; a smoke test of the benchmark, not a measurement"
                if self.plan.mode == "quick"
                else "full run"
            ),
            "started_at": began_at,
            "duration_s": time.monotonic() - started,
            "command": " ".join(["python -m bench", *sys.argv[1:]]),
            "machine": machine_info(),
            "versions": self.versions(),
            "settings": {
                **asdict(self.plan),
                "fsync": True,
                "history_processes": 2,
                "load_processes": self.plan.workers,
            },
            "figures": figures,
            "targets": targets(figures),
            "sweeps": self.sweeps,
            "phase_seconds": self.phase_s,
        }

    def versions(self) -> dict[str, str]:
        found: dict[str, str] = {"python": platform.python_version()}
        for package in (
            "grpcio",
            "protobuf",
            "asyncpg",
            "redis",
            "hiredis",
            "uvloop",
            "SQLAlchemy",
            "psycopg2-binary",
        ):
            with contextlib.suppress(importlib.metadata.PackageNotFoundError):
                found[package] = importlib.metadata.version(package)
        with (
            contextlib.suppress(Exception),
            contextlib.closing(psycopg2.connect(self.endpoints["POSTGRES_DSN"])) as c,
            c.cursor() as cursor,
        ):
            cursor.execute("SHOW server_version")
            row = cursor.fetchone()
            found["postgresql"] = str(row[0]) if row else "?"
        with contextlib.suppress(Exception):
            client = redis.Redis.from_url(self.endpoints["REDIS_URL"])
            found["redis_server"] = str(client.info("server")["redis_version"])
            client.close()
        with contextlib.suppress(Exception):
            commit = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
            ).stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
            ).stdout
            found["git_commit"] = commit + ("+uncommitted changes" if dirty.strip() else "")
        return found


def _excess_per_read(window: Window, baseline: Window, resource: str) -> float:
    """CPU µs per read that `resource` spent beyond what the baseline window's writes cost."""
    extra = stats.excess(
        window.cpu_s[resource], window.duration_s, baseline.cpu_s[resource], baseline.duration_s
    )
    return stats.per_op(extra * 1e6, window.completed)


def machine_info() -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_gb = math.nan
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    distro = "?"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    load = os.getloadavg()
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gb": memory_gb,
        "kernel": platform.release(),
        "os": distro,
        "load_average_at_end": [round(x, 2) for x in load],
    }


_TARGETS: tuple[tuple[str, str, str, Callable[[float], bool]], ...] = (
    ("Replicator drain", "≥ 30,000 row changes/s", "replication.drain.changes_per_s", lambda v: v >= 30_000),
    (
        "Commit-to-visible p99 at 500 payments/s",
        "≤ 15 ms",
        "replication.commit_to_visible.p99_ms",
        lambda v: v <= 15,
    ),
    (
        "History GetPayment CPU per RPC ÷ floor",
        "≤ 1.5x",
        "history.get_payment_1.cpu_ratio_to_floor",
        lambda v: v <= 1.5,
    ),
    (
        "History ListPayments CPU per RPC ÷ floor",
        "≤ 2.5x",
        "history.list_payments_1.cpu_ratio_to_floor",
        lambda v: v <= 2.5,
    ),
    (
        "GetPayment p99: CRUD ÷ history, under writes",
        "≥ 3x",
        "crud_baseline.get_payment.p99_ratio",
        lambda v: v >= 3,
    ),
    (
        "ListPayments p99: CRUD ÷ history, under writes",
        "≥ 3x",
        "crud_baseline.list_payments.p99_ratio",
        lambda v: v >= 3,
    ),
    (
        "Approval SubmitPayment throughput",
        "≥ 1,000 payments/s",
        "approval_submit.throughput_rps",
        lambda v: v >= 1000,
    ),
)


def targets(figures: dict[str, Any]) -> list[dict[str, Any]]:
    found = []
    for name, goal, path, check in _TARGETS:
        try:
            value = float(report.lookup({"figures": figures}, path)["median"])
        except (KeyError, TypeError):
            value = math.nan
        found.append(
            {
                "name": name,
                "goal": goal,
                "figure": path,
                "value": value,
                "met": None if math.isnan(value) else check(value),
            }
        )
    return found


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the smoke-test size: under two minutes")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/latest.json")
    parser.add_argument("--chart", type=Path, default=ROOT / "bench/results/latency.png")
    parser.add_argument("--root", type=Path, default=None, help="where the stack's state and logs go")
    args = parser.parse_args(list(argv) if argv is not None else None)
    plan = QUICK if args.quick else FULL
    root = args.root or Path(tempfile.mkdtemp(prefix="payments-bench-"))
    started = time.monotonic()
    began_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    bench = Bench(plan, root)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    try:
        for name, phase in (
            ("start", bench.start),
            ("seed", bench.seed),
            ("floor_approval_history", bench.phase_floor_approval_history),
            ("crud_baseline", bench.phase_crud),
            ("commit_to_visible", bench.phase_visibility),
            ("sweeps", bench.phase_sweeps),
            ("drain", bench.phase_drain),
        ):
            began = time.monotonic()
            phase()
            bench.phase_s[name] = round(time.monotonic() - began, 1)
        results = bench.results(started, began_at)
        results["machine"]["load_average_at_start"] = load_at_start
    finally:
        print("== stopping the stack", flush=True)
        bench.stop()
    results["duration_s"] = time.monotonic() - started
    report.write_json(results, args.out)
    report.write_chart(results, args.chart)
    print()
    print(report.markdown_table(results))
    print()
    print(report.targets_table(results))
    print(f"\nresults: {args.out}\nchart:   {args.chart}\nlogs:    {root}")
    missing = report.missing_figures(results)
    if missing:
        print(f"missing figures: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
