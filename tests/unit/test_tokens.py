"""Consistency and page tokens: round trips, and every alteration is refused."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from payments_common.lsn import format_lsn, parse_lsn
from payments_common.tokens import (
    PageTokenCodec,
    TokenError,
    decode_consistency_token,
    encode_consistency_token,
)

SECRET = b"0123456789abcdef-secret"


@given(st.integers(min_value=0, max_value=2**64 - 1))
def test_consistency_token_round_trips(lsn: int) -> None:
    assert decode_consistency_token(encode_consistency_token(lsn)) == lsn


@given(st.integers(min_value=0, max_value=2**64 - 1), st.data())
def test_altered_consistency_token_is_refused(lsn: int, data: st.DataObject) -> None:
    token = encode_consistency_token(lsn)
    position = data.draw(st.integers(min_value=3, max_value=len(token) - 1))
    replacement = data.draw(
        st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    )
    altered = token[:position] + replacement + token[position + 1 :]
    if altered != token:
        with pytest.raises(TokenError):
            decode_consistency_token(altered)


@pytest.mark.parametrize("token", ["", "c1.", "c2.AAAAAAAAAAAAAAAA", "garbage", "c1.!!!!", "c1." + "A" * 100])
def test_malformed_consistency_tokens_are_refused(token: str) -> None:
    with pytest.raises(TokenError):
        decode_consistency_token(token)


@given(st.text(max_size=80))
def test_page_token_round_trips(cursor: str) -> None:
    codec = PageTokenCodec(SECRET)
    query = ("acc", "sent", 1)
    assert codec.decode(query, codec.encode(query, cursor)) == cursor


def test_page_token_is_bound_to_its_query_and_secret() -> None:
    codec = PageTokenCodec(SECRET)
    token = codec.encode(("acc-1", "sent"), "cursor")
    with pytest.raises(TokenError):
        codec.decode(("acc-2", "sent"), token)
    with pytest.raises(TokenError):
        PageTokenCodec(b"another-secret-of-16b").decode(("acc-1", "sent"), token)


@given(st.binary(min_size=1, max_size=4), st.integers(min_value=0, max_value=40))
def test_altered_page_token_is_refused(noise: bytes, position: int) -> None:
    codec = PageTokenCodec(SECRET)
    token = codec.encode(("acc",), "0000001700000000:payment")
    position %= len(token)
    altered = token[:position] + noise.hex() + token[position:]
    with pytest.raises(TokenError):
        codec.decode(("acc",), altered)


def test_lsn_text_round_trips() -> None:
    assert parse_lsn("16/B374D848") == (0x16 << 32) | 0xB374D848
    assert format_lsn(parse_lsn("0/0")) == "0/0"
    assert format_lsn(parse_lsn("FFFFFFFF/FFFFFFFF")) == "FFFFFFFF/FFFFFFFF"
    for bad in ("", "12", "/1", "1/", "x/1", "123456789/0"):
        with pytest.raises(ValueError, match="LSN"):
            parse_lsn(bad)
