"""One benchmark run: the stack and the extra servers, the load generators, and the measuring that every phase shares.

`run` starts everything, runs the phases (bench/phases/) in order, timing each, and
returns the results that bench/report.py writes. A phase is a function of the
`Runner`: it drives load through `jobs` and `measure` and adds its figures to the
runner's `collector`.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import psycopg2

from bench import backlog, cpu, environment, report
from bench.figures import Collector, Window
from bench.load import Job, LoadPool, split
from bench.plan import Plan
from payments_common.keys import DEFAULT_SLOT_NAME
from payments_common.lsn import parse_lsn
from payments_common.redisconn import sync_client
from stack import local
from stack.auth import ACCOUNTS_ADMIN, HISTORY_READER, PAYMENT_GATEWAY
from stack.replication import replicator_env, start_replicator, wait_for_checkpoint
from stack.servers import free_port, process_alive
from stack.tokens import authority, token_for

ROOT = Path(__file__).resolve().parent.parent

Phase = Callable[["Runner"], None]


def sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        time.sleep(delay)


def settle(
    dsn: str,
    redis_url: str,
    account_id: str,
    slot: str = DEFAULT_SLOT_NAME,
    timeout: float = 120.0,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Waits until the replicator has applied every write so far, so that no lag spills into a window.

    It writes one more change (an account's `updated_at`) and waits for the position
    read inside that transaction: a position that a commit of the publication passes.
    """
    with contextlib.closing(psycopg2.connect(dsn)) as connection:
        with connection.cursor() as cursor:
            cursor.execute("UPDATE accounts SET updated_at = now() WHERE account_id = %s", (account_id,))
            cursor.execute("SELECT pg_current_wal_insert_lsn()::text")
            row = cursor.fetchone()
            assert row is not None
        connection.commit()
    client = sync_client(redis_url)
    try:
        wait_for_checkpoint(client, parse_lsn(row[0]), timeout, slot, alive)
    finally:
        client.close()


class Runner:
    """One run: the stack, the extra servers, the load pool, the accounts, and the figures so far.

    `history_count` history processes are started; `extra_servers` adds the echo floor and
    the CRUD baseline, which only `python -m bench`'s phases call.
    """

    def __init__(self, plan: Plan, root: Path, *, history_count: int = 2, extra_servers: bool = True) -> None:
        self.plan = plan
        self.root = root
        self.history_count = history_count
        self.extra_servers = extra_servers
        self.collector = Collector()
        self.sweeps: dict[str, list[dict[str, Any]]] = {}
        self.phase_s: dict[str, float] = {}
        self.state: local.StackState | None = None
        self.servers: dict[str, subprocess.Popen[bytes]] = {}
        self.pool: LoadPool | None = None
        # Filled by the seed phase.
        self.payers: tuple[str, ...] = ()
        self.watched: tuple[str, ...] = ()
        self.list_accounts: tuple[str, ...] = ()
        self.payment_ids: tuple[str, ...] = ()
        # The stack authenticates every call: the load carries a service's token with the roles it needs.
        self.token = ""

    # -- the stack --------------------------------------------------------------------------

    @property
    def endpoints(self) -> dict[str, str]:
        assert self.state is not None
        return self.state.endpoints

    @property
    def dsn(self) -> str:
        return self.endpoints["POSTGRES_DSN"]

    @property
    def redis_url(self) -> str:
        return self.endpoints["REDIS_URL"]

    @property
    def slot(self) -> str:
        return DEFAULT_SLOT_NAME

    def pid(self, name: str) -> int:
        assert self.state is not None
        if name == "postgres":
            return self.state.postgres_pid
        if name in self.servers:
            return self.servers[name].pid
        for process in self.state.processes:
            if process.name == name:
                return process.pid
        raise KeyError(name)

    def pids(self, name: str) -> list[int]:
        """The processes of `name`: "redis" is every Redis process of the stack (one, or each node of a cluster)."""
        assert self.state is not None
        if name == "redis":
            return [pid for pid in (self.state.redis_pid, *self.state.redis_cluster_pids) if pid]
        return [self.pid(name)]

    def start(self) -> None:
        topology = local.redis_topology()
        print(
            f"== starting the stack under {self.root} "
            f"(fsync on, {self.history_count} history processes, Redis: {topology})",
            flush=True,
        )
        self.state = local.up(self.root, history_count=self.history_count, fsync=True)
        self.token = token_for(
            authority(self.root),
            [ACCOUNTS_ADMIN, PAYMENT_GATEWAY, HISTORY_READER],
            subject="spiffe://payments.local/ns/payments/sa/benchmark",
            lifetime_seconds=24 * 3600,
        )
        if self.extra_servers:
            for name, module, extra in (
                ("echo", "bench.echo_server", []),
                ("crud", "bench.crud_history", ["--dsn", self.dsn]),
            ):
                port = free_port()
                self.spawn(name, ["-m", module, "--port", str(port), *extra])
                self.endpoints[f"BENCH_{name.upper()}_ADDR"] = f"127.0.0.1:{port}"
            for name in ("echo", "crud"):
                local.wait_serving(self.endpoints[f"BENCH_{name.upper()}_ADDR"], 30)
        self.pool = LoadPool(self.plan.workers + 1)

    def spawn(self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> None:
        """Starts `python <args>` as the server `name`, output to bench-<name>.log; `stop` stops it."""
        log = open(self.root / f"bench-{name}.log", "ab")  # noqa: SIM115 - the child keeps it
        self.servers[name] = subprocess.Popen(
            [sys.executable, *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=ROOT,
            env=None if env is None else dict(env),
            start_new_session=True,
        )
        log.close()

    def stop_servers(self, *names: str) -> None:
        """SIGTERM to each of the servers `names` together, then waits for each (SIGKILL after 15 s)."""
        servers = [self.servers[name] for name in names]
        for server in servers:
            with contextlib.suppress(ProcessLookupError):
                server.send_signal(signal.SIGTERM)
        for server in servers:
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.stop_servers(*self.servers)
        local.down(self.root, quiet=True)

    def wait_checkpoint(self, target: int, timeout: float) -> None:
        client = sync_client(self.redis_url)
        try:
            wait_for_checkpoint(client, target, timeout, self.slot)
        finally:
            client.close()

    def settle(self) -> None:
        """Waits until the replicator has applied every write so far, so that no lag spills into a window."""
        settle(self.dsn, self.redis_url, self.payers[0], self.slot)

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

    # -- the replicator, for the drain ------------------------------------------------------------

    def _replicator(self) -> local.Process:
        assert self.state is not None
        return next(p for p in self.state.processes if p.name == "replicator")

    def stop_replicator(self) -> None:
        """SIGTERM, SIGKILL after 30 s."""
        pid = self._replicator().pid
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if process_alive(pid):
            os.kill(pid, signal.SIGKILL)
            # Gone before a new one binds its ports.
            deadline = time.monotonic() + 10
            while process_alive(pid) and time.monotonic() < deadline:
                time.sleep(0.05)

    def start_replicator(self, extra_env: Mapping[str, str] | None = None) -> int:
        """Starts the replicator again on its health port, its output to its log; returns its pid.

        `extra_env` (e.g. OTEL_* variables) is added to the stack's settings for this process only.
        """
        assert self.state is not None
        old = self._replicator()
        env = replicator_env(
            self.dsn,
            self.redis_url,
            health_port=int(old.health_addr.rsplit(":", 1)[1]),
            # The same port as before, where `endpoints` says the replicator's /metrics is.
            metrics_port=int(self.endpoints["REPLICATOR_METRICS_ADDR"].rsplit(":", 1)[1]),
            extra=extra_env,
        )
        process = start_replicator(env, Path(old.log), detached=True)
        new = local.Process(name=old.name, pid=process.pid, log=old.log, health_addr=old.health_addr)
        self.state.processes[self.state.processes.index(old)] = new
        self.state.save()  # so that `down` stops the new process
        return new.pid

    def replicator_alive(self) -> bool:
        return process_alive(self._replicator().pid)

    def replicator_ready(self) -> None:
        local.wait_serving(self._replicator().health_addr, 60)

    # -- measuring --------------------------------------------------------------------------

    def measure(
        self,
        jobs_for: Callable[[float], list[Job]],
        cpu_of: dict[str, Callable[[], cpu.Snapshot]],
        duration_s: float,
        warmup_s: float,
    ) -> Window:
        """Runs one window: the jobs start together, the CPU readings bracket the measured part."""
        return self.measure_apart({"": jobs_for}, cpu_of, duration_s, warmup_s)[""]

    def measure_apart(
        self,
        loads: Mapping[str, Callable[[float], list[Job]]],
        cpu_of: dict[str, Callable[[], cpu.Snapshot]],
        duration_s: float,
        warmup_s: float,
    ) -> dict[str, Window]:
        """`measure` of several loads at once, e.g. writes and reads: a window for each, the same CPU readings in each."""
        assert self.pool is not None
        start_at = time.monotonic() + 0.3 + warmup_s
        handles = {name: self.pool.submit(jobs_for(start_at)) for name, jobs_for in loads.items()}
        sleep_until(start_at)
        before = {name: read() for name, read in cpu_of.items()}
        sleep_until(start_at + duration_s)
        after = {name: read() for name, read in cpu_of.items()}
        spent = {name: cpu.spent(before[name], after[name]) for name in cpu_of}
        return {
            name: Window.of(self.pool.collect(handle), duration_s, spent) for name, handle in handles.items()
        }

    def closed_loop_figure(
        self,
        figure: str,
        call: str,
        target: str,
        *,
        server: str,
        floor_us: float | None,
        processes: Sequence[str] = (),
        history_channel: bool = False,
        redis_cpu: bool = False,
        postgres_cpu: bool = False,
    ) -> Window:
        """Measures `call` on `target`, closed loop at the plan's concurrency, and adds the window to `figure`.

        `server` names the CPU of `processes` (by default the process of that name) in the
        window; its CPU per RPC is divided by `floor_us` when one is given. With `redis_cpu`,
        the CPU of every Redis process over the window per RPC is added too
        (`redis_cpu_us_per_rpc`); with `postgres_cpu`, PostgreSQL's, every process of the
        server, its WAL senders included (`postgres_cpu_us_per_rpc`).
        """
        cpu_of = {server: self.cpu_reader(*(processes or [server]))}
        if redis_cpu:
            cpu_of["redis"] = self.redis_cpu
        if postgres_cpu:
            cpu_of["pg"] = self.pg_cpu
        window = self.measure(
            self.jobs("closed", call, target, self.plan.concurrency, history_channel=history_channel),
            cpu_of,
            self.plan.window_s,
            self.plan.warmup_s,
        )
        self.collector.add_window(figure, window, server, floor_us)
        if redis_cpu:
            self.collector.add(figure, redis_cpu_us_per_rpc=window.cpu_us_per_op("redis"))
        if postgres_cpu:
            self.collector.add(figure, postgres_cpu_us_per_rpc=window.cpu_us_per_op("pg"))
        return window

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
        traced: bool = False,
    ) -> Callable[[float], list[Job]]:
        """A closed-loop (`total` callers) or open-loop (`total` calls/s) load spread over the workers.

        `traced` submissions carry a sampled traceparent each (`Job.traced`).
        """
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
                    token="" if call == "echo" else self.token,
                    traced=traced,
                )
                for index, share in enumerate(split(total, count))
            ]

        return build

    def cpu_reader(self, *names: str) -> Callable[[], cpu.Snapshot]:
        pids = [pid for name in names for pid in self.pids(name)]
        return lambda: cpu.snapshot(pids)

    def pg_cpu(self) -> cpu.Snapshot:
        return cpu.tree_snapshot(self.pid("postgres"))

    def redis_cpu(self) -> cpu.Snapshot:
        """Every Redis process of the stack: the one server, or all the nodes of a cluster, masters and replicas."""
        return cpu.snapshot(self.pids("redis"))

    # -- results ----------------------------------------------------------------------------

    def results(self, started: float, began_at: str, command: str) -> dict[str, Any]:
        figures = self.collector.figures()
        return {
            "schema_version": 1,
            "mode": self.plan.mode,
            "note": (
                "quick run: one short repetition per figure, a small drain backlog "
                f"({self.plan.drain_payments * backlog.CHANGES_PER_PAYMENT:,} changes instead of 200,000+), "
                f"a large transaction of {self.plan.large_transaction_changes:,} row changes instead of "
                "1,000,000 and a coarse sweep; a smoke test of the benchmark, not a measurement"
                if self.plan.mode == "quick"
                else "full run"
            ),
            "started_at": began_at,
            "duration_s": time.monotonic() - started,
            "command": command,
            "machine": environment.machine_info(),
            "versions": environment.versions(self.dsn, self.redis_url),
            "settings": {
                **asdict(self.plan),
                "fsync": True,
                "history_processes": self.history_count,
                "redis_topology": self.endpoints.get("REDIS_TOPOLOGY", "single"),
                "load_processes": self.plan.workers,
            },
            "figures": figures,
            "targets": report.targets(figures),
            "sweeps": self.sweeps,
            "phase_seconds": self.phase_s,
        }


def run(plan: Plan, root: Path, phases: Sequence[tuple[str, Phase]], command: str) -> dict[str, Any]:
    """Runs the phases in order on one runner, timing each, and stops everything, whatever happens."""
    started = time.monotonic()
    began_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    runner = Runner(plan, root)
    load_at_start = [round(x, 2) for x in os.getloadavg()]
    try:
        for name, phase in phases:
            began = time.monotonic()
            phase(runner)
            runner.phase_s[name] = round(time.monotonic() - began, 1)
        results = runner.results(started, began_at, command)
        results["machine"]["load_average_at_start"] = load_at_start
    finally:
        print("== stopping the stack", flush=True)
        runner.stop()
    results["duration_s"] = time.monotonic() - started
    return results
