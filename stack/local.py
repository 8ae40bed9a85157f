"""The local stack: private PostgreSQL and Redis plus every service, in the background, under .stack/."""

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
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from stack import tokens
from stack.auth import CUSTOMER, ROLES
from stack.servers import PostgresServer, RedisServer, free_port, process_alive

STATE_FILE = "state.json"
ENDPOINTS_FILE = "endpoints.env"
DATABASE = "payments"


@dataclass
class Process:
    """A background process of the stack: its name, pid, and where it logs."""

    name: str
    pid: int
    log: str
    health_addr: str = ""


@dataclass
class StackState:
    """What `up` started, so that `down` (another process) can stop exactly that."""

    root: str
    postgres_pid: int = 0
    postgres_dir: str = ""
    redis_pid: int = 0
    redis_dir: str = ""
    endpoints: dict[str, str] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)

    def save(self) -> None:
        Path(self.root, STATE_FILE).write_text(json.dumps(asdict(self), indent=2))

    @classmethod
    def load(cls, root: Path) -> StackState | None:
        path = root / STATE_FILE
        if not path.exists():
            return None
        raw = json.loads(path.read_text())
        raw["processes"] = [Process(**p) for p in raw.get("processes", [])]
        return cls(**raw)


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
    return Process(name=name, pid=process.pid, log=str(log))


def up(root: Path, history_count: int = 2, fsync: bool = False, timeout: float = 90.0) -> StackState:
    """Starts everything in the background and waits until every health check is SERVING."""
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
    print("starting Redis ...", flush=True)
    redis_server = RedisServer(
        base_dir=root / "redis", port=_port("redis"), detached=True, log_file=root / "redis.log"
    ).start()
    assert redis_server.process is not None
    state.redis_pid, state.redis_dir = redis_server.process.pid, str(redis_server.base_dir)
    state.save()

    dsn = postgres.create_database(DATABASE)
    redis_url = redis_server.url(0)
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
    approval = _spawn(
        root,
        "approval",
        [python, "-m", "approval_svc", "serve"],
        {
            "APPROVAL_DATABASE_URL": dsn,
            "APPROVAL_HOST": "127.0.0.1",
            "APPROVAL_PORT": str(approval_port),
            "APPROVAL_METRICS_PORT": str(_port("approval_metrics")),
            # Low enough that the demo's large payment is held for review.
            "APPROVAL_REVIEW_THRESHOLD_MINOR": os.environ.get("APPROVAL_REVIEW_THRESHOLD_MINOR", "100000"),
            **authority.server_env("APPROVAL_"),
        },
    )
    approval.health_addr = f"127.0.0.1:{approval_port}"
    state.processes.append(approval)

    replicator_port = _port("replicator_health")
    replicator = _spawn(
        root,
        "replicator",
        [python, "-m", "replicator", "run"],
        {
            "REPLICATOR_DATABASE_URL": dsn,
            "REPLICATOR_REDIS_URL": redis_url,
            "REPLICATOR_HEALTH_PORT": str(replicator_port),
            "REPLICATOR_METRICS_PORT": str(_port("replicator_metrics")),
        },
    )
    replicator.health_addr = f"127.0.0.1:{replicator_port}"
    state.processes.append(replicator)

    page_secret = secrets.token_hex(32)
    history_addrs = []
    for index in range(1, history_count + 1):
        port = free_port()
        history = _spawn(
            root,
            f"history-{index}",
            [python, "-m", "history_svc", "serve"],
            {
                "HISTORY_REDIS_URL": redis_url,
                "HISTORY_HOST": "127.0.0.1",
                "HISTORY_PORT": str(port),
                "HISTORY_METRICS_PORT": "0",
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
        try:
            wait_serving(process.health_addr, timeout)
        except TimeoutError as error:
            tail = "\n".join(Path(process.log).read_text(errors="replace").splitlines()[-20:])
            raise RuntimeError(f"{process.name} did not become ready: {error}\n{tail}") from None

    state.endpoints = {
        "APPROVAL_ADDR": approval.health_addr,
        "HISTORY_ADDRS": ",".join(history_addrs),
        "REPLICATOR_HEALTH_ADDR": replicator.health_addr,
        "POSTGRES_DSN": dsn,
        "REDIS_URL": redis_url,
    }
    state.save()
    lines = [f"{key}={shlex.quote(value)}" for key, value in state.endpoints.items()]
    (root / ENDPOINTS_FILE).write_text("\n".join(lines) + "\n")
    auth_env = tokens.write_auth_env(root, authority)
    print("the stack is up:")
    for line in lines:
        print(f"  {line}")
    print(f"endpoints written to {root / ENDPOINTS_FILE}; logs in {root}/*.log; `make down` stops it")
    print(
        f"authentication is on: a token per role ({', '.join(tokens.token_variable(r) for r in ROLES if r != CUSTOMER)}) "
        f"and the JWKS and policy paths are in {auth_env};\n"
        "  call with the metadata 'authorization: Bearer <token>'; "
        "`python -m stack token --role ROLE [--account ID]` prints another"
    )


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
    _terminate(state.redis_pid, signal.SIGTERM, 10)
    _terminate(state.postgres_pid, signal.SIGINT, 30)

    for folder in (state.postgres_dir, state.redis_dir):
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
    # The authority (root/auth) stays: tokens it signed remain valid for the next stack.
    for name in (STATE_FILE, ENDPOINTS_FILE, tokens.AUTH_ENV_FILE):
        (root / name).unlink(missing_ok=True)
    if not quiet:
        print("the stack is down; logs kept in", root)
