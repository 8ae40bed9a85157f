"""Resuming a WatchPayments: resume tokens, and the changes of one account read back from the change stream."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis

from history_svc.queries import REDIS_ERRORS, ReadModelUnavailable
from history_svc.watcher import Change, parse_entry, stream_id
from payments.readmodel.v1 import read_model_pb2
from payments_common.errors import FieldViolation, InvalidArgument, OutOfRange
from payments_common.keys import KeySchema
from payments_common.tokens import PageTokenCodec, TokenError

log = logging.getLogger(__name__)

# Entries read per round trip while walking back through the stream.
CHUNK: Final = 256


class ResumeUnavailable(OutOfRange):
    """The changes after the client's position are no longer held, or cannot be shown complete."""

    def __init__(self, why: str) -> None:
        super().__init__(
            "WATCH_RESUME_UNAVAILABLE",
            "the changes since that position are no longer available; list the account's payments,"
            " then watch again without a start position",
            {"why": why},
        )


class InvalidResumeToken(InvalidArgument):
    def __init__(self) -> None:
        super().__init__(
            [FieldViolation("start_after_resume_token", "not a resume token of this account's stream")],
            reason="INVALID_RESUME_TOKEN",
        )


@dataclass(frozen=True)
class ChangePosition:
    """Where one change stands in an account's stream: its entry, that entry's checkpoint, its index."""

    lsn: int
    entry_id: bytes
    index: int


_ENTRY_ID = re.compile(rb"[0-9]{1,20}-[0-9]{1,20}")
_RESUME_VERSION = 1


def _binding(account_id: str) -> tuple[object, ...]:
    # Not the shape of any ListPayments query: a token of one never decodes as the other.
    return ("WatchPayments.resume_token", _RESUME_VERSION, account_id)


def encode_resume_token(codec: PageTokenCodec, account_id: str, change: Change) -> str:
    """The signed resume token of `change` in `account_id`'s stream."""
    return codec.encode(_binding(account_id), f"{change.lsn}/{change.entry_id.decode()}/{change.index}")


def decode_resume_token(codec: PageTokenCodec, account_id: str, token: str) -> ChangePosition:
    """The position in a resume token; InvalidResumeToken unless this server signed it for this account."""
    try:
        lsn, entry_id, index = codec.decode(_binding(account_id), token).split("/")
        if not (lsn.isdigit() and index.isdigit() and _ENTRY_ID.fullmatch(entry_id.encode())):
            raise TokenError("resume token is not a position")
        return ChangePosition(int(lsn), entry_id.encode(), int(index))
    except (TokenError, ValueError):
        raise InvalidResumeToken() from None


def _changes_of(batch: read_model_pb2.ChangeBatch, entry_id: bytes, account_id: str) -> list[Change]:
    views = [view for view in batch.payments if account_id in (view.payer_account_id, view.payee_account_id)]
    return [Change(view, batch.checkpoint_lsn, entry_id, index) for index, view in enumerate(views)]


async def missed_changes(
    redis: Redis,
    keys: KeySchema,
    account_id: str,
    after: int | ChangePosition,
    until_id: bytes | None,
    until_lsn: int,
) -> list[list[Change]]:
    """The account's changes after `after` up to the entry `until_id`, a list per batch.

    `after` is a checkpoint (a consistency token: every change of the entries up to it is
    behind the client) or one change's position (a resume token: the changes of its entry
    after it are still to come). `until_id` and `until_lsn` are where a live subscription
    begins (the entry the watcher had taken in, and its checkpoint), so the two together
    deliver every change once. The walk goes back from that entry and checks every link of
    the chain: each entry must end where the next one moved from, list all its payments, and
    not follow a rebuild. It stops at the entry that moved from the checkpoint `after`, or at
    the entry of the position `after`; when the chain breaks, passes below `after` or runs
    out (trimmed), the position cannot be resumed from.
    """
    position = after if isinstance(after, ChangePosition) else None
    after_lsn = after if isinstance(after, int) else after.lsn
    if position is None and after_lsn == until_lsn:
        return []
    if until_id is None or after_lsn > until_lsn:
        raise ResumeUnavailable("position_unknown")
    if position is not None and stream_id(position.entry_id) > stream_id(until_id):
        raise ResumeUnavailable("position_unknown")
    groups: list[list[Change]] = []
    expected = until_lsn
    upper = until_id.decode()
    first = True
    while True:
        try:
            entries: Any = await redis.xrevrange(keys.changes(), max=upper, min="-", count=CHUNK)
        except REDIS_ERRORS as error:
            raise ReadModelUnavailable() from error
        if first and (not entries or bytes(entries[0][0]) != until_id):
            raise ResumeUnavailable("stream_replaced")
        first = False
        for raw_id, fields in entries:
            entry_id = bytes(raw_id)
            batch = parse_entry(fields)
            if batch is None or batch.checkpoint_lsn != expected:
                raise ResumeUnavailable("chain_broken")
            previous = batch.previous_checkpoint_lsn
            if batch.omits_payments:
                raise ResumeUnavailable("batch_omits_payments")
            if position is not None and entry_id == position.entry_id:
                # The entry of the client's last change: the rest of it is still to come.
                changes = _changes_of(batch, entry_id, account_id)
                if batch.checkpoint_lsn != position.lsn or position.index >= len(changes):
                    raise ResumeUnavailable("position_unknown")
                groups.append(changes[position.index + 1 :])
                groups.reverse()
                return [group for group in groups if group]
            if position is not None and stream_id(entry_id) < stream_id(position.entry_id):
                raise ResumeUnavailable("position_unknown")
            if previous == 0 or previous > batch.checkpoint_lsn:
                raise ResumeUnavailable("chain_broken")
            groups.append(_changes_of(batch, entry_id, account_id))
            expected = previous
            if position is None and expected == after_lsn:
                groups.reverse()
                return [group for group in groups if group]
            if expected < after_lsn:
                raise ResumeUnavailable("position_unknown")
            upper = "(" + entry_id.decode()
        if len(entries) < CHUNK:
            raise ResumeUnavailable("trimmed")
