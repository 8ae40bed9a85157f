"""Readiness stops whatever its probe does with the cancellation: a stop that hangs keeps a pod past its grace."""

from __future__ import annotations

import asyncio

from grpc_health.v1 import health, health_pb2

from payments_common.grpcserver import Readiness

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def _status(servicer: health.aio.HealthServicer, name: str) -> int:  # type: ignore[name-defined]
    request = health_pb2.HealthCheckRequest(service=name)
    reply: health_pb2.HealthCheckResponse = await servicer.Check(request, None)
    status: int = reply.status
    return status


async def test_stop_returns_when_the_probe_swallows_the_cancellation() -> None:
    """A client library may swallow a cancellation that lands in its read and answer as usual."""
    probing = asyncio.Event()
    swallowed = []
    calls = 0

    async def probe() -> bool:
        nonlocal calls
        calls += 1
        if calls == 1:
            return True  # start()'s own probe
        probing.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            swallowed.append(True)
        return True

    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    readiness = Readiness(servicer, ["test.Service"], probe, interval_seconds=0.01)
    await readiness.start()
    await probing.wait()
    async with asyncio.timeout(30):  # a bound on a hang, not a measure: stop() returns at once
        await readiness.stop()
    assert swallowed
    assert readiness._task is not None
    assert readiness._task.done()
    assert await _status(servicer, "test.Service") == NOT_SERVING


async def test_stop_ends_a_loop_between_probes() -> None:
    probes = 0
    probed_thrice = asyncio.Event()

    async def probe() -> bool:
        nonlocal probes
        probes += 1
        if probes == 3:
            probed_thrice.set()
        return True

    servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    readiness = Readiness(servicer, ["test.Service"], probe, interval_seconds=0.01)
    await readiness.start()
    async with asyncio.timeout(30):
        await probed_thrice.wait()
        await readiness.stop()
    assert readiness._task is not None
    assert readiness._task.done()
    assert await _status(servicer, "") == NOT_SERVING
