"""Health, reflection, and Redis outages: UNAVAILABLE and NOT_SERVING while Redis is gone, then recovery."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from redis.asyncio import Redis

from history_svc.server import SERVICE_NAME
from payments.history.v1 import history_service_pb2 as pb
from payments.readmodel.v1 import read_model_pb2
from payments_common.grpcstatus import error_info
from payments_common.keys import CHECKPOINT_LSN_FIELD, DEFAULT_SLOT_NAME, STREAM_BATCH_FIELD, KeySchema
from payments_common.tokens import encode_consistency_token
from stack.servers import RedisCluster, RedisServer
from tests.support.auth import service_token
from tests.support.history import RunningHistory, running_history, settings_for
from tests.support.waiting import eventually

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SOMEONE = "0b0e1a7c-55d0-4a5e-9a59-3c1a0e6f2d11"


@pytest.fixture
def redis_server_of_its_own(tmp_path: Path) -> Iterator[RedisServer]:
    # Detached: started without a pre-exec hook, so a restart while gRPC threads run is a
    # plain fork+exec that runs no gRPC fork handlers in the child.
    server = RedisServer(base_dir=tmp_path / "redis", detached=True)
    try:
        yield server.start()
    finally:
        server.remove()


async def _status(history: RunningHistory, service: str) -> int:
    health = health_pb2_grpc.HealthStub(history.channel)
    reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
    return int(reply.status)


async def _statuses(history: RunningHistory) -> dict[str, int]:
    return {name: await _status(history, name) for name in ("", "readiness", "liveness", SERVICE_NAME)}


async def _reason(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        return error.code(), info.reason if info else ""
    return grpc.StatusCode.OK, ""


def _calls(history: RunningHistory) -> list[object]:
    stub = history.stub
    return [
        stub.GetPayment(pb.GetPaymentRequest(payment_id=SOMEONE), timeout=10),
        stub.GetAccount(pb.GetAccountRequest(account_id=SOMEONE), timeout=10),
        stub.ListPayments(
            pb.ListPaymentsRequest(account_id=SOMEONE, direction=pb.PAYMENT_DIRECTION_ALL), timeout=10
        ),
        stub.WatchPayments(pb.WatchPaymentsRequest(account_id=SOMEONE), timeout=10).read(),
    ]


async def test_health_and_reflection_are_served(redis_server_of_its_own: RedisServer) -> None:
    async with running_history(settings_for(redis_server_of_its_own.url())) as history:
        assert set((await _statuses(history)).values()) == {SERVING}
        reflection = reflection_pb2_grpc.ServerReflectionStub(history.channel)
        replies = reflection.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names: set[str] = set()
        async for reply in replies:
            names |= {service.name for service in reply.list_services_response.service}
            break
        assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


async def test_a_redis_outage_is_unavailable_and_not_serving_until_redis_returns(
    redis_server_of_its_own: RedisServer,
) -> None:
    redis_server = redis_server_of_its_own
    settings = settings_for(redis_server.url(), redis_timeout_seconds=1.0)
    async with running_history(settings) as history:
        assert [await _reason(call) for call in _calls(history)] == [
            (grpc.StatusCode.NOT_FOUND, "PAYMENT_NOT_FOUND"),
            (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"),
            (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"),
            (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"),
        ]

        redis_server.kill()
        assert [await _reason(call) for call in _calls(history)] == [
            (grpc.StatusCode.UNAVAILABLE, "READ_MODEL_UNAVAILABLE")
        ] * 4
        await eventually(lambda: _not_serving(history))
        assert await _status(history, "liveness") == SERVING
        assert await _status(history, SERVICE_NAME) == NOT_SERVING
        # A read that waits for a position cannot be answered either; it says why.
        token_call = history.stub.GetAccount(
            pb.GetAccountRequest(account_id=SOMEONE, min_consistency_token=encode_consistency_token(10**15)),
            timeout=1.5,
        )
        assert await _reason(token_call) == (grpc.StatusCode.UNAVAILABLE, "READ_MODEL_UNAVAILABLE")

        redis_server.start()  # the same port, empty
        await eventually(lambda: _serving(history))
        call = history.stub.GetAccount(pb.GetAccountRequest(account_id=SOMEONE), timeout=10)
        assert await _reason(call) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
        await eventually(lambda: history.server.watcher.connected)


async def test_a_hung_redis_times_out_as_unavailable_and_recovers(
    redis_server_of_its_own: RedisServer,
) -> None:
    redis_server = redis_server_of_its_own
    async with running_history(settings_for(redis_server.url(), redis_timeout_seconds=0.5)) as history:
        await eventually(lambda: _serving(history))
        redis_server.pause()
        try:
            call = history.stub.GetAccount(pb.GetAccountRequest(account_id=SOMEONE), timeout=10)
            assert await _reason(call) == (grpc.StatusCode.UNAVAILABLE, "READ_MODEL_UNAVAILABLE")
            await eventually(lambda: _not_serving(history))
        finally:
            redis_server.resume()
        await eventually(lambda: _serving(history))
        call = history.stub.GetAccount(pb.GetAccountRequest(account_id=SOMEONE), timeout=10)
        assert await _reason(call) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


NOT_FOUND_ALL = [
    (grpc.StatusCode.NOT_FOUND, "PAYMENT_NOT_FOUND"),
    (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"),
    (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"),
    (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND"),
]


@pytest.mark.slow
async def test_a_hung_redis_cluster_times_out_as_unavailable_and_recovers(tmp_path: Path) -> None:
    # Every node stopped (SIGSTOP) for a while shorter than the node timeout: the cluster sees
    # no failure of its own (no failover), only its clients do.
    cluster = RedisCluster(base_dir=tmp_path / "cluster", node_timeout_ms=60_000, detached=True)
    try:
        cluster.start()
        settings = settings_for(cluster.url, redis_timeout_seconds=0.5, consistency_wait_max_seconds=1.0)
        async with running_history(settings) as history:
            await eventually(lambda: _serving(history))
            assert [await _reason(call) for call in _calls(history)] == NOT_FOUND_ALL
            for port in cluster.ports:
                cluster.pause(port)
            try:
                assert [await _reason(call) for call in _calls(history)] == [
                    (grpc.StatusCode.UNAVAILABLE, "READ_MODEL_UNAVAILABLE")
                ] * 4
                await eventually(lambda: _not_serving(history))
                assert await _status(history, "liveness") == SERVING
            finally:
                for port in cluster.ports:
                    cluster.resume(port)
            await eventually(lambda: _serving(history))
            assert [await _reason(call) for call in _calls(history)] == NOT_FOUND_ALL
            await eventually(lambda: history.server.watcher.connected)
    finally:
        cluster.remove()


async def _serving(history: RunningHistory) -> bool:
    return bool(await _status(history, "readiness") == SERVING)


async def _not_serving(history: RunningHistory) -> bool:
    return bool(await _status(history, "readiness") == NOT_SERVING)


# Installed with the project (buf-bin), next to this interpreter.
BUF = Path(sys.executable).parent / "buf"


async def test_buf_curl_calls_the_service_over_reflection(redis_server_of_its_own: RedisServer) -> None:
    async with running_history(settings_for(redis_server_of_its_own.url())) as history:
        command = [str(BUF), "curl", "--protocol", "grpc", "--http2-prior-knowledge", "--data"]
        health = await asyncio.to_thread(
            subprocess.run,
            [*command, '{"service": "readiness"}', f"http://{history.address}/grpc.health.v1.Health/Check"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        # Health needs no credentials (Kubernetes probes have none); the service does.
        assert health.returncode == 0, health.stderr
        assert json.loads(health.stdout) == {"status": "SERVING"}
        missing = await asyncio.to_thread(
            subprocess.run,
            [
                *command,
                json.dumps({"account_id": SOMEONE}),
                "--header",
                f"authorization: Bearer {service_token()}",
                f"http://{history.address}/payments.history.v1.HistoryService/GetAccount",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert missing.returncode != 0
        assert json.loads(missing.stderr)["code"] == "not_found"


async def test_the_watcher_survives_bad_stream_entries_and_catches_up_without_them(
    redis_server_of_its_own: RedisServer,
) -> None:
    # The stream contract by hand: entries the replicator never writes must not stop the watcher.
    keys = KeySchema()
    client = Redis.from_url(redis_server_of_its_own.url())
    try:
        async with running_history(settings_for(redis_server_of_its_own.url())) as history:
            watcher = history.server.watcher
            await eventually(lambda: watcher.connected)
            await client.xadd(keys.changes(), {STREAM_BATCH_FIELD: b"\xff not a batch"})
            await client.xadd(keys.changes(), {"other": b"x"})
            await client.xadd(
                keys.changes(),
                {STREAM_BATCH_FIELD: read_model_pb2.ChangeBatch(checkpoint_lsn=42).SerializeToString()},
            )
            assert await watcher.wait_for(42, 30)
            # A checkpoint that moved without a stream entry (trimmed or missed) is found while idle.
            await client.hset(keys.checkpoint(DEFAULT_SLOT_NAME), CHECKPOINT_LSN_FIELD, "77")
            assert await watcher.wait_for(77, 30)
            # The token's position is reached: the read is answered (the account just does not exist).
            call = history.stub.GetAccount(
                pb.GetAccountRequest(account_id=SOMEONE, min_consistency_token=encode_consistency_token(77)),
                timeout=10,
            )
            assert await _reason(call) == (grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    finally:
        await client.aclose()
