"""The gRPC server of the command side: wiring, health tied to PostgreSQL, and graceful shutdown."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from uuid import UUID, uuid4

from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.pool import QueuePool

from approval_svc import metrics
from approval_svc.adapters.unit_of_work import SqlSubmissionPath, SqlUnitOfWork, create_engine, probe
from approval_svc.config import Settings
from approval_svc.handlers import Handlers, SubmissionPathFactory, UnitOfWorkFactory
from approval_svc.servicer import AUDITED, SERVICE_NAME, ApprovalServicer
from payments.approval.v1 import approval_service_pb2_grpc as pb_grpc
from payments_common import grpcserver
from payments_common.grpcserver import GrpcService, build_server


@dataclass(frozen=True)
class Dependencies:
    """What the server needs from the outside world; tests pass their own."""

    uow_factory: UnitOfWorkFactory
    probe: Callable[[], Awaitable[bool]]
    new_id: Callable[[], UUID] = uuid4
    readiness_interval_seconds: float = 1.0
    # The submissions' path in one call; None: every submission is decided under the locks in Python.
    submissions: SubmissionPathFactory | None = None

    @classmethod
    def from_engine(cls, engine: AsyncEngine, readiness_interval_seconds: float = 1.0) -> Dependencies:
        return cls(
            uow_factory=lambda: SqlUnitOfWork(engine),
            probe=lambda: probe(engine),
            readiness_interval_seconds=readiness_interval_seconds,
            submissions=lambda: SqlSubmissionPath(engine),
        )


def create_server(settings: Settings, deps: Dependencies) -> tuple[GrpcService, int]:
    """Builds (does not start) the server; returns it and its bound port (tests bind port 0)."""
    handlers = Handlers(
        deps.uow_factory, settings.review_threshold_minor, new_id=deps.new_id, submissions=deps.submissions
    )
    servicer = ApprovalServicer(handlers)
    server, port, readiness = build_server(
        settings,
        lambda s: pb_grpc.add_ApprovalServiceServicer_to_server(servicer, s),
        [SERVICE_NAME],
        deps.probe,
        audited=AUDITED,
        readiness_interval_seconds=deps.readiness_interval_seconds,
    )
    return GrpcService(server, readiness), port


@contextlib.asynccontextmanager
async def _opened(settings: Settings) -> AsyncIterator[tuple[GrpcService, int]]:
    """The server on a connection pool, which is disposed of after the server stops."""
    engine = create_engine(
        settings.async_database_url, settings.db_pool_size, settings.db_pool_timeout_seconds
    )
    pool = engine.pool
    if isinstance(pool, QueuePool):
        metrics.POOL_CHECKED_OUT.set_function(pool.checkedout)
    try:
        yield create_server(settings, Dependencies.from_engine(engine))
    finally:
        await engine.dispose()


async def serve(settings: Settings) -> None:
    """Runs the service until SIGTERM or SIGINT, then shuts down gracefully."""
    await grpcserver.serve(
        "approval service", settings, lambda: _opened(settings), database=settings.redacted_database_url
    )
