"""One Redis connection shared by every request: commands are pipelined, written once per loop turn."""

from __future__ import annotations

import asyncio
import collections
from typing import Any

import hiredis
from redis.asyncio import Redis
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

_READ_CHUNK = 65536


class Multiplexer:
    """Sends commands on one long-lived connection; a reply is awaited without any per-call timer.

    The hot reads (GetPayment, ListPayments) are one script call each. Through redis-py's pool
    each call checks a connection out, arms a timeout, writes, waits for its reply and checks
    the connection back in: more CPU than the call's own work. Here every call appends its
    packed command to a buffer that is written once per event-loop iteration, and one reader
    task hands out the replies in order (Redis answers a connection's commands in order), so
    concurrent calls share their writes and reads. redis-py still opens the connection (TLS,
    AUTH, SELECT, unix sockets all as configured), and still serves everything else.

    A call fails with a redis-py ConnectionError when the connection breaks, and with a
    TimeoutError when Redis leaves the oldest pending command unanswered for `timeout_seconds`
    (the connection is then dropped, failing every call pending on it). A call that finds
    its connection broken while being written or answered is retried once on a new one:
    every command sent here is a read, and after a Redis restart the old connection is dead.
    """

    def __init__(self, redis: Redis, timeout_seconds: float) -> None:
        self._redis = redis
        self._timeout_seconds = timeout_seconds
        self._link: _Link | None = None
        self._connecting: asyncio.Future[_Link] | None = None
        self._closed = False

    async def execute(self, *args: object) -> Any:
        try:
            return await self._execute(args)
        except RedisConnectionError:
            return await self._execute(args)

    async def _execute(self, args: tuple[object, ...]) -> Any:
        link = self._link
        if link is None or link.broken:
            link = await self._connect()
        return await link.send(args)

    async def _connect(self) -> _Link:
        if self._closed:
            raise RedisConnectionError("the multiplexer is closed")
        if self._connecting is None:
            self._connecting = asyncio.ensure_future(self._open())
        connecting = self._connecting
        try:
            return await asyncio.shield(connecting)
        finally:
            if connecting.done() and self._connecting is connecting:
                self._connecting = None

    async def _open(self) -> _Link:
        connection = self._redis.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            await connection.connect()
        except Exception:
            await connection.disconnect()
            raise
        self._link = _Link(connection, self._timeout_seconds)
        return self._link

    async def close(self) -> None:
        self._closed = True
        if self._link is not None:
            await self._link.close()
            self._link = None


class _Link:
    """One open connection with its queue of pending replies, oldest first."""

    def __init__(self, connection: AbstractConnection, timeout_seconds: float) -> None:
        self._connection = connection
        reader, writer = connection._reader, connection._writer
        if reader is None or writer is None:
            raise RedisConnectionError("the connection is not open")
        self._stream = reader
        self._writer = writer
        self._timeout_seconds = timeout_seconds
        self._loop = asyncio.get_running_loop()
        self._parser = hiredis.Reader(notEnoughData=False)
        self._pending: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._outgoing: list[bytes] = []
        self._flush_scheduled = False
        self._watchdog: asyncio.TimerHandle | None = None
        self.broken = False
        self._reading = asyncio.ensure_future(self._read())

    def send(self, args: tuple[object, ...]) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = self._loop.create_future()
        self._outgoing.append(hiredis.pack_command(args))  # type: ignore[arg-type]
        self._pending.append((future, self._loop.time()))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self._timeout_seconds, self._check_timeout)
        return future

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.broken or not self._outgoing:
            return
        data, self._outgoing = b"".join(self._outgoing), []
        try:
            self._writer.write(data)
        except Exception as error:  # a broken transport: fail every pending call
            self._fail(RedisConnectionError(f"writing to Redis failed: {error}"))

    def _check_timeout(self) -> None:
        self._watchdog = None
        if not self._pending or self.broken:
            return
        waited = self._loop.time() - self._pending[0][1]
        if waited >= self._timeout_seconds:
            self._fail(RedisTimeoutError("Redis did not answer in time"))
        else:
            self._watchdog = self._loop.call_later(self._timeout_seconds - waited, self._check_timeout)

    async def _read(self) -> None:
        parser, pending = self._parser, self._pending
        try:
            while True:
                data = await self._stream.read(_READ_CHUNK)
                if not data:
                    raise RedisConnectionError("Redis closed the connection")
                parser.feed(data)
                while (reply := parser.gets()) is not False:
                    future, _ = pending.popleft()
                    if future.done():
                        continue
                    if isinstance(reply, hiredis.ReplyError):
                        future.set_exception(_reply_error(str(reply)))
                    else:
                        future.set_result(reply)
        except asyncio.CancelledError:
            self._fail(RedisConnectionError("the connection was closed"))
            raise
        except (OSError, RedisConnectionError, hiredis.ProtocolError, IndexError) as error:
            self._fail(error if isinstance(error, RedisConnectionError) else RedisConnectionError(str(error)))

    def _fail(self, error: Exception) -> None:
        """Marks the link broken and fails every pending call; the next call opens a new link."""
        self.broken = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        while self._pending:
            future, _ = self._pending.popleft()
            if not future.done():
                future.set_exception(error)
        self._writer.close()
        if not self._reading.done() and asyncio.current_task() is not self._reading:
            self._reading.cancel()

    async def close(self) -> None:
        self._fail(RedisConnectionError("the connection was closed"))
        await self._connection.disconnect(nowait=True)


def _reply_error(message: str) -> ResponseError:
    if message.startswith("NOSCRIPT"):
        return NoScriptError(message)
    return ResponseError(message)
