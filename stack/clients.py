"""Client channels to the services: one for approval, round-robin with retries over history processes."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import grpc

from payments.approval.v1 import approval_service_pb2 as approval
from payments.approval.v1 import approval_service_pb2_grpc as approval_grpc
from payments.history.v1 import history_service_pb2 as history_pb
from payments.history.v1 import history_service_pb2_grpc as history_grpc
from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import money_pb2
from stack.auth import ACCOUNTS_ADMIN, REVIEWER

HISTORY_SERVICE = "payments.history.v1.HistoryService"

# Reads are safe to retry; UNAVAILABLE covers a pod going away (and a
# consistency token not reached yet, which a retry may well find reached).
HISTORY_SERVICE_CONFIG = {
    "loadBalancingConfig": [{"round_robin": {}}],
    "methodConfig": [
        {
            "name": [{"service": HISTORY_SERVICE}],
            "retryPolicy": {
                "maxAttempts": 4,
                "initialBackoff": "0.05s",
                "maxBackoff": "1s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }
    ],
}


# A token, or a function that returns the current one (a long-lived client renews its token).
TokenSource = str | Callable[[], str]


def _bearer(token: TokenSource) -> tuple[str, str]:
    return ("authorization", f"Bearer {token() if callable(token) else token}")


def _with_bearer(details: grpc.aio.ClientCallDetails, token: TokenSource) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    metadata.add(*_bearer(token))
    return details._replace(metadata=metadata)  # type: ignore[attr-defined, no-any-return]


# Two classes, not one with both methods: a grpc.aio channel files each interceptor under
# the first kind it is an instance of, so one object would see unary-unary calls only.
class _AioUnaryBearer(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg]
    """Adds `authorization: Bearer <token>` to every unary call of an asyncio channel."""

    def __init__(self, token: TokenSource) -> None:
        self.token = token

    async def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_with_bearer(client_call_details, self.token), request)


class _AioStreamBearer(grpc.aio.UnaryStreamClientInterceptor):  # type: ignore[type-arg]
    """Adds `authorization: Bearer <token>` to every server-streaming call of an asyncio channel."""

    def __init__(self, token: TokenSource) -> None:
        self.token = token

    async def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return await continuation(_with_bearer(client_call_details, self.token), request)


def bearer_interceptors(token: TokenSource) -> list[Any]:
    """The asyncio client interceptors (unary-unary and unary-stream) that send `token` with every call."""
    return [_AioUnaryBearer(token), _AioStreamBearer(token)]


class _CallDetails(NamedTuple):
    method: str
    timeout: float | None
    metadata: Sequence[tuple[str, str | bytes]] | None
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class _SyncBearer(
    grpc.UnaryUnaryClientInterceptor,  # type: ignore[type-arg]
    grpc.UnaryStreamClientInterceptor,  # type: ignore[type-arg]
):
    """The synchronous equivalent of the asyncio interceptors, for `grpc.intercept_channel`."""

    def __init__(self, token: TokenSource) -> None:
        self.token = token

    def _details(self, details: Any) -> _CallDetails:
        return _CallDetails(
            details.method,
            details.timeout,
            [*(details.metadata or ()), _bearer(self.token)],
            details.credentials,
            getattr(details, "wait_for_ready", None),
            getattr(details, "compression", None),
        )

    def intercept_unary_unary(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation: Any, client_call_details: Any, request: Any) -> Any:
        return continuation(self._details(client_call_details), request)


def sync_bearer_interceptors(token: TokenSource) -> list[Any]:
    """The synchronous client interceptors that send `token` with every call."""
    return [_SyncBearer(token)]


def with_bearer(channel: grpc.Channel, token: TokenSource) -> grpc.Channel:
    """A synchronous channel that sends `token` with every call: `grpc.intercept_channel` with the interceptors."""
    return grpc.intercept_channel(channel, *sync_bearer_interceptors(token))


def history_target(addresses: list[str]) -> str:
    """A target that gRPC resolves to every address, e.g. "ipv4:127.0.0.1:5001,127.0.0.1:5002".

    In Kubernetes use the headless Service instead: "dns:///history-headless.payments:50052".
    """
    return "ipv4:" + ",".join(addresses)


def history_channel(
    target: str, credentials: grpc.ChannelCredentials | None = None, *, token: TokenSource | None = None
) -> grpc.aio.Channel:
    """An asyncio channel that spreads calls over every history process and retries UNAVAILABLE.

    With `credentials` (payments_common.tls.channel_credentials) the channel speaks TLS;
    with `token` every call carries it as a bearer token.
    """
    options = [
        ("grpc.service_config", json.dumps(HISTORY_SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
    ]
    interceptors = bearer_interceptors(token) if token is not None else None
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)
    return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)


def approval_channel(
    address: str, credentials: grpc.ChannelCredentials | None = None, *, token: TokenSource | None = None
) -> grpc.aio.Channel:
    """An asyncio channel to the approval service. Mutations are retried by the caller, with the same request_id.

    With `token` every call carries it as a bearer token.
    """
    interceptors = bearer_interceptors(token) if token is not None else None
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials, interceptors=interceptors)
    return grpc.aio.insecure_channel(address, interceptors=interceptors)


class Credentials(Protocol):
    """Where a client's tokens come from: one per role, and a customer's for the account it acts for."""

    def role(self, role: str) -> str: ...

    def customer(self, account_id: str) -> str: ...


def bearer_metadata(token: TokenSource) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token`, for one call: `stub.Method(request, metadata=...)`."""
    return (_bearer(token),)


class Payments:
    """The calls of a scenario (the demo, the end-to-end test), each with the token of the role that may make it.

    Accounts are opened and frozen by an accounts admin, a payment is submitted by the
    customer who pays (a token acting for the payer's account only), and a held payment is
    decided by the reviewer, whose identity the timeline records. It keeps the last
    consistency token: a read that passes `last_token` as its `min_consistency_token` sees
    every change made so far.
    """

    def __init__(
        self,
        approval_stub: approval_grpc.ApprovalServiceAsyncStub,
        history_stub: history_grpc.HistoryServiceAsyncStub,
        credentials: Credentials,
        currency: str = "EUR",
    ) -> None:
        self.approval = approval_stub
        self.history = history_stub
        self.credentials = credentials
        self.currency = currency
        self.last_token = ""

    def as_role(self, role: str) -> tuple[tuple[str, str], ...]:
        """The metadata of a call made as `role` (see stack/auth.py's ROLES)."""
        return bearer_metadata(self.credentials.role(role))

    def as_customer(self, account_id: str) -> tuple[tuple[str, str], ...]:
        """The metadata of a call made by the customer who holds `account_id`."""
        return bearer_metadata(self.credentials.customer(account_id))

    def money(self, minor: int) -> money_pb2.Money:
        return money_pb2.Money(currency_code=self.currency, amount_minor=minor)

    async def open(self, owner: str, opening: int, per_payment: int, daily: int) -> approval.Account:
        response = await self.approval.CreateAccount(
            approval.CreateAccountRequest(
                request_id=str(uuid.uuid4()),
                owner_name=owner,
                currency_code=self.currency,
                opening_balance_minor=opening,
                per_payment_limit_minor=per_payment,
                daily_limit_minor=daily,
            ),
            metadata=self.as_role(ACCOUNTS_ADMIN),
        )
        self.last_token = response.consistency_token
        return response.account

    async def pay(
        self, payer: str, payee: str, minor: int, reference: str = "", request_id: str | None = None
    ) -> approval.Payment:
        """Submits a payment as the payer's customer."""
        response = await self.approval.SubmitPayment(
            approval.SubmitPaymentRequest(
                request_id=request_id or str(uuid.uuid4()),
                payer_account_id=payer,
                payee_account_id=payee,
                amount=self.money(minor),
                reference=reference,
            ),
            metadata=self.as_customer(payer),
        )
        self.last_token = response.consistency_token
        return response.payment

    async def freeze(self, account_id: str, reason: str = "") -> None:
        response = await self.approval.FreezeAccount(
            approval.FreezeAccountRequest(request_id=str(uuid.uuid4()), account_id=account_id, reason=reason),
            metadata=self.as_role(ACCOUNTS_ADMIN),
        )
        self.last_token = response.consistency_token

    async def approve(self, payment_id: str, note: str = "") -> approval.Payment:
        """Approves a held payment as the reviewer: the token, not the request, names who decided."""
        response = await self.approval.ApprovePayment(
            approval.ApprovePaymentRequest(request_id=str(uuid.uuid4()), payment_id=payment_id, note=note),
            metadata=self.as_role(REVIEWER),
        )
        self.last_token = response.consistency_token
        return response.payment

    async def review_queue(self, page_size: int = 50) -> list[read_model_pb2.PaymentView]:
        """The payments held for review, of every account, oldest first, as the reviewer reads them.

        Every page is read with `last_token`, so the queue includes every change made so far.
        """
        views: list[read_model_pb2.PaymentView] = []
        request = history_pb.ListHeldPaymentsRequest(
            page_size=page_size, min_consistency_token=self.last_token
        )
        while True:
            page = await self.history.ListHeldPayments(request, metadata=self.as_role(REVIEWER))
            views += page.payments
            if not page.next_page_token:
                return views
            request.page_token = page.next_page_token
