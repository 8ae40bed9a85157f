"""The approval service's SQL adapters against a private PostgreSQL: effects, ledger, timeline, schema."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from approval_svc.adapters.repository import IdempotencyKey, SavedRequest, StoredRequest
from approval_svc.adapters.unit_of_work import CALL_DEADLINE, SqlUnitOfWork
from approval_svc.domain import commands, rules
from approval_svc.domain.errors import (
    AccountNotFound,
    DeadlineExceeded,
    InvalidRequest,
    PaymentNotUnderReview,
    RequestIdReused,
    TransactionConflict,
)
from approval_svc.domain.model import (
    MAX_AMOUNT,
    Account,
    AccountStatus,
    DeclineReason,
    Payment,
    PaymentEvent,
    PaymentStatus,
)
from approval_svc.handlers import Handlers
from payments_common.lsn import parse_lsn
from tests.support.approval import CALLER, engine_for, handlers_for, key, open_account, submission_key
from tests.support.waiting import eventually


@pytest.fixture
async def engine(migrated_dsn: str) -> AsyncIterator[AsyncEngine]:
    async with engine_for(migrated_dsn) as engine:
        yield engine


async def pay(
    handlers: Handlers, payer: Account, payee: Account, amount: int, request_id: str | None = None
) -> Payment:
    command = commands.SubmitPayment(payer.account_id, payee.account_id, payer.currency, amount, "ref")
    outcome = await handlers.submit_payment(command, key("SubmitPayment", request_id))
    assert outcome.value is not None
    return outcome.value


async def review(handlers: Handlers, payment: Payment, approve: bool) -> Payment:
    command = commands.ReviewPayment(payment.payment_id, "bob", "looked at it", approve)
    outcome = await handlers.review_payment(command, key("Review"))
    assert outcome.value is not None
    return outcome.value


async def balances(engine: AsyncEngine) -> dict[uuid.UUID, tuple[int, int, int]]:
    """Each account's ledger balance, held amount and the sum of its ledger entries."""
    async with engine.connect() as connection:
        rows = await connection.execute(
            text(
                """
                SELECT a.account_id, a.ledger_balance_minor, a.held_minor,
                       coalesce((SELECT sum(amount_minor) FROM ledger_entries e
                                 WHERE e.account_id = a.account_id), 0) AS ledger_sum
                FROM accounts a
                """
            )
        )
        return {r.account_id: (r.ledger_balance_minor, r.held_minor, int(r.ledger_sum)) for r in rows}


async def test_every_decision_is_stored_with_its_effects(engine: AsyncEngine) -> None:
    handlers = handlers_for(engine, review_threshold=500)
    payer, payee = (
        await open_account(handlers, 1_000, owner="Ada"),
        await open_account(handlers, 0, owner="Bo"),
    )
    approved = await pay(handlers, payer, payee, 100)
    held = await pay(handlers, payer, payee, 600)
    declined = await pay(handlers, payer, payee, 301)
    assert (approved.status, held.status, declined.status) == (
        PaymentStatus.APPROVED,
        PaymentStatus.PENDING_REVIEW,
        PaymentStatus.DECLINED,
    )
    assert declined.decline_reason is DeclineReason.INSUFFICIENT_FUNDS

    after = await balances(engine)
    assert after[payer.account_id] == (900, 600, 900)
    assert after[payee.account_id] == (100, 0, 100)

    stored, events = await handlers.get_payment(held.payment_id)
    assert stored == held
    assert [(e.sequence, e.status, e.actor) for e in events] == [(1, PaymentStatus.PENDING_REVIEW, "system")]
    async with engine.connect() as connection:
        row = (
            await connection.execute(
                text(
                    "SELECT payer_name, payee_name, sent_approved, sent_declined, sent_pending_review,"
                    " total_sent_minor FROM payments p JOIN accounts a ON a.account_id = p.payer_account_id"
                    " WHERE payment_id = :p"
                ),
                {"p": held.payment_id},
            )
        ).one()
    assert tuple(row) == ("Ada", "Bo", 1, 1, 1, 100)

    released = await review(handlers, held, approve=False)
    assert released.decline_reason is DeclineReason.DECLINED_BY_REVIEWER
    assert (await balances(engine))[payer.account_id] == (900, 0, 900)
    _, events = await handlers.get_payment(held.payment_id)
    assert [(e.sequence, e.status, e.actor, e.note) for e in events][1] == (
        2,
        PaymentStatus.DECLINED,
        "bob",
        "looked at it",
    )
    with pytest.raises(PaymentNotUnderReview):
        await review(handlers, held, approve=True)


async def test_approving_a_held_payment_moves_the_funds(engine: AsyncEngine) -> None:
    handlers = handlers_for(engine, review_threshold=500)
    payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 5)
    held = await pay(handlers, payer, payee, 700)
    assert (await pay(handlers, payer, payee, 301)).decline_reason is DeclineReason.INSUFFICIENT_FUNDS
    approved = await review(handlers, held, approve=True)
    assert approved.status is PaymentStatus.APPROVED
    after = await balances(engine)
    assert after[payer.account_id] == (300, 0, 300)
    assert after[payee.account_id] == (705, 0, 705)
    async with engine.connect() as connection:
        kinds = (
            await connection.execute(
                text("SELECT kind, amount_minor FROM ledger_entries WHERE payment_id = :p ORDER BY entry_id"),
                {"p": held.payment_id},
            )
        ).all()
    assert [tuple(k) for k in kinds] == [("DEBIT", -700), ("CREDIT", 700)]


async def test_the_daily_limit_ignores_yesterday_and_declines(engine: AsyncEngine) -> None:
    handlers = handlers_for(engine)
    payer, payee = await open_account(handlers, 10_000, daily_limit=1_000), await open_account(handlers, 0)
    old = await pay(handlers, payer, payee, 900)
    declined = await pay(handlers, payer, payee, 200)
    assert declined.decline_reason is DeclineReason.DAILY_LIMIT_EXCEEDED
    # As yesterday left them: the payment, and the payer's counter of that day.
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE payments SET created_at = created_at - interval '1 day' WHERE payment_id = :p"),
            {"p": old.payment_id},
        )
        await connection.execute(
            text("UPDATE accounts SET daily_usage_day = daily_usage_day - 1 WHERE account_id = :a"),
            {"a": payer.account_id},
        )
    assert (await pay(handlers, payer, payee, 1_000)).status is PaymentStatus.APPROVED


async def test_idempotency_is_recorded_with_the_effect(engine: AsyncEngine) -> None:
    handlers = handlers_for(engine)
    payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 0)
    command = commands.SubmitPayment(payer.account_id, payee.account_id, "EUR", 10, "")
    first = await handlers.submit_payment(command, submission_key("r-1"))
    again = await handlers.submit_payment(command, submission_key("r-1"))
    assert first.value is not None
    assert again.replay == submission_key().encode(first.value)
    assert again.position >= first.position
    with pytest.raises(RequestIdReused):
        await handlers.submit_payment(command, key("SubmitPayment", "r-1", b"other"))
    # A request that failed leaves no record, so the same request_id may be used again.
    unknown = commands.SubmitPayment(uuid.uuid4(), payee.account_id, "EUR", 10, "")
    with pytest.raises(AccountNotFound):
        await handlers.submit_payment(unknown, key("SubmitPayment", "r-2"))
    await handlers.submit_payment(command, key("SubmitPayment", "r-2"))
    async with engine.connect() as connection:
        count = (await connection.execute(text("SELECT count(*) FROM payments"))).scalar_one()
        keys = (await connection.execute(text("SELECT count(*) FROM idempotency_keys"))).scalar_one()
    assert count == 2
    assert keys == 4  # two accounts, two payments


async def test_a_claim_waits_only_for_its_own_callers_request(engine: AsyncEngine) -> None:
    """Another caller's claim of the same request_id, not yet committed, is not in the way."""
    async with SqlUnitOfWork(engine) as first:
        await first.repo.claim_request(IdempotencyKey("token:ada", "shared"), "M", b"f")
        async with SqlUnitOfWork(engine) as second:
            # Were it to wait for the first transaction's row, it would wait for ever: the
            # deadline only turns that hang into a failure.
            lookup = await asyncio.wait_for(
                second.repo.claim_request(IdempotencyKey("token:bob", "shared"), "M", b"f"), 60
            )
            assert lookup.stored is None
            await second.repo.save_response(IdempotencyKey("token:bob", "shared"), b"bob's")
            await second.commit()
        await first.repo.save_response(IdempotencyKey("token:ada", "shared"), b"ada's")
        await first.commit()
    async with engine.connect() as connection:
        found = await connection.execute(
            text("SELECT caller, response FROM idempotency_keys WHERE request_id = 'shared' ORDER BY caller")
        )
        assert [(r.caller, bytes(r.response)) for r in found] == [
            ("token:ada", b"ada's"),
            ("token:bob", b"bob's"),
        ]


async def test_the_position_is_at_or_after_the_commit(engine: AsyncEngine) -> None:
    handlers = handlers_for(engine)
    payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 0)
    command = commands.SubmitPayment(payer.account_id, payee.account_id, "EUR", 10, "")
    first = await handlers.submit_payment(command, key("SubmitPayment"))
    second = await handlers.submit_payment(command, key("SubmitPayment"))
    assert second.position > first.position
    async with engine.connect() as connection:
        now = (await connection.execute(text("SELECT pg_current_wal_lsn()::text"))).scalar_one()
    assert parse_lsn(now) >= second.position


async def test_freeze_and_unfreeze(engine: AsyncEngine) -> None:
    handlers = handlers_for(engine)
    payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 0)
    freeze = commands.SetAccountStatus(payer.account_id, AccountStatus.FROZEN, "")
    frozen = await handlers.set_account_status(freeze, key("FreezeAccount"))
    assert frozen.value is not None
    assert frozen.value.status is AccountStatus.FROZEN
    assert (await pay(handlers, payer, payee, 10)).decline_reason is DeclineReason.ACCOUNT_FROZEN
    unfreeze = commands.SetAccountStatus(payer.account_id, AccountStatus.ACTIVE, "")
    await handlers.set_account_status(unfreeze, key("UnfreezeAccount"))
    assert (await pay(handlers, payer, payee, 10)).status is PaymentStatus.APPROVED


async def test_a_credit_that_would_overflow_is_rejected(engine: AsyncEngine) -> None:
    handlers = handlers_for(engine)
    payer, payee = await open_account(handlers, 10), await open_account(handlers, MAX_AMOUNT - 5)
    with pytest.raises(InvalidRequest):
        await pay(handlers, payer, payee, 6)
    assert (await pay(handlers, payer, payee, 5)).status is PaymentStatus.APPROVED
    assert (await balances(engine))[payee.account_id][0] == MAX_AMOUNT


async def test_the_publication_covers_the_read_model_tables(engine: AsyncEngine) -> None:
    async with engine.connect() as connection:
        tables = (
            await connection.execute(
                text("SELECT tablename FROM pg_publication_tables WHERE pubname = 'payments_read_model'")
            )
        ).scalars()
        identities = (
            await connection.execute(
                text(
                    "SELECT relname, relreplident::text FROM pg_class"
                    " WHERE relname IN ('accounts', 'payments', 'payment_events')"
                )
            )
        ).all()
    assert set(tables) == {"accounts", "payments", "payment_events"}
    assert {tuple(r) for r in identities} == {("accounts", "d"), ("payments", "d"), ("payment_events", "d")}


async def test_a_connection_killed_under_the_pool_is_replaced(migrated_dsn: str) -> None:
    async with engine_for(migrated_dsn, pool_size=1) as engine:
        handlers = handlers_for(engine)
        payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 0)
        async with engine.connect() as connection:
            pid = (await connection.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        async with engine_for(migrated_dsn, pool_size=1) as other, other.connect() as connection:
            await connection.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        # The pool's only connection is dead: the unit of work notices at BEGIN and
        # starts again on a fresh one, with nothing done twice.
        assert (await pay(handlers, payer, payee, 10)).status is PaymentStatus.APPROVED
        assert (await balances(engine))[payer.account_id] == (990, 0, 990)


async def test_the_wait_for_a_connection_ends_with_the_call_deadline(migrated_dsn: str) -> None:
    async with engine_for(migrated_dsn, pool_size=1) as engine:
        handlers = handlers_for(engine)
        payer, payee = await open_account(handlers, 1_000), await open_account(handlers, 0)
        loop = asyncio.get_running_loop()
        async with engine.connect():
            token = CALL_DEADLINE.set(loop.time() + 0.2)
            try:
                started = loop.time()
                with pytest.raises(DeadlineExceeded):
                    await pay(handlers, payer, payee, 10)
                assert loop.time() - started < 5  # the engine's own wait is 300 s
                with pytest.raises(DeadlineExceeded):
                    await pay(handlers, payer, payee, 10)  # past the deadline: not even tried
            finally:
                CALL_DEADLINE.reset(token)
        assert (await balances(engine))[payer.account_id] == (1_000, 0, 1_000)


async def test_a_decision_that_waited_for_its_key_runs_again(engine: AsyncEngine) -> None:
    """The key, committed while the decision's write waited for it, is not in that write's snapshot."""
    handlers = handlers_for(engine)
    first_payer, second_payer, payee = (
        await open_account(handlers, 100),
        await open_account(handlers, 100),
        await open_account(handlers, 0),
    )

    async def decide(uow: SqlUnitOfWork, payer: Account, response: bytes) -> StoredRequest | None:
        now = await uow.repo.now()
        payment = Payment(
            uuid.uuid4(), "shared", payer.account_id, payee.account_id, "Ada", "Ada", "EUR", 10, "",
            PaymentStatus.APPROVED, None, now, now,
        )  # fmt: skip
        event = PaymentEvent(payment.payment_id, 1, payment.status, None, "system", "", now)
        request = SavedRequest(IdempotencyKey(CALLER, "shared"), "SubmitPayment", b"f", response)
        return await uow.repo.add_decision(
            payment, event, rules.submission_changes(payment), rules.transfer_entries(payment), request
        )

    async with SqlUnitOfWork(engine) as first:
        assert await decide(first, first_payer, b"first") is None
        async with SqlUnitOfWork(engine) as second:
            # The same key with other accounts: no lock in common, so the insert of the key waits.
            waiting = asyncio.create_task(decide(second, second_payer, b"second"))
            async with engine.connect() as connection:

                async def waits() -> object:
                    query = "SELECT count(*) FROM pg_locks WHERE NOT granted AND locktype = 'transactionid'"
                    return (await connection.execute(text(query))).scalar_one()

                await eventually(waits, what="the second insert of the key waits for the first")
            await first.commit()
            with pytest.raises(TransactionConflict):
                await waiting
    async with engine.connect() as connection:
        payers = (await connection.execute(text("SELECT payer_account_id FROM payments"))).scalars().all()
    assert payers == [first_payer.account_id]
