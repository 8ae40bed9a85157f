"""Two concurrent calls with one request_id, over gRPC to a real server: one answer, one effect, for every mutation."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import message

from approval_svc import metrics
from payments.approval.v1 import approval_service_pb2 as pb
from payments.type.v1 import money_pb2, payment_pb2
from payments_common.grpcstatus import error_info
from tests.support.approval import RunningServer, running_server

pytestmark = pytest.mark.slow

PAIRS = 30
THRESHOLD = 1_000


@pytest.fixture
async def svc(migrated_dsn: str) -> AsyncIterator[RunningServer]:
    async with running_server(migrated_dsn, review_threshold=THRESHOLD) as running:
        yield running


@pytest.fixture
async def db(migrated_dsn: str) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(migrated_dsn)
    try:
        yield connection
    finally:
        await connection.close()


def rid() -> str:
    return uuid.uuid4().hex


def eur(amount: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="EUR", amount_minor=amount)


Answer = tuple[str, Any]


async def answer(call: Awaitable[message.Message]) -> Answer:
    """A call's answer in a comparable form: the response without its token, or the code and reason."""
    try:
        response = await call
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        return ("error", (error.code(), info.reason if info else None))
    copy = type(response)()
    copy.CopyFrom(response)
    # The token is a position read by each call: a replay reads a later one on purpose.
    copy.consistency_token = ""  # type: ignore[attr-defined]
    return ("ok", copy)


def replays(method: str) -> float:
    return metrics.REPLAYS.labels(method)._value.get()  # type: ignore[no-any-return]


def retries() -> float:
    return metrics.RETRIES._value.get()  # type: ignore[no-any-return]


async def race_pairs(make_call: Callable[[int, str], Awaitable[message.Message]]) -> list[Answer]:
    """Sends PAIRS pairs of concurrent calls, each pair with one request_id; checks each pair agrees."""
    firsts: list[Answer] = []
    for index in range(PAIRS):
        request_id = rid()
        first, second = await asyncio.gather(
            answer(make_call(index, request_id)), answer(make_call(index, request_id))
        )
        assert first == second, f"pair {index}: {first} != {second}"
        firsts.append(first)
    return firsts


async def open_account(svc: RunningServer, opening: int = 1_000_000) -> pb.Account:
    response = await svc.stub.CreateAccount(
        pb.CreateAccountRequest(
            request_id=rid(),
            owner_name="Ada",
            currency_code="EUR",
            opening_balance_minor=opening,
            per_payment_limit_minor=10**9,
            daily_limit_minor=10**10,
        )
    )
    return response.account


async def held_payments(svc: RunningServer, payer: pb.Account, payee: pb.Account) -> list[pb.Payment]:
    held = []
    for _ in range(PAIRS):
        response = await svc.stub.SubmitPayment(
            pb.SubmitPaymentRequest(
                request_id=rid(),
                payer_account_id=payer.account_id,
                payee_account_id=payee.account_id,
                amount=eur(THRESHOLD),
            )
        )
        assert response.payment.status == payment_pb2.PAYMENT_STATUS_PENDING_REVIEW
        held.append(response.payment)
    return held


async def test_racing_create_account_opens_one_account(svc: RunningServer, db: asyncpg.Connection) -> None:
    def call(index: int, request_id: str) -> Awaitable[message.Message]:
        return svc.stub.CreateAccount(
            pb.CreateAccountRequest(
                request_id=request_id,
                owner_name=f"owner {index}",
                currency_code="EUR",
                opening_balance_minor=100 + index,
                per_payment_limit_minor=1_000,
                daily_limit_minor=10_000,
            )
        )

    answers = await race_pairs(call)
    assert all(kind == "ok" for kind, _ in answers)
    rows = await db.fetch("SELECT owner_name, ledger_balance_minor FROM accounts")
    assert sorted((r["owner_name"], r["ledger_balance_minor"]) for r in rows) == sorted(
        (f"owner {i}", 100 + i) for i in range(PAIRS)
    )
    assert await db.fetchval("SELECT count(*) FROM ledger_entries") == PAIRS
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == PAIRS


async def test_racing_submit_payment_pays_once(svc: RunningServer, db: asyncpg.Connection) -> None:
    payer, payee = await open_account(svc), await open_account(svc, opening=0)

    def call(index: int, request_id: str) -> Awaitable[message.Message]:
        return svc.stub.SubmitPayment(
            pb.SubmitPaymentRequest(
                request_id=request_id,
                payer_account_id=payer.account_id,
                payee_account_id=payee.account_id,
                amount=eur(1 + index),
            )
        )

    answers = await race_pairs(call)
    assert all(
        kind == "ok" and r.payment.status == payment_pb2.PAYMENT_STATUS_APPROVED for kind, r in answers
    )
    counts = await db.fetch("SELECT request_id, count(*) AS n FROM payments GROUP BY request_id")
    assert len(counts) == PAIRS
    assert all(r["n"] == 1 for r in counts)
    paid = sum(1 + i for i in range(PAIRS))
    assert (
        await db.fetchval(
            "SELECT ledger_balance_minor FROM accounts WHERE account_id = $1", uuid.UUID(payee.account_id)
        )
        == paid
    )
    assert await db.fetchval("SELECT count(*) FROM ledger_entries WHERE payment_id IS NOT NULL") == 2 * PAIRS


@pytest.mark.parametrize("approve", [True, False], ids=["approve", "decline"])
async def test_racing_reviews_decide_once(svc: RunningServer, db: asyncpg.Connection, approve: bool) -> None:
    payer, payee = await open_account(svc), await open_account(svc, opening=0)
    held = await held_payments(svc, payer, payee)

    def call(index: int, request_id: str) -> Awaitable[message.Message]:
        payment_id = held[index].payment_id
        if approve:
            return svc.stub.ApprovePayment(
                pb.ApprovePaymentRequest(request_id=request_id, payment_id=payment_id)
            )
        return svc.stub.DeclinePayment(pb.DeclinePaymentRequest(request_id=request_id, payment_id=payment_id))

    method = "ApprovePayment" if approve else "DeclinePayment"
    replayed, retried = replays(method), retries()
    answers = await race_pairs(call)
    # Each second call waited on the first one's claim of the key, then replayed its response.
    assert (replays(method) - replayed, retries() - retried) == (PAIRS, 0)
    status = payment_pb2.PAYMENT_STATUS_APPROVED if approve else payment_pb2.PAYMENT_STATUS_DECLINED
    assert all(kind == "ok" and r.payment.status == status for kind, r in answers)
    events = await db.fetch("SELECT payment_id, count(*) AS n FROM payment_events GROUP BY payment_id")
    assert len(events) == PAIRS
    assert all(r["n"] == 2 for r in events)
    ledger_rows = await db.fetchval("SELECT count(*) FROM ledger_entries WHERE payment_id IS NOT NULL")
    assert ledger_rows == (2 * PAIRS if approve else 0)
    payer_row = await db.fetchrow(
        "SELECT ledger_balance_minor, held_minor, sent_approved, sent_declined, sent_pending_review"
        " FROM accounts WHERE account_id = $1",
        uuid.UUID(payer.account_id),
    )
    assert payer_row["held_minor"] == 0
    assert payer_row["ledger_balance_minor"] == 1_000_000 - (PAIRS * THRESHOLD if approve else 0)
    assert (payer_row["sent_approved"], payer_row["sent_declined"], payer_row["sent_pending_review"]) == (
        (PAIRS, 0, 0) if approve else (0, PAIRS, 0)
    )


async def test_racing_freezes_and_unfreezes_change_an_account_once(
    svc: RunningServer, db: asyncpg.Connection
) -> None:
    accounts = [await open_account(svc) for _ in range(PAIRS)]

    def freeze(index: int, request_id: str) -> Awaitable[message.Message]:
        return svc.stub.FreezeAccount(
            pb.FreezeAccountRequest(
                request_id=request_id, account_id=accounts[index].account_id, reason="fraud"
            )
        )

    def unfreeze(index: int, request_id: str) -> Awaitable[message.Message]:
        return svc.stub.UnfreezeAccount(
            pb.UnfreezeAccountRequest(
                request_id=request_id, account_id=accounts[index].account_id, reason="ok"
            )
        )

    for call, status in (
        (freeze, payment_pb2.ACCOUNT_STATUS_FROZEN),
        (unfreeze, payment_pb2.ACCOUNT_STATUS_ACTIVE),
    ):
        answers = await race_pairs(call)
        for (kind, response), account in zip(answers, accounts, strict=True):
            assert kind == "ok"
            assert response.account.status == status
            # The one change: the row's last update is the one both callers were told of.
            updated = await db.fetchval(
                "SELECT updated_at FROM accounts WHERE account_id = $1", uuid.UUID(account.account_id)
            )
            assert response.account.update_time.ToDatetime().replace(tzinfo=updated.tzinfo) == updated
    # One key per pair and per account opening: no call stored a second record.
    assert await db.fetchval("SELECT count(*) FROM idempotency_keys") == 3 * PAIRS


async def test_racing_review_of_a_payment_not_held_agrees_on_the_error(svc: RunningServer) -> None:
    payer, payee = await open_account(svc), await open_account(svc, opening=0)
    done = await svc.stub.SubmitPayment(
        pb.SubmitPaymentRequest(
            request_id=rid(),
            payer_account_id=payer.account_id,
            payee_account_id=payee.account_id,
            amount=eur(5),
        )
    )

    def call(index: int, request_id: str) -> Awaitable[message.Message]:
        return svc.stub.ApprovePayment(
            pb.ApprovePaymentRequest(request_id=request_id, payment_id=done.payment.payment_id)
        )

    answers = await race_pairs(call)
    assert all(
        a == ("error", (grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_NOT_UNDER_REVIEW")) for a in answers
    )
