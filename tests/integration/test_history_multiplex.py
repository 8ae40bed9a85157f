"""The shared pipelined Redis connection: replies in order under concurrency, errors, reconnection, timeouts."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from history_svc.multiplex import Multiplexer
from stack.servers import RedisServer


@pytest.fixture
async def redis(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url())
    try:
        yield client
    finally:
        await client.aclose()


@contextlib.asynccontextmanager
async def open_multiplexer(client: Redis, timeout_seconds: float) -> AsyncIterator[Multiplexer]:
    """A Multiplexer on `client`'s server, closed when the block ends."""
    multiplexer = Multiplexer(client, timeout_seconds=timeout_seconds)
    try:
        yield multiplexer
    finally:
        await multiplexer.close()


async def test_concurrent_calls_get_their_own_replies(redis: Redis) -> None:
    prefix = uuid.uuid4().hex
    await redis.mset({f"{prefix}:{n}": str(n) for n in range(300)})
    async with open_multiplexer(redis, timeout_seconds=5) as multiplexer:
        replies = await asyncio.gather(*(multiplexer.execute("GET", f"{prefix}:{n}") for n in range(300)))
        assert replies == [str(n).encode() for n in range(300)]
        assert await multiplexer.execute("GET", f"{prefix}:absent") is None


async def test_error_replies_raise_and_leave_the_connection_usable(redis: Redis) -> None:
    async with open_multiplexer(redis, timeout_seconds=5) as multiplexer:
        with pytest.raises(NoScriptError):
            await multiplexer.execute("EVALSHA", "0" * 40, 0)
        with pytest.raises(ResponseError):
            await multiplexer.execute("NOT-A-COMMAND")
        assert await multiplexer.execute("EVAL", "return 7", 0) == 7


async def test_a_killed_connection_is_replaced_without_failing_the_call(redis: Redis) -> None:
    async with open_multiplexer(redis, timeout_seconds=5) as multiplexer:
        name = f"mux-{uuid.uuid4().hex[:8]}"
        await multiplexer.execute("CLIENT", "SETNAME", name)
        # CLIENT KILL returns once the connection is closed on the server: the call must
        # succeed whether the multiplexer has already seen the close or finds it now.
        await redis.execute_command("CLIENT", "KILL", "SKIPME", "yes", "TYPE", "normal")  # type: ignore[no-untyped-call]
        assert await multiplexer.execute("PING") == b"PONG"


async def test_a_reply_that_does_not_come_times_out_and_the_next_call_reconnects(redis: Redis) -> None:
    async with open_multiplexer(redis, timeout_seconds=0.3) as multiplexer:
        with pytest.raises(RedisTimeoutError):
            await multiplexer.execute("BLPOP", f"never-{uuid.uuid4().hex}", 3)
        assert await multiplexer.execute("PING") == b"PONG"


async def test_calls_fail_with_a_connection_error_when_redis_is_unreachable() -> None:
    client = Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    try:
        async with open_multiplexer(client, timeout_seconds=1) as multiplexer:
            with pytest.raises(RedisConnectionError):
                await multiplexer.execute("PING")
    finally:
        await client.aclose()
