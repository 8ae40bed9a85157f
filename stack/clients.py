"""Client channels to the services: one for approval, round-robin with retries over history processes."""

from __future__ import annotations

import json
import uuid

import grpc

from payments.approval.v1 import approval_service_pb2 as approval
from payments.approval.v1 import approval_service_pb2_grpc as approval_grpc
from payments.history.v1 import history_service_pb2_grpc as history_grpc
from payments.type.v1 import money_pb2

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


def history_target(addresses: list[str]) -> str:
    """A target that gRPC resolves to every address, e.g. "ipv4:127.0.0.1:5001,127.0.0.1:5002".

    In Kubernetes use the headless Service instead: "dns:///history-headless.payments:50052".
    """
    return "ipv4:" + ",".join(addresses)


def history_channel(target: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """An asyncio channel that spreads calls over every history process and retries UNAVAILABLE.

    With `credentials` (payments_common.tls.channel_credentials) the channel speaks TLS.
    """
    options = [
        ("grpc.service_config", json.dumps(HISTORY_SERVICE_CONFIG)),
        ("grpc.enable_retries", 1),
    ]
    if credentials is not None:
        return grpc.aio.secure_channel(target, credentials, options=options)
    return grpc.aio.insecure_channel(target, options=options)


def approval_channel(address: str, credentials: grpc.ChannelCredentials | None = None) -> grpc.aio.Channel:
    """An asyncio channel to the approval service. Mutations are retried by the caller, with the same request_id."""
    if credentials is not None:
        return grpc.aio.secure_channel(address, credentials)
    return grpc.aio.insecure_channel(address)


class Payments:
    """The calls of a scenario (the demo, the end-to-end test), keeping the last consistency token.

    A read that passes `last_token` as its `min_consistency_token` sees every change made so far.
    """

    def __init__(
        self,
        approval_stub: approval_grpc.ApprovalServiceAsyncStub,
        history_stub: history_grpc.HistoryServiceAsyncStub,
        currency: str = "EUR",
    ) -> None:
        self.approval = approval_stub
        self.history = history_stub
        self.currency = currency
        self.last_token = ""

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
            )
        )
        self.last_token = response.consistency_token
        return response.account

    async def pay(
        self, payer: str, payee: str, minor: int, reference: str = "", request_id: str | None = None
    ) -> approval.Payment:
        response = await self.approval.SubmitPayment(
            approval.SubmitPaymentRequest(
                request_id=request_id or str(uuid.uuid4()),
                payer_account_id=payer,
                payee_account_id=payee,
                amount=self.money(minor),
                reference=reference,
            )
        )
        self.last_token = response.consistency_token
        return response.payment
