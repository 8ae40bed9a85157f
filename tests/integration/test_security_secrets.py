"""Credentials: Redis ACL users, secrets from the environment or mounted files, never in logs or errors.

The history service's Redis user may only read: that it works with such a user, and that
the user's writes are refused, shows that the query side has no route to write. The
approval service has no Redis setting and loads no Redis client at all.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import psycopg2
import pytest
import redis

from approval_svc.migrate import upgrade
from payments.approval.v1 import approval_service_pb2 as approval_pb
from payments.approval.v1 import approval_service_pb2_grpc as approval_grpc
from payments.history.v1 import history_service_pb2 as history_pb
from payments.history.v1 import history_service_pb2_grpc as history_grpc
from payments.type.v1 import money_pb2
from payments_common.grpcstatus import error_info
from payments_common.redisconn import sync_client
from stack.servers import PostgresServer, RedisCluster, RedisServer, free_port
from tests.support import ROOT
from tests.support.auth import aio_channel, sync_channel
from tests.support.faults import approval_process, history_process, secret_free
from tests.support.processes import ServiceProcess
from tests.support.replicator import ReplicatorProcess
from tests.support.source import SourceWriter
from tests.support.waiting import eventually

SLOT = "acl_read_model"
REPLICATOR_PASSWORD = "R3pl-" + uuid.uuid4().hex
HISTORY_PASSWORD = "H1st-" + uuid.uuid4().hex
DATABASE_PASSWORD = "Db-" + uuid.uuid4().hex
SECRETS = (REPLICATOR_PASSWORD, HISTORY_PASSWORD, DATABASE_PASSWORD)

# What the history service runs: reads (HGET, HGETALL, EXISTS, ZRANGE, XREVRANGE, XREAD),
# read-only scripts (EVALSHA_RO, EVAL_RO: Redis refuses writes inside them) and connection
# commands (AUTH, HELLO, SELECT, PING, CLIENT). Nothing that writes.
HISTORY_ACL = [
    "on",
    f">{HISTORY_PASSWORD}",
    "~rm:v1:*",
    "resetchannels",
    "-@all",
    "+@read",
    "+@connection",
    "+evalsha_ro",
    "+eval_ro",
]
REPLICATOR_ACL = ["on", f">{REPLICATOR_PASSWORD}", "~*", "&*", "+@all"]
# Without credentials a client may only ping (which the test servers' start-up check uses).
DEFAULT_ACL = ["on", "nopass", "-@all", "+ping"]


def acl_users(history_more: list[str] | None = None, **others: list[str]) -> list[str]:
    """redis-server's arguments for the users: `default`, `history` (with `history_more`
    rules), `replicator`, and `others` by name."""
    users = {
        "default": DEFAULT_ACL,
        "history": [*HISTORY_ACL, *(history_more or [])],
        **others,
        "replicator": REPLICATOR_ACL,
    }
    return [argument for name, rules in users.items() for argument in ("--user", name, *rules)]


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(base_dir=tmp_path / "redis", extra_args=acl_users())
    try:
        yield server.start()
    finally:
        server.remove()


def url(server: RedisServer, user: str, password: str) -> str:
    return f"redis://{user}:{password}@127.0.0.1:{server.port}/0"


async def read_back(
    read: history_grpc.HistoryServiceAsyncStub, payment_id: str, token: str, within_s: float
) -> None:
    """Waits until history answers GetPayment with the payment's token (UNAVAILABLE until the
    replicator's first checkpoint: a client retries it)."""
    request = history_pb.GetPaymentRequest(payment_id=payment_id, min_consistency_token=token)
    found: list[str] = []

    async def replicated() -> bool:
        try:
            found.append((await read.GetPayment(request, timeout=5)).payment.payment_id)
        except grpc.aio.AioRpcError as error:
            found.append(error.code().name)
        return found[-1] == payment_id

    await eventually(replicated, within_s, "the payment is read back")


def database_with_password(postgres: PostgresServer) -> tuple[str, str]:
    """A database and a URL that carries a role's password (the test cluster trusts local logins)."""
    name = f"s_{uuid.uuid4().hex[:12]}"
    postgres.create_database(name)
    connection = psycopg2.connect(postgres.dsn())
    connection.autocommit = True
    role = f"app_{uuid.uuid4().hex[:8]}"
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                f"CREATE ROLE {role} LOGIN SUPERUSER REPLICATION PASSWORD %s", (DATABASE_PASSWORD,)
            )
    finally:
        connection.close()
    return name, f"postgresql://{role}:{DATABASE_PASSWORD}@127.0.0.1:{postgres.port}/{name}"


async def test_services_run_on_least_privilege_redis_users_and_never_reveal_credentials(
    acl_redis: RedisServer, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    name, dsn = database_with_password(postgres_server)
    upgrade(dsn)
    # Mounted secrets: the replicator and history read their Redis URL from files.
    replicator_url_file = tmp_path / "replicator-redis-url"
    replicator_url_file.write_text(url(acl_redis, "replicator", REPLICATOR_PASSWORD) + "\n")
    history_url_file = tmp_path / "history-redis-url"
    history_url_file.write_text(url(acl_redis, "history", HISTORY_PASSWORD))

    approval = approval_process(dsn, free_port(), tmp_path / "approval.log", log_level="DEBUG")
    replicator = ReplicatorProcess(
        dsn,
        "redis://placeholder",
        tmp_path / "replicator.log",
        slot=SLOT,
        extra_env={"REPLICATOR_REDIS_URL_FILE": str(replicator_url_file), "REPLICATOR_LOG_LEVEL": "DEBUG"},
    )
    history = history_process("", free_port(), tmp_path / "history.log", SLOT, log_level="DEBUG")
    del history.env["HISTORY_REDIS_URL"]
    history.env["HISTORY_REDIS_URL_FILE"] = str(history_url_file)
    try:
        approval.start()
        replicator.start()
        history.start()
        approval.wait_serving(60)
        history.wait_serving(60)

        async with (
            aio_channel(approval.address) as approval_channel,
            aio_channel(history.address) as history_channel,
        ):
            approve: approval_grpc.ApprovalServiceAsyncStub = approval_grpc.ApprovalServiceStub(
                approval_channel
            )
            read: history_grpc.HistoryServiceAsyncStub = history_grpc.HistoryServiceStub(history_channel)
            accounts = []
            for n in range(2):
                created = await approve.CreateAccount(
                    approval_pb.CreateAccountRequest(
                        request_id=f"acl-{n}",
                        owner_name=f"Owner {n}",
                        currency_code="EUR",
                        opening_balance_minor=1000,
                        per_payment_limit_minor=1000,
                        daily_limit_minor=1000,
                    ),
                    timeout=10,
                )
                accounts.append(created.account.account_id)
            paid = await approve.SubmitPayment(
                approval_pb.SubmitPaymentRequest(
                    request_id="acl-pay",
                    payer_account_id=accounts[0],
                    payee_account_id=accounts[1],
                    amount=money_pb2.Money(currency_code="EUR", amount_minor=5),
                ),
                timeout=10,
            )
            # The whole path works with these users: a read with the payment's token finds it.
            await read_back(read, paid.payment.payment_id, paid.consistency_token, 30)

            # Redis goes away: the history service's errors carry no credential.
            acl_redis.kill()
            with pytest.raises(grpc.aio.AioRpcError) as down:
                await read.GetAccount(history_pb.GetAccountRequest(account_id=accounts[0]), timeout=10)
            assert down.value.code() == grpc.StatusCode.UNAVAILABLE
            info = error_info(down.value)
            assert info is not None
            assert info.reason == "READ_MODEL_UNAVAILABLE"
            exposed = [down.value.details() or "", str(down.value.trailing_metadata()), str(info)]
            assert secret_free(exposed, SECRETS) == []
            # Errors are logged too (the readiness probe's, the watcher's): checked below.
            await eventually(
                lambda: "readiness probe failed" in history.log_text(), 30, "history logs the outage"
            )
            acl_redis.start()

        # The history user may read but not write.
        history_client = redis.Redis.from_url(url(acl_redis, "history", HISTORY_PASSWORD))
        try:
            assert history_client.ping()
            for write in (
                lambda: history_client.hset("rm:v1:account:x", "view", b""),
                lambda: history_client.delete("rm:v1:checkpoint:{" + SLOT + "}"),
                lambda: history_client.xadd("rm:v1:changes", {"batch": b""}),
                lambda: history_client.flushdb(),
                lambda: history_client.eval("return 1", 0),
                lambda: history_client.config_set("appendonly", "no"),
            ):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    write()
            # A read-only script may not write either.
            with pytest.raises(redis.exceptions.ResponseError):
                history_client.eval_ro("return redis.call('del', KEYS[1])", 1, "rm:v1:changes")
        finally:
            history_client.close()
        # A client without credentials can do nothing but ping.
        anonymous = redis.Redis(port=acl_redis.port)
        try:
            with pytest.raises(redis.exceptions.NoPermissionError):
                anonymous.get("rm:v1:checkpoint:{" + SLOT + "}")
        finally:
            anonymous.close()
    finally:
        approval.stop(5)
        history.stop(5)
        replicator.stop()
        postgres_server.drop_database(name)

    # Every log line is JSON, and no secret appears in any of them, even at DEBUG.
    logs = {
        "approval": approval.log_text(),
        "history": history.log_text(),
        "replicator": replicator.log_path.read_text(errors="replace"),
    }
    assert secret_free(logs.values(), SECRETS) == []
    assert secret_free(logs.values(), [f"{DATABASE_PASSWORD[:8]}", f"{HISTORY_PASSWORD[:8]}"]) == []
    for service, text in logs.items():
        assert text, service
        for line in text.splitlines():
            if line.startswith("{"):
                json.loads(line)


def test_a_wrong_redis_password_is_not_serving_and_not_logged(acl_redis: RedisServer, tmp_path: Path) -> None:
    wrong = "Wr0ng-" + uuid.uuid4().hex
    history = history_process(url(acl_redis, "history", wrong), free_port(), tmp_path / "history.log", SLOT)
    history.start()
    try:
        with pytest.raises(AssertionError, match="not SERVING"):
            history.wait_serving(3)
        assert history.alive
    finally:
        history.stop(5)
    text = history.log_text()
    assert "readiness probe failed" in text
    assert secret_free([text], [wrong]) == []


@pytest.mark.parametrize(
    ("service", "modules", "setting_words", "clients"),
    [
        (
            "approval_svc",
            "approval_svc.__main__, approval_svc.server, approval_svc.servicer, approval_svc.migrate",
            ("redis",),
            ("redis", "hiredis"),
        ),
        (
            "history_svc",
            "history_svc.__main__, history_svc.server, history_svc.servicer",
            ("database", "postgres"),
            ("psycopg2", "psycopg", "asyncpg", "sqlalchemy"),
        ),
    ],
)
def test_a_service_has_no_route_to_the_other_sides_store(
    service: str, modules: str, setting_words: tuple[str, ...], clients: tuple[str, ...]
) -> None:
    """Approval never reaches Redis and history never reaches PostgreSQL: no setting, no client loaded."""
    settings = importlib.import_module(f"{service}.config").Settings
    names = [f.name.lower() for f in dataclasses.fields(settings)]
    assert not [n for n in names if any(word in n for word in setting_words)]
    # Loading the whole service (CLI, server, handlers, adapters) loads none of those clients.
    probe = f"import sys, {modules}; print(sorted(m for m in sys.modules if m.split('.')[0] in {clients!r}))"
    loaded = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        check=True,
        timeout=60,
    )
    assert loaded.stdout.strip() == "[]", loaded.stdout


def test_an_unreachable_database_reveals_no_credential(tmp_path: Path) -> None:
    """Nothing listens at the URL: calls are UNAVAILABLE, and neither they nor the logs carry the password."""
    password = "Pg-" + uuid.uuid4().hex
    dsn = f"postgresql://app:{password}@127.0.0.1:{free_port()}/payments"
    approval = approval_process(dsn, free_port(), tmp_path / "approval.log", log_level="DEBUG")
    approval.start()
    try:
        approval.wait_serving(30, service="liveness")
        with sync_channel(approval.address) as channel:
            stub = approval_grpc.ApprovalServiceStub(channel)
            with pytest.raises(grpc.RpcError) as down:
                stub.CreateAccount(
                    approval_pb.CreateAccountRequest(
                        request_id="down-1",
                        owner_name="Ada",
                        currency_code="EUR",
                        opening_balance_minor=1,
                        per_payment_limit_minor=1,
                        daily_limit_minor=1,
                    ),
                    timeout=30,
                )
        assert down.value.code() == grpc.StatusCode.UNAVAILABLE
        info = error_info(down.value)
        assert info is not None
        assert info.reason == "DATABASE_UNAVAILABLE"
        assert secret_free([down.value.details() or "", str(info)], [password]) == []
    finally:
        approval.stop(5)
    assert "readiness probe failed" in approval.log_text()
    assert secret_free([approval.log_text()], [password]) == []


# On a Redis Cluster a client also reads the topology (CLUSTER SLOTS, or CLUSTER SHARDS) and
# the command table (COMMAND): the history user needs these besides its read-only set.
CLUSTER_READS = ["+cluster|slots", "+cluster|shards", "+command"]


@pytest.mark.slow
async def test_on_a_redis_cluster_history_serves_as_its_read_only_user_with_the_cluster_reads(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    cluster = RedisCluster(
        base_dir=tmp_path / "cluster",
        detached=True,
        admin=("replicator", REPLICATOR_PASSWORD),
        # "plain": the read-only set alone, as on one node.
        extra_args=acl_users(CLUSTER_READS, plain=HISTORY_ACL),
    )
    name, dsn = database_with_password(postgres_server)
    upgrade(dsn)
    processes: list[ReplicatorProcess | ServiceProcess] = []
    try:
        cluster.start()
        seeds = ",".join(f"127.0.0.1:{port}" for port in cluster.master_ports())

        def cluster_url(user: str, password: str) -> str:
            return f"redis+cluster://{user}:{password}@{seeds}"

        replicator = ReplicatorProcess(
            dsn, cluster_url("replicator", REPLICATOR_PASSWORD), tmp_path / "replicator.log", slot=SLOT
        )
        history = history_process(
            cluster_url("history", HISTORY_PASSWORD), free_port(), tmp_path / "history.log", SLOT
        )
        plain = history_process(
            cluster_url("plain", HISTORY_PASSWORD), free_port(), tmp_path / "plain.log", SLOT
        )
        processes += [replicator, history, plain]
        for process in processes:
            process.start()
        history.wait_serving(60)
        with SourceWriter(dsn) as writer:
            payer, payee = writer.open_account("Payer"), writer.open_account("Payee")
            payment_id, token = writer.pay(payer, payee, 5)

        async with aio_channel(history.address) as channel:
            read: history_grpc.HistoryServiceAsyncStub = history_grpc.HistoryServiceStub(channel)
            await read_back(read, payment_id, token, 60)
            listed = await read.ListPayments(
                history_pb.ListPaymentsRequest(
                    account_id=payer,
                    direction=history_pb.PAYMENT_DIRECTION_ALL,
                    min_consistency_token=token,
                ),
                timeout=10,
            )
            assert [view.payment_id for view in listed.payments] == [payment_id]

        # Without the cluster reads the same read-only user cannot find the cluster's topology.
        with pytest.raises(AssertionError, match="not SERVING"):
            plain.wait_serving(3)
        assert "readiness probe failed" in plain.log_text()

        # The history user may read on every master, and write on none.
        history_client = sync_client(cluster_url("history", HISTORY_PASSWORD))
        try:
            assert history_client.exists(f"rm:v1:payment:{{{payment_id}}}") == 1
            for write in (
                lambda: history_client.hset(f"rm:v1:account:{{{payer}}}", "view", b""),
                lambda: history_client.hset(f"rm:v1:payment:{{{payment_id}}}", "view", b""),
                lambda: history_client.xadd("rm:v1:changes:{" + SLOT + "}", {"batch": b""}),
            ):
                with pytest.raises(redis.exceptions.NoPermissionError):
                    write()
        finally:
            history_client.close()
    finally:
        for process in processes:
            process.stop()
        cluster.remove()
        postgres_server.drop_database(name)
