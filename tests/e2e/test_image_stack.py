"""The stack run from the service image, every container as deploy/k8s/base runs it, with docker or podman.

What `make image` built is started as Kubernetes would start it (tests/support/containers.py
reads each workload of the rendered base: command, settings, mounted Secrets and ConfigMaps,
ports, probes, security contexts, limits, preStop and grace): the migration Job, approval,
the replicator and two history processes, on a private PostgreSQL with the dev overlay's
roles and a private Redis. Then the scenario through the containers; the replicator killed
with SIGKILL under load and started anew; and SIGTERM to each container under calls, as the
kubelet sends it after the preStop sleep: each exits 0 within its grace, no call in flight
is lost, and the read models equal PostgreSQL (`replicator reconcile`).

Not shown here: a real cluster (scheduling, Services and DNS, NetworkPolicies, the probes
as the kubelet runs them, the preStop sleep itself, volume updates).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import subprocess
import time
import tomllib
import urllib.request
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import psycopg2
import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from payments.approval.v1 import approval_service_pb2 as approval_pb
from payments.approval.v1 import approval_service_pb2_grpc as approval_grpc
from payments.history.v1 import history_service_pb2 as history_pb
from payments.history.v1 import history_service_pb2_grpc as history_grpc
from payments.type.v1 import money_pb2
from payments.type.v1 import payment_pb2 as types
from replicator.config import Settings as ReplicatorSettings
from replicator.reconcile import reconcile
from stack.auth import REVIEWER
from stack.clients import Payments, approval_channel, history_channel, history_target
from stack.servers import PostgresServer, RedisServer, find_postgres_bin
from stack.tokens import SUBJECTS, LocalCredentials
from tests.support import ROOT, k8s
from tests.support.auth import aio_channel, authority
from tests.support.containers import Container, Engine, Pods, PodSpec, engine
from tests.support.faults import FAST_RECONNECT, PaymentLoad
from tests.support.replicator import wait_caught_up
from tests.support.waiting import eventually

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# The workloads of deploy/k8s/base that run the image, by kind and name.
WORKLOADS = {
    "migrate": ("Job", "migrate"),
    "approval": ("Deployment", "approval"),
    "replicator": ("Deployment", "replicator"),
    "history": ("Deployment", "history"),
}
DATABASE = "payments"
ROLES_SCRIPT = ROOT / "deploy" / "k8s" / "overlays" / "dev" / "postgres" / "10-roles.sh"
OPENING_BALANCE = 10**9


@pytest.fixture(scope="module")
def image_engine() -> Engine:
    return engine()


@pytest.fixture(scope="module")
def specs(image_engine: Engine) -> dict[str, PodSpec]:
    try:
        objects = k8s.objects(k8s.BASE)
    except k8s.ToolMissing as missing:
        raise AssertionError(str(missing)) from None
    return {
        name: PodSpec.read(objects, kind, workload, image_engine.tool)
        for name, (kind, workload) in WORKLOADS.items()
    }


# ----- the image ------------------------------------------------------------------------------------

# What the image must not hold: the project's dev tooling and the packaging tools.
NOT_IN_THE_IMAGE = (
    "stack",
    "bench",
    "tests",
    "tools",
    "pip",
    "setuptools",
    "wheel",
    "pytest",
    "mypy",
    "ruff",
    "grpc_tools",
)

INVENTORY = """
import importlib.metadata, importlib.util, json, platform, sys
print(json.dumps({
    "python": platform.python_version(),
    "distributions": sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions()),
    "importable": [m for m in sys.argv[1:] if importlib.util.find_spec(m) is not None],
}))
"""


def test_the_image_holds_the_locked_dependencies_the_services_and_nothing_else(image_engine: Engine) -> None:
    """Installed: the lock's releases for the image's Python, and the project; no dev or packaging tool."""
    config = json.loads(image_engine.inspect(image_engine.image, "{{json .Config}}", image=True))
    assert config["User"] == "10001:10001"
    # No entrypoint: a manifest's `command` is then the whole command line, as the test runs it.
    assert not config.get("Entrypoint")
    result = image_engine.run(
        "run", "--rm", "--network", "none", "--read-only", "--user", "10001:10001", "--cap-drop", "ALL",
        "--entrypoint", "python", image_engine.image, "-c", INVENTORY, *NOT_IN_THE_IMAGE,
    )  # fmt: skip
    inventory = json.loads(result.stdout)
    assert inventory["importable"] == []
    python = inventory["python"]
    environment = {"python_full_version": python, "python_version": ".".join(python.split(".")[:2])}
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = {f"{project['name']}=={project['version']}"}
    for line in (ROOT / "deploy" / "docker" / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                expected.add(
                    f"{canonicalize_name(requirement.name)}=={next(iter(requirement.specifier)).version}"
                )
    installed = set()
    for entry in inventory["distributions"]:
        name, _, version = entry.partition("==")
        installed.add(f"{canonicalize_name(name)}=={version}")
    assert installed == expected


# ----- PostgreSQL and Redis, as the dev overlay sets them up ------------------------------------------


def create_roles(postgres: PostgresServer) -> dict[str, str]:
    """The dev overlay's roles and grants (its init script's SQL, run by psql); each role's DSN."""
    script = ROLES_SCRIPT.read_text()
    sql = script.split("<<'SQL'\n", 1)[1].rsplit("\nSQL", 1)[0]
    passwords = {role: secrets.token_hex(12) for role in ("payments_owner", "approval", "replicator")}
    variables = {"owner_pw": "payments_owner", "approval_pw": "approval", "replicator_pw": "replicator"}
    assert set(re.findall(r":'(\w+)'", sql)) == set(variables)
    arguments = [str(find_postgres_bin("psql")), "-v", "ON_ERROR_STOP=1", "-q", postgres.dsn(DATABASE)]
    for variable, role in variables.items():
        arguments += ["-v", f"{variable}={passwords[role]}"]
    done = subprocess.run(arguments, input=sql, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return {
        role: f"postgresql://{role}:{password}@127.0.0.1:{postgres.port}/{DATABASE}"
        for role, password in passwords.items()
    }


@dataclass
class Stack:
    """The private servers, the running containers and the means to start more."""

    pods: Pods
    specs: dict[str, PodSpec]
    postgres: PostgresServer
    redis_url: str
    approval: Container
    replicator: Container
    histories: list[Container]
    replicator_starts: int = 1

    @property
    def dsn(self) -> str:
        return self.postgres.dsn(DATABASE)

    @property
    def slot(self) -> str:
        return self.specs["replicator"].env["REPLICATOR_SLOT_NAME"]

    def new_replicator(self) -> Container:
        """A replicator in a new container, as the Recreate strategy starts one once the old is gone."""
        self.replicator_starts += 1
        self.replicator = self.pods.start(self.specs["replicator"], f"replicator-{self.replicator_starts}")
        self.replicator.wait_ready()
        return self.replicator


@contextlib.contextmanager
def running_stack(work: Path, specs: dict[str, PodSpec], image_engine: Engine) -> Iterator[Stack]:
    """Private servers, the migration Job (twice: a Job's pod may run again), then every service, ready."""
    postgres = PostgresServer()
    redis_server = RedisServer(base_dir=work / "redis")
    pods: Pods | None = None
    try:
        postgres.start()
        redis_server.start()
        postgres.create_database(DATABASE)
        dsns = create_roles(postgres)
        redis_url = redis_server.url(0)
        pods = Pods(
            image_engine,
            work,
            {
                "migrate-secrets": {"database-url": dsns["payments_owner"]},
                "approval-secrets": {"database-url": dsns["approval"]},
                "replicator-secrets": {"database-url": dsns["replicator"], "redis-url": redis_url},
                "history-secrets": {"redis-url": redis_url, "page-token-secret": secrets.token_hex(32)},
                "auth-jwks": {"jwks.json": authority().jwks_path.read_text()},
            },
        )
        for attempt in (1, 2):
            job = pods.run_to_completion(specs["migrate"], f"migrate-{attempt}")
            assert job.exit_code() == 0, f"migrate, run {attempt}:\n{job.log_tail()}"
        approval = pods.start(specs["approval"], "approval")
        replicator = pods.start(specs["replicator"], "replicator-1")
        histories = [pods.start(specs["history"], f"history-{n}") for n in (1, 2)]
        for container in (approval, replicator, *histories):
            container.wait_ready()
        yield Stack(pods, specs, postgres, redis_url, approval, replicator, histories)
    except BaseException:
        if pods is not None:
            print(pods.logs())  # pytest shows it with the failure
        raise
    finally:
        if pods is not None:
            pods.close()
        redis_server.remove()
        postgres.remove()


# ----- what the containers run as -------------------------------------------------------------------

CREDENTIALS_PROBE = """
import json, os, sys
status = dict(line.split(":\\t", 1) for line in open("/proc/1/status").read().splitlines() if ":\\t" in line)
def writable(folder):
    probe = os.path.join(folder, ".write-probe")
    try:
        open(probe, "w").close()
    except OSError:
        return False
    os.remove(probe)
    return True
print(json.dumps({
    "uid": sorted(set(status["Uid"].split())), "gid": sorted(set(status["Gid"].split())),
    "groups": status["Groups"].split(), "cap_eff": status["CapEff"], "cap_bnd": status["CapBnd"],
    "no_new_privs": status["NoNewPrivs"], "seccomp": status["Seccomp"],
    "writable": sorted(folder for folder in sys.argv[1:] if writable(folder)),
}))
"""


def assert_runs_as_the_manifest_says(container: Container) -> None:
    """The service process (pid 1) has the pod's user and groups, no capability, no new privileges, the default
    seccomp filter; only its emptyDir volumes are writable."""
    spec = container.spec
    mounts = [volume.path for volume in spec.volumes]
    probe = container.exec("python", "-c", CREDENTIALS_PROBE, "/", "/opt/venv", "/etc", *mounts)
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    assert seen["uid"] == [str(spec.user)]
    assert seen["gid"] == [str(spec.group)]
    assert str(spec.fs_group) in seen["groups"]
    assert int(seen["cap_eff"], 16) == 0
    assert int(seen["cap_bnd"], 16) == 0
    assert seen["no_new_privs"] == "1"
    assert seen["seccomp"] == "2"  # a filter: the engine's default profile, as RuntimeDefault
    assert seen["writable"] == sorted(v.path for v in spec.volumes if v.kind == "emptyDir")


def assert_serves_metrics(container: Container) -> None:
    with urllib.request.urlopen(f"http://{container.address('metrics')}/metrics", timeout=10) as response:
        assert response.status == 200
        assert b"# TYPE " in response.read()


# ----- calls recorded through a stop ----------------------------------------------------------------


@dataclass(frozen=True)
class Call:
    started: float
    ended: float
    code: grpc.StatusCode
    key: str
    value: Any = None


@dataclass
class Calls:
    """Workers that call back to back until stopped, each call recorded with its start, end and outcome; no retry."""

    call: Callable[[str], Awaitable[Any]]
    workers: int = 3
    records: list[Call] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def _worker(self) -> None:
        while not self.stopping.is_set():
            key = str(uuid.uuid4())
            started = time.monotonic()
            try:
                value = await self.call(key)
            except grpc.aio.AioRpcError as error:
                self.records.append(Call(started, time.monotonic(), error.code(), key))
                await asyncio.sleep(0.05)  # a client's backoff after a failure, not synchronisation
            else:
                self.records.append(Call(started, time.monotonic(), grpc.StatusCode.OK, key, value))

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Calls]:
        tasks = [asyncio.create_task(self._worker()) for _ in range(self.workers)]
        try:
            yield self
        finally:
            self.stopping.set()
            await asyncio.gather(*tasks)

    @property
    def answered(self) -> list[Call]:
        return [c for c in self.records if c.code == grpc.StatusCode.OK]

    async def wait_answered(self, count: int, within_s: float = 60) -> None:
        await eventually(lambda: len(self.answered) >= count, within_s, f"{count} calls answered")

    def refused_after(self, sigterm: float) -> list[Call]:
        """The calls that failed: every call begun before SIGTERM was answered (some were in flight then), and a
        call begun later was answered or refused, with UNAVAILABLE or, for one that reached the server in the
        instant it stopped, before any handler ran, gRPC's CANCELLED."""
        before = [c for c in self.records if c.started < sigterm]
        assert [c.code.name for c in before if c.code != grpc.StatusCode.OK] == []
        assert any(c.ended > sigterm for c in before), "no call was in flight at SIGTERM"
        failed = [c for c in self.records if c.code != grpc.StatusCode.OK]
        assert {c.code for c in failed} <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, [
            (c.code.name, round(c.started - sigterm, 3), round(c.ended - sigterm, 3)) for c in failed
        ]
        return failed


def logged(container: Container) -> list[dict[str, Any]]:
    """The JSON lines of a container's log."""
    records = []
    for line in container.logs().splitlines():
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def calls_cut(container: Container, method: str) -> list[dict[str, Any]]:
    """The calls of `method` that the server began and that ended without their answer, from its log."""
    return [r for r in logged(container) if r.get("method", "").endswith(f"/{method}") and "grpc_code" in r]


def payments(
    stub: approval_grpc.ApprovalServiceAsyncStub, accounts: list[str]
) -> Callable[[str], Awaitable[Any]]:
    """SubmitPayment of a small amount between two of `accounts`, with `key` as its request_id."""
    amounts = iter(range(1, 10**9))

    async def submit(request_id: str) -> tuple[str, str]:
        amount = next(amounts)
        payer, payee = accounts[amount % len(accounts)], accounts[(amount + 1) % len(accounts)]
        reply = await stub.SubmitPayment(
            approval_pb.SubmitPaymentRequest(
                request_id=request_id,
                payer_account_id=payer,
                payee_account_id=payee,
                amount=money_pb2.Money(currency_code="EUR", amount_minor=amount % 500 + 1),
                reference="image stack",
            ),
            timeout=10,
        )
        return reply.payment.payment_id, reply.consistency_token

    return submit


def reads(stub: history_grpc.HistoryServiceAsyncStub, accounts: list[str]) -> Callable[[str], Awaitable[Any]]:
    """GetAccount of one of `accounts` after another."""
    turn = iter(range(10**9))

    async def read(_: str) -> None:
        account = accounts[next(turn) % len(accounts)]
        await stub.GetAccount(history_pb.GetAccountRequest(account_id=account), timeout=10)

    return read


async def terminate(container: Container) -> float:
    """SIGTERM, as the kubelet sends it; returns the moment just before. The container must exit 0 in its grace."""
    sigterm = time.monotonic()
    code = await asyncio.to_thread(container.terminate)
    assert code == 0, (
        f"{container.name} exited {code} (137: killed once its {container.spec.term_budget_s:.0f} s "
        f"after SIGTERM ran out):\n{container.log_tail()}"
    )
    return sigterm


@contextlib.asynccontextmanager
async def watching(address: str, account: str) -> AsyncIterator[asyncio.Task[grpc.StatusCode]]:
    """A WatchPayments stream open on one history process; the task ends with the stream's status."""
    async with aio_channel(address) as channel:
        stub: history_grpc.HistoryServiceAsyncStub = history_grpc.HistoryServiceStub(channel)
        stream = stub.WatchPayments(history_pb.WatchPaymentsRequest(account_id=account))
        await stream.initial_metadata()

        async def drained() -> grpc.StatusCode:
            async for _ in stream:
                pass
            return await stream.code()

        task = asyncio.create_task(drained())
        try:
            yield task
        finally:
            stream.cancel()
            with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError):
                await task


def committed_requests(dsn: str) -> set[str]:
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT request_id FROM payments")
            return {row[0] for row in cursor.fetchall()}
    finally:
        connection.close()


def assert_reconciled(s: Stack) -> None:
    report = reconcile(ReplicatorSettings(database_url=s.dsn, redis_url=s.redis_url, slot_name=s.slot), 60)
    assert report.clean, "\n".join(report.lines())
    assert report.in_flight == 0
    assert report.checked > 0


# ----- the test -------------------------------------------------------------------------------------


async def open_accounts(client: Payments, count: int) -> list[str]:
    return [
        (await client.open(f"Owner {n}", OPENING_BALANCE, 10**8, 10**12)).account_id for n in range(count)
    ]


async def the_scenario(client: Payments) -> None:
    """Payments approved, declined and reviewed, read back with consistency tokens, and a watch stream."""
    alice = (await client.open("Alice", 5_000_000, 2_000_000, 10_000_000)).account_id
    bob = (await client.open("Bob", 10_000, 200_000, 1_000_000)).account_id
    carol = (await client.open("Carol", 0, 200_000, 1_000_000)).account_id

    approved = await client.pay(alice, bob, 12_500, reference="dinner")
    assert approved.status == types.PAYMENT_STATUS_APPROVED
    declined = await client.pay(bob, alice, 40_000, reference="rent share")
    assert (declined.status, declined.decline_reason) == (
        types.PAYMENT_STATUS_DECLINED,
        types.DECLINE_REASON_INSUFFICIENT_FUNDS,
    )
    # Above the approval service's default review threshold (the manifests keep the default).
    held = await client.pay(alice, carol, 1_500_000, reference="deposit")
    assert held.status == types.PAYMENT_STATUS_PENDING_REVIEW
    reviewed = await client.approve(held.payment_id)
    assert reviewed.status == types.PAYMENT_STATUS_APPROVED

    token = client.last_token
    listed = await client.history.ListPayments(
        history_pb.ListPaymentsRequest(
            account_id=alice,
            direction=history_pb.PAYMENT_DIRECTION_ALL,
            page_size=10,
            min_consistency_token=token,
        ),
        metadata=client.as_customer(alice),
    )
    assert {(p.payment_id, p.status) for p in listed.payments} == {
        (approved.payment_id, types.PAYMENT_STATUS_APPROVED),
        (declined.payment_id, types.PAYMENT_STATUS_DECLINED),
        (held.payment_id, types.PAYMENT_STATUS_APPROVED),
    }
    timeline = (
        await client.history.GetPayment(
            history_pb.GetPaymentRequest(payment_id=held.payment_id, min_consistency_token=token),
            metadata=client.as_customer(carol),
        )
    ).payment.timeline
    assert [(e.status, e.actor) for e in timeline][1:] == [
        (types.PAYMENT_STATUS_APPROVED, SUBJECTS[REVIEWER])
    ]
    account = (
        await client.history.GetAccount(
            history_pb.GetAccountRequest(account_id=alice, min_consistency_token=token),
            metadata=client.as_customer(alice),
        )
    ).account
    assert account.ledger_balance.amount_minor == 5_000_000 - 12_500 - 1_500_000

    stream = client.history.WatchPayments(
        history_pb.WatchPaymentsRequest(account_id=bob), metadata=client.as_customer(bob)
    )
    await stream.initial_metadata()  # subscribed: every later change follows
    live = await client.pay(alice, bob, 700, reference="watched")
    async with asyncio.timeout(30):
        async for change in stream:
            if change.payment.payment_id == live.payment_id:
                assert change.payment.status == types.PAYMENT_STATUS_APPROVED
                break
    stream.cancel()


async def test_the_stack_runs_from_the_image_as_the_manifests_say(
    tmp_path: Path, specs: dict[str, PodSpec], image_engine: Engine
) -> None:
    with running_stack(tmp_path, specs, image_engine) as s:
        for container in (s.approval, s.replicator, *s.histories):
            assert_runs_as_the_manifest_says(container)
            assert_serves_metrics(container)
        histories = [h.address() for h in s.histories]

        async with (
            approval_channel(s.approval.address()) as a,
            history_channel(history_target(histories)) as h,
        ):
            client = Payments(
                approval_grpc.ApprovalServiceStub(a),
                history_grpc.HistoryServiceStub(h),
                LocalCredentials(authority()),
            )
            await the_scenario(client)
            accounts = await open_accounts(client, 8)

        # The replicator killed under load; a new container resumes, losing nothing.
        load = PaymentLoad(s.approval.address(), accounts)
        task = asyncio.create_task(load.run())
        try:
            await load.wait_acks(60)
            await asyncio.to_thread(s.replicator.kill)
            await asyncio.to_thread(s.new_replicator)
            await load.wait_acks(len(load.acks) + 60)
        finally:
            load.stopping.set()
            await task
        assert load.unexpected == []
        assert load.unresolved == []
        await asyncio.to_thread(wait_caught_up, s.dsn, s.redis_url, s.slot, 120)
        await asyncio.to_thread(assert_reconciled, s)
        acknowledged = {ack.request_id: (ack.payment_id, ack.token) for ack in load.acks}

        async with aio_channel(s.approval.address(), options=FAST_RECONNECT) as approval_ch:
            writes = Calls(payments(approval_grpc.ApprovalServiceStub(approval_ch), accounts))
            async with writes.running():
                # SIGTERM to the replicator under writes: it exits 0; a new container resumes.
                await writes.wait_answered(30)
                await terminate(s.replicator)
                await asyncio.to_thread(s.new_replicator)
                await writes.wait_answered(len(writes.answered) + 30)
                assert [c.code.name for c in writes.records if c.code != grpc.StatusCode.OK] == []

                # SIGTERM to one history process under reads and a watch: calls in flight are answered.
                first = s.histories[0]
                async with aio_channel(first.address(), options=FAST_RECONNECT) as history_ch:
                    readers = Calls(reads(history_grpc.HistoryServiceStub(history_ch), accounts))
                    async with watching(first.address(), accounts[0]) as watch, readers.running():
                        await readers.wait_answered(30)
                        sigterm = await terminate(first)
                        assert await asyncio.wait_for(watch, 30) == grpc.StatusCode.OK
                    readers.refused_after(sigterm)
                    assert calls_cut(first, "GetAccount") == []

                # SIGTERM to approval under writes: every call begun before is answered and committed,
                # and no refused call was committed.
                answered = len(writes.answered)
                await writes.wait_answered(answered + 30)
                sigterm = await terminate(s.approval)
            refused = writes.refused_after(sigterm)
            assert calls_cut(s.approval, "SubmitPayment") == []
        committed = committed_requests(s.dsn)
        assert {c.key for c in refused} & committed == set()
        acknowledged |= {c.key: c.value for c in writes.answered}
        assert set(acknowledged) <= committed

        # Every acknowledged payment reaches the read models, and reads with its token find it.
        await asyncio.to_thread(wait_caught_up, s.dsn, s.redis_url, s.slot, 120)
        check = s.replicator.exec("replicator", "reconcile", "--wait-seconds", "60")
        assert check.returncode == 0, check.stdout + check.stderr
        assert re.search(r"^0 differences; [1-9]\d* items checked", check.stdout, re.MULTILINE), check.stdout
        second = s.histories[1]
        async with aio_channel(second.address()) as channel:
            stub: history_grpc.HistoryServiceAsyncStub = history_grpc.HistoryServiceStub(channel)
            items = list(acknowledged.values())
            for start in range(0, len(items), 50):
                replies = await asyncio.gather(
                    *(
                        stub.GetPayment(
                            history_pb.GetPaymentRequest(payment_id=payment_id, min_consistency_token=token),
                            timeout=10,
                        )
                        for payment_id, token in items[start : start + 50]
                    )
                )
                assert [r.payment.payment_id for r in replies] == [p for p, _ in items[start : start + 50]]

            # The last replicator and history process, SIGTERM too.
            await terminate(s.replicator)
            readers = Calls(reads(stub, accounts))
            async with watching(second.address(), accounts[1]) as watch, readers.running():
                await readers.wait_answered(30)
                sigterm = await terminate(second)
                assert await asyncio.wait_for(watch, 30) == grpc.StatusCode.OK
            readers.refused_after(sigterm)
            assert calls_cut(second, "GetAccount") == []

        for container in s.pods.started:
            assert [r for r in logged(container) if r.get("level") in ("error", "critical")] == [], (
                container.name
            )
