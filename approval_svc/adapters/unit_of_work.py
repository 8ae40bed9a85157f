"""The unit of work: one transaction per RPC on a pooled connection, rolled back unless committed."""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Final, Protocol, Self

import asyncpg
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from approval_svc.adapters.repository import Repository, SqlRepository
from approval_svc.domain.errors import DatabaseUnavailable, DomainError, TransactionConflict
from payments_common.lsn import parse_lsn

log = logging.getLogger(__name__)

_WAL_POSITION = text("SELECT pg_current_wal_lsn()::text")
_PROBE = text("SELECT 1")

# Serialization failure and deadlock: the transaction did nothing and can run again.
_RETRYABLE_SQLSTATES: Final = frozenset({"40001", "40P01"})
# Connection failures, shutdown, "starting up", too many connections.
_UNAVAILABLE_SQLSTATES: Final = frozenset({"57P01", "57P02", "57P03", "53300"})
_UNAVAILABLE_ERRORS: Final = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.InterfaceError,
)


class UnitOfWork(Protocol):
    """One atomic piece of work on the store; leaving it without `commit` rolls back."""

    repo: Repository

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None: ...

    async def commit(self) -> int:
        """Commits and returns a WAL position at or after the commit."""
        ...

    async def position(self) -> int:
        """A WAL position at or after every commit this transaction can see."""
        ...


def database_error(error: BaseException) -> DomainError | None:
    """The domain error for a failure of the database driver, or None when it is not one."""
    if isinstance(error, DomainError):
        return None
    if isinstance(error, sa_exc.TimeoutError):
        return DatabaseUnavailable("no database connection became free in time")
    if isinstance(error, sa_exc.DBAPIError):
        sqlstate = getattr(error.orig, "sqlstate", None) or ""
        if sqlstate in _RETRYABLE_SQLSTATES:
            return TransactionConflict("the transaction conflicted with another one")
        cause = error.orig.__cause__ if error.orig is not None else None
        if (
            error.connection_invalidated
            or isinstance(error, sa_exc.InterfaceError)
            or sqlstate.startswith("08")
            or sqlstate in _UNAVAILABLE_SQLSTATES
            or isinstance(cause, _UNAVAILABLE_ERRORS)
        ):
            return DatabaseUnavailable("the database is unavailable")
        return None
    if isinstance(error, _UNAVAILABLE_ERRORS):
        return DatabaseUnavailable("the database is unavailable")
    return None


def create_engine(database_url: str, pool_size: int, pool_timeout: float = 5.0) -> AsyncEngine:
    """The connection pool; no connection is opened until the first unit of work.

    A call that waits longer than `pool_timeout` for a connection fails with
    UNAVAILABLE rather than queue without bound behind a hot account.
    """
    return create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=pool_timeout,
        # A connection broken by a database restart is replaced before use, so the
        # service recovers by itself once PostgreSQL is back.
        pool_pre_ping=True,
        connect_args={
            "timeout": 5,
            "command_timeout": 30,
            "server_settings": {"application_name": "approval-svc"},
        },
    )


class SqlUnitOfWork:
    """A UnitOfWork on one pooled connection of `engine`."""

    repo: Repository

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._connection: AsyncConnection | None = None

    async def __aenter__(self) -> Self:
        try:
            self._connection = await self._engine.connect()
            await self._connection.begin()
        except Exception as error:
            mapped = database_error(error)
            if mapped is not None:
                raise mapped from error
            raise
        self.repo = SqlRepository(self._connection)
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            try:
                # Closing returns the connection to the pool, which rolls back whatever
                # was not committed.
                await connection.close()
            except Exception as error:
                if exc is None and database_error(error) is None:
                    raise
                log.warning("could not release a database connection: %s", error)
        if exc is not None:
            mapped = database_error(exc)
            if mapped is not None:
                raise mapped from exc

    def _require(self) -> AsyncConnection:
        if self._connection is None:
            raise RuntimeError("the unit of work is not open")
        return self._connection

    async def commit(self) -> int:
        connection = self._require()
        await connection.commit()
        # synchronous_commit is on, so the commit record is flushed before COMMIT returns
        # and the current insert position is past it.
        return await self.position()

    async def position(self) -> int:
        text_lsn: str = (await self._require().execute(_WAL_POSITION)).scalar_one()
        return parse_lsn(text_lsn)


async def probe(engine: AsyncEngine) -> bool:
    """Readiness: whether the database answers a trivial query."""
    async with engine.connect() as connection:
        await connection.execute(_PROBE)
    return True
