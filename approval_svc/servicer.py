"""The gRPC servicer: translates between protobuf and the domain; domain errors pass through to the edge."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, TypeVar

from google.protobuf import message, timestamp_pb2

from approval_svc.adapters.unit_of_work import CALL_DEADLINE
from approval_svc.domain import commands
from approval_svc.domain.errors import OwnPaymentReview, PaymentNotFound, ReviewerMismatch
from approval_svc.domain.model import (
    Account,
    AccountStatus,
    DeclineReason,
    HoldReason,
    Payment,
    PaymentEvent,
)
from approval_svc.handlers import Handlers, Outcome, RequestKey
from payments.approval.v1 import approval_service_pb2 as pb
from payments.approval.v1 import approval_service_pb2_grpc as pb_grpc
from payments.type.v1 import money_pb2
from payments_common.audit import TargetOf
from payments_common.identity import Caller, NotYourAccount, current_caller
from payments_common.tokens import encode_consistency_token

S = TypeVar("S")
Q = TypeVar("Q")
R = TypeVar("R")
M = TypeVar("M", bound=message.Message)
T = TypeVar("T")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ApprovalService"].full_name


def _deadline_bound(method: Callable[[S, Q, Any], Awaitable[R]]) -> Callable[[S, Q, Any], Awaitable[R]]:
    """Hands the call's deadline to the unit of work, which waits for the database no longer.

    Domain errors are ServiceErrors: they pass through, and the server's error
    interceptor turns them into statuses.
    """

    @functools.wraps(method)
    async def wrapper(servicer: S, request: Q, context: Any) -> R:
        # Each RPC runs in a task of its own, so the deadline stays with this call.
        remaining = context.time_remaining()
        if remaining is not None:
            CALL_DEADLINE.set(asyncio.get_running_loop().time() + remaining)
        return await method(servicer, request, context)

    return wrapper


def _timestamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


def _money(currency: str, amount: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code=currency, amount_minor=amount)


# Enum fields are set by name: the stored names are the proto names without their prefix.


def _decline_reason(reason: DeclineReason | None) -> str:
    """The enum name of a decline reason; a payment not declined has DECLINE_REASON_UNSPECIFIED."""
    return f"DECLINE_REASON_{reason.value if reason else 'UNSPECIFIED'}"


def _hold_reason(reason: HoldReason | None) -> str:
    """The enum name of a hold reason; a payment never held (or held unrecorded) has HOLD_REASON_UNSPECIFIED."""
    return f"HOLD_REASON_{reason.value if reason else 'UNSPECIFIED'}"


def account_message(account: Account) -> pb.Account:
    return pb.Account(
        account_id=str(account.account_id),
        owner_name=account.owner_name,
        currency_code=account.currency,
        ledger_balance=_money(account.currency, account.ledger_balance),
        available_balance=_money(account.currency, account.available_balance),
        per_payment_limit=_money(account.currency, account.per_payment_limit),
        daily_limit=_money(account.currency, account.daily_limit),
        status=f"ACCOUNT_STATUS_{account.status.value}",
        create_time=_timestamp(account.created_at),
        update_time=_timestamp(account.updated_at),
    )


def payment_message(payment: Payment) -> pb.Payment:
    return pb.Payment(
        payment_id=str(payment.payment_id),
        payer_account_id=str(payment.payer_account_id),
        payee_account_id=str(payment.payee_account_id),
        amount=_money(payment.currency, payment.amount),
        reference=payment.reference,
        status=f"PAYMENT_STATUS_{payment.status.value}",
        decline_reason=_decline_reason(payment.decline_reason),
        create_time=_timestamp(payment.created_at),
        update_time=_timestamp(payment.updated_at),
        hold_reason=_hold_reason(payment.hold_reason),
    )


def event_message(event: PaymentEvent) -> pb.PaymentEvent:
    return pb.PaymentEvent(
        sequence=event.sequence,
        status=f"PAYMENT_STATUS_{event.status.value}",
        decline_reason=_decline_reason(event.decline_reason),
        actor=event.actor,
        note=event.note,
        event_time=_timestamp(event.created_at),
    )


def fingerprint(method: str, request: message.Message) -> bytes:
    """Identifies a request's content apart from its request_id, to tell a retry from a reuse."""
    body = type(request)()
    body.CopyFrom(request)
    body.request_id = ""  # type: ignore[attr-defined]
    return hashlib.sha256(method.encode() + b"\0" + body.SerializeToString(deterministic=True)).digest()


# Beyond this length a subject is stored as its digest, so that a key always fits an index entry.
MAX_CALLER_TEXT = 256


def caller_key(caller: Caller) -> str:
    """Who a request_id belongs to: the caller's identity source and subject (`token:operator.jane`).

    The source keeps a token's subject apart from a certificate's of the same name. A
    long subject is stored as its SHA-256 (`token#sha256:…`, a form no plain key takes).
    With authentication disabled every call is the anonymous caller's (`none:anonymous`).
    """
    source, subject = caller.identity.source.value, caller.subject
    if len(subject) > MAX_CALLER_TEXT:
        return f"{source}#sha256:{hashlib.sha256(subject.encode()).hexdigest()}"
    return f"{source}:{subject}"


def _key(method: str, request: Any, build: Callable[[T], message.Message]) -> RequestKey[T]:
    """The request's idempotency key, the caller's own; its first response, stored for retries, is what `build` makes."""

    def encode(value: T) -> bytes:
        return build(value).SerializeToString(deterministic=True)

    return RequestKey(
        caller_key(current_caller()), request.request_id, method, fingerprint(method, request), encode
    )


def _response(outcome: Outcome[T], response_type: type[M], build: Callable[[T], M]) -> M:
    if outcome.replay is not None:
        response = response_type.FromString(outcome.replay)
    else:
        assert outcome.value is not None
        response = build(outcome.value)
    # A replay gets a fresh position: the stored response was written before its own
    # commit, and any position read now is at or after that commit.
    response.consistency_token = encode_consistency_token(outcome.position)  # type: ignore[attr-defined]
    return response


def _reviewer(requested: str) -> str:
    """The reviewer of a decision: the authenticated caller (the request's, if set, must match).

    With authentication disabled the caller is anonymous, and the request names the
    reviewer, as it did before authentication existed.
    """
    caller = current_caller()
    if not caller.authenticated:
        return requested
    if requested and requested != caller.subject:
        raise ReviewerMismatch()
    return caller.subject


def _reviewer_accounts() -> frozenset[str]:
    """The accounts the reviewer's credentials bind; OwnPaymentReview when one is not an account id.

    Text that names no account cannot be compared with the payment's parties: the review
    is refused rather than let through (the rule fails closed).
    """
    accounts = current_caller().identity.accounts
    for account in accounts:
        try:
            uuid.UUID(account)
        except ValueError:
            raise OwnPaymentReview() from None
    return accounts


Review = TypeVar("Review", pb.ApprovePaymentRequest, pb.DeclinePaymentRequest)


def _as_reviewed_by(request: Review, reviewer: str) -> Review:
    """The request as the reviewer it runs as: so a retry matches whether it names the reviewer or not."""
    copy = type(request)()
    copy.CopyFrom(request)
    copy.reviewer = reviewer
    return copy


def _create_account_response(account: Account) -> pb.CreateAccountResponse:
    return pb.CreateAccountResponse(account=account_message(account))


def submit_payment_response(payment: Payment) -> pb.SubmitPaymentResponse:
    return pb.SubmitPaymentResponse(payment=payment_message(payment))


def _approve_payment_response(payment: Payment) -> pb.ApprovePaymentResponse:
    return pb.ApprovePaymentResponse(payment=payment_message(payment))


def _decline_payment_response(payment: Payment) -> pb.DeclinePaymentResponse:
    return pb.DeclinePaymentResponse(payment=payment_message(payment))


def _freeze_account_response(account: Account) -> pb.FreezeAccountResponse:
    return pb.FreezeAccountResponse(account=account_message(account))


def _unfreeze_account_response(account: Account) -> pb.UnfreezeAccountResponse:
    return pb.UnfreezeAccountResponse(account=account_message(account))


class ApprovalServicer(pb_grpc.ApprovalServiceServicer):
    """payments.approval.v1.ApprovalService on top of the handlers."""

    def __init__(self, handlers: Handlers) -> None:
        self._handlers = handlers

    @_deadline_bound
    async def CreateAccount(self, request: pb.CreateAccountRequest, context: Any) -> pb.CreateAccountResponse:
        command = commands.create_account(
            request.request_id,
            request.owner_name,
            request.currency_code,
            request.opening_balance_minor,
            request.per_payment_limit_minor,
            request.daily_limit_minor,
        )
        key = _key("CreateAccount", request, _create_account_response)
        outcome = await self._handlers.create_account(command, key)
        return _response(outcome, pb.CreateAccountResponse, _create_account_response)

    @_deadline_bound
    async def SubmitPayment(self, request: pb.SubmitPaymentRequest, context: Any) -> pb.SubmitPaymentResponse:
        command = commands.submit_payment(
            request.request_id,
            request.payer_account_id,
            request.payee_account_id,
            request.HasField("amount"),
            request.amount.currency_code,
            request.amount.amount_minor,
            request.reference,
        )
        # A customer pays from its own accounts only (to anyone's).
        current_caller().require_account(str(command.payer_account_id))
        key = _key("SubmitPayment", request, submit_payment_response)
        outcome = await self._handlers.submit_payment(command, key)
        return _response(outcome, pb.SubmitPaymentResponse, submit_payment_response)

    @_deadline_bound
    async def ApprovePayment(
        self, request: pb.ApprovePaymentRequest, context: Any
    ) -> pb.ApprovePaymentResponse:
        reviewer = _reviewer(request.reviewer)
        command = commands.review_payment(
            request.request_id,
            request.payment_id,
            reviewer,
            request.note,
            approve=True,
            reviewer_accounts=_reviewer_accounts(),
        )
        key = _key("ApprovePayment", _as_reviewed_by(request, reviewer), _approve_payment_response)
        outcome = await self._handlers.review_payment(command, key)
        return _response(outcome, pb.ApprovePaymentResponse, _approve_payment_response)

    @_deadline_bound
    async def DeclinePayment(
        self, request: pb.DeclinePaymentRequest, context: Any
    ) -> pb.DeclinePaymentResponse:
        reviewer = _reviewer(request.reviewer)
        command = commands.review_payment(
            request.request_id,
            request.payment_id,
            reviewer,
            request.note,
            approve=False,
            reviewer_accounts=_reviewer_accounts(),
        )
        key = _key("DeclinePayment", _as_reviewed_by(request, reviewer), _decline_payment_response)
        outcome = await self._handlers.review_payment(command, key)
        return _response(outcome, pb.DeclinePaymentResponse, _decline_payment_response)

    @_deadline_bound
    async def FreezeAccount(self, request: pb.FreezeAccountRequest, context: Any) -> pb.FreezeAccountResponse:
        command = commands.set_account_status(
            request.request_id, request.account_id, request.reason, AccountStatus.FROZEN
        )
        key = _key("FreezeAccount", request, _freeze_account_response)
        outcome = await self._handlers.set_account_status(command, key)
        return _response(outcome, pb.FreezeAccountResponse, _freeze_account_response)

    @_deadline_bound
    async def UnfreezeAccount(
        self, request: pb.UnfreezeAccountRequest, context: Any
    ) -> pb.UnfreezeAccountResponse:
        command = commands.set_account_status(
            request.request_id, request.account_id, request.reason, AccountStatus.ACTIVE
        )
        key = _key("UnfreezeAccount", request, _unfreeze_account_response)
        outcome = await self._handlers.set_account_status(command, key)
        return _response(outcome, pb.UnfreezeAccountResponse, _unfreeze_account_response)

    @_deadline_bound
    async def GetPayment(self, request: pb.GetPaymentRequest, context: Any) -> pb.GetPaymentResponse:
        caller = current_caller()
        try:
            payment, events = await self._handlers.get_payment(commands.payment_id(request.payment_id))
        except PaymentNotFound:
            if caller.scoped:
                raise NotYourAccount() from None  # a customer does not learn which payments exist
            raise
        caller.require_party(str(payment.payer_account_id), str(payment.payee_account_id))
        return pb.GetPaymentResponse(
            payment=payment_message(payment), events=[event_message(e) for e in events]
        )


def _payment_target(request: Any, response: Any) -> dict[str, str]:
    return {"payment_id": request.payment_id} if request is not None else {}


def _account_target(request: Any, response: Any) -> dict[str, str]:
    return {"account_id": request.account_id} if request is not None else {}


def _new_account_target(request: Any, response: Any) -> dict[str, str]:
    return {"account_id": response.account.account_id} if response is not None else {}


# The privileged methods, audited whatever their outcome, and what each acts on.
AUDITED: dict[str, TargetOf] = {
    f"/{SERVICE_NAME}/CreateAccount": _new_account_target,
    f"/{SERVICE_NAME}/ApprovePayment": _payment_target,
    f"/{SERVICE_NAME}/DeclinePayment": _payment_target,
    f"/{SERVICE_NAME}/FreezeAccount": _account_target,
    f"/{SERVICE_NAME}/UnfreezeAccount": _account_target,
}
