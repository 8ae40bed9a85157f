"""Helpers for the approval service's integration tests: engines, handlers and a running server."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
from sqlalchemy.ext.asyncio import AsyncEngine

from approval_svc.adapters.unit_of_work import SqlSubmissionPath, SqlUnitOfWork, create_engine
from approval_svc.config import Settings
from approval_svc.domain import commands
from approval_svc.domain.model import Account, Payment
from approval_svc.handlers import Handlers, RequestKey
from approval_svc.server import Dependencies, create_server
from approval_svc.servicer import submit_payment_response
from payments.approval.v1 import approval_service_pb2_grpc as pb_grpc
from payments_common.authsettings import AuthSettings
from payments_common.grpcserver import GrpcService
from tests.support.auth import aio_channel, auth_settings


def async_url(dsn: str) -> str:
    return "postgresql+asyncpg://" + dsn.partition("://")[2]


@contextlib.asynccontextmanager
async def engine_for(dsn: str, pool_size: int = 20) -> AsyncIterator[AsyncEngine]:
    # Hundreds of calls queue behind one account's row lock; on a busy machine
    # that can take longer than the service's default wait for a connection.
    engine = create_engine(async_url(dsn), pool_size, pool_timeout=300)
    try:
        yield engine
    finally:
        await engine.dispose()


def handlers_for(
    engine: AsyncEngine, review_threshold: int = 1_000_000, *, locked_only: bool = False
) -> Handlers:
    """The service's handlers on `engine`, as the server builds them (`locked_only`: every submission under the locks)."""
    submissions = None if locked_only else (lambda: SqlSubmissionPath(engine))
    return Handlers(lambda: SqlUnitOfWork(engine), review_threshold, submissions=submissions)


T = TypeVar("T")


# The caller of the requests these helpers make, as the servicer would name it.
CALLER = "token:tests"


def key(
    method: str, request_id: str | None = None, fingerprint: bytes = b"f", caller: str = CALLER
) -> RequestKey[T]:
    """A request key whose stored response is a placeholder: these tests check effects, not replies."""
    return RequestKey(caller, request_id or uuid.uuid4().hex, method, fingerprint, lambda value: b"stored")


def submission_key(
    request_id: str | None = None, fingerprint: bytes = b"f", caller: str = CALLER
) -> RequestKey[Payment]:
    """A SubmitPayment key whose stored response is the servicer's, as the path of one call stores it too."""

    def encode(payment: Payment) -> bytes:
        return submit_payment_response(payment).SerializeToString(deterministic=True)

    return RequestKey(caller, request_id or uuid.uuid4().hex, "SubmitPayment", fingerprint, encode)


async def open_account(
    handlers: Handlers,
    opening: int,
    currency: str = "EUR",
    per_payment_limit: int = 10**12,
    daily_limit: int = 10**12,
    owner: str = "Ada",
) -> Account:
    command = commands.CreateAccount(owner, currency, opening, per_payment_limit, daily_limit)
    outcome = await handlers.create_account(command, key("CreateAccount"))
    assert outcome.value is not None
    return outcome.value


@dataclass
class RunningServer:
    server: GrpcService
    port: int
    channel: grpc.aio.Channel
    stub: pb_grpc.ApprovalServiceAsyncStub

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


@contextlib.asynccontextmanager
async def running_server(
    dsn: str,
    review_threshold: int = 1_000_000,
    readiness_interval_seconds: float = 0.1,
    auth: AuthSettings | None = None,
    token: str | None = None,
) -> AsyncIterator[RunningServer]:
    """The real server on a free port of 127.0.0.1, with a client channel to it.

    The server authenticates as `auth` says (by default: the session's token authority
    and the default policy); the channel's calls carry `token` (by default the service
    token, which holds every role).
    """
    settings = Settings(
        database_url=dsn,
        host="127.0.0.1",
        port=0,
        metrics_port=0,
        review_threshold_minor=review_threshold,
        db_pool_size=10,
        grace_seconds=1,
        auth=auth_settings(Settings) if auth is None else auth,
    )
    async with engine_for(dsn, settings.db_pool_size) as engine:
        deps = Dependencies.from_engine(engine, readiness_interval_seconds=readiness_interval_seconds)
        server, port = create_server(settings, deps)
        await server.start()
        try:
            async with aio_channel(f"127.0.0.1:{port}", token) as channel:
                yield RunningServer(server, port, channel, pb_grpc.ApprovalServiceStub(channel))
        finally:
            await server.stop(None)
