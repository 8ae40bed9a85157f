"""The replicator's health service without a network: probes, watches, deadlines and shutdown, via grpc_testing.

grpc_testing drives synchronous servicers only: it calls a method in a thread and takes
its return value as the response, so a grpc.aio servicer's coroutine would come back
unawaited with status OK, and its ServicerContext does not implement `abort_with_status`. The
approval and history servicers are grpc.aio and send rich errors with
`abort_with_status`; they are tested on real servers (tests/integration). The
replicator's health server is a plain synchronous grpc.server, which grpc_testing serves.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc
import grpc_testing  # type: ignore[import-untyped]
import pytest
from grpc_health.v1 import health_pb2

from payments_common.grpcserver import LIVENESS, READINESS
from replicator.health import NOT_SERVING, SERVING, HealthServer

HEALTH = health_pb2.DESCRIPTOR.services_by_name["Health"]
CHECK = HEALTH.methods_by_name["Check"]
WATCH = HEALTH.methods_by_name["Watch"]
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


@pytest.fixture
def health() -> Iterator[HealthServer]:
    # Binds a port of 127.0.0.1 but is never started: the calls go through grpc_testing.
    server = HealthServer(port=0, host="127.0.0.1")
    try:
        yield server
    finally:
        server.server.stop(None)


def serve(health: HealthServer, time: Any = None) -> Any:
    return grpc_testing.server_from_dictionary(
        {HEALTH: health.servicer}, time if time is not None else grpc_testing.strict_real_time()
    )


def check(health: HealthServer, service: str) -> tuple[int, grpc.StatusCode]:
    rpc = serve(health).invoke_unary_unary(CHECK, (), health_pb2.HealthCheckRequest(service=service), 1.0)
    response, _, code, _ = rpc.termination()
    return response.status, code


def test_a_new_replicator_is_live_but_not_ready(health: HealthServer) -> None:
    assert check(health, LIVENESS) == (SERVING, grpc.StatusCode.OK)
    assert check(health, READINESS) == (NOT_SERVING, grpc.StatusCode.OK)
    assert check(health, "") == (NOT_SERVING, grpc.StatusCode.OK)


def test_readiness_and_the_overall_status_follow_the_stream_and_liveness_does_not(
    health: HealthServer,
) -> None:
    health.set_ready(True)
    assert check(health, READINESS) == (SERVING, grpc.StatusCode.OK)
    assert check(health, "") == (SERVING, grpc.StatusCode.OK)
    health.set_ready(False)
    assert check(health, READINESS) == (NOT_SERVING, grpc.StatusCode.OK)
    assert check(health, "") == (NOT_SERVING, grpc.StatusCode.OK)
    assert check(health, LIVENESS) == (SERVING, grpc.StatusCode.OK)


def test_an_unknown_service_is_not_found(health: HealthServer) -> None:
    _, code = check(health, "payments.approval.v1.ApprovalService")
    assert code is grpc.StatusCode.NOT_FOUND


def test_a_watch_sees_each_change_of_readiness(health: HealthServer) -> None:
    rpc = serve(health).invoke_unary_stream(WATCH, (), health_pb2.HealthCheckRequest(service=READINESS), None)
    assert rpc.take_response().status == NOT_SERVING
    health.set_ready(True)
    assert rpc.take_response().status == SERVING
    health.set_ready(False)
    assert rpc.take_response().status == NOT_SERVING
    rpc.cancel()


def test_a_watch_of_an_unknown_service_says_so_and_waits(health: HealthServer) -> None:
    rpc = serve(health).invoke_unary_stream(WATCH, (), health_pb2.HealthCheckRequest(service="later"), None)
    assert rpc.take_response().status == SERVICE_UNKNOWN
    health.servicer.set("later", SERVING)
    assert rpc.take_response().status == SERVING
    rpc.cancel()


def test_a_watch_ends_at_its_deadline(health: HealthServer) -> None:
    time = grpc_testing.strict_fake_time(1_000.0)
    rpc = serve(health, time).invoke_unary_stream(
        WATCH, (), health_pb2.HealthCheckRequest(service=READINESS), 5.0
    )
    assert rpc.take_response().status == NOT_SERVING
    time.sleep_for(5.0)
    _, code, _ = rpc.termination()
    assert code is grpc.StatusCode.DEADLINE_EXCEEDED


def test_shutdown_reports_not_serving_to_watchers_and_probes_and_stays_so(health: HealthServer) -> None:
    health.set_ready(True)
    rpc = serve(health).invoke_unary_stream(WATCH, (), health_pb2.HealthCheckRequest(service=""), None)
    assert rpc.take_response().status == SERVING
    health.stop()
    assert rpc.take_response().status == NOT_SERVING
    health.set_ready(True)
    assert check(health, "") == (NOT_SERVING, grpc.StatusCode.OK)
    assert check(health, READINESS) == (NOT_SERVING, grpc.StatusCode.OK)
    assert check(health, LIVENESS) == (NOT_SERVING, grpc.StatusCode.OK)
    rpc.cancel()
