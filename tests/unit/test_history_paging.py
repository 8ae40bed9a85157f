"""The pure rules of the lists: page sizes, index bounds, and page tokens bound to their query."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st

from history_svc.consistency import consistency_budget
from history_svc.paging import (
    DEFAULT_PAGE_SIZE,
    HELD,
    MAX_PAGE_SIZE,
    TIME_LIMIT_US,
    InvalidPageToken,
    ListQuery,
    decode_page_token,
    encode_page_token,
    index_range,
    is_cursor,
    lex_range,
    page_size,
    queue_range,
)
from payments_common.keys import index_member
from payments_common.tokens import PageTokenCodec, TokenError

SECRET = b"a-page-token-secret-for-tests"
ACCOUNT = "6a1c5f0e-8d1b-4c1e-9d55-0c1f3c2b7a10"


def _in_range(member: str, upper: str, lower: str) -> bool:
    """What Redis's ZRANGE BYLEX REV selects with these bounds."""
    if upper != "+":
        bound = upper[1:]
        if not (member < bound if upper[0] == "(" else member <= bound):
            return False
    if lower != "-":
        bound = lower[1:]
        if not (member > bound if lower[0] == "(" else member >= bound):
            return False
    return True


def _walk(members: list[str], query: ListQuery, size: int) -> list[str]:
    """Pages through `members` the way ReadModel.page does, one bounded range per page."""
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(len(members) + 2):
        bounds = lex_range(query, cursor)
        if bounds is None:
            return seen
        found = sorted((m for m in members if _in_range(m, *bounds)), reverse=True)[: size + 1]
        seen += found[:size]
        if len(found) <= size:
            return seen
        cursor = found[size - 1]
    raise AssertionError("the walk did not end")


def test_page_size_defaults_caps_and_refuses_negative() -> None:
    assert page_size(0) == DEFAULT_PAGE_SIZE == 50
    assert page_size(1) == 1
    assert page_size(MAX_PAGE_SIZE) == MAX_PAGE_SIZE == 500
    assert page_size(10_000) == MAX_PAGE_SIZE
    with pytest.raises(ValueError, match="negative"):
        page_size(-1)


times = st.integers(min_value=0, max_value=4_000_000_000_000_000)


@given(
    st.lists(st.tuples(times, st.uuids()), max_size=40, unique_by=lambda item: item[1]),
    st.none() | times,
    st.none() | times,
    st.integers(min_value=1, max_value=7),
)
def test_walking_every_page_yields_the_range_newest_first_exactly_once(
    payments: list[tuple[int, uuid.UUID]], start: int | None, end: int | None, size: int
) -> None:
    members = [index_member(t, str(u)) for t, u in payments]
    query = ListQuery(ACCOUNT, "all", 0, start, end)
    expected = sorted(
        (
            index_member(t, str(u))
            for t, u in payments
            if (start is None or t >= start) and (end is None or t < end)
        ),
        reverse=True,
    )
    assert _walk(members, query, size) == expected


def test_payments_added_during_a_walk_neither_repeat_nor_hide_older_ones() -> None:
    members = [index_member(1_000 + i, str(uuid.UUID(int=i))) for i in range(10)]
    query = ListQuery(ACCOUNT, "all", 0)
    bounds = lex_range(query, None)
    assert bounds is not None
    first = sorted((m for m in members if _in_range(m, *bounds)), reverse=True)[:3]
    members += [index_member(5_000 + i, str(uuid.UUID(int=100 + i))) for i in range(5)]
    rest: list[str] = []
    cursor = first[-1]
    while True:
        bounds = lex_range(query, cursor)
        assert bounds is not None
        found = sorted((m for m in members if _in_range(m, *bounds)), reverse=True)[:4]
        rest += found[:3]
        if len(found) <= 3:
            break
        cursor = found[2]
    assert first + rest == sorted(members[:10], reverse=True)


@pytest.mark.parametrize(
    ("start", "end"),
    [(10, 10), (11, 10), (TIME_LIMIT_US, None), (None, 0), (None, -5)],
)
def test_empty_ranges_need_no_read(start: int | None, end: int | None) -> None:
    assert lex_range(ListQuery(ACCOUNT, "sent", 0, start, end), None) is None


def test_times_beyond_the_index_width_are_open_bounds() -> None:
    assert lex_range(ListQuery(ACCOUNT, "sent", 0, -10, TIME_LIMIT_US * 10), None) == ("+", "-")


def test_cursor_form_is_checked() -> None:
    member = index_member(1_700_000_000_000_000, str(uuid.uuid4()))
    assert is_cursor(member)
    for bad in ("", "x", member + "x", "1:" + member[17:], member.upper(), "+", "(" + member):
        assert not is_cursor(bad)


def test_page_token_is_bound_to_every_selecting_field() -> None:
    codec = PageTokenCodec(SECRET)
    query = ListQuery(ACCOUNT, "sent", 1, 10, 20)
    token = codec.encode(query.binding(), "cursor")
    assert codec.decode(query.binding(), token) == "cursor"
    others = [
        ListQuery("7a1c5f0e-8d1b-4c1e-9d55-0c1f3c2b7a10", "sent", 1, 10, 20),
        ListQuery(ACCOUNT, "received", 1, 10, 20),
        ListQuery(ACCOUNT, "sent", 2, 10, 20),
        ListQuery(ACCOUNT, "sent", 1, None, 20),
        ListQuery(ACCOUNT, "sent", 1, 10, 21),
    ]
    for other in others:
        with pytest.raises(TokenError):
            codec.decode(other.binding(), token)
    with pytest.raises(TokenError):
        PageTokenCodec(b"another-secret-of-enough-bytes").decode(query.binding(), token)


def test_a_page_reads_one_member_more_than_it_holds_and_nothing_when_the_range_is_empty() -> None:
    query = ListQuery(ACCOUNT, "sent", 0, 10, 20)
    cursor = index_member(15, str(uuid.UUID(int=1)))
    assert index_range(query, None, 5) == ("(" + f"{20:016d}", "[" + f"{10:016d}", 6)
    assert index_range(query, cursor, 1) == ("(" + cursor, "[" + f"{10:016d}", 2)
    assert index_range(ListQuery(ACCOUNT, "sent", 0, 20, 10), None, 5) == ("-", "-", 0)


def test_a_page_token_gives_back_its_cursor_for_the_same_query_only() -> None:
    codec = PageTokenCodec(SECRET)
    query = ListQuery(ACCOUNT, "all", 0)
    cursor = index_member(1_700_000_000_000_000, str(uuid.uuid4()))
    token = encode_page_token(codec, query, cursor)
    assert decode_page_token(codec, query, token) == cursor
    refused = [
        (codec, ListQuery(ACCOUNT, "sent", 0), token),
        (PageTokenCodec(b"another-secret-of-enough-bytes"), query, token),
        (codec, query, token[:-2]),
        (codec, query, "not a token"),
        # Signed for this query, but what it carries is not an index member.
        (codec, query, encode_page_token(codec, query, "+")),
    ]
    for other_codec, other_query, other_token in refused:
        with pytest.raises(InvalidPageToken) as refusal:
            decode_page_token(other_codec, other_query, other_token)
        assert refusal.value.reason == "INVALID_PAGE_TOKEN"
        assert [v.field for v in refusal.value.violations] == ["page_token"]


def _walk_queue(members: list[str], size: int, between: list[str] | None = None) -> list[str]:
    """Pages through the queue's `members` oldest first, as ReadModel.held_page does.

    `between` holds members that join the queue after the first page, one per page.
    """
    queue, arriving = list(members), list(between or [])
    seen: list[str] = []
    cursor: str | None = None
    for _ in range(len(members) + len(arriving) + 2):
        lower, count = queue_range(cursor, size)
        found = sorted(m for m in queue if lower == "-" or m > lower[1:])[:count]
        seen += found[:size]
        if len(found) <= size:
            return seen
        cursor = found[size - 1]
        if arriving:
            queue.append(arriving.pop(0))
    raise AssertionError("the walk did not end")


@given(st.sets(st.integers(0, 10**12), max_size=40), st.integers(1, 7))
def test_walking_the_queue_yields_it_oldest_first_exactly_once(stamps: set[int], size: int) -> None:
    members = [index_member(stamp, str(uuid.UUID(int=stamp))) for stamp in stamps]
    assert _walk_queue(members, size) == sorted(members)


def test_payments_held_during_a_walk_of_the_queue_come_after_the_older_ones() -> None:
    older = [index_member(stamp, str(uuid.UUID(int=stamp))) for stamp in range(1, 11)]
    newer = [index_member(stamp, str(uuid.UUID(int=stamp))) for stamp in range(100, 104)]
    seen = _walk_queue(older, 3, between=newer)
    assert seen == older + newer


def test_a_page_of_the_queue_reads_one_member_more_than_it_holds() -> None:
    cursor = index_member(15, str(uuid.UUID(int=1)))
    assert queue_range(None, 5) == ("-", 6)
    assert queue_range(cursor, 1) == ("(" + cursor, 2)


def test_a_page_token_of_the_queue_is_not_one_of_a_list_of_payments() -> None:
    codec = PageTokenCodec(SECRET)
    cursor = index_member(1_700_000_000_000_000, str(uuid.uuid4()))
    token = encode_page_token(codec, HELD, cursor)
    assert decode_page_token(codec, HELD, token) == cursor
    with pytest.raises(InvalidPageToken):
        decode_page_token(codec, ListQuery(ACCOUNT, "all", 0), token)
    with pytest.raises(InvalidPageToken):
        decode_page_token(codec, HELD, encode_page_token(codec, ListQuery(ACCOUNT, "all", 0), cursor))


@pytest.mark.parametrize(
    ("remaining", "cap", "expected"),
    [(None, 5.0, 5.0), (100.0, 5.0, 5.0), (1.0, 5.0, 0.9), (0.01, 5.0, 0.0), (0.0, 5.0, 0.0)],
)
def test_consistency_wait_stops_before_the_deadline(
    remaining: float | None, cap: float, expected: float
) -> None:
    assert consistency_budget(remaining, cap) == pytest.approx(expected)
