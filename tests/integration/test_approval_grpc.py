"""The approval service over gRPC on a free port: every RPC, every error path with its reason, health, reflection."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from approval_svc.migrate import upgrade
from approval_svc.servicer import SERVICE_NAME
from payments.approval.v1 import approval_service_pb2 as pb
from payments.type.v1 import money_pb2, payment_pb2
from payments_common.grpcstatus import bad_request, error_info
from payments_common.tokens import decode_consistency_token
from stack.servers import PostgresServer
from tests.support.approval import RunningServer, running_server
from tests.support.auth import SERVICE_SUBJECT
from tests.support.waiting import eventually

THRESHOLD = 5_000


@pytest.fixture(scope="module")
async def svc(postgres_server: PostgresServer) -> AsyncIterator[RunningServer]:
    """One server and database for the module: each test opens accounts of its own."""
    name = f"approval_grpc_{uuid.uuid4().hex[:8]}"
    dsn = postgres_server.create_database(name)
    try:
        upgrade(dsn)
        async with running_server(dsn, review_threshold=THRESHOLD) as running:
            yield running
    finally:
        postgres_server.drop_database(name)


def rid() -> str:
    return uuid.uuid4().hex


def eur(amount: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="EUR", amount_minor=amount)


async def open_account(svc: RunningServer, opening: int = 10_000, currency: str = "EUR") -> pb.Account:
    response = await svc.stub.CreateAccount(
        pb.CreateAccountRequest(
            request_id=rid(),
            owner_name="Ada",
            currency_code=currency,
            opening_balance_minor=opening,
            per_payment_limit_minor=8_000,
            daily_limit_minor=20_000,
        )
    )
    return response.account


async def submit(
    svc: RunningServer, payer: pb.Account, payee: pb.Account, amount: int
) -> pb.SubmitPaymentResponse:
    return await svc.stub.SubmitPayment(
        pb.SubmitPaymentRequest(
            request_id=rid(),
            payer_account_id=payer.account_id,
            payee_account_id=payee.account_id,
            amount=eur(amount),
            reference="invoice 7",
        )
    )


async def fails(call: Awaitable[Any], code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    assert raised.value.code() == code
    info = error_info(raised.value)
    assert info is not None
    assert info.reason == reason
    return raised.value


async def test_a_payment_life_cycle(svc: RunningServer) -> None:
    payer, payee = await open_account(svc), await open_account(svc, opening=0)
    assert payer.status == payment_pb2.ACCOUNT_STATUS_ACTIVE
    assert payer.available_balance == eur(10_000)

    approved = await submit(svc, payer, payee, 1_000)
    assert approved.payment.status == payment_pb2.PAYMENT_STATUS_APPROVED
    assert approved.payment.decline_reason == payment_pb2.DECLINE_REASON_UNSPECIFIED
    assert approved.payment.reference == "invoice 7"
    assert approved.payment.hold_reason == payment_pb2.HOLD_REASON_UNSPECIFIED

    held = await submit(svc, payer, payee, THRESHOLD)
    assert held.payment.status == payment_pb2.PAYMENT_STATUS_PENDING_REVIEW
    assert held.payment.hold_reason == payment_pb2.HOLD_REASON_AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD

    declined = await submit(svc, payer, payee, 4_001)
    assert declined.payment.status == payment_pb2.PAYMENT_STATUS_DECLINED
    assert declined.payment.decline_reason == payment_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS

    reviewed = await svc.stub.ApprovePayment(
        pb.ApprovePaymentRequest(request_id=rid(), payment_id=held.payment.payment_id, note="ok")
    )
    assert reviewed.payment.status == payment_pb2.PAYMENT_STATUS_APPROVED
    assert reviewed.payment.hold_reason == payment_pb2.HOLD_REASON_AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD

    tokens = [decode_consistency_token(r.consistency_token) for r in (approved, held, declined, reviewed)]
    assert tokens == sorted(tokens)

    got = await svc.stub.GetPayment(pb.GetPaymentRequest(payment_id=held.payment.payment_id))
    assert got.payment == reviewed.payment
    assert [(e.sequence, e.status, e.actor, e.note) for e in got.events] == [
        (1, payment_pb2.PAYMENT_STATUS_PENDING_REVIEW, "system", ""),
        # The reviewer, and the actor of the decision, is the authenticated caller.
        (2, payment_pb2.PAYMENT_STATUS_APPROVED, SERVICE_SUBJECT, "ok"),
    ]

    rest = await submit(svc, payer, payee, 4_000)
    assert rest.payment.status == payment_pb2.PAYMENT_STATUS_APPROVED
    empty = await submit(svc, payer, payee, 1)
    assert empty.payment.decline_reason == payment_pb2.DECLINE_REASON_INSUFFICIENT_FUNDS


async def test_decline_by_reviewer_and_freeze(svc: RunningServer) -> None:
    payer, payee = await open_account(svc), await open_account(svc)
    held = await submit(svc, payer, payee, 6_000)
    declined = await svc.stub.DeclinePayment(
        pb.DeclinePaymentRequest(request_id=rid(), payment_id=held.payment.payment_id)
    )
    assert declined.payment.decline_reason == payment_pb2.DECLINE_REASON_DECLINED_BY_REVIEWER
    await fails(
        svc.stub.DeclinePayment(
            pb.DeclinePaymentRequest(request_id=rid(), payment_id=held.payment.payment_id)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PAYMENT_NOT_UNDER_REVIEW",
    )
    await fails(
        svc.stub.ApprovePayment(
            pb.ApprovePaymentRequest(request_id=rid(), payment_id=held.payment.payment_id)
        ),
        grpc.StatusCode.FAILED_PRECONDITION,
        "PAYMENT_NOT_UNDER_REVIEW",
    )

    frozen = await svc.stub.FreezeAccount(
        pb.FreezeAccountRequest(request_id=rid(), account_id=payee.account_id)
    )
    assert frozen.account.status == payment_pb2.ACCOUNT_STATUS_FROZEN
    again = await svc.stub.FreezeAccount(
        pb.FreezeAccountRequest(request_id=rid(), account_id=payee.account_id)
    )
    assert again.account == frozen.account
    blocked = await submit(svc, payer, payee, 10)
    assert blocked.payment.decline_reason == payment_pb2.DECLINE_REASON_ACCOUNT_FROZEN
    active = await svc.stub.UnfreezeAccount(
        pb.UnfreezeAccountRequest(request_id=rid(), account_id=payee.account_id, reason="cleared")
    )
    assert active.account.status == payment_pb2.ACCOUNT_STATUS_ACTIVE
    assert (await submit(svc, payer, payee, 10)).payment.status == payment_pb2.PAYMENT_STATUS_APPROVED

    usd = await open_account(svc, currency="USD")
    mismatch = await submit(svc, payer, usd, 10)
    assert mismatch.payment.decline_reason == payment_pb2.DECLINE_REASON_CURRENCY_MISMATCH
    too_big = await submit(svc, payer, payee, 8_001)
    assert too_big.payment.decline_reason == payment_pb2.DECLINE_REASON_PER_PAYMENT_LIMIT_EXCEEDED


async def test_a_retry_returns_the_first_response(svc: RunningServer) -> None:
    payer, payee = await open_account(svc), await open_account(svc)
    request = pb.SubmitPaymentRequest(
        request_id="retry-1",
        payer_account_id=payer.account_id,
        payee_account_id=payee.account_id,
        amount=eur(5),
    )
    first = await svc.stub.SubmitPayment(request)
    again = await svc.stub.SubmitPayment(request)
    assert again.payment == first.payment
    assert decode_consistency_token(again.consistency_token) >= decode_consistency_token(
        first.consistency_token
    )

    changed = pb.SubmitPaymentRequest()
    changed.CopyFrom(request)
    changed.amount.amount_minor = 6
    await fails(svc.stub.SubmitPayment(changed), grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    await fails(
        svc.stub.FreezeAccount(pb.FreezeAccountRequest(request_id="retry-1", account_id=payer.account_id)),
        grpc.StatusCode.ALREADY_EXISTS,
        "REQUEST_ID_REUSED",
    )

    create = pb.CreateAccountRequest(
        request_id="retry-2",
        owner_name="Bo",
        currency_code="JPY",
        per_payment_limit_minor=1,
        daily_limit_minor=1,
    )
    account = await svc.stub.CreateAccount(create)
    assert (await svc.stub.CreateAccount(create)).account == account.account


def _valid_submit(**overrides: Any) -> pb.SubmitPaymentRequest:
    fields: dict[str, Any] = {
        "request_id": rid(),
        "payer_account_id": str(uuid.uuid4()),
        "payee_account_id": str(uuid.uuid4()),
        "amount": eur(10),
    }
    fields.update(overrides)
    return pb.SubmitPaymentRequest(**fields)


def _valid_create(**overrides: Any) -> pb.CreateAccountRequest:
    fields: dict[str, Any] = {
        "request_id": rid(),
        "owner_name": "Ada",
        "currency_code": "EUR",
        "per_payment_limit_minor": 10,
        "daily_limit_minor": 10,
    }
    fields.update(overrides)
    return pb.CreateAccountRequest(**fields)


SAME = str(uuid.uuid4())

INVALID: list[tuple[str, str, Any, str]] = [
    ("CreateAccount", "no request id", _valid_create(request_id=""), "request_id"),
    ("CreateAccount", "long request id", _valid_create(request_id="r" * 65), "request_id"),
    ("CreateAccount", "no owner", _valid_create(owner_name=""), "owner_name"),
    ("CreateAccount", "long owner", _valid_create(owner_name="x" * 201), "owner_name"),
    ("CreateAccount", "unknown currency", _valid_create(currency_code="EUX"), "currency_code"),
    ("CreateAccount", "lower-case currency", _valid_create(currency_code="eur"), "currency_code"),
    ("CreateAccount", "negative opening", _valid_create(opening_balance_minor=-1), "opening_balance_minor"),
    ("CreateAccount", "zero limit", _valid_create(per_payment_limit_minor=0), "per_payment_limit_minor"),
    ("CreateAccount", "negative daily", _valid_create(daily_limit_minor=-(2**63)), "daily_limit_minor"),
    ("SubmitPayment", "no payer", _valid_submit(payer_account_id=""), "payer_account_id"),
    ("SubmitPayment", "bad payee", _valid_submit(payee_account_id="42"), "payee_account_id"),
    (
        "SubmitPayment",
        "self",
        _valid_submit(payer_account_id=SAME, payee_account_id=SAME),
        "payee_account_id",
    ),
    ("SubmitPayment", "no amount", pb.SubmitPaymentRequest(request_id="r", payer_account_id=SAME), "amount"),
    ("SubmitPayment", "zero", _valid_submit(amount=eur(0)), "amount.amount_minor"),
    ("SubmitPayment", "negative", _valid_submit(amount=eur(-5)), "amount.amount_minor"),
    (
        "SubmitPayment",
        "currency",
        _valid_submit(amount=money_pb2.Money(amount_minor=5)),
        "amount.currency_code",
    ),
    ("SubmitPayment", "reference", _valid_submit(reference="r" * 141), "reference"),
    ("SubmitPayment", "nul", _valid_submit(reference="a\x00b"), "reference"),
    ("ApprovePayment", "no id", pb.ApprovePaymentRequest(request_id="r"), "payment_id"),
    (
        "DeclinePayment",
        "long note",
        pb.DeclinePaymentRequest(request_id="r", payment_id=SAME, note="n" * 501),
        "note",
    ),
    (
        "DeclinePayment",
        "no request id",
        pb.DeclinePaymentRequest(payment_id=SAME),
        "request_id",
    ),
    ("FreezeAccount", "bad id", pb.FreezeAccountRequest(request_id="r", account_id="x"), "account_id"),
    ("FreezeAccount", "no request id", pb.FreezeAccountRequest(account_id=SAME), "request_id"),
    (
        "UnfreezeAccount",
        "long reason",
        pb.UnfreezeAccountRequest(request_id="r", account_id=SAME, reason="r" * 501),
        "reason",
    ),
    ("GetPayment", "bad id", pb.GetPaymentRequest(payment_id="not-a-uuid"), "payment_id"),
    ("GetPayment", "no id", pb.GetPaymentRequest(), "payment_id"),
]


@pytest.mark.parametrize(
    ("method", "request_message", "field"),
    [pytest.param(m, r, f, id=f"{m}-{name}") for m, name, r, f in INVALID],
)
async def test_malformed_requests_are_invalid_argument(
    svc: RunningServer, method: str, request_message: Any, field: str
) -> None:
    call: Callable[[Any], Awaitable[Any]] = getattr(svc.stub, method)
    error = await fails(call(request_message), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    violations = bad_request(error)
    assert violations is not None
    assert field in {v.field for v in violations.field_violations}


async def test_a_credit_that_would_overflow_is_invalid_argument(svc: RunningServer) -> None:
    payer, payee = await open_account(svc), await open_account(svc, opening=2**63 - 2)
    error = await fails(submit(svc, payer, payee, 5), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    violations = bad_request(error)
    assert violations is not None
    assert [v.field for v in violations.field_violations] == ["amount.amount_minor"]


async def test_unknown_accounts_and_payments_are_not_found(svc: RunningServer) -> None:
    known = await open_account(svc)
    unknown = str(uuid.uuid4())
    stub = svc.stub
    for payer, payee in ((unknown, known.account_id), (known.account_id, unknown)):
        await fails(
            stub.SubmitPayment(_valid_submit(payer_account_id=payer, payee_account_id=payee)),
            grpc.StatusCode.NOT_FOUND,
            "ACCOUNT_NOT_FOUND",
        )
    await fails(
        stub.FreezeAccount(pb.FreezeAccountRequest(request_id=rid(), account_id=unknown)),
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )
    await fails(
        stub.UnfreezeAccount(pb.UnfreezeAccountRequest(request_id=rid(), account_id=unknown)),
        grpc.StatusCode.NOT_FOUND,
        "ACCOUNT_NOT_FOUND",
    )
    await fails(
        stub.ApprovePayment(pb.ApprovePaymentRequest(request_id=rid(), payment_id=unknown)),
        grpc.StatusCode.NOT_FOUND,
        "PAYMENT_NOT_FOUND",
    )
    await fails(
        stub.DeclinePayment(pb.DeclinePaymentRequest(request_id=rid(), payment_id=unknown)),
        grpc.StatusCode.NOT_FOUND,
        "PAYMENT_NOT_FOUND",
    )
    await fails(
        stub.GetPayment(pb.GetPaymentRequest(payment_id=unknown)),
        grpc.StatusCode.NOT_FOUND,
        "PAYMENT_NOT_FOUND",
    )


async def _health(channel: grpc.aio.Channel, service: str) -> int:
    response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service))
    return int(response.status)


async def test_health_and_reflection(svc: RunningServer) -> None:
    for service in ("", "liveness", "readiness", SERVICE_NAME):
        assert await _health(svc.channel, service) == health_pb2.HealthCheckResponse.SERVING

    call = reflection_pb2_grpc.ServerReflectionStub(svc.channel).ServerReflectionInfo()
    await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
    response = await call.read()
    await call.done_writing()
    names = {s.name for s in response.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= names


async def _wait_for_health(channel: grpc.aio.Channel, status: int, within_s: float = 30.0) -> None:
    async def reached() -> bool:
        return await _health(channel, "readiness") == status

    await eventually(reached, within_s, "readiness changes")


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        yield server.start()
    finally:
        server.remove()


async def test_database_down_is_unavailable_and_the_service_recovers(own_postgres: PostgresServer) -> None:
    dsn = own_postgres.create_database("approval")
    upgrade(dsn)
    async with running_server(dsn, review_threshold=THRESHOLD, readiness_interval_seconds=0.1) as svc:
        payer, payee = await open_account(svc), await open_account(svc)
        await submit(svc, payer, payee, 1)

        await asyncio.to_thread(own_postgres.stop)
        await fails(submit(svc, payer, payee, 1), grpc.StatusCode.UNAVAILABLE, "DATABASE_UNAVAILABLE")
        await fails(
            svc.stub.GetPayment(pb.GetPaymentRequest(payment_id=str(uuid.uuid4()))),
            grpc.StatusCode.UNAVAILABLE,
            "DATABASE_UNAVAILABLE",
        )
        await _wait_for_health(svc.channel, health_pb2.HealthCheckResponse.NOT_SERVING)
        assert await _health(svc.channel, "liveness") == health_pb2.HealthCheckResponse.SERVING

        await asyncio.to_thread(own_postgres.start)
        await _wait_for_health(svc.channel, health_pb2.HealthCheckResponse.SERVING)
        recovered = await submit(svc, payer, payee, 1)
        assert recovered.payment.status == payment_pb2.PAYMENT_STATUS_APPROVED
