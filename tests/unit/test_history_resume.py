"""Resume tokens of WatchPayments name the read-model version whose change stream they point into."""

from __future__ import annotations

from typing import Any

import pytest

from history_svc.changestream import Change, ChangeStream, ResumeUnavailable
from history_svc.resume import _binding, decode_resume_token, encode_resume_token
from payments.readmodel.v1 import read_model_pb2
from payments_common.keys import DEFAULT_NAMESPACE, KeySchema
from payments_common.tokens import PageTokenCodec

CODEC = PageTokenCodec(b"resume-token-secret-0123456789")
ACCOUNT = "4c0d5a4e-8e1f-4a56-9d0b-0d7c2f1e6b11"
CHANGE = Change(read_model_pb2.PaymentView(payment_id="p"), 1234, b"1700000000000-3", 2)


def test_a_token_carries_its_position_and_version() -> None:
    position = decode_resume_token(CODEC, ACCOUNT, encode_resume_token(CODEC, ACCOUNT, CHANGE, "rm:v2"))
    assert (position.lsn, position.entry_id, position.index, position.namespace) == (
        1234,
        b"1700000000000-3",
        2,
        "rm:v2",
    )


def test_a_token_issued_before_tokens_named_a_version_is_of_the_default_one() -> None:
    legacy = CODEC.encode(_binding(ACCOUNT), "1234/1700000000000-3/2")
    assert decode_resume_token(CODEC, ACCOUNT, legacy).namespace == DEFAULT_NAMESPACE


class _NoRedis:
    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"Redis was asked ({name}) about a position of another version")


async def test_a_position_in_another_versions_stream_cannot_be_resumed_from() -> None:
    """After a switch of versions, a resume token of the old one is OUT_OF_RANGE, never read in the new stream."""
    position = decode_resume_token(CODEC, ACCOUNT, encode_resume_token(CODEC, ACCOUNT, CHANGE, "rm:v1"))
    stream = ChangeStream(_NoRedis(), KeySchema("rm:v2"), "slot")  # type: ignore[arg-type]
    with pytest.raises(ResumeUnavailable) as raised:
        await stream.missed_changes(ACCOUNT, position, b"1700000000001-0", 2000)
    assert raised.value.reason == "WATCH_RESUME_UNAVAILABLE"
    assert raised.value.metadata == {"why": "read_model_switched"}
