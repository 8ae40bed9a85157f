"""The HistoryService servicer: translates protobuf requests into the query side's calls, and their results into responses."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from history_svc import wire
from history_svc.changestream import Change
from history_svc.consistency import Consistency
from history_svc.paging import HELD, ListQuery, decode_page_token, encode_page_token, page_size
from history_svc.queries import Reads
from history_svc.resume import ChangePosition, decode_resume_token, encode_resume_token
from history_svc.watch import Watches
from payments.history.v1 import history_service_pb2 as pb
from payments.history.v1 import history_service_pb2_grpc
from payments_common import tracing
from payments_common.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from payments_common.identity import NotYourAccount, current_caller
from payments_common.keys import DIRECTIONS, STATUS_NAMES
from payments_common.tokens import (
    PageTokenCodec,
    TokenError,
    decode_consistency_token,
    encode_consistency_token,
)

Context = grpc.aio.ServicerContext[Any, Any]

# The read models' index directions, by the PaymentDirection value of the same name.
_DIRECTIONS = {pb.PaymentDirection.Value(f"PAYMENT_DIRECTION_{name.upper()}"): name for name in DIRECTIONS}


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


class ReadModelWithoutReviewQueue(FailedPrecondition):
    """The read-model version served was built without the review queue, so it lacks what was held before."""

    def __init__(self, namespace: str) -> None:
        super().__init__(
            "READ_MODEL_WITHOUT_REVIEW_QUEUE",
            "the read models were built without the review queue: build a read-model version with it "
            "beside this one and switch",
            {"namespace": namespace},
        )


def _min_lsn(token: str) -> int:
    """The position of a read's `min_consistency_token` (0: none)."""
    if not token:
        return 0
    try:
        return decode_consistency_token(token)
    except TokenError:
        raise InvalidArgument(
            [FieldViolation("min_consistency_token", "not a consistency token")],
            reason="INVALID_CONSISTENCY_TOKEN",
        ) from None


def serialize(response: bytes | Message) -> bytes:
    """The response serializer: GetPayment, ListPayments and ListHeldPayments answer with bytes built from Redis."""
    return response if isinstance(response, bytes) else response.SerializeToString()


class HistoryServicer(history_service_pb2_grpc.HistoryServiceServicer):
    """Answers every query from Redis; each error is a ServiceError that the interceptor maps.

    GetPayment, ListPayments and ListHeldPayments return their responses already serialized
    (see `serialize`).
    """

    def __init__(
        self, read_model: Reads, consistency: Consistency, watches: Watches, page_tokens: PageTokenCodec
    ) -> None:
        self._read_model = read_model
        self._consistency = consistency
        self._watches = watches
        self._page_tokens = page_tokens

    async def GetPayment(self, request: pb.GetPaymentRequest, context: Context) -> bytes:  # type: ignore[override]
        violations: list[FieldViolation] = []
        payment_id = _uuid("payment_id", request.payment_id, violations)
        if violations:
            raise InvalidArgument(violations)
        caller = current_caller()
        min_lsn = _min_lsn(request.min_consistency_token)
        response = await self._consistency.answer(
            lambda until: self._read_model.payment_response(payment_id, min_lsn, until),
            min_lsn,
            context,
            payment_id,
        )
        if response is None:
            if caller.scoped:
                raise NotYourAccount()  # a customer does not learn which payments exist
            raise NotFound("PAYMENT_NOT_FOUND", "no such payment", {"payment_id": payment_id})
        if caller.scoped:
            # Parsed only for a customer: everyone else gets the bytes as Redis built them.
            view = pb.GetPaymentResponse.FromString(response).payment
            caller.require_party(view.payer_account_id, view.payee_account_id)
        return response

    async def GetAccount(self, request: pb.GetAccountRequest, context: Context) -> pb.GetAccountResponse:
        violations: list[FieldViolation] = []
        account_id = _uuid("account_id", request.account_id, violations)
        if violations:
            raise InvalidArgument(violations)
        current_caller().require_account(account_id)
        min_lsn = _min_lsn(request.min_consistency_token)
        view = await self._consistency.answer(
            lambda until: self._read_model.account(account_id, min_lsn, until), min_lsn, context
        )
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
        current_caller().require_account(account_id)
        query = ListQuery(account_id, direction, request.status, start_us, end_us)
        cursor = (
            decode_page_token(self._page_tokens, query, request.page_token) if request.page_token else None
        )
        min_lsn = _min_lsn(request.min_consistency_token)
        page = await self._consistency.answer(
            lambda until: self._read_model.page(query, cursor, size, min_lsn, until), min_lsn, context
        )
        if page is None:
            raise NotFound("ACCOUNT_NOT_FOUND", "no such account", {"account_id": account_id})
        token = (
            "" if page.next_cursor is None else encode_page_token(self._page_tokens, query, page.next_cursor)
        )
        return wire.list_payments_response(page.payments, token)

    async def ListHeldPayments(self, request: pb.ListHeldPaymentsRequest, context: Context) -> bytes:  # type: ignore[override]
        try:
            size = page_size(request.page_size)
        except ValueError:
            raise InvalidArgument([FieldViolation("page_size", "must not be negative")]) from None
        # The queue spans every account: a policy may not give this method to a customer role
        # (history_svc/config.py), and a call scoped to a customer's accounts is refused anyway.
        if current_caller().scoped:
            raise NotYourAccount()
        cursor = (
            decode_page_token(self._page_tokens, HELD, request.page_token) if request.page_token else None
        )
        min_lsn = _min_lsn(request.min_consistency_token)
        page = await self._consistency.answer(
            lambda until: self._read_model.held_page(cursor, size, min_lsn, until), min_lsn, context
        )
        if page is None:
            raise ReadModelWithoutReviewQueue(self._read_model.namespace)
        token = (
            "" if page.next_cursor is None else encode_page_token(self._page_tokens, HELD, page.next_cursor)
        )
        position = encode_consistency_token(page.checkpoint) if page.checkpoint else ""
        return wire.list_held_payments_response(page.payments, token, position)

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
        current_caller().require_account(account_id)
        if request.start_after_resume_token:
            after = decode_resume_token(self._page_tokens, account_id, request.start_after_resume_token)
        await self._consistency.synced(context)
        if after is not None:
            await self._consistency.reach_head(
                after.lsn if isinstance(after, ChangePosition) else after, context
            )
        watch = await self._watches.open(account_id, after)
        try:
            # Tells the client that the stream is established: every change applied from now on follows.
            await context.send_initial_metadata(())
            for group in watch.backlog:
                for change in group:
                    yield self._watch_response(account_id, change)
            async for change in watch.subscription:
                yield self._watch_response(account_id, change)
        finally:
            watch.close()

    def _watch_response(self, account_id: str, change: Change) -> pb.WatchPaymentsResponse:
        if change.trace is not None and tracing.active():
            # The delivery joins the trace of the transaction that made the change.
            tracing.delivered(change.trace, change.view.payment_id, change.lsn)
        return pb.WatchPaymentsResponse(
            payment=change.view,
            consistency_token=encode_consistency_token(change.lsn),
            resume_token=encode_resume_token(
                self._page_tokens, account_id, change, self._read_model.namespace
            ),
        )
