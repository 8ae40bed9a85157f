"""Reads of the Redis read models, and the pure rules that turn a list query into index bounds.

Every query costs a fixed number of round trips, whatever the page size: a payment is one
pipeline (view + timeline), an account one command, a page of a list two pipelines (the
index range with the account's existence, then the page's views).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis
from redis.exceptions import RedisError

from payments.readmodel.v1 import read_model_pb2
from payments_common.errors import Unavailable
from payments_common.keys import (
    CHECKPOINT_LSN_FIELD,
    TIME_DIGITS,
    VIEW_FIELD,
    KeySchema,
    parse_index_member,
)

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 500

# Index members carry the creation time in TIME_DIGITS decimal digits, so times at or
# beyond this bound (the year 2286) cannot be stored and need no bound of their own.
TIME_LIMIT_US: Final = 10**TIME_DIGITS

_CURSOR = re.compile(
    rf"\d{{{TIME_DIGITS}}}:[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}"
)

# Errors that mean "Redis cannot answer now"; everything else is a bug.
REDIS_ERRORS: Final = (RedisError, OSError)


class ReadModelUnavailable(Unavailable):
    """Redis did not answer; the call can be retried (on this or another server)."""

    def __init__(self) -> None:
        super().__init__("READ_MODEL_UNAVAILABLE", "the read models are unavailable; retry later")


class CheckpointBehind(Exception):
    """Redis's checkpoint is below the position a read asked for: its data may not include it.

    The process's known checkpoint can be ahead of Redis for a moment after Redis lost its
    data (a restart, a flush before a rebuild), so a read with a consistency token checks
    the checkpoint again in the same round trip as its data, before the data.
    """

    def __init__(self, checkpoint: int) -> None:
        super().__init__(f"checkpoint {checkpoint}")
        self.checkpoint = checkpoint


def page_size(requested: int) -> int:
    """The number of payments a page holds: 0 means the default, large values are capped."""
    if requested < 0:
        raise ValueError("page_size must not be negative")
    if requested == 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


@dataclass(frozen=True)
class ListQuery:
    """The fields of a ListPayments request that select payments; a page token is bound to them.

    `start_us` is inclusive and `end_us` exclusive, both microseconds since the epoch.
    """

    account_id: str
    direction: str
    status: int
    start_us: int | None = None
    end_us: int | None = None

    def binding(self) -> tuple[object, ...]:
        """What a page token is bound to: a token issued for another query does not decode."""
        return ("ListPayments", self.account_id, self.direction, self.status, self.start_us, self.end_us)


def is_cursor(cursor: str) -> bool:
    """Whether `cursor` has the form of an index member, as a page token must carry."""
    return _CURSOR.fullmatch(cursor) is not None


def lex_range(query: ListQuery, cursor: str | None) -> tuple[str, str] | None:
    """The (max, min) lexicographic bounds of the query's next page, or None when nothing can match.

    Pages go newest first, so the cursor (the last member already returned) is an exclusive
    upper bound: members added while a client walks the pages sort above it (they are newer)
    and never shift the pages still to come.
    """
    start, end = query.start_us, query.end_us
    if start is not None and start >= TIME_LIMIT_US:
        return None
    if end is not None and end <= 0:
        return None
    if start is not None and end is not None and start >= end:
        return None
    if cursor is not None:
        upper = "(" + cursor
    elif end is not None and end < TIME_LIMIT_US:
        # "(<end>" excludes every member "<end>:<id>", since those sort after the bare prefix.
        upper = "(" + f"{end:0{TIME_DIGITS}d}"
    else:
        upper = "+"
    lower = "[" + f"{start:0{TIME_DIGITS}d}" if start is not None and start > 0 else "-"
    return upper, lower


@dataclass(frozen=True)
class Page:
    """One page of a list: the views found, and the cursor of the next page (None on the last)."""

    views: list[read_model_pb2.PaymentView]
    next_cursor: str | None


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class ReadModel:
    """Reads the views that the replicator writes; raises ReadModelUnavailable when Redis fails."""

    def __init__(self, redis: Redis, keys: KeySchema, slot: str = "payments_read_model") -> None:
        self._redis = redis
        self._keys = keys
        self._checkpoint_key = keys.checkpoint(slot)

    def _guard(self, pipe: Any, min_lsn: int) -> None:
        """Queues the checkpoint read first, so that the data read after it includes `min_lsn`."""
        if min_lsn:
            pipe.hget(self._checkpoint_key, CHECKPOINT_LSN_FIELD)

    @staticmethod
    def _checked(replies: list[Any], min_lsn: int) -> list[Any]:
        """The replies after the guard's; raises CheckpointBehind when the checkpoint is below `min_lsn`."""
        if not min_lsn:
            return replies
        checkpoint = int(replies[0]) if replies[0] is not None else 0
        if checkpoint < min_lsn:
            raise CheckpointBehind(checkpoint)
        return replies[1:]

    async def ping(self) -> bool:
        return bool(await self._redis.ping())

    async def payment(self, payment_id: str, min_lsn: int = 0) -> read_model_pb2.PaymentView | None:
        """The payment's view with its timeline (oldest first), or None when absent."""
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                self._guard(pipe, min_lsn)
                pipe.hget(self._keys.payment(payment_id), VIEW_FIELD)
                pipe.hgetall(self._keys.payment_timeline(payment_id))
                raw_view, raw_timeline = self._checked(await pipe.execute(), min_lsn)
        except REDIS_ERRORS as error:
            raise ReadModelUnavailable() from error
        if raw_view is None:
            return None
        view = read_model_pb2.PaymentView.FromString(raw_view)
        del view.timeline[:]
        view.timeline.extend(_timeline(raw_timeline))
        return view

    async def timelines(self, payment_ids: Iterable[str]) -> dict[str, list[read_model_pb2.TimelineEntry]]:
        """The timelines of several payments in one round trip."""
        ids = list(dict.fromkeys(payment_ids))
        if not ids:
            return {}
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for payment_id in ids:
                    pipe.hgetall(self._keys.payment_timeline(payment_id))
                replies = await pipe.execute()
        except REDIS_ERRORS as error:
            raise ReadModelUnavailable() from error
        return {payment_id: _timeline(raw) for payment_id, raw in zip(ids, replies, strict=True)}

    async def account(self, account_id: str, min_lsn: int = 0) -> read_model_pb2.AccountView | None:
        try:
            if min_lsn:
                async with self._redis.pipeline(transaction=False) as pipe:
                    self._guard(pipe, min_lsn)
                    pipe.hget(self._keys.account(account_id), VIEW_FIELD)
                    (raw,) = self._checked(await pipe.execute(), min_lsn)
            else:
                raw = await self._redis.hget(self._keys.account(account_id), VIEW_FIELD)
        except REDIS_ERRORS as error:
            raise ReadModelUnavailable() from error
        return None if raw is None else read_model_pb2.AccountView.FromString(raw)

    async def account_exists(self, account_id: str) -> bool:
        try:
            return bool(await self._redis.exists(self._keys.account(account_id)))
        except REDIS_ERRORS as error:
            raise ReadModelUnavailable() from error

    async def page(self, query: ListQuery, cursor: str | None, size: int, min_lsn: int = 0) -> Page | None:
        """One page of the query, newest first; None when the account does not exist.

        A member whose view is missing (the replicator removed the payment between the
        two round trips) is skipped; the cursor still moves past it.
        """
        bounds = lex_range(query, cursor)
        index = self._keys.account_index(query.account_id, query.direction, query.status)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                self._guard(pipe, min_lsn)
                pipe.exists(self._keys.account(query.account_id))
                if bounds is not None:
                    # One extra member says whether another page follows.
                    pipe.zrange(index, bounds[0], bounds[1], desc=True, bylex=True, offset=0, num=size + 1)
                replies: list[Any] = self._checked(await pipe.execute(), min_lsn)
            if not replies[0]:
                return None
            members = [_text(member) for member in replies[1]] if bounds is not None else []
            shown = members[:size]
            raw_views: list[Any] = []
            if shown:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for member in shown:
                        pipe.hget(self._keys.payment(parse_index_member(member)[1]), VIEW_FIELD)
                    raw_views = await pipe.execute()
        except REDIS_ERRORS as error:
            raise ReadModelUnavailable() from error
        views = [read_model_pb2.PaymentView.FromString(raw) for raw in raw_views if raw is not None]
        for view in views:
            del view.timeline[:]
        return Page(views=views, next_cursor=shown[-1] if len(members) > size else None)

    async def checkpoint(self, slot: str) -> int:
        """The replicator's applied position (0 before its first checkpoint)."""
        try:
            raw = await self._redis.hget(self._keys.checkpoint(slot), CHECKPOINT_LSN_FIELD)
        except REDIS_ERRORS as error:
            raise ReadModelUnavailable() from error
        return int(raw) if raw is not None else 0


def _timeline(raw: dict[bytes, bytes]) -> list[read_model_pb2.TimelineEntry]:
    ordered = sorted(raw.items(), key=lambda item: int(item[0]))
    return [read_model_pb2.TimelineEntry.FromString(value) for _, value in ordered]
