"""The local stack: private PostgreSQL and Redis plus every service, in the background, under .stack/.

With STACK_PROMETHEUS=1, also a Prometheus that scrapes every process and evaluates the
shipped alert rules (deploy/k8s/components/alerts/replicator.rules.yml).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stack import tokens
from stack.auth import CUSTOMER, ROLES
from stack.servers import PostgresServer, RedisCluster, RedisServer, free_port, process_alive

STATE_FILE = "state.json"
ENDPOINTS_FILE = "endpoints.env"
DATABASE = "payments"

# STACK_PROMETHEUS=1 (or true, yes) adds a Prometheus. It scrapes every process and evaluates
# the rules this often: a local stack's alerts should follow it within seconds (a production
# Prometheus scrapes every 15-60 s). Its configuration and data live in PROMETHEUS_DIR.
PROMETHEUS_INTERVAL_SECONDS = 1
PROMETHEUS_DIR = "prometheus"
# The rules it loads unless STACK_PROMETHEUS_RULES names another file: the shipped ones.
ALERT_RULES = (
    Path(__file__).resolve().parent.parent
    / "deploy"
    / "k8s"
    / "components"
    / "alerts"
    / "replicator.rules.yml"
)


def prometheus_wanted() -> bool:
    return os.environ.get("STACK_PROMETHEUS", "").strip().lower() in ("1", "true", "yes")


# STACK_REDIS=cluster runs the read models on a Redis Cluster of 3 masters and 3 replicas
# instead of one Redis; a master's replica is promoted after this long without it.
CLUSTER_NODE_TIMEOUT_MS = 5000


def redis_topology() -> str:
    """`single` (the default) or `cluster`, from STACK_REDIS."""
    topology = os.environ.get("STACK_REDIS", "").strip().lower() or "single"
    if topology not in ("single", "cluster"):
        raise RuntimeError(f"STACK_REDIS must be single or cluster, got {topology!r}")
    return topology


@dataclass
class Process:
    """A background process of the stack: its name, pid, where it logs, and how to start it again."""

    name: str
    pid: int
    log: str
    health_addr: str = ""
    # The command and the environment it adds to the stack's: `start_process` runs it again.
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    # Where a process without gRPC health (Prometheus) answers 200 once it is ready.
    ready_url: str = ""


@dataclass
class StackState:
    """What `up` started, so that `down` (another process) can stop exactly that."""

    root: str
    postgres_pid: int = 0
    postgres_dir: str = ""
    redis_pid: int = 0
    redis_dir: str = ""
    # A cluster's nodes (STACK_REDIS=cluster), each a process of its own in redis_dir.
    redis_cluster_pids: list[int] = field(default_factory=list)
    prometheus_dir: str = ""
    endpoints: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)

    def save(self) -> None:
        # Only its owner may read it: the processes' environments hold the page token secret.
        path = Path(self.root, STATE_FILE)
        path.unlink(missing_ok=True)
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
            out.write(json.dumps(asdict(self), indent=2))

    def process(self, name: str) -> Process:
        for process in self.processes:
            if process.name == name:
                return process
        names = ", ".join(p.name for p in self.processes)
        raise LookupError(f"the stack has no process {name!r} (it has {names})")

    @classmethod
    def load(cls, root: Path) -> StackState | None:
        path = root / STATE_FILE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        raw["processes"] = [Process(**p) for p in raw.get("processes", [])]
        return cls(**raw)


def _start_redis(root: Path, state: StackState) -> tuple[str, list[str]]:
    """Starts one Redis, or a cluster with STACK_REDIS=cluster; returns its URL and every node's address."""
    if redis_topology() == "cluster":
        print("starting a Redis Cluster (3 masters, 3 replicas) ...", flush=True)
        cluster = RedisCluster(
            base_dir=root / "redis", detached=True, node_timeout_ms=CLUSTER_NODE_TIMEOUT_MS
        )
        state.redis_dir = str(root / "redis")
        try:
            cluster.start()
        finally:
            state.redis_cluster_pids = [
                node.process.pid for node in cluster.nodes if node.process is not None
            ]
            state.save()
        return cluster.url, [f"127.0.0.1:{node.port}" for node in cluster.nodes]
    print("starting Redis ...", flush=True)
    redis_server = RedisServer(
        base_dir=root / "redis", port=_port("redis"), detached=True, log_file=root / "redis.log"
    ).start()
    assert redis_server.process is not None
    state.redis_pid, state.redis_dir = redis_server.process.pid, str(redis_server.base_dir)
    state.save()
    return redis_server.url(0), [f"127.0.0.1:{redis_server.port}"]


def _port(name: str) -> int:
    """A configured port (STACK_<NAME>_PORT) or a free one."""
    configured = os.environ.get(f"STACK_{name.upper()}_PORT", "")
    return int(configured) if configured else free_port()


def wait_serving(
    address: str,
    timeout: float,
    service: str = "readiness",
    credentials: grpc.ChannelCredentials | None = None,
    alive: Callable[[], bool] | None = None,
) -> None:
    """Returns once the health service at `address` answers SERVING for `service`.

    Raises TimeoutError when it does not in time, and ChildProcessError as soon as
    `alive` (the server's process, when the caller has one) says it has exited.
    """
    deadline = time.monotonic() + timeout
    last = "no answer"
    channel = grpc.secure_channel(address, credentials) if credentials else grpc.insecure_channel(address)
    with channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise ChildProcessError(f"the server of {address} exited")
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
                last = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            except grpc.RpcError as error:
                last = error.code().name
            time.sleep(0.05)
    raise TimeoutError(f"{address} not SERVING after {timeout:.0f}s (last: {last})")


def wait_http_ready(url: str, timeout: float, alive: Callable[[], bool] | None = None) -> None:
    """Returns once `url` answers 200; TimeoutError when it does not in time, ChildProcessError once `alive` says no."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if alive is not None and not alive():
            raise ChildProcessError(f"the server of {url} exited")
        try:
            with urllib.request.urlopen(url, timeout=1) as reply:
                if reply.status == 200:
                    return
                last = f"HTTP {reply.status}"
        except urllib.error.HTTPError as error:
            last = f"HTTP {error.code}"
        except OSError as error:
            last = str(error)
        time.sleep(0.05)
    raise TimeoutError(f"{url} not ready after {timeout:.0f}s (last: {last})")


def _spawn(root: Path, name: str, args: list[str], env: dict[str, str]) -> Process:
    log = root / f"{name}.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env},
            start_new_session=True,
        )
    return Process(name=name, pid=process.pid, log=str(log), args=args, env=env)


def _wait_ready(process: Process, timeout: float) -> None:
    """Waits until the process is ready: SERVING on gRPC health, or 200 from its ready URL."""
    try:
        if process.ready_url:
            wait_http_ready(process.ready_url, timeout, alive=lambda: process_alive(process.pid))
        else:
            wait_serving(process.health_addr, timeout, alive=lambda: process_alive(process.pid))
    except (TimeoutError, ChildProcessError) as error:
        tail = "\n".join(Path(process.log).read_text(errors="replace").splitlines()[-20:])
        raise RuntimeError(f"{process.name} did not become ready: {error}\n{tail}") from None


def up(root: Path, history_count: int = 2, fsync: bool = False, timeout: float = 90.0) -> StackState:
    """Starts everything in the background and waits until every health check is SERVING."""
    redis_topology()  # a wrong STACK_REDIS stops it before anything starts
    existing = StackState.load(root)
    if existing is not None and process_alive(existing.postgres_pid):
        print(f"the stack is already up (see {root / ENDPOINTS_FILE}); `make down` stops it")
        return existing
    if existing is not None:
        down(root, quiet=True)
    root.mkdir(parents=True, exist_ok=True)
    state = StackState(root=str(root))
    try:
        _start(root, state, history_count, fsync, timeout)
    except BaseException:
        state.save()
        down(root, quiet=True)
        raise
    return state


def _start(root: Path, state: StackState, history_count: int, fsync: bool, timeout: float) -> None:
    print("starting PostgreSQL (wal_level=logical) ...", flush=True)
    # The data lives in a folder of its own under the system's temporary folder: as
    # root, PostgreSQL runs as an unprivileged user that may not enter `root`.
    postgres = PostgresServer(
        base_dir=Path(tempfile.mkdtemp(prefix="payments-stack-pg-")),
        port=_port("postgres"),
        fsync=fsync,
        detached=True,
        log_file=root / "postgres.log",
    ).start()
    assert postgres.process is not None
    state.postgres_pid, state.postgres_dir = postgres.process.pid, str(postgres.base_dir)
    state.save()
    redis_url, redis_nodes = _start_redis(root, state)
    dsn = postgres.create_database(DATABASE)
    python = sys.executable
    # Authentication is on, as in Kubernetes: the servers verify tokens of the local
    # authority (created once, kept across `make down`) and apply its policies.
    authority = tokens.authority(root)
    # Its keys are kept, but its policies are this version's: an authority created by an
    # earlier version would refuse the methods added since.
    authority.write_policies()
    print(f"token authority: {authority.directory} (issuer {authority.ISSUER})", flush=True)
    print("running the migrations ...", flush=True)
    subprocess.run(
        [python, "-m", "approval_svc", "migrate"],
        env={**os.environ, "APPROVAL_DATABASE_URL": dsn},
        check=True,
        stdout=open(root / "migrate.log", "ab"),  # noqa: SIM115
        stderr=subprocess.STDOUT,
    )

    approval_port = _port("approval")
    # Where each process serves /metrics, by Prometheus's job name.
    metrics: dict[str, list[str]] = {"approval": [], "replicator": [], "history": []}
    approval_metrics_port = _port("approval_metrics")
    metrics["approval"].append(f"127.0.0.1:{approval_metrics_port}")
    approval = _spawn(
        root,
        "approval",
        [python, "-m", "approval_svc", "serve"],
        {
            "APPROVAL_DATABASE_URL": dsn,
            "APPROVAL_HOST": "127.0.0.1",
            "APPROVAL_PORT": str(approval_port),
            "APPROVAL_METRICS_PORT": str(approval_metrics_port),
            # Low enough that the demo's large payment is held for review.
            "APPROVAL_REVIEW_THRESHOLD_MINOR": os.environ.get("APPROVAL_REVIEW_THRESHOLD_MINOR", "100000"),
            **authority.server_env("APPROVAL_"),
        },
    )
    approval.health_addr = f"127.0.0.1:{approval_port}"
    state.processes.append(approval)

    replicator_port = _port("replicator_health")
    replicator_metrics_port = _port("replicator_metrics")
    metrics["replicator"].append(f"127.0.0.1:{replicator_metrics_port}")
    replicator = _spawn(
        root,
        "replicator",
        [python, "-m", "replicator", "run"],
        {
            "REPLICATOR_DATABASE_URL": dsn,
            "REPLICATOR_REDIS_URL": redis_url,
            "REPLICATOR_HEALTH_PORT": str(replicator_port),
            "REPLICATOR_METRICS_PORT": str(replicator_metrics_port),
        },
    )
    replicator.health_addr = f"127.0.0.1:{replicator_port}"
    state.processes.append(replicator)

    page_secret = secrets.token_hex(32)
    history_addrs = []
    with_prometheus = prometheus_wanted()
    for index in range(1, history_count + 1):
        port = free_port()
        history_metrics_port = free_port()
        metrics["history"].append(f"127.0.0.1:{history_metrics_port}")
        history = _spawn(
            root,
            f"history-{index}",
            [python, "-m", "history_svc", "serve"],
            {
                "HISTORY_REDIS_URL": redis_url,
                "HISTORY_HOST": "127.0.0.1",
                "HISTORY_PORT": str(port),
                "HISTORY_METRICS_PORT": str(history_metrics_port),
                "HISTORY_PAGE_TOKEN_SECRET": page_secret,
                **authority.server_env("HISTORY_"),
            },
        )
        history.health_addr = f"127.0.0.1:{port}"
        history_addrs.append(history.health_addr)
        state.processes.append(history)
    state.save()

    for process in state.processes:
        print(f"waiting for {process.name} ({process.health_addr}) to be SERVING ...", flush=True)
        _wait_ready(process, timeout)

    state.endpoints = {
        "APPROVAL_ADDR": approval.health_addr,
        "HISTORY_ADDRS": ",".join(history_addrs),
        "REPLICATOR_HEALTH_ADDR": replicator.health_addr,
        # Where each process serves /metrics, for a look with curl and for the benchmark.
        "APPROVAL_METRICS_ADDR": metrics["approval"][0],
        "REPLICATOR_METRICS_ADDR": metrics["replicator"][0],
        "HISTORY_METRICS_ADDRS": ",".join(metrics["history"]),
        "POSTGRES_DSN": dsn,
        "REDIS_URL": redis_url,
        "REDIS_TOPOLOGY": redis_topology(),
        "REDIS_NODES": ",".join(redis_nodes),
    }
    if with_prometheus:
        prometheus = _start_prometheus(root, state, metrics)
        print(f"waiting for prometheus ({prometheus.ready_url}) to be ready ...", flush=True)
        _wait_ready(prometheus, timeout)
        state.endpoints["PROMETHEUS_URL"] = prometheus.ready_url.removesuffix("/-/ready")
    state.save()
    lines = [f"{key}={shlex.quote(value)}" for key, value in state.endpoints.items()]
    (root / ENDPOINTS_FILE).write_text("\n".join(lines) + "\n")
    auth_env = tokens.write_auth_env(root, authority)
    print("the stack is up:")
    for line in lines:
        print(f"  {line}")
    if with_prometheus:
        url = state.endpoints["PROMETHEUS_URL"]
        print(
            f"prometheus: {url} scrapes every process every {PROMETHEUS_INTERVAL_SECONDS}s and evaluates "
            f"the alert rules of {_rules_file()} as often; the alerts: {url}/alerts"
        )
    print(f"endpoints written to {root / ENDPOINTS_FILE}; logs in {root}/*.log; `make down` stops it")
    print(
        f"authentication is on: a token per role ({', '.join(tokens.token_variable(r) for r in ROLES if r != CUSTOMER)}) "
        f"and the JWKS and policy paths are in {auth_env};\n"
        "  call with the metadata 'authorization: Bearer <token>'; "
        "`python -m stack token --role ROLE [--account ID]` prints another"
    )


def _rules_file() -> Path:
    """The rules Prometheus loads: STACK_PROMETHEUS_RULES, or the shipped ones."""
    return Path(os.environ.get("STACK_PROMETHEUS_RULES") or ALERT_RULES).resolve()


def prometheus_config(rules: Path, targets: dict[str, list[str]]) -> str:
    """The local Prometheus's configuration: the rules file, and one job per service with its /metrics addresses."""
    interval = f"{PROMETHEUS_INTERVAL_SECONDS}s"
    lines = [
        "# Written by `make up` with STACK_PROMETHEUS=1 (stack/local.py).",
        "global:",
        f"  scrape_interval: {interval}",
        f"  scrape_timeout: {interval}",
        f"  evaluation_interval: {interval}",
        "rule_files:",
        f"  - {json.dumps(str(rules))}",
        "scrape_configs:",
    ]
    for job, addresses in targets.items():
        # JSON's strings and lists are YAML too.
        lines += [f"  - job_name: {job}", "    static_configs:", f"      - targets: {json.dumps(addresses)}"]
    return "\n".join(lines) + "\n"


def _start_prometheus(root: Path, state: StackState, targets: dict[str, list[str]]) -> Process:
    """Starts Prometheus on the stack's /metrics addresses, its configuration and data under root/prometheus."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise RuntimeError("STACK_PROMETHEUS=1 needs Prometheus: apt-get install prometheus (Debian)")
    rules = _rules_file()
    if not rules.is_file():
        raise RuntimeError(f"STACK_PROMETHEUS_RULES: no file {rules}")
    folder = root / PROMETHEUS_DIR
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "data").mkdir(parents=True)
    state.prometheus_dir = str(folder)
    config = folder / "prometheus.yml"
    config.write_text(prometheus_config(rules, targets))
    port = _port("prometheus")
    print(f"starting Prometheus on 127.0.0.1:{port} ...", flush=True)
    prometheus = _spawn(
        root,
        "prometheus",
        [
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1d",
        ],
        {},
    )
    prometheus.ready_url = f"http://127.0.0.1:{port}/-/ready"
    state.processes.append(prometheus)
    state.save()
    return prometheus


def stop_process(root: Path, name: str) -> None:
    """Stops one process of the stack as Kubernetes stops a container (SIGTERM, SIGKILL after 20 s)."""
    state = _state_of(root)
    _terminate(state.process(name).pid, signal.SIGTERM, 20)


def start_process(root: Path, name: str, timeout: float = 90.0) -> None:
    """Starts a stopped process of the stack again, as it was started, and waits until it is ready."""
    state = _state_of(root)
    old = state.process(name)
    if process_alive(old.pid):
        raise RuntimeError(f"{name} is running (pid {old.pid}); stop it first")
    if not old.args:
        raise RuntimeError(
            f"{name} was started by an earlier version of the stack: `make down`, then `make up`"
        )
    new = _spawn(root, name, old.args, old.env)
    new.health_addr, new.ready_url = old.health_addr, old.ready_url
    state.processes[state.processes.index(old)] = new
    state.save()
    _wait_ready(new, timeout)


def _state_of(root: Path) -> StackState:
    state = StackState.load(root)
    if state is None or not process_alive(state.postgres_pid):
        raise RuntimeError(f"the stack of {root} is not up")
    return state


def _terminate(pid: int, sig: int, timeout: float) -> None:
    if not process_alive(pid):
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        if not process_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def down(root: Path, quiet: bool = False) -> None:
    """Stops everything `up` started and removes the data (the logs stay)."""
    state = StackState.load(root)
    if state is None:
        if not quiet:
            print("the stack is not up")
        return
    for process in reversed(state.processes):
        _terminate(process.pid, signal.SIGTERM, 20)
    for pid in (state.redis_pid, *state.redis_cluster_pids):
        _terminate(pid, signal.SIGTERM, 10)
    _terminate(state.postgres_pid, signal.SIGINT, 30)

    for folder in (state.postgres_dir, state.redis_dir, state.prometheus_dir):
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    # The authority (root/auth) stays: tokens it signed remain valid for the next stack.
    for name in (STATE_FILE, ENDPOINTS_FILE, tokens.AUTH_ENV_FILE):
        (root / name).unlink(missing_ok=True)
    if not quiet:
        print("the stack is down; logs kept in", root)
