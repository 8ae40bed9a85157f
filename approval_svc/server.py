"""The gRPC server of the command side: wiring, health tied to PostgreSQL, and graceful shutdown."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from uuid import UUID, uuid4

import grpc
from prometheus_client import start_http_server
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from approval_svc import metrics
from approval_svc.adapters.unit_of_work import SqlUnitOfWork, create_engine, probe
from approval_svc.config import Settings
from approval_svc.handlers import Handlers, UnitOfWorkFactory
from approval_svc.servicer import SERVICE_NAME, ApprovalServicer
from payments.approval.v1 import approval_service_pb2_grpc as pb_grpc
from payments_common.grpcserver import Readiness, ServerOptions, build_server, wait_for_signal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dependencies:
    """What the server needs from the outside world; tests pass their own."""

    uow_factory: UnitOfWorkFactory
    probe: Callable[[], Awaitable[bool]]
    new_id: Callable[[], UUID] = uuid4
    readiness_interval_s: float = 1.0

    @classmethod
    def from_engine(cls, engine: AsyncEngine, readiness_interval_s: float = 1.0) -> Dependencies:
        return cls(
            uow_factory=lambda: SqlUnitOfWork(engine),
            probe=lambda: probe(engine),
            readiness_interval_s=readiness_interval_s,
        )


class ApprovalServer:
    """A gRPC server whose readiness follows the database, started and stopped together."""

    def __init__(self, server: grpc.aio.Server, readiness: Readiness) -> None:
        self.grpc = server
        self.readiness = readiness

    async def start(self) -> None:
        await self.grpc.start()
        await self.readiness.start()

    async def stop(self, grace: float | None) -> None:
        """Reports NOT_SERVING first, so balancers drain, then lets calls in flight finish."""
        await self.readiness.stop()
        await self.grpc.stop(grace)


def create_server(settings: Settings, deps: Dependencies) -> tuple[ApprovalServer, int]:
    """Builds (does not start) the server; returns it and its bound port (tests bind port 0)."""
    handlers = Handlers(deps.uow_factory, settings.review_threshold_minor, new_id=deps.new_id)
    servicer = ApprovalServicer(handlers)
    options = ServerOptions(
        host=settings.host,
        port=settings.port,
        max_message_bytes=settings.max_message_bytes,
        grace_s=settings.grace_seconds,
    )
    server, port, health = build_server(
        options,
        lambda s: pb_grpc.add_ApprovalServiceServicer_to_server(servicer, s),
        [SERVICE_NAME],
        credentials=settings.tls.server_credentials(),
    )
    readiness = Readiness(health, [SERVICE_NAME], deps.probe, interval_s=deps.readiness_interval_s)
    return ApprovalServer(server, readiness), port


async def serve(settings: Settings) -> None:
    """Runs the service until SIGTERM or SIGINT, then shuts down gracefully."""
    engine = create_engine(
        settings.async_database_url, settings.db_pool_size, settings.db_pool_timeout_seconds
    )
    pool = engine.pool
    if isinstance(pool, QueuePool):
        metrics.POOL_CHECKED_OUT.set_function(pool.checkedout)
    try:
        server, port = create_server(settings, Dependencies.from_engine(engine))
        if settings.metrics_port:
            start_http_server(settings.metrics_port)
        await server.start()
        log.info(
            "approval service started",
            extra={
                "port": port,
                "metrics_port": settings.metrics_port,
                "database": settings.redacted_database_url,
                "tls": "mutual" if settings.tls.client_ca_file else "on" if settings.tls.enabled else "off",
            },
        )
        await wait_for_signal()
        await server.stop(settings.grace_seconds)
        log.info("approval service stopped")
    finally:
        await engine.dispose()
