"""Private PostgreSQL and Redis servers in temporary folders, on free ports, for tests and the local stack.

Each server runs as a child process that this module starts, waits for, and stops. As
root (CI), PostgreSQL runs as an unprivileged system user, since `initdb` refuses root.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import os
import pwd
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg2
import redis

_PR_SET_PDEATHSIG = 1


class ServerError(RuntimeError):
    """A private server could not be set up or did not start; the message says what to do."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    # Runs in the child after any change of user: the kernel kills the server
    # if the test process dies, so nothing is left running after a crash.
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def dying_with_parent(args: list[str]) -> tuple[list[str], Callable[[], None] | None]:
    """The command and preexec function that make a child die when this process dies.

    util-linux's `setpriv --pdeathsig` does it without running Python in the forked
    child (which can abort when gRPC threads are running); a preexec function is the
    fallback where setpriv is missing.
    """
    setpriv = shutil.which("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--", *args], None
    return args, _die_with_parent


def process_alive(pid: int) -> bool:
    """Whether a process runs: a zombie (exited, not yet reaped) counts as gone."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    return False


def find_postgres_bin(name: str) -> Path:
    """The path of a PostgreSQL server program, on PATH or under /usr/lib/postgresql/*/bin."""
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    candidates = sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if candidates:
        return Path(candidates[-1])
    raise ServerError(
        f"PostgreSQL program {name!r} not found on PATH or under /usr/lib/postgresql/*/bin; "
        "install the server: `apt-get install postgresql` (Debian) or your platform's package"
    )


def find_redis_server() -> Path:
    found = shutil.which("redis-server")
    if not found:
        raise ServerError("redis-server not found on PATH; install it: `apt-get install redis-server`")
    return Path(found)


def _unprivileged_user() -> pwd.struct_passwd | None:
    """The user to run PostgreSQL as: None for a normal user, a system user when we are root."""
    if os.geteuid() != 0:
        return None
    for name in (os.environ.get("PAYMENTS_PG_USER", ""), "postgres", "nobody"):
        if not name:
            continue
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise ServerError("running as root: create an unprivileged user (e.g. `postgres`) to run PostgreSQL")


def _wait_until(
    check: Callable[[], bool], process: subprocess.Popen[bytes], what: str, log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ServerError(f"{what} exited with {process.returncode}:\n{_tail(log)}")
        if check():
            return
        time.sleep(0.05)
    raise ServerError(f"{what} did not accept connections within {timeout:.0f}s:\n{_tail(log)}")


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@dataclass
class PostgresServer:
    """A private PostgreSQL cluster with logical replication enabled.

    `fsync` is off by default because tests do not survive power loss; the benchmark
    turns it on. `detached` servers outlive this process (for the local stack).
    """

    base_dir: Path | None = None
    port: int = 0
    fsync: bool = False
    detached: bool = False
    log_file: Path | None = None
    extra_settings: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _owns_dir: bool = field(default=False, init=False, repr=False)

    @property
    def data_dir(self) -> Path:
        assert self.base_dir is not None
        return self.base_dir / "data"

    @property
    def log_path(self) -> Path:
        assert self.base_dir is not None
        return self.log_file or self.base_dir / "postgres.log"

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def _popen(self, args: list[str], log: Path | None) -> subprocess.Popen[bytes]:
        user = _unprivileged_user()
        preexec: Callable[[], None] | None = None
        if not self.detached:
            args, preexec = dying_with_parent(args)
        setpriv = shutil.which("setpriv")
        switch_in_child = user is not None and setpriv is None
        if user is not None and setpriv is not None:
            # setpriv changes the user after exec: Popen's user= needs a real fork, and a
            # fork of a process whose gRPC threads are busy can crash the child.
            args = [
                setpriv,
                f"--reuid={user.pw_uid}",
                f"--regid={user.pw_gid}",
                "--clear-groups",
                "--",
                *args,
            ]
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child keeps it
        try:
            return subprocess.Popen(
                args,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                user=user.pw_uid if user and switch_in_child else None,
                group=user.pw_gid if user and switch_in_child else None,
                extra_groups=[] if user and switch_in_child else None,
                cwd=self.base_dir,
                preexec_fn=preexec,
                start_new_session=self.detached,
                env={"PATH": os.environ.get("PATH", ""), "LC_ALL": "C", "TZ": "UTC"},
            )
        finally:
            if log:
                out.close()  # type: ignore[union-attr]

    def init(self) -> None:
        """Creates the cluster's folder and runs initdb (once)."""
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="payments-pg-"))
            self._owns_dir = True
        self.base_dir.mkdir(parents=True, exist_ok=True)
        user = _unprivileged_user()
        if user:
            os.chown(self.base_dir, user.pw_uid, user.pw_gid)
        if (self.data_dir / "PG_VERSION").exists():
            return
        initdb = self._popen(
            [
                str(find_postgres_bin("initdb")),
                "-D",
                str(self.data_dir),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            self.base_dir / "initdb.log",
        )
        if initdb.wait(timeout=120) != 0:
            raise ServerError(f"initdb failed:\n{_tail(self.base_dir / 'initdb.log')}")

    def start(self, timeout: float = 60.0) -> PostgresServer:
        self.init()
        assert self.base_dir is not None
        if not self.port:
            self.port = free_port()
        settings = {
            "listen_addresses": "127.0.0.1",
            "port": str(self.port),
            "unix_socket_directories": str(self.base_dir),
            "wal_level": "logical",
            "max_replication_slots": "20",
            "max_wal_senders": "20",
            "max_connections": "200",
            "fsync": "on" if self.fsync else "off",
            # On: an acknowledged payment survives a crash of PostgreSQL. (Consistency
            # tokens cover the commit whatever this setting.)
            "synchronous_commit": "on",
            "full_page_writes": "on" if self.fsync else "off",
            "shared_buffers": "128MB",
            "max_slot_wal_keep_size": "2GB",
            "timezone": "UTC",
            "log_min_messages": "warning",
            **self.extra_settings,
        }
        args = [str(find_postgres_bin("postgres")), "-D", str(self.data_dir)]
        for key, value in settings.items():
            args += ["-c", f"{key}={value}"]
        self.process = self._popen(args, self.log_path)
        _wait_until(self._accepts, self.process, "PostgreSQL", self.log_path, timeout)
        return self

    def _accepts(self) -> bool:
        try:
            psycopg2.connect(self.dsn(), connect_timeout=2).close()
            return True
        except psycopg2.OperationalError:
            return False

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT), SIGKILL if it takes too long."""
        _stop(self.process, signal.SIGINT, timeout)
        self.process = None

    def kill(self) -> None:
        """Crash the server (SIGKILL of the postmaster and its children)."""
        if self.process is not None:
            # Children would outlive a killed postmaster; SIGQUIT makes them exit at once.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGQUIT)
            _stop(self.process, signal.SIGKILL, 10)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def remove(self) -> None:
        self.stop()
        if self._owns_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)

    @contextlib.contextmanager
    def admin_cursor(self) -> Iterator[psycopg2.extensions.cursor]:
        """A cursor on the `postgres` database in autocommit, for statements that no transaction may hold."""
        connection = psycopg2.connect(self.dsn())
        connection.autocommit = True
        try:
            with connection.cursor() as cursor:
                yield cursor
        finally:
            connection.close()

    def create_database(self, name: str) -> str:
        """Creates an empty database and returns its DSN."""
        with self.admin_cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    def drop_database(self, name: str) -> None:
        with self.admin_cursor() as cursor:
            # A walsender that a client just left may still hold its slot for a moment;
            # end any that remain, and drop the slots once they are free.
            deadline = time.monotonic() + 30
            while True:
                cursor.execute(
                    "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots "
                    "WHERE database = %s AND active_pid IS NOT NULL",
                    (name,),
                )
                cursor.execute(
                    "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                    "WHERE database = %s AND NOT active",
                    (name,),
                )
                cursor.execute("SELECT count(*) FROM pg_replication_slots WHERE database = %s", (name,))
                row = cursor.fetchone()
                if row is None or row[0] == 0 or time.monotonic() >= deadline:
                    break
                time.sleep(0.02)
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class RedisServer:
    """A private Redis that keeps nothing on disk."""

    base_dir: Path | None = None
    port: int = 0
    detached: bool = False
    log_file: Path | None = None
    extra_args: list[str] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _owns_dir: bool = field(default=False, init=False, repr=False)

    @property
    def log_path(self) -> Path:
        assert self.base_dir is not None
        return self.log_file or self.base_dir / "redis.log"

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 30.0) -> RedisServer:
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="payments-redis-"))
            self._owns_dir = True
        self.base_dir.mkdir(parents=True, exist_ok=True)
        if not self.port:
            self.port = free_port()
        args = [
            str(find_redis_server()),
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.base_dir),
            "--databases",
            "64",
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            *self.extra_args,
        ]
        preexec: Callable[[], None] | None = None
        if not self.detached:
            args, preexec = dying_with_parent(args)
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                args,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=preexec,
                start_new_session=self.detached,
            )
        _wait_until(self._accepts, self.process, "Redis", self.log_path, timeout)
        return self

    def _accepts(self) -> bool:
        try:
            client = redis.Redis(port=self.port, socket_connect_timeout=1)
            try:
                return bool(client.ping())
            finally:
                client.close()
        except redis.RedisError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        _stop(self.process, signal.SIGTERM, timeout)
        self.process = None

    def kill(self) -> None:
        _stop(self.process, signal.SIGKILL, 10)
        self.process = None

    def restart_empty(self) -> None:
        """Stops Redis and starts it again on the same port with no data."""
        self.kill()
        self.start()

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def remove(self) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.process.pid, signal.SIGCONT)
        self.stop()
        if self._owns_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)


def _ephemeral_low() -> int:
    """The lowest port the kernel hands out for port 0 and for outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_cluster_port() -> int:
    """A free port whose cluster bus port (the port + 10000) is free too, both below the
    kernel's ephemeral range.

    So neither can be taken between this choice and the node's bind by a port that another
    process got from `free_port` (the ephemeral range) or by an outgoing connection's own
    port; another cluster choosing the same pair is what `RedisCluster.start` retries.
    """
    high = _ephemeral_low() - 10000
    low = max(1024, high - 12000)
    for _ in range(500):
        port = random.randrange(low, high)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise ServerError(f"found no free port pair (port, port + 10000) for a cluster node in {low}-{high}")


def _redis_cli() -> str:
    cli = shutil.which("redis-cli")
    if not cli:
        raise ServerError("redis-cli not found on PATH; install it: `apt-get install redis-tools`")
    return cli


@dataclass(frozen=True)
class ClusterNodeView:
    """One node as a line of `CLUSTER NODES` shows it."""

    node_id: str
    port: int
    master: bool
    myself: bool
    # Marked as failing (`fail` or `fail?`) by the node that lists it.
    failed: bool
    # The node id of the master that a replica follows; None for a master.
    master_id: str | None
    # The ranges of hash slots it serves, lowest first (inclusive bounds).
    slots: tuple[tuple[int, int], ...]


def parse_cluster_nodes(raw: object) -> list[ClusterNodeView]:
    """The nodes of a `CLUSTER NODES` reply (slots being moved, `[...]`, are left out)."""
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    views = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        flags = set(parts[2].split(","))
        slots = []
        for part in parts[8:]:
            if part.startswith("["):
                continue
            low, _, high = part.partition("-")
            slots.append((int(low), int(high or low)))
        views.append(
            ClusterNodeView(
                node_id=parts[0],
                port=int(parts[1].split("@")[0].rpartition(":")[2]),
                master="master" in flags,
                myself="myself" in flags,
                failed=bool(flags & {"fail", "fail?"}),
                master_id=None if parts[3] == "-" else parts[3],
                slots=tuple(sorted(slots)),
            )
        )
    return views


def _count(slots: tuple[tuple[int, int], ...]) -> int:
    return sum(high - low + 1 for low, high in slots)


def _text_info(raw: object) -> dict[str, str]:
    """The fields of an `INFO` reply, whether redis-py parsed it or not."""
    if isinstance(raw, dict):
        return {str(key): str(value) for key, value in raw.items()}
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


@dataclass
class RedisCluster:
    """A private Redis Cluster: `masters` masters with `replicas` replicas each, one process per node.

    Formed with `redis-cli --cluster create`, each node in a folder of its own under
    `base_dir`; `node_timeout_ms` is how long a master may be silent before its replica is
    promoted (Redis's default is 15 s; tests use less). Nothing is kept on disk but the
    nodes' cluster configuration.
    """

    base_dir: Path | None = None
    masters: int = 3
    replicas: int = 1
    node_timeout_ms: int = 2000
    detached: bool = False
    ports: list[int] = field(default_factory=list)
    # Every node's own arguments besides the cluster's: ACL users (`--user name rules...`), say.
    extra_args: list[str] = field(default_factory=list)
    # With ACL users: the one (name, password) that may do everything. The replicas log in
    # to their masters with it, and this class forms and administers the cluster as it.
    admin: tuple[str, str] | None = None
    nodes: list[RedisServer] = field(default_factory=list, init=False, repr=False)
    _owns_dir: bool = field(default=False, init=False, repr=False)
    _paused: set[int] = field(default_factory=set, init=False, repr=False)

    @property
    def url(self) -> str:
        """The cluster URL that every service takes: the masters as seeds (payments_common/redisconn.py)."""
        seeds = ",".join(f"127.0.0.1:{node.port}" for node in self.nodes[: self.masters])
        return f"redis+cluster://{seeds}"

    def start(self, timeout: float = 60.0) -> RedisCluster:
        if self.base_dir is None:
            self.base_dir = Path(tempfile.mkdtemp(prefix="payments-redis-cluster-"))
            self._owns_dir = True
        count = self.masters * (1 + self.replicas)
        chosen = not self.ports
        if chosen:
            self.ports = [free_cluster_port() for _ in range(count)]
        for index, port in enumerate(self.ports):
            for attempt in range(1, 6):
                node = self._node(port)
                try:
                    node.start(timeout)
                    break
                except ServerError as error:
                    # A port found free may be taken by another process before the node binds it.
                    if not chosen or "Address already in use" not in str(error) or attempt == 5:
                        raise
                    node.remove()
                    port = self.ports[index] = free_cluster_port()
            self.nodes.append(node)
        if not self._formed():
            self._create(timeout)
        self.wait_ok(timeout)
        return self

    def _node(self, port: int) -> RedisServer:
        assert self.base_dir is not None
        return RedisServer(
            base_dir=self.base_dir / str(port),
            port=port,
            detached=self.detached,
            extra_args=[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(self.node_timeout_ms),
                # Failovers and resyncs are logged at this level: the log tails of errors show them.
                "--loglevel",
                "notice",
                # A replica that starts, or starts again, gets its full sync at once (not after 5 s).
                "--repl-diskless-sync-delay",
                "0",
                *(["--masteruser", self.admin[0], "--masterauth", self.admin[1]] if self.admin else []),
                *self.extra_args,
            ],
        )

    def _cli_auth(self) -> list[str]:
        return ["--user", self.admin[0], "--pass", self.admin[1], "--no-auth-warning"] if self.admin else []

    def _client(self, port: int, **options: Any) -> redis.Redis:
        """A connection to one node, as the administrator when there are ACL users."""
        if self.admin is not None:
            options.update(username=self.admin[0], password=self.admin[1])
        return redis.Redis(port=port, socket_connect_timeout=1, socket_timeout=2, **options)

    def _create(self, timeout: float) -> None:
        cli = _redis_cli()
        addresses = [f"127.0.0.1:{node.port}" for node in self.nodes]
        result = subprocess.run(
            [
                cli,
                *self._cli_auth(),
                "--cluster",
                "create",
                *addresses,
                "--cluster-replicas",
                str(self.replicas),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            raise ServerError(f"redis-cli --cluster create failed:\n{result.stdout}\n{result.stderr}")

    def _formed(self) -> bool:
        """Whether the nodes already form a cluster (restarted from their nodes.conf)."""
        return self._info(self.nodes[0]).get("cluster_known_nodes") == str(len(self.nodes))

    def _info(self, node: RedisServer) -> dict[str, str]:
        try:
            client = self._client(node.port)
            try:
                raw = client.execute_command("CLUSTER", "INFO")  # type: ignore[no-untyped-call]
            finally:
                client.close()
        except redis.RedisError:
            return {}
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def wait_ok(self, timeout: float = 60.0) -> None:
        """Waits until every running node says `cluster_state:ok` and sees every slot served.

        A paused node cannot answer: it is left out until it is resumed.
        """

        def ok(node: RedisServer) -> bool:
            info = self._info(node)
            return info.get("cluster_state") == "ok" and info.get("cluster_slots_ok") == "16384"

        self._wait(
            lambda: all(ok(node) for node in self._answering()),
            timeout,
            "was not ok",
            lambda: [node for node in self._answering() if not ok(node)],
        )

    def node(self, port: int) -> RedisServer:
        return next(node for node in self.nodes if node.port == port)

    # -- the topology, as the nodes see it --------------------------------------------------

    def topology(self) -> list[ClusterNodeView]:
        """Every node as the first answering node lists it in `CLUSTER NODES`."""
        for node in self._answering():
            with contextlib.suppress(redis.RedisError):
                return parse_cluster_nodes(self._command(node.port, "CLUSTER", "NODES"))
        raise ServerError(f"no node of the Redis Cluster under {self.base_dir} answers")

    def master_ports(self) -> list[int]:
        """The ports of the masters that serve slots and are not failed, lowest slot first."""
        serving = [view for view in self.topology() if view.master and view.slots and not view.failed]
        return [view.port for view in sorted(serving, key=lambda view: view.slots[0][0])]

    def replica_of(self, master_port: int, timeout: float = 30.0) -> int:
        """The port of the replica that follows the master on `master_port` (and is not failed).

        Waits until the nodes say so: just after the cluster forms, or a node rejoins, the
        node asked may not have heard yet which node follows which.
        """
        found: list[int] = []

        def known() -> bool:
            views = self.topology()
            master = next(view for view in views if view.port == master_port)
            found[:] = [view.port for view in views if view.master_id == master.node_id and not view.failed]
            return bool(found)

        self._wait(
            known,
            timeout,
            f"showed no replica of the master on port {master_port}",
            lambda: [self.node(master_port)],
        )
        return found[0]

    def master_of_slot(self, slot: int) -> int:
        """The port of the master that serves hash slot `slot`."""
        for view in self.topology():
            if view.master and not view.failed and any(low <= slot <= high for low, high in view.slots):
                return view.port
        raise ServerError(f"no master of the Redis Cluster under {self.base_dir} serves slot {slot}")

    def node_id(self, port: int) -> str:
        raw = self._command(port, "CLUSTER", "MYID")
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    # -- faults -----------------------------------------------------------------------------

    def kill(self, port: int) -> None:
        """kill -9 of one node: it stops at once, and its data is gone (nothing is kept on disk)."""
        self._paused.discard(port)
        self.node(port).kill()

    def start_node(self, port: int, timeout: float = 60.0) -> None:
        """Starts a killed node again, from its nodes.conf, and waits until it has rejoined as a
        replica (of whichever node serves its slots now) and holds its master's data.

        Start a killed master only after its replica was promoted (`wait_promoted`): before
        that, it would come back as the master of its slots, empty.
        """
        node = self.node(port)
        node.start(timeout)
        self.wait_in_sync(port, timeout)

    def pause(self, port: int) -> None:
        """SIGSTOP: the node keeps its connections but answers nothing until `resume`."""
        self.node(port).pause()
        self._paused.add(port)

    def resume(self, port: int) -> None:
        self.node(port).resume()
        self._paused.discard(port)

    def reshard(self, from_port: int, to_port: int, slots: int, timeout: float = 120.0) -> None:
        """Moves `slots` hash slots, and their keys, from one master to another with
        `redis-cli --cluster reshard`, then waits until every running node agrees on the new layout."""
        source, target = self.node_id(from_port), self.node_id(to_port)
        expected = _count(next(view.slots for view in self.topology() if view.node_id == target)) + slots
        result = subprocess.run(
            [
                _redis_cli(),
                *self._cli_auth(),
                "--cluster",
                "reshard",
                f"127.0.0.1:{from_port}",
                "--cluster-from",
                source,
                "--cluster-to",
                target,
                "--cluster-slots",
                str(slots),
                "--cluster-yes",
            ],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0 or "[ERR]" in result.stdout:
            raise ServerError(
                f"redis-cli --cluster reshard failed:\n{result.stdout[-3000:]}\n{result.stderr}\n"
                f"{self._tail(from_port)}\n{self._tail(to_port)}"
            )

        def layouts() -> dict[int, dict[str, tuple[tuple[int, int], ...]]]:
            seen = {}
            for node in self._answering():
                try:
                    views = parse_cluster_nodes(self._command(node.port, "CLUSTER", "NODES"))
                except redis.RedisError:
                    views = []
                seen[node.port] = {view.node_id: view.slots for view in views if view.master}
            return seen

        def disagreeing() -> list[RedisServer]:
            seen = layouts()
            reference = seen.get(to_port, {})
            if _count(reference.get(target, ())) != expected:
                return [self.node(to_port)]
            return [self.node(port) for port, layout in seen.items() if layout != reference]

        self._wait(
            lambda: not disagreeing(), timeout, "did not agree on the slots after the reshard", disagreeing
        )
        self.wait_ok(timeout)

    def wait_promoted(self, port: int, timeout: float = 60.0) -> None:
        """Waits until the node on `port` is a master that serves slots, in its own view."""

        def promoted() -> bool:
            try:
                views = parse_cluster_nodes(self._command(port, "CLUSTER", "NODES"))
            except redis.RedisError:
                return False
            return any(view.myself and view.master and view.slots for view in views)

        self._wait(promoted, timeout, f"did not promote the node on port {port}", lambda: [self.node(port)])

    def wait_in_sync(self, port: int, timeout: float = 60.0) -> None:
        """Waits until the node on `port` is a replica whose link to its master is up (the full sync done)."""

        def in_sync() -> bool:
            try:
                info = _text_info(self._command(port, "INFO", "replication"))
            except redis.RedisError:
                return False
            return info.get("role") == "slave" and info.get("master_link_status") == "up"

        self._wait(in_sync, timeout, f"has no replica in sync on port {port}", lambda: [self.node(port)])

    # -- plumbing ---------------------------------------------------------------------------

    def _answering(self) -> list[RedisServer]:
        """The nodes that run and are not paused."""
        return [node for node in self.nodes if node.process is not None and node.port not in self._paused]

    def _command(self, port: int, *args: str) -> object:
        client = self._client(port)
        try:
            return client.execute_command(*args)  # type: ignore[no-untyped-call]
        finally:
            client.close()

    def _wait(
        self,
        check: Callable[[], bool],
        timeout: float,
        what: str,
        culprits: Callable[[], list[RedisServer]],
    ) -> None:
        """Polls `check` until it holds; ServerError with the log tails of `culprits()` at the deadline."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() >= deadline:
                tails = "\n".join(self._tail(node.port) for node in culprits())
                raise ServerError(
                    f"the Redis Cluster under {self.base_dir} {what} within {timeout:.0f}s\n{tails}"
                )
            time.sleep(0.05)

    def _tail(self, port: int) -> str:
        node = self.node(port)
        return f"-- node {port} ({'running' if node.process is not None else 'stopped'}):\n{_tail(node.log_path)}"

    def stop(self, timeout: float = 10.0) -> None:
        for node in self.nodes:
            node.stop(timeout)

    def remove(self) -> None:
        for node in self.nodes:
            node.remove()
        if self._owns_dir and self.base_dir is not None:
            shutil.rmtree(self.base_dir, ignore_errors=True)


def _stop(process: subprocess.Popen[bytes] | None, sig: int, timeout: float) -> None:
    if process is None or process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@contextlib.contextmanager
def running_postgres(**kwargs: object) -> Iterator[PostgresServer]:
    server = PostgresServer(**kwargs)  # type: ignore[arg-type]
    try:
        yield server.start()
    finally:
        server.remove()


@contextlib.contextmanager
def running_redis_cluster(**kwargs: object) -> Iterator[RedisCluster]:
    cluster = RedisCluster(**kwargs)  # type: ignore[arg-type]
    try:
        yield cluster.start()
    finally:
        cluster.remove()


@contextlib.contextmanager
def running_redis(**kwargs: object) -> Iterator[RedisServer]:
    server = RedisServer(**kwargs)  # type: ignore[arg-type]
    try:
        yield server.start()
    finally:
        server.remove()
