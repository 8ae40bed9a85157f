"""The HistoryService servicer: translates between protobuf requests and the read models."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message
from prometheus_client import Counter
from redis.asyncio import Redis

from history_svc.queries import (
    CheckpointBehind,
    ListQuery,
    ReadModel,
    ReadModelUnavailable,
    is_cursor,
    page_size,
)
from history_svc.resume import ChangePosition, decode_resume_token, encode_resume_token, missed_changes
from history_svc.watcher import Change, ChangeWatcher
from payments.history.v1 import history_service_pb2 as pb
from payments.history.v1 import history_service_pb2_grpc
from payments_common.errors import FieldViolation, InvalidArgument, NotFound, Unavailable
from payments_common.keys import STATUS_NAMES, KeySchema
from payments_common.lsn import format_lsn
from payments_common.tokens import (
    PageTokenCodec,
    TokenError,
    decode_consistency_token,
    encode_consistency_token,
)

Context = grpc.aio.ServicerContext[Any, Any]
T = TypeVar("T")

CONSISTENCY_READS = Counter(
    "history_consistency_reads_total",
    "Reads with a consistency token, by outcome: at once, after waiting, or not reached.",
    ["outcome"],
)

_DIRECTIONS = {
    pb.PAYMENT_DIRECTION_SENT: "sent",
    pb.PAYMENT_DIRECTION_RECEIVED: "received",
    pb.PAYMENT_DIRECTION_ALL: "all",
}


def consistency_budget(time_remaining: float | None, cap: float) -> float:
    """How long a read may wait for its token: the cap, or less when the deadline is nearer.

    A margin before the deadline leaves time for the failure to reach the client as
    CONSISTENCY_NOT_REACHED rather than as the client's own DEADLINE_EXCEEDED.
    """
    if time_remaining is None:
        return cap
    margin = min(0.25, max(0.05, time_remaining * 0.1))
    return max(0.0, min(cap, time_remaining - margin))


def _uuid(field: str, value: str, violations: list[FieldViolation]) -> str:
    if not value:
        violations.append(FieldViolation(field, "required"))
        return ""
    try:
        return str(uuid.UUID(value))
    except ValueError:
        violations.append(FieldViolation(field, "must be a UUID"))
        return ""


def _micros(field: str, stamp: timestamp_pb2.Timestamp, violations: list[FieldViolation]) -> int:
    if not 0 <= stamp.nanos < 1_000_000_000 or not -62135596800 <= stamp.seconds <= 253402300799:
        violations.append(FieldViolation(field, "must be a valid timestamp"))
        return 0
    # Rounded up: a start of x.0000005 s must not include a payment at x.000000 s.
    return stamp.seconds * 1_000_000 + (stamp.nanos + 999) // 1000


def serialize(response: bytes | Message) -> bytes:
    """The response serializer: GetPayment and ListPayments answer with bytes built from Redis."""
    return response if isinstance(response, bytes) else response.SerializeToString()


def _length_delimited(key: bytes, value: bytes) -> bytes:
    """A protobuf length-delimited field whose varint length is written here."""
    size = len(value)
    prefix = bytearray(key)
    while size >= 0x80:
        prefix.append(size & 0x7F | 0x80)
        size >>= 7
    prefix.append(size)
    return bytes(prefix) + value


# ListPaymentsResponse.next_page_token is field 2, length-delimited.
_NEXT_PAGE_TOKEN_KEY = b"\x12"


class HistoryServicer(history_service_pb2_grpc.HistoryServiceServicer):
    """Answers every query from Redis; each error is a ServiceError that the interceptor maps.

    GetPayment and ListPayments return their responses already serialized (see `serialize`).
    """

    def __init__(
        self,
        read_model: ReadModel,
        watcher: ChangeWatcher,
        page_tokens: PageTokenCodec,
        consistency_wait_max_s: float,
        watch_queue_size: int,
        stream_redis: Redis,
        keys: KeySchema,
    ) -> None:
        self._watch_redis = stream_redis
        self._keys = keys
        self._read_model = read_model
        self._watcher = watcher
        self._page_tokens = page_tokens
        self._consistency_wait_max_s = consistency_wait_max_s
        self._watch_queue_size = watch_queue_size

    async def GetPayment(self, request: pb.GetPaymentRequest, context: Context) -> bytes:  # type: ignore[override]
        violations: list[FieldViolation] = []
        payment_id = _uuid("payment_id", request.payment_id, violations)
        if violations:
            raise InvalidArgument(violations)
        min_lsn = await self._await_consistency(request.min_consistency_token, context)
        response = await self._read(self._read_model.payment_response(payment_id, min_lsn), min_lsn)
        if response is None:
            raise NotFound("PAYMENT_NOT_FOUND", "no such payment", {"payment_id": payment_id})
        return response

    async def GetAccount(self, request: pb.GetAccountRequest, context: Context) -> pb.GetAccountResponse:
        violations: list[FieldViolation] = []
        account_id = _uuid("account_id", request.account_id, violations)
        if violations:
            raise InvalidArgument(violations)
        min_lsn = await self._await_consistency(request.min_consistency_token, context)
        view = await self._read(self._read_model.account(account_id, min_lsn), min_lsn)
        if view is None:
            raise NotFound("ACCOUNT_NOT_FOUND", "no such account", {"account_id": account_id})
        return pb.GetAccountResponse(account=view)

    async def ListPayments(self, request: pb.ListPaymentsRequest, context: Context) -> bytes:  # type: ignore[override]
        violations: list[FieldViolation] = []
        account_id = _uuid("account_id", request.account_id, violations)
        direction = _DIRECTIONS.get(request.direction)
        if direction is None:
            violations.append(FieldViolation("direction", "must be SENT, RECEIVED or ALL"))
        if request.status not in STATUS_NAMES:
            violations.append(FieldViolation("status", "unknown payment status"))
        start_us = (
            _micros("start_time", request.start_time, violations) if request.HasField("start_time") else None
        )
        end_us = _micros("end_time", request.end_time, violations) if request.HasField("end_time") else None
        if start_us is not None and end_us is not None and start_us >= end_us and not violations:
            violations.append(FieldViolation("end_time", "must be after start_time"))
        size = 0
        try:
            size = page_size(request.page_size)
        except ValueError:
            violations.append(FieldViolation("page_size", "must not be negative"))
        if violations or direction is None:
            raise InvalidArgument(violations)
        query = ListQuery(account_id, direction, request.status, start_us, end_us)
        cursor = None
        if request.page_token:
            try:
                cursor = self._page_tokens.decode(query.binding(), request.page_token)
            except TokenError:
                cursor = None
            if cursor is None or not is_cursor(cursor):
                raise InvalidArgument(
                    [FieldViolation("page_token", "not a page token of this query")],
                    reason="INVALID_PAGE_TOKEN",
                )
        min_lsn = await self._await_consistency(request.min_consistency_token, context)
        page = await self._read(self._read_model.page(query, cursor, size, min_lsn), min_lsn)
        if page is None:
            raise NotFound("ACCOUNT_NOT_FOUND", "no such account", {"account_id": account_id})
        if page.next_cursor is None:
            return page.payments
        token = self._page_tokens.encode(query.binding(), page.next_cursor)
        return page.payments + _length_delimited(_NEXT_PAGE_TOKEN_KEY, token.encode())

    async def WatchPayments(
        self, request: pb.WatchPaymentsRequest, context: Context
    ) -> AsyncIterator[pb.WatchPaymentsResponse]:
        violations: list[FieldViolation] = []
        account_id = _uuid("account_id", request.account_id, violations)
        after: int | ChangePosition | None = None
        if request.start_after_consistency_token:
            try:
                after = decode_consistency_token(request.start_after_consistency_token)
            except TokenError:
                raise InvalidArgument(
                    [FieldViolation("start_after_consistency_token", "not a consistency token")],
                    reason="INVALID_CONSISTENCY_TOKEN",
                ) from None
            if request.start_after_resume_token:
                violations.append(
                    FieldViolation(
                        "start_after_resume_token", "must not be set with start_after_consistency_token"
                    )
                )
        if violations:
            raise InvalidArgument(violations)
        if request.start_after_resume_token:
            after = decode_resume_token(self._page_tokens, account_id, request.start_after_resume_token)
        budget = consistency_budget(context.time_remaining(), self._consistency_wait_max_s)
        if not await self._watcher.wait_synced(budget):
            raise ReadModelUnavailable()
        after_lsn = after.lsn if isinstance(after, ChangePosition) else after
        if after_lsn is not None and self._watcher.head < after_lsn:
            await self._await_lsn(after_lsn, context)
            if self._watcher.head < after_lsn:
                raise _not_reached(after_lsn, self._watcher.head)
        # Subscribed before the existence check and the backlog, so that no change falls
        # between them: the backlog ends at the entry where the subscription begins.
        subscription = self._watcher.subscribe(account_id, self._watch_queue_size)
        try:
            if not await self._read_model.account_exists(account_id):
                raise NotFound("ACCOUNT_NOT_FOUND", "no such account", {"account_id": account_id})
            backlog: list[list[Change]] = []
            if after is not None:
                backlog = await missed_changes(
                    self._watch_redis,
                    self._keys,
                    account_id,
                    after,
                    subscription.after_id,
                    subscription.after_lsn,
                )
                await self._fill_timelines([change for group in backlog for change in group])
            # Tells the client that the stream is established: every change applied from now on follows.
            await context.send_initial_metadata(())
            for group in backlog:
                for change in group:
                    yield self._watch_response(account_id, change)
            async for change in subscription:
                yield self._watch_response(account_id, change)
        finally:
            self._watcher.unsubscribe(subscription)

    def _watch_response(self, account_id: str, change: Change) -> pb.WatchPaymentsResponse:
        return pb.WatchPaymentsResponse(
            payment=change.view,
            consistency_token=encode_consistency_token(change.lsn),
            resume_token=encode_resume_token(self._page_tokens, account_id, change),
        )

    async def _fill_timelines(self, changes: list[Change]) -> None:
        """Adds their timelines to the views read back from the stream that carry none."""
        missing = [change.view.payment_id for change in changes if not change.view.timeline]
        if not missing:
            return
        found = await self._read_model.timelines(missing)
        for change in changes:
            if not change.view.timeline and change.view.payment_id in found:
                change.view.timeline.extend(found[change.view.payment_id])

    @staticmethod
    async def _read(read: Awaitable[T], min_lsn: int) -> T:
        """Runs a read that checked Redis's checkpoint; below the token it is CONSISTENCY_NOT_REACHED."""
        try:
            return await read
        except CheckpointBehind as behind:
            CONSISTENCY_READS.labels("behind_in_redis").inc()
            raise _not_reached(min_lsn, behind.checkpoint) from None

    async def _await_consistency(self, token: str, context: Context) -> int:
        """Waits until the known checkpoint reaches the token; returns its position (0: no token)."""
        if not token:
            return 0
        try:
            lsn = decode_consistency_token(token)
        except TokenError:
            raise InvalidArgument(
                [FieldViolation("min_consistency_token", "not a consistency token")],
                reason="INVALID_CONSISTENCY_TOKEN",
            ) from None
        return await self._await_lsn(lsn, context)

    async def _await_lsn(self, lsn: int, context: Context) -> int:
        """Waits until the known checkpoint reaches `lsn`; returns it."""
        if self._watcher.checkpoint >= lsn:
            CONSISTENCY_READS.labels("immediate").inc()
            return lsn
        budget = consistency_budget(context.time_remaining(), self._consistency_wait_max_s)
        if await self._watcher.wait_for(lsn, budget):
            CONSISTENCY_READS.labels("waited").inc()
            return lsn
        CONSISTENCY_READS.labels("not_reached").inc()
        if not self._watcher.connected:
            raise ReadModelUnavailable()
        raise _not_reached(lsn, self._watcher.checkpoint)


def _not_reached(lsn: int, checkpoint: int) -> Unavailable:
    return Unavailable(
        "CONSISTENCY_NOT_REACHED",
        "the read models do not include the requested write yet; retry later",
        {"min_lsn": format_lsn(lsn), "checkpoint_lsn": format_lsn(checkpoint)},
    )
