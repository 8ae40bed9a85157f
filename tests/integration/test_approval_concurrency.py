"""Concurrent payments against a private PostgreSQL: no overdraft, no lost update, no deadlock, one effect per request_id."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from approval_svc.domain import commands
from approval_svc.domain.errors import PaymentNotUnderReview, RequestIdReused
from approval_svc.domain.model import DeclineReason, Payment, PaymentStatus
from approval_svc.handlers import Handlers, Outcome, RequestKey
from tests.support.approval import engine_for, handlers_for, key, open_account, submission_key


@pytest.fixture
async def engine(migrated_dsn: str) -> AsyncIterator[AsyncEngine]:
    async with engine_for(migrated_dsn, pool_size=20) as engine:
        yield engine


async def check_books(engine: AsyncEngine, expected_total: int) -> None:
    """The sum of balances is the sum of opening credits, and each balance is its ledger sum."""
    async with engine.connect() as connection:
        rows = (
            await connection.execute(
                text(
                    """
                    SELECT a.account_id, a.ledger_balance_minor, a.held_minor,
                           a.sent_approved + a.sent_declined + a.sent_pending_review AS sent,
                           coalesce((SELECT sum(amount_minor) FROM ledger_entries e
                                     WHERE e.account_id = a.account_id), 0) AS ledger_sum
                    FROM accounts a
                    """
                )
            )
        ).all()
        debits_and_credits = (
            await connection.execute(
                text("SELECT coalesce(sum(amount_minor), 0) FROM ledger_entries WHERE payment_id IS NOT NULL")
            )
        ).scalar_one()
        payments = (await connection.execute(text("SELECT count(*) FROM payments"))).scalar_one()
    assert sum(r.ledger_balance_minor for r in rows) == expected_total
    for row in rows:
        assert row.ledger_balance_minor == row.ledger_sum
        assert row.held_minor == 0
    assert debits_and_credits == 0
    assert sum(r.sent for r in rows) == payments


async def test_many_payments_from_one_account_never_overdraw(engine: AsyncEngine) -> None:
    handlers = handlers_for(engine)
    payer, payee = await open_account(handlers, 100), await open_account(handlers, 0)
    command = commands.SubmitPayment(payer.account_id, payee.account_id, "EUR", 1, "")

    async def submit() -> Outcome[object]:
        return await handlers.submit_payment(command, key("SubmitPayment"))  # type: ignore[return-value]

    outcomes = await asyncio.gather(*(submit() for _ in range(200)))
    decisions = Counter(
        (o.value.status, o.value.decline_reason)  # type: ignore[attr-defined]
        for o in outcomes
    )
    assert decisions == {
        (PaymentStatus.APPROVED, None): 100,
        (PaymentStatus.DECLINED, DeclineReason.INSUFFICIENT_FUNDS): 100,
    }
    await check_books(engine, 100)
    async with engine.connect() as connection:
        balance = (
            await connection.execute(
                text("SELECT ledger_balance_minor FROM accounts WHERE account_id = :a"),
                {"a": payer.account_id},
            )
        ).scalar_one()
    assert balance == 0


async def test_random_transfers_keep_the_books_balanced(engine: AsyncEngine) -> None:
    handlers = handlers_for(engine, review_threshold=10**9)
    accounts = [await open_account(handlers, 1_000) for _ in range(20)]
    rng = random.Random(20260304)
    plans = [[(rng.sample(accounts, 2), rng.randint(1, 400)) for _ in range(25)] for _ in range(16)]

    async def client(plan: list[tuple[list[object], int]]) -> Counter[PaymentStatus]:
        seen: Counter[PaymentStatus] = Counter()
        for (payer, payee), amount in plan:
            command = commands.SubmitPayment(payer.account_id, payee.account_id, "EUR", amount, "")  # type: ignore[attr-defined]
            outcome = await handlers.submit_payment(command, key("SubmitPayment"))
            assert outcome.value is not None
            seen[outcome.value.status] += 1
        return seen

    results = await asyncio.gather(*(client(plan) for plan in plans))  # type: ignore[arg-type]
    total = sum(results, Counter())
    assert sum(total.values()) == 16 * 25
    assert total[PaymentStatus.APPROVED] > 0
    await check_books(engine, 20 * 1_000)


async def test_racing_retries_of_one_request_have_one_effect(engine: AsyncEngine) -> None:
    handlers = handlers_for(engine)
    payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 0)
    command = commands.SubmitPayment(payer.account_id, payee.account_id, "EUR", 10, "")
    request = submission_key("race-1", b"same")
    outcomes = await asyncio.gather(*(handlers.submit_payment(command, request) for _ in range(20)))
    done = [o.value for o in outcomes if o.value is not None]
    assert len(done) == 1
    first = request.encode(done[0])
    assert all(o.replay == first for o in outcomes if o.value is None)
    await check_books(engine, 1_000)
    async with engine.connect() as connection:
        assert (await connection.execute(text("SELECT count(*) FROM payments"))).scalar_one() == 1


async def test_racing_reuses_of_one_request_id_are_rejected(engine: AsyncEngine) -> None:
    handlers = handlers_for(engine)
    payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 0)

    async def submit(amount: int) -> object:
        command = commands.SubmitPayment(payer.account_id, payee.account_id, "EUR", amount, "")
        request: RequestKey[Payment] = key("SubmitPayment", "race-2", fingerprint=str(amount).encode())
        try:
            return await handlers.submit_payment(command, request)
        except RequestIdReused as error:
            return error

    results = await asyncio.gather(*(submit(amount) for amount in range(1, 11)))
    assert sum(isinstance(r, Outcome) for r in results) == 1
    assert sum(isinstance(r, RequestIdReused) for r in results) == 9


async def test_racing_reviews_decide_a_payment_once(engine: AsyncEngine) -> None:
    handlers: Handlers = handlers_for(engine, review_threshold=100)
    payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 0)
    command = commands.SubmitPayment(payer.account_id, payee.account_id, "EUR", 500, "")
    held = (await handlers.submit_payment(command, key("SubmitPayment"))).value
    assert held is not None

    async def decide(approve: bool) -> object:
        review = commands.ReviewPayment(held.payment_id, f"reviewer-{uuid.uuid4().hex[:6]}", "", approve)
        try:
            return await handlers.review_payment(review, key("Review"))
        except PaymentNotUnderReview as error:
            return error

    results = await asyncio.gather(*(decide(i % 2 == 0) for i in range(10)))
    assert sum(isinstance(r, Outcome) for r in results) == 1
    await check_books(engine, 1_000)
