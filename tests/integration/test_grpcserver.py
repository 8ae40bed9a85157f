"""The shared server skeleton: errors become statuses with ErrorInfo, health and reflection are served."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import FrameType
from typing import Any

import grpc
import pytest
from google.protobuf import wrappers_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import REGISTRY

from payments_common.errors import INTERNAL_MESSAGE, FieldViolation, InvalidArgument, NotFound
from payments_common.grpcserver import (
    EXIT_STOP_OVERDUE,
    LIVENESS,
    READINESS,
    STOP_MARGIN_SECONDS,
    GrpcService,
    Readiness,
    build_server,
    serve,
)
from payments_common.grpcstatus import bad_request, error_info
from payments_common.settings import ServerSettings
from stack.auth import ROLES, LocalAuthority
from tests.support import ROOT
from tests.support.auth import aio_channel, authority, bearer, policy_for, trusting

SERVICE = "test.Echo"


def _settings(**values: Any) -> ServerSettings:
    """The test service's settings: tokens of the tests' authority, every role allowed every method."""
    auth = trusting(authority(), policy_for([f"{SERVICE}/{name}" for name in ("Echo", "Count", "Forever")]))
    return ServerSettings(host="127.0.0.1", auth=auth, **values)


async def _echo(request: wrappers_pb2.StringValue, context: Any) -> wrappers_pb2.StringValue:
    if request.value == "missing":
        raise NotFound("THING_NOT_FOUND", "no such thing", {"thing": "x"})
    if request.value == "invalid":
        raise InvalidArgument([FieldViolation("value", "must not be 'invalid'")])
    if request.value == "crash":
        raise RuntimeError("secret detail: password=hunter2")
    return wrappers_pb2.StringValue(value=request.value)


async def _count(request: wrappers_pb2.StringValue, context: Any) -> AsyncIterator[wrappers_pb2.StringValue]:
    for i in range(3):
        yield wrappers_pb2.StringValue(value=str(i))
    raise NotFound("THING_NOT_FOUND", "stream ended badly")


# The requests ("value") of the Forever streams whose handler has run its clean-up.
FOREVER_ENDED: set[str] = set()


async def _forever(
    request: wrappers_pb2.StringValue, context: Any
) -> AsyncIterator[wrappers_pb2.StringValue]:
    try:
        yield wrappers_pb2.StringValue(value="first")
        await asyncio.Event().wait()
    finally:
        FOREVER_ENDED.add(request.value)


def _register(server: grpc.aio.Server) -> None:
    handlers = {
        "Forever": grpc.unary_stream_rpc_method_handler(
            _forever,
            request_deserializer=wrappers_pb2.StringValue.FromString,
            response_serializer=wrappers_pb2.StringValue.SerializeToString,
        ),
        "Echo": grpc.unary_unary_rpc_method_handler(
            _echo,
            request_deserializer=wrappers_pb2.StringValue.FromString,
            response_serializer=wrappers_pb2.StringValue.SerializeToString,
        ),
        "Count": grpc.unary_stream_rpc_method_handler(
            _count,
            request_deserializer=wrappers_pb2.StringValue.FromString,
            response_serializer=wrappers_pb2.StringValue.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])


@pytest.fixture
async def channel() -> AsyncIterator[tuple[grpc.aio.Channel, Readiness, dict[str, bool]]]:
    ready = {"value": True}

    async def probe() -> bool:
        return ready["value"]

    server, port, readiness = build_server(
        _settings(), _register, [SERVICE], probe, readiness_interval_seconds=0.05
    )
    await server.start()
    await readiness.start()
    async with aio_channel(f"127.0.0.1:{port}") as chan:
        yield chan, readiness, ready
    await readiness.stop()
    await server.stop(None)


def _unary(chan: grpc.aio.Channel) -> Any:
    return chan.unary_unary(
        f"/{SERVICE}/Echo",
        request_serializer=wrappers_pb2.StringValue.SerializeToString,
        response_deserializer=wrappers_pb2.StringValue.FromString,
    )


def _stream(chan: grpc.aio.Channel, method: str) -> Any:
    """A server-streaming method of the test service, of StringValues both ways."""
    return chan.unary_stream(
        f"/{SERVICE}/{method}",
        request_serializer=wrappers_pb2.StringValue.SerializeToString,
        response_deserializer=wrappers_pb2.StringValue.FromString,
    )


async def test_ok_and_service_errors_map_to_status(
    channel: tuple[grpc.aio.Channel, Readiness, dict[str, bool]],
) -> None:
    chan, _, _ = channel
    echo = _unary(chan)
    assert (await echo(wrappers_pb2.StringValue(value="hi"))).value == "hi"

    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await echo(wrappers_pb2.StringValue(value="missing"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(missing.value)
    assert info is not None
    assert info.reason == "THING_NOT_FOUND"
    assert info.metadata["thing"] == "x"

    with pytest.raises(grpc.aio.AioRpcError) as invalid:
        await echo(wrappers_pb2.StringValue(value="invalid"))
    assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violations = bad_request(invalid.value)
    assert violations is not None
    assert [v.field for v in violations.field_violations] == ["value"]


async def test_unexpected_error_is_internal_without_details(
    channel: tuple[grpc.aio.Channel, Readiness, dict[str, bool]],
) -> None:
    chan, _, _ = channel
    with pytest.raises(grpc.aio.AioRpcError) as crash:
        await _unary(chan)(wrappers_pb2.StringValue(value="crash"))
    assert crash.value.code() == grpc.StatusCode.INTERNAL
    assert crash.value.details() == INTERNAL_MESSAGE
    assert "hunter2" not in str(crash.value.trailing_metadata())
    info = error_info(crash.value)
    assert info is not None
    assert info.reason == "INTERNAL"
    # The server goes on serving.
    assert (await _unary(chan)(wrappers_pb2.StringValue(value="after"))).value == "after"


async def test_stream_errors_map_to_status(
    channel: tuple[grpc.aio.Channel, Readiness, dict[str, bool]],
) -> None:
    chan, _, _ = channel
    count = _stream(chan, "Count")
    seen: list[str] = []

    async def drain() -> None:
        async for item in count(wrappers_pb2.StringValue()):
            seen.append(item.value)

    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await drain()
    assert seen == ["0", "1", "2"]
    assert failed.value.code() == grpc.StatusCode.NOT_FOUND
    info = error_info(failed.value)
    assert info is not None
    assert info.reason == "THING_NOT_FOUND"


async def test_readiness_follows_the_probe_and_liveness_does_not(
    channel: tuple[grpc.aio.Channel, Readiness, dict[str, bool]],
) -> None:
    chan, readiness, ready = channel
    stub = health_pb2_grpc.HealthStub(chan)
    serving = health_pb2.HealthCheckResponse.SERVING

    async def status(name: str) -> int:
        response = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        return int(response.status)

    assert await status(READINESS) == serving
    assert await status(SERVICE) == serving
    ready["value"] = False
    await readiness.check_once()
    assert await status(READINESS) != serving
    assert await status("") != serving
    assert await status(LIVENESS) == serving
    ready["value"] = True
    await readiness.check_once()
    assert await status(READINESS) == serving


def _handled(code: str) -> float:
    value = REGISTRY.get_sample_value(
        "grpc_server_handled_total", {"grpc_method": f"/{SERVICE}/Forever", "grpc_code": code}
    )
    return value or 0.0


@pytest.mark.parametrize(("ending", "code"), [("cancel", "CANCELLED"), ("deadline", "DEADLINE_EXCEEDED")])
async def test_a_stream_ended_by_its_client_is_counted_by_why(
    channel: tuple[grpc.aio.Channel, Readiness, dict[str, bool]], ending: str, code: str
) -> None:
    chan, _, _ = channel
    forever = _stream(chan, "Forever")
    before = _handled(code)
    call = forever(wrappers_pb2.StringValue(), timeout=0.5 if ending == "deadline" else 60)
    first = await call.read()
    assert isinstance(first, wrappers_pb2.StringValue)
    assert first.value == "first"
    if ending == "cancel":
        call.cancel()
    else:
        with pytest.raises(grpc.aio.AioRpcError) as expired:
            await call.read()
        assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    deadline = time.monotonic() + 10
    while _handled(code) < before + 1:
        assert time.monotonic() < deadline, f"the server did not count {code}"
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def _server_of(authority: LocalAuthority, **build: Any) -> AsyncIterator[str]:
    """The test service trusting `authority` (no clock skew allowed), on a port of its own; yields its address."""
    auth = trusting(authority, policy_for([f"{SERVICE}/Forever"]))
    settings = ServerSettings(host="127.0.0.1", auth=dataclasses.replace(auth, clock_skew_seconds=0))
    server, port, _ = build_server(settings, _register, [SERVICE], **build)
    await server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        await server.stop(None)


async def _refusal_ending(
    address: str, token: str, name: str, after_first: Callable[[], object] = lambda: None
) -> str:
    """Opens a Forever stream as `token`, reads its first response, calls `after_first`, then
    returns the reason the stream ended with."""
    async with grpc.aio.insecure_channel(address) as chan:
        call = _stream(chan, "Forever")(
            wrappers_pb2.StringValue(value=name), metadata=bearer(token), timeout=60
        )
        first = await call.read()
        assert isinstance(first, wrappers_pb2.StringValue)
        assert first.value == "first"
        after_first()
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await call.read()
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED, ended.value
    info = error_info(ended.value)
    assert info is not None
    return str(info.reason)


async def test_a_stream_ends_when_its_token_expires(tmp_path: Path) -> None:
    """A stream does not outlive its token: it ends with UNAUTHENTICATED at the token's expiry, and the handler cleans up."""
    authority = LocalAuthority.create(tmp_path)
    async with _server_of(authority) as address:
        token = authority.token("watcher", [ROLES[0]], lifetime_seconds=2)
        assert await _refusal_ending(address, token, "expiring") == "TOKEN_EXPIRED"
    assert "expiring" in FOREVER_ENDED


async def test_a_stream_ends_when_the_key_of_its_token_is_withdrawn(tmp_path: Path) -> None:
    authority = LocalAuthority.create(tmp_path)
    async with _server_of(authority, recheck_seconds=0.2) as address:
        token = authority.token("watcher", [ROLES[0]])
        old = authority.current_kid

        def withdraw() -> None:
            authority.rotate()
            authority.retire(old)

        assert await _refusal_ending(address, token, "withdrawn", withdraw) == "UNKNOWN_KEY"
    assert "withdrawn" in FOREVER_ENDED


async def test_serve_stops_gracefully_after_a_signal_that_came_during_start_up() -> None:
    """A SIGTERM while the service starts is not lost: the service starts, then stops in order."""
    events: list[str] = []

    async def probe() -> bool:
        return True

    class SlowToStart(GrpcService):
        async def starting(self) -> None:
            events.append("starting")
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.sleep(0.2)

        async def draining(self) -> None:
            events.append("draining")

        async def stopped(self) -> None:
            events.append("stopped")

    @contextlib.asynccontextmanager
    async def opened() -> AsyncIterator[tuple[GrpcService, int]]:
        server, port, readiness = build_server(_settings(), _register, [SERVICE], probe)
        yield SlowToStart(server, readiness), port
        events.append("closed")

    def unhandled(signum: int, frame: FrameType | None) -> None:
        events.append("unhandled")  # serve() did not take the signal over: it waits for ever

    previous = signal.signal(signal.SIGTERM, unhandled)
    try:
        settings = _settings(grace_seconds=0.1)
        # In the test's own process: no exit when the stop is overdue (the test's bound is its own).
        await asyncio.wait_for(serve("test service", settings, opened, exit_when_overdue=False), 10)
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert events == ["starting", "draining", "stopped", "closed"]


# A service whose clean-up never ends, run as a process of its own that gets SIGTERM once started.
_STUCK_ON_STOP = """
import asyncio, contextlib, os, signal
from payments_common.authsettings import AuthSettings
from payments_common.grpcserver import GrpcService, build_server, serve
from payments_common.logs import configure_logging
from payments_common.settings import ServerSettings

class StuckOnStop(GrpcService):
    async def started_then_signalled(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    async def stopped(self) -> None:
        await asyncio.Event().wait()  # a dependency's close that never returns

@contextlib.asynccontextmanager
async def opened():
    server, port, readiness = build_server(settings, lambda server: None, [])
    service = StuckOnStop(server, readiness)
    service.starting = service.started_then_signalled
    yield service, port

configure_logging("stuck")
settings = ServerSettings(host="127.0.0.1", grace_seconds=0.2, auth=AuthSettings(disabled=True))
asyncio.run(serve("stuck service", settings, opened))
print("returned")
"""


def test_a_process_that_does_not_stop_in_its_grace_exits_saying_where_it_waits() -> None:
    """The kubelet's SIGKILL would end it silently: it exits first, with what it was waiting for."""
    done = subprocess.run(
        [sys.executable, "-c", _STUCK_ON_STOP], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == EXIT_STOP_OVERDUE, done.stdout + done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    overdue = [r for r in records if "did not stop" in r["message"]]
    assert len(overdue) == 1, done.stdout
    assert overdue[0]["level"] == "error"
    assert (
        overdue[0]["message"]
        == f"stuck service did not stop within {0.2 + STOP_MARGIN_SECONDS:g} s of the signal; exiting"
    )
    assert any("StuckOnStop.stopped" in place for place in overdue[0]["awaiting"]), overdue[0]
    assert "returned" not in done.stdout
