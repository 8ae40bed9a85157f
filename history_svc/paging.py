"""The pure rules of the lists: page sizes, the index range of a page, and page tokens bound to their query.

ListPayments pages one account's index newest first; ListHeldPayments pages the review
queue oldest first. Both walk members "<creation µs>:<payment id>" with the last member
returned as an exclusive cursor.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final, Protocol

from payments_common.errors import FieldViolation, InvalidArgument
from payments_common.keys import TIME_DIGITS
from payments_common.tokens import PageTokenCodec, TokenError

DEFAULT_PAGE_SIZE: Final = 50
MAX_PAGE_SIZE: Final = 500

# Index members carry the creation time in TIME_DIGITS decimal digits, so times at or
# beyond this bound (the year 2286) cannot be stored and need no bound of their own.
TIME_LIMIT_US: Final = 10**TIME_DIGITS

_CURSOR = re.compile(
    rf"\d{{{TIME_DIGITS}}}:[0-9a-f]{{8}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{4}}-[0-9a-f]{{12}}"
)


class InvalidPageToken(InvalidArgument):
    """The page token was altered, signed with another secret, or belongs to another query."""

    def __init__(self) -> None:
        super().__init__(
            [FieldViolation("page_token", "not a page token of this query")],
            reason="INVALID_PAGE_TOKEN",
        )


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


@dataclass(frozen=True)
class HeldQuery:
    """A ListHeldPayments request: the review queue, which has no filter; its page tokens are bound to it."""

    def binding(self) -> tuple[object, ...]:
        return ("ListHeldPayments",)


HELD: Final = HeldQuery()


class Query(Protocol):
    """A list's query, to which its page tokens are bound."""

    def binding(self) -> tuple[object, ...]: ...


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


def index_range(query: ListQuery, cursor: str | None, size: int) -> tuple[str, str, int]:
    """What a page reads from the index, newest first: (max, min, how many members).

    One member more than the page holds says whether another page follows; the count is 0
    when the bounds match nothing, so that the read only checks that the account exists.
    """
    bounds = lex_range(query, cursor)
    if bounds is None:
        return "-", "-", 0
    return bounds[0], bounds[1], size + 1


def queue_range(cursor: str | None, size: int) -> tuple[str, int]:
    """What a page of the review queue reads, oldest first: (min, how many members).

    The cursor (the last member already returned) is an exclusive lower bound: a payment
    held later sorts above it (it is newer) and comes on a later page, and one that leaves
    the queue meanwhile shifts no member after it. One member more than the page holds says
    whether another page follows.
    """
    return ("(" + cursor if cursor is not None else "-"), size + 1


def encode_page_token(codec: PageTokenCodec, query: Query, cursor: str) -> str:
    """The signed token of the page after `cursor`, bound to the query."""
    return codec.encode(query.binding(), cursor)


def decode_page_token(codec: PageTokenCodec, query: Query, token: str) -> str:
    """The cursor in a page token; InvalidPageToken unless this deployment signed it for this query."""
    try:
        cursor = codec.decode(query.binding(), token)
    except TokenError:
        raise InvalidPageToken() from None
    if not is_cursor(cursor):
        raise InvalidPageToken()
    return cursor
