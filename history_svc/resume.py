"""Resume tokens of WatchPayments: the signed position of one change in an account's stream."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from payments_common.errors import FieldViolation, InvalidArgument
from payments_common.keys import DEFAULT_NAMESPACE
from payments_common.tokens import PageTokenCodec, TokenError

if TYPE_CHECKING:
    from history_svc.changestream import Change


class InvalidResumeToken(InvalidArgument):
    def __init__(self) -> None:
        super().__init__(
            [FieldViolation("start_after_resume_token", "not a resume token of this account's stream")],
            reason="INVALID_RESUME_TOKEN",
        )


@dataclass(frozen=True)
class ChangePosition:
    """Where one change stands in an account's stream: its entry, that entry's checkpoint, its index.

    `namespace` is the read-model version whose change stream holds the entry: an entry id
    means nothing in another version's stream.
    """

    lsn: int
    entry_id: bytes
    index: int
    namespace: str = DEFAULT_NAMESPACE


_ENTRY_ID = re.compile(rb"[0-9]{1,20}-[0-9]{1,20}")
_RESUME_VERSION = 1


def _binding(account_id: str) -> tuple[object, ...]:
    # Not the shape of any ListPayments query: a token of one never decodes as the other.
    return ("WatchPayments.resume_token", _RESUME_VERSION, account_id)


def encode_resume_token(codec: PageTokenCodec, account_id: str, change: Change, namespace: str) -> str:
    """The signed resume token of `change` in `account_id`'s stream of the version `namespace`."""
    return codec.encode(
        _binding(account_id), f"{change.lsn}/{change.entry_id.decode()}/{change.index}/{namespace}"
    )


def decode_resume_token(codec: PageTokenCodec, account_id: str, token: str) -> ChangePosition:
    """The position in a resume token; InvalidResumeToken unless this server signed it for this account.

    A token without a namespace was issued before tokens named one, when every server served
    the default version.
    """
    try:
        lsn, entry_id, index, *rest = codec.decode(_binding(account_id), token).split("/")
        if (
            not (lsn.isdigit() and index.isdigit() and _ENTRY_ID.fullmatch(entry_id.encode()))
            or len(rest) > 1
        ):
            raise TokenError("resume token is not a position")
        namespace = rest[0] if rest else DEFAULT_NAMESPACE
        return ChangePosition(int(lsn), entry_id.encode(), int(index), namespace)
    except (TokenError, ValueError):
        raise InvalidResumeToken() from None
