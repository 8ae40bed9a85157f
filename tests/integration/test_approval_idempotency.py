"""One request_id over gRPC to a real server: a caller's concurrent calls have one answer and one effect, for every
mutation; two callers' calls are two requests."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import message

from approval_svc import metrics
from payments.approval.v1 import approval_service_pb2 as pb
from payments.approval.v1 import approval_service_pb2_grpc as pb_grpc
from payments.type.v1 import money_pb2, payment_pb2
from payments_common.grpcstatus import error_info
from stack.auth import CUSTOMER, ROLES
from tests.support.approval import RunningServer, running_server
from tests.support.auth import aio_channel, authority

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


async def held_payments(
    svc: RunningServer, payer: pb.Account, payee: pb.Account, count: int = PAIRS
) -> list[pb.Payment]:
    held = []
    for _ in range(count):
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

    replayed, retried = replays("SubmitPayment"), retries()
    answers = await race_pairs(call)
    # Each second call waited for the first one's locks, then replayed its response: found by
    # its lookup, or by its decision's write, which checks the key after the locks.
    assert (replays("SubmitPayment") - replayed, retries() - retried) == (PAIRS, 0)
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


# -- one request_id, two callers ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def caller(
    svc: RunningServer, subject: str, roles: Sequence[str] = ROLES, accounts: Sequence[str] = ()
) -> AsyncIterator[pb_grpc.ApprovalServiceAsyncStub]:
    """A stub whose calls carry a token of `subject` (every role by default), on a channel of its own."""
    token = authority().token(subject, roles, accounts)
    async with aio_channel(svc.address, token) as channel:
        yield pb_grpc.ApprovalServiceStub(channel)


def payment_request(request_id: str, payer: str, payee: str, amount: int) -> pb.SubmitPaymentRequest:
    return pb.SubmitPaymentRequest(
        request_id=request_id, payer_account_id=payer, payee_account_id=payee, amount=eur(amount)
    )


async def keys_of(db: asyncpg.Connection, request_id: str) -> int:
    return int(await db.fetchval("SELECT count(*) FROM idempotency_keys WHERE request_id = $1", request_id))


async def test_one_request_id_from_two_callers_is_two_payments_each_replayed_to_its_caller(
    svc: RunningServer, db: asyncpg.Connection
) -> None:
    payer, payee = await open_account(svc), await open_account(svc, opening=0)
    request = payment_request(rid(), payer.account_id, payee.account_id, 25)
    async with caller(svc, "gateway-a") as a, caller(svc, "gateway-b") as b:
        first_a = await answer(a.SubmitPayment(request))
        # The same request_id and the same body from another caller: not a retry of A's.
        first_b = await answer(b.SubmitPayment(request))
        assert first_a[0] == first_b[0] == "ok"
        assert first_a[1].payment.payment_id != first_b[1].payment.payment_id
        # Each caller's retry gets its own first response back.
        assert await answer(a.SubmitPayment(request)) == first_a
        assert await answer(b.SubmitPayment(request)) == first_b
    rows = await db.fetch("SELECT payment_id FROM payments WHERE request_id = $1", request.request_id)
    assert {str(r["payment_id"]) for r in rows} == {
        first_a[1].payment.payment_id,
        first_b[1].payment.payment_id,
    }
    assert await keys_of(db, request.request_id) == 2
    assert (
        await db.fetchval(
            "SELECT ledger_balance_minor FROM accounts WHERE account_id = $1", uuid.UUID(payee.account_id)
        )
        == 50
    )


async def test_a_callers_reuse_of_its_own_request_id_is_still_refused(
    svc: RunningServer, db: asyncpg.Connection
) -> None:
    payer, payee = await open_account(svc), await open_account(svc, opening=0)
    request_id = rid()
    reused = ("error", (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"))
    async with caller(svc, "gateway-a") as a, caller(svc, "gateway-b") as b:
        assert (
            await answer(a.SubmitPayment(payment_request(request_id, payer.account_id, payee.account_id, 5)))
        )[0] == "ok"
        # Another body, or another method, from the same caller.
        assert (
            await answer(a.SubmitPayment(payment_request(request_id, payer.account_id, payee.account_id, 6)))
            == reused
        )
        assert (
            await answer(
                a.FreezeAccount(pb.FreezeAccountRequest(request_id=request_id, account_id=payee.account_id))
            )
            == reused
        )
        # The other caller's reuse of its own request_id is refused the same way.
        assert (
            await answer(
                b.FreezeAccount(pb.FreezeAccountRequest(request_id=request_id, account_id=payee.account_id))
            )
        )[0] == "ok"
        assert (
            await answer(b.SubmitPayment(payment_request(request_id, payer.account_id, payee.account_id, 5)))
            == reused
        )
    assert await db.fetchval("SELECT count(*) FROM payments WHERE request_id = $1", request_id) == 1
    assert await keys_of(db, request_id) == 2


async def test_a_request_id_taken_by_another_customer_neither_blocks_nor_reveals_anything(
    svc: RunningServer, db: asyncpg.Connection
) -> None:
    alice, mallory, shop = (
        await open_account(svc),
        await open_account(svc),
        await open_account(svc, opening=0),
    )
    request_id = rid()
    alices = payment_request(request_id, alice.account_id, shop.account_id, 700)
    mallorys = payment_request(request_id, mallory.account_id, shop.account_id, 1)
    async with (
        caller(svc, "alice", [CUSTOMER], [alice.account_id]) as alice_calls,
        caller(svc, "mallory", [CUSTOMER], [mallory.account_id]) as mallory_calls,
    ):
        # Mallory learned the request_id that Alice is about to send, and sends it first.
        squatted = await answer(mallory_calls.SubmitPayment(mallorys))
        assert squatted[0] == "ok"
        paid = await answer(alice_calls.SubmitPayment(alices))
        assert paid[0] == "ok"
        assert (paid[1].payment.payer_account_id, paid[1].payment.amount.amount_minor) == (
            alice.account_id,
            700,
        )
        # Sent again, with another body or the same, Mallory's request_id is Mallory's own:
        # she learns nothing of Alice's request and never gets its response.
        assert await answer(mallory_calls.SubmitPayment(mallorys)) == squatted
        probe = payment_request(request_id, mallory.account_id, shop.account_id, 700)
        assert await answer(mallory_calls.SubmitPayment(probe)) == (
            "error",
            (grpc.StatusCode.ALREADY_EXISTS, "REQUEST_ID_REUSED"),
        )
        assert await answer(alice_calls.SubmitPayment(alices)) == paid
    payers = await db.fetch("SELECT payer_account_id FROM payments WHERE request_id = $1", request_id)
    assert sorted(str(r["payer_account_id"]) for r in payers) == sorted(
        [alice.account_id, mallory.account_id]
    )


async def test_every_mutation_runs_once_for_each_caller_of_one_request_id_at_once(
    svc: RunningServer, db: asyncpg.Connection
) -> None:
    """Two callers send one request_id to each mutation at the same time: each is carried out, for each."""
    payer, payee = await open_account(svc), await open_account(svc, opening=0)
    held = await held_payments(svc, payer, payee, 4)
    targets = [await open_account(svc) for _ in range(2)]
    request_id = rid()
    async with caller(svc, "operator-a") as a, caller(svc, "operator-b") as b:
        stubs = (a, b)

        def create(n: int) -> Awaitable[message.Message]:
            return stubs[n].CreateAccount(
                pb.CreateAccountRequest(
                    request_id=request_id,
                    owner_name="same body",
                    currency_code="EUR",
                    opening_balance_minor=100,
                    per_payment_limit_minor=1_000,
                    daily_limit_minor=10_000,
                )
            )

        def submit(n: int) -> Awaitable[message.Message]:
            return stubs[n].SubmitPayment(payment_request(request_id, payer.account_id, payee.account_id, 7))

        def approve(n: int) -> Awaitable[message.Message]:
            return stubs[n].ApprovePayment(
                pb.ApprovePaymentRequest(request_id=request_id, payment_id=held[n].payment_id)
            )

        def decline(n: int) -> Awaitable[message.Message]:
            return stubs[n].DeclinePayment(
                pb.DeclinePaymentRequest(request_id=request_id, payment_id=held[2 + n].payment_id)
            )

        def freeze(n: int) -> Awaitable[message.Message]:
            return stubs[n].FreezeAccount(
                pb.FreezeAccountRequest(request_id=request_id, account_id=targets[n].account_id)
            )

        def unfreeze(n: int) -> Awaitable[message.Message]:
            return stubs[n].UnfreezeAccount(
                pb.UnfreezeAccountRequest(request_id=request_id, account_id=targets[n].account_id)
            )

        # One request_id for all six methods would be a reuse: each method gets its own.
        for call in (create, submit, approve, decline, freeze, unfreeze):
            request_id = rid()
            first = list(await asyncio.gather(answer(call(0)), answer(call(1))))
            assert [kind for kind, _ in first] == ["ok", "ok"], (call.__name__, first)
            assert first[0] != first[1], call.__name__
            # Each caller's retry is its own replay.
            assert [await answer(call(0)), await answer(call(1))] == first, call.__name__
            assert await keys_of(db, request_id) == 2, call.__name__
    assert await db.fetchval("SELECT count(*) FROM accounts WHERE owner_name = 'same body'") == 2
    statuses = await db.fetch(
        "SELECT status FROM payments WHERE payment_id = ANY($1::uuid[]) ORDER BY created_at",
        [uuid.UUID(p.payment_id) for p in held[:4]],
    )
    assert sorted(r["status"] for r in statuses) == ["APPROVED", "APPROVED", "DECLINED", "DECLINED"]
