"""Reads back from the change stream the changes of one account that a resumed WatchPayments missed."""

from __future__ import annotations

import logging
from typing import Any, Final

import grpc
from redis.asyncio import Redis

from history_svc.queries import REDIS_ERRORS, ReadModelUnavailable
from history_svc.watcher import Change, parse_entry
from payments.readmodel.v1 import read_model_pb2
from payments_common.errors import ServiceError
from payments_common.keys import KeySchema

log = logging.getLogger(__name__)

# Entries read per round trip while walking back through the stream.
CHUNK: Final = 256


class ResumeUnavailable(ServiceError):
    """The changes after the client's position are no longer held, or cannot be shown complete."""

    code = grpc.StatusCode.OUT_OF_RANGE

    def __init__(self, why: str) -> None:
        super().__init__(
            "WATCH_RESUME_UNAVAILABLE",
            "the changes since that position are no longer available; list the account's payments,"
            " then watch again without a start position",
            {"why": why},
        )


def _changes_of(batch: read_model_pb2.ChangeBatch, account_id: str) -> list[Change]:
    return [
        Change(view=view, lsn=batch.checkpoint_lsn)
        for view in batch.payments
        if account_id in (view.payer_account_id, view.payee_account_id)
    ]


async def missed_changes(
    redis: Redis,
    keys: KeySchema,
    account_id: str,
    after_lsn: int,
    until_id: bytes | None,
    until_lsn: int,
) -> list[list[Change]]:
    """The account's changes after position `after_lsn` up to the entry `until_id`, a list per batch.

    `until_id` and `until_lsn` are where a live subscription begins (the entry the watcher
    had taken in, and its checkpoint), so the two together deliver every change once. The
    walk goes back from that entry and checks every link of the chain: each entry must end
    where the next one moved from, list all its payments, and not follow a rebuild. It stops
    at the entry that moved from `after_lsn`; when the chain breaks, passes below `after_lsn`
    or runs out (trimmed), the position cannot be resumed from.
    """
    if after_lsn == until_lsn:
        return []
    if until_id is None or after_lsn > until_lsn:
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
        for entry_id, fields in entries:
            batch = parse_entry(fields)
            if batch is None or batch.checkpoint_lsn != expected:
                raise ResumeUnavailable("chain_broken")
            previous = batch.previous_checkpoint_lsn
            if batch.omits_payments:
                raise ResumeUnavailable("batch_omits_payments")
            if previous == 0 or previous > batch.checkpoint_lsn:
                raise ResumeUnavailable("chain_broken")
            groups.append(_changes_of(batch, account_id))
            expected = previous
            if expected == after_lsn:
                groups.reverse()
                return [group for group in groups if group]
            if expected < after_lsn:
                raise ResumeUnavailable("position_unknown")
            upper = "(" + bytes(entry_id).decode()
        if len(entries) < CHUNK:
            raise ResumeUnavailable("trimmed")
