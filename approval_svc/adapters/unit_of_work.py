"""The unit of work: one transaction per RPC on a pooled connection, rolled back unless committed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Final, Protocol, Self

import asyncpg
from sqlalchemy import exc as sa_exc
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from approval_svc.adapters.repository import (
    Repository,
    SqlRepository,
    Submission,
    Submitted,
    submit_payment,
)
from approval_svc.domain.errors import DatabaseUnavailable, DeadlineExceeded, TransactionConflict
from payments_common import tracing
from payments_common.errors import ServiceError
from payments_common.lsn import format_lsn, parse_lsn
from payments_common.tracing import WAL_MESSAGE_PREFIX

log = logging.getLogger(__name__)

# The insert position, not pg_current_wal_lsn() (the write position): with
# synchronous_commit off, COMMIT returns before its record is written, so only the
# insert position is sure to be at or past the end of the commit record.
_WAL_POSITION = "SELECT pg_current_wal_insert_lsn()::text"
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
    # The protocol state of a connection whose server went away under it.
    asyncpg.InternalClientError,
)


# Bounds the ROLLBACK of a release (after a cancel, it first waits for the cancel's
# acknowledgement); past it the connection is dropped instead.
_RELEASE_TIMEOUT_S: Final = 5.0

# Releases that go on after the task that started them was cancelled; held here so that
# they are not garbage-collected before they end.
_RELEASES: set[asyncio.Task[None]] = set()


async def _to_the_end(work: Coroutine[Any, Any, None]) -> None:
    """Runs `work` to its end even if the calling task is cancelled meanwhile.

    gRPC cancels a handler when its call ends; a connection's release that such a
    cancellation interrupted would leave the connection checked out until the garbage
    collector finds it. Shielded, the release goes on by itself and the caller sees its
    CancelledError at once.
    """
    task = asyncio.ensure_future(work)
    _RELEASES.add(task)
    task.add_done_callback(_RELEASES.discard)
    await asyncio.shield(task)


# The event loop time by which the current RPC's client stops waiting, when it set a
# deadline: a unit of work waits for a pooled connection no longer than that, so an
# overloaded service sheds calls whose clients have given up instead of doing them late.
CALL_DEADLINE: ContextVar[float | None] = ContextVar("approval_call_deadline", default=None)


class UnitOfWork(Protocol):
    """One atomic piece of work on the store; leaving it without `commit` rolls back."""

    @property
    def repo(self) -> Repository: ...

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


def database_error(error: BaseException) -> ServiceError | None:
    """The domain error for a failure of the database driver, or None when it is not one.

    Knows both SQLAlchemy's wrapped errors (the engine, the readiness probe) and
    asyncpg's own (the hot path runs on the raw driver connection).
    """
    if isinstance(error, ServiceError):
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
    if isinstance(error, asyncpg.PostgresError):
        sqlstate = getattr(error, "sqlstate", None) or ""
        if sqlstate in _RETRYABLE_SQLSTATES:
            return TransactionConflict("the transaction conflicted with another one")
        if sqlstate.startswith("08") or sqlstate in _UNAVAILABLE_SQLSTATES:
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
    # No pool_pre_ping: it cost a round trip per checkout. A connection broken by a
    # database restart fails its BEGIN instead; the unit of work then discards it and
    # tries once more on a fresh one, so the service still recovers by itself.
    return create_async_engine(
        database_url,
        pool_size=pool_size,
        max_overflow=0,
        pool_timeout=pool_timeout,
        connect_args={
            "timeout": 5,
            "command_timeout": 30,
            "server_settings": {"application_name": "approval-svc"},
        },
    )


async def _release(
    connection: AsyncConnection, driver: asyncpg.Connection, cancelled: bool, broken: bool = False
) -> None:
    """Ends the transaction and gives the connection back to the pool (or drops it if broken).

    After a cancelled statement asyncpg first waits for PostgreSQL to acknowledge the
    cancel request it sent, then runs the ROLLBACK: the connection returns clean,
    without a reconnect. A cancellation can land before the transaction status is
    known (in BEGIN), so then ROLLBACK is sent whatever the status says.
    """
    if not broken and not driver.is_closed() and (cancelled or driver.is_in_transaction()):
        try:
            await driver.execute("ROLLBACK", timeout=_RELEASE_TIMEOUT_S)
        except Exception as error:
            if database_error(error) is None and not isinstance(error, asyncpg.PostgresError):
                log.error("could not roll back", exc_info=error)
            else:
                log.warning("could not roll back: %s", error)
            broken = True
    await _discard(connection, invalidate=broken or driver.is_closed())


async def _checkout(engine: AsyncEngine) -> AsyncConnection:
    deadline = CALL_DEADLINE.get()
    if deadline is None:
        return await engine.connect()
    remaining = deadline - asyncio.get_running_loop().time()
    if remaining <= 0:
        raise DeadlineExceeded("the call's deadline passed before a database connection was free")
    try:
        async with asyncio.timeout(remaining):
            return await engine.connect()
    except TimeoutError:
        raise DeadlineExceeded("the call's deadline passed before a database connection was free") from None


async def _discard(connection: AsyncConnection, invalidate: bool) -> None:
    """Returns the connection to the pool, or drops it when it can no longer be trusted."""
    try:
        if invalidate:
            await connection.invalidate()
        await connection.close()
    except Exception as error:
        if database_error(error) is None:
            log.error("could not release a database connection", exc_info=error)
        else:
            log.warning("could not release a database connection: %s", error)


async def _give_back(
    connection: AsyncConnection | None, driver: asyncpg.Connection | None, exc: BaseException | None
) -> None:
    """Returns a connection at the end of its work, then raises the service error that `exc` stands for.

    Work that ended cleanly, outside a transaction, goes back without any await (nothing to
    interrupt); work cut short (cancelled, or the connection failed) is released as `_release`
    says, which rolls back whatever the server may still have open.
    """
    if connection is not None and driver is not None:
        if exc is None and not driver.is_in_transaction():
            await _discard(connection, invalidate=driver.is_closed())
        else:
            cancelled = exc is not None and not isinstance(exc, Exception)
            broken = isinstance(exc, DatabaseUnavailable) or (
                isinstance(exc, Exception) and isinstance(database_error(exc), DatabaseUnavailable)
            )
            await _to_the_end(_release(connection, driver, cancelled=cancelled, broken=broken))
    if isinstance(exc, Exception):
        mapped = database_error(exc)
        if mapped is not None:
            raise mapped from exc


class SqlUnitOfWork:
    """A UnitOfWork on one pooled connection of `engine`.

    SQLAlchemy owns the pool; the transaction and every statement run on the pooled
    connection's asyncpg driver connection, whose statement cache prepares each
    statement once per connection. SQLAlchemy does not know of this transaction, so
    this class ends it itself: COMMIT on `commit`, ROLLBACK on leaving otherwise.
    """

    repo: Repository

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._connection: AsyncConnection | None = None
        self._driver: asyncpg.Connection | None = None

    async def __aenter__(self) -> Self:
        # A pooled connection may have died with a database restart; its BEGIN fails
        # before anything ran, so one more try on a fresh connection is safe.
        for attempt in (1, 2):
            try:
                connection = await _checkout(self._engine)
            except Exception as error:
                mapped = database_error(error)
                if mapped is not None:
                    raise mapped from error
                raise
            driver: asyncpg.Connection | None = None
            try:
                raw = await connection.get_raw_connection()
                begun: asyncpg.Connection = raw.driver_connection
                driver = begun
                await begun.execute("BEGIN")
            except Exception as error:
                mapped = database_error(error)
                await _discard(connection, invalidate=mapped is not None)
                if isinstance(mapped, DatabaseUnavailable) and attempt == 1:
                    continue
                if mapped is not None:
                    raise mapped from error
                raise
            except BaseException:
                # Cancelled during BEGIN: the connection goes back all the same.
                if driver is None:
                    await _to_the_end(_discard(connection, invalidate=True))
                else:
                    await _to_the_end(_release(connection, driver, cancelled=True))
                raise
            self._connection, self._driver = connection, begun
            self.repo = SqlRepository(begun)
            return self
        raise AssertionError("unreachable")

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        connection, self._connection = self._connection, None
        driver, self._driver = self._driver, None
        await _give_back(connection, driver, exc)

    def _require(self) -> asyncpg.Connection:
        if self._driver is None:
            raise RuntimeError("the unit of work is not open")
        return self._driver

    async def commit(self) -> int:
        driver = self._require()
        if not tracing.active():
            await driver.execute("COMMIT")
            return await self._committed_at(driver)
        with tracing.span("commit") as span:
            parent = tracing.sampled_traceparent()
            if parent is None:
                await driver.execute("COMMIT")
            else:
                # The trace context travels with the transaction through the WAL, so that the
                # replicator's apply joins this trace. The same round trip as the COMMIT; the
                # traceparent is checked hex (tracing.parse_traceparent's pattern), safe inline.
                await driver.execute(
                    f"SELECT pg_logical_emit_message(true, '{WAL_MESSAGE_PREFIX}', '{parent}'); COMMIT"
                )
            lsn = await self._committed_at(driver)
            if span is not None:
                span.set_attribute("db.consistency_lsn", format_lsn(lsn))
            return lsn

    @staticmethod
    async def _committed_at(driver: asyncpg.Connection) -> int:
        # COMMIT returns after its commit record was inserted into the WAL, whatever
        # synchronous_commit says (which only decides whether it waits for the flush), so
        # the insert position read now is at or past the record's end. Read outside any
        # transaction: one round trip.
        text_lsn: str = await driver.fetchval(_WAL_POSITION)
        return parse_lsn(text_lsn)

    async def position(self) -> int:
        text_lsn: str = await self._require().fetchval(_WAL_POSITION)
        return parse_lsn(text_lsn)


class SqlSubmissionPath:
    """A SubmissionPath on one pooled connection, without a transaction block: the call commits by itself.

    Opened for one submission (`async with`) and given back to the pool when it ends.
    """

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._connection: AsyncConnection | None = None
        self._driver: asyncpg.Connection | None = None

    async def __aenter__(self) -> Self:
        try:
            connection = await _checkout(self._engine)
        except Exception as error:
            mapped = database_error(error)
            if mapped is not None:
                raise mapped from error
            raise
        try:
            raw = await connection.get_raw_connection()
        except BaseException:
            await _to_the_end(_discard(connection, invalidate=True))
            raise
        self._connection, self._driver = connection, raw.driver_connection
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        connection, self._connection = self._connection, None
        driver, self._driver = self._driver, None
        await _give_back(connection, driver, exc)

    def _require(self) -> asyncpg.Connection:
        if self._driver is None:
            raise RuntimeError("the submission path is not open")
        return self._driver

    async def submit(self, submission: Submission) -> Submitted:
        driver = self._require()
        if not tracing.active():
            return await submit_payment(driver, submission, None)
        with tracing.span("commit") as span:
            # The trace context goes to the WAL with the transaction (docs/tracing.md).
            submitted = await submit_payment(driver, submission, tracing.sampled_traceparent())
            if span is not None:
                if submitted.position:
                    span.set_attribute("db.consistency_lsn", format_lsn(submitted.position))
                span.set_attribute("db.outcome", submitted.outcome)
            return submitted


async def probe(engine: AsyncEngine) -> bool:
    """Readiness: whether the database answers a trivial query."""
    async with engine.connect() as connection:
        await connection.execute(_PROBE)
    return True
