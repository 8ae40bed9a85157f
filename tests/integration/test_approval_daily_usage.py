"""The daily limit's counter against a private PostgreSQL: exact under concurrency, given back by declines, and
read without the payer's payments."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import date
from types import TracebackType
from typing import ClassVar, Self

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from approval_svc.adapters.unit_of_work import SqlUnitOfWork
from approval_svc.domain import commands
from approval_svc.domain.model import Account, DeclineReason, Payment, PaymentStatus
from approval_svc.handlers import Handlers
from tests.support.approval import engine_for, handlers_for, key, open_account

THRESHOLD = 700

# The payer's usage of the day as the rule defines it, from its payments.
_SUM = """
    SELECT coalesce(sum(amount_minor), 0) FROM payments
    WHERE payer_account_id = :a AND status IN ('APPROVED', 'PENDING_REVIEW')
      AND created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'
"""


@pytest.fixture
async def engine(migrated_dsn: str) -> AsyncIterator[AsyncEngine]:
    async with engine_for(migrated_dsn, pool_size=20) as engine:
        yield engine


async def usage(engine: AsyncEngine, account: Account) -> tuple[date | None, int, int]:
    """The account's counter (its day and amount) and the SUM over its payments of today."""
    async with engine.connect() as connection:
        day, counted = (
            await connection.execute(
                text("SELECT daily_usage_day, daily_usage_minor FROM accounts WHERE account_id = :a"),
                {"a": account.account_id},
            )
        ).one()
        summed = (await connection.execute(text(_SUM), {"a": account.account_id})).scalar_one()
    return day, counted, int(summed)


async def today(engine: AsyncEngine) -> date:
    async with engine.connect() as connection:
        day: date = (await connection.execute(text("SELECT (now() AT TIME ZONE 'UTC')::date"))).scalar_one()
    return day


async def submit(handlers: Handlers, payer: Account, payee: Account, amount: int) -> Payment:
    command = commands.SubmitPayment(payer.account_id, payee.account_id, "EUR", amount, "")
    outcome = await handlers.submit_payment(command, key("SubmitPayment"))
    assert outcome.value is not None
    return outcome.value


async def review(handlers: Handlers, payment: Payment, approve: bool) -> Payment:
    command = commands.ReviewPayment(payment.payment_id, "eve", "", approve)
    outcome = await handlers.review_payment(command, key("ApprovePayment" if approve else "DeclinePayment"))
    assert outcome.value is not None
    return outcome.value


async def test_concurrent_payments_of_one_payer_never_pass_its_daily_limit(engine: AsyncEngine) -> None:
    handlers = handlers_for(engine, review_threshold=THRESHOLD)
    limit = 20_000
    payer = await open_account(handlers, 10**9, daily_limit=limit)
    payee = await open_account(handlers, 0)
    rng = random.Random(20260305)
    amounts = [rng.randint(100, 1_000) for _ in range(80)]
    assert sum(amounts) > 2 * limit

    decided = await asyncio.gather(*(submit(handlers, payer, payee, amount) for amount in amounts))

    counted = [p for p in decided if p.status is not PaymentStatus.DECLINED]
    assert {p.status for p in counted} == {PaymentStatus.APPROVED, PaymentStatus.PENDING_REVIEW}
    used = sum(p.amount for p in counted)
    assert used <= limit
    assert await usage(engine, payer) == (await today(engine), used, used)
    # No payment was declined that fitted: each decline saw at most today's final usage.
    declined = [p for p in decided if p.status is PaymentStatus.DECLINED]
    assert declined
    assert {p.decline_reason for p in declined} == {DeclineReason.DAILY_LIMIT_EXCEEDED}
    assert all(used + p.amount > limit for p in declined)


async def test_concurrent_payments_and_reviews_keep_every_counter_equal_to_the_sum(
    engine: AsyncEngine,
) -> None:
    """Three accounts paying each other in both directions while reviewers approve and decline held payments."""
    handlers = handlers_for(engine, review_threshold=THRESHOLD)
    limit = 15_000
    accounts = [await open_account(handlers, 10**9, daily_limit=limit) for _ in range(3)]
    held = [await submit(handlers, accounts[i % 3], accounts[(i + 1) % 3], THRESHOLD + i) for i in range(12)]

    async def payments(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(15):
            payer, payee = rng.sample(accounts, 2)
            await submit(handlers, payer, payee, rng.randint(100, 1_200))

    async def reviewer(held_payments: list[Payment], approve: bool) -> None:
        for payment in held_payments:
            await review(handlers, payment, approve)

    await asyncio.gather(
        *(payments(20260306 + n) for n in range(6)),
        reviewer(held[0::2], approve=False),
        reviewer(held[1::2], approve=True),
    )
    day = await today(engine)
    for account in accounts:
        counter_day, counted, summed = await usage(engine, account)
        assert (counter_day, counted) == (day, summed)
        assert counted <= limit


async def test_a_declined_review_gives_its_amount_back_to_its_own_day(engine: AsyncEngine) -> None:
    handlers = handlers_for(engine, review_threshold=THRESHOLD)
    payer = await open_account(handlers, 100_000, daily_limit=3_000)
    payee = await open_account(handlers, 0)
    held_yesterday = await submit(handlers, payer, payee, 1_000)
    # As yesterday left them: the payment, and the counter that counted it.
    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE payments SET created_at = created_at - interval '1 day' WHERE payment_id = :p"),
            {"p": held_yesterday.payment_id},
        )
        await connection.execute(
            text("UPDATE accounts SET daily_usage_day = daily_usage_day - 1 WHERE account_id = :a"),
            {"a": payer.account_id},
        )
    day = await today(engine)
    held_today = await submit(handlers, payer, payee, 2_000)
    assert held_today.status is PaymentStatus.PENDING_REVIEW
    assert await usage(engine, payer) == (day, 2_000, 2_000)

    # Yesterday's payment declined today: its funds are released, today's usage stays.
    await review(handlers, held_yesterday, approve=False)
    assert await usage(engine, payer) == (day, 2_000, 2_000)
    assert (await submit(handlers, payer, payee, 1_001)).decline_reason is DeclineReason.DAILY_LIMIT_EXCEEDED
    # Today's declined: its amount is free again today.
    await review(handlers, held_today, approve=False)
    assert await usage(engine, payer) == (day, 0, 0)
    again = await submit(handlers, payer, payee, 3_000)
    assert again.status is PaymentStatus.PENDING_REVIEW
    # An approval changes nothing: the payment was counted when it was held.
    await review(handlers, again, approve=True)
    assert await usage(engine, payer) == (day, 3_000, 3_000)
    assert (await submit(handlers, payer, payee, 1)).decline_reason is DeclineReason.DAILY_LIMIT_EXCEEDED


# What the connection has read of payments and not yet reported to the cumulative statistics:
# scans started, rows read by them. Nothing is reported within a transaction, so what a
# transaction reads is the difference between its start and its end.
_PAYMENTS_READ = """
    SELECT coalesce(sum(seq_scan), 0) AS seq_scan, coalesce(sum(seq_tup_read), 0) AS seq_tup_read,
           coalesce(sum(idx_scan), 0) AS idx_scan, coalesce(sum(idx_tup_fetch), 0) AS idx_tup_fetch
    FROM pg_stat_xact_user_tables WHERE relname = 'payments'
"""

Reads = tuple[int, int, int, int]


class MeasuredUnitOfWork(SqlUnitOfWork):
    """Records what its transaction read of the payments table, and the statements it sent."""

    reads: ClassVar[list[Reads]] = []
    statements: ClassVar[list[list[str]]] = []

    async def _payments_read(self) -> Reads:
        # The statistics of a transaction are its own connection's.
        row = await self._require().fetchrow(_PAYMENTS_READ)
        return int(row["seq_scan"]), int(row["seq_tup_read"]), int(row["idx_scan"]), int(row["idx_tup_fetch"])

    def _sent(self, query: asyncpg.connection.LoggedQuery) -> None:
        if query.query != _PAYMENTS_READ:
            self.statements[-1].append(query.query.split()[0])

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        self._before = await self._payments_read()
        # The BEGIN went out before a logger could be added to the pooled connection.
        self.statements.append(["BEGIN"])
        self._require().add_query_logger(self._sent)
        return self

    async def commit(self) -> int:
        after = await self._payments_read()
        (seq_scans, seq_rows, index_scans, index_rows), before = after, self._before
        self.reads.append(
            (seq_scans - before[0], seq_rows - before[1], index_scans - before[2], index_rows - before[3])
        )
        return await super().commit()

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._require().remove_query_logger(self._sent)
        # The logger's calls were scheduled on the loop: let them run.
        await asyncio.sleep(0)
        await super().__aexit__(exc_type, exc, tb)


async def test_a_payment_reads_none_of_the_payers_earlier_payments(
    engine: AsyncEngine, migrated_dsn: str
) -> None:
    """The cost of the daily limit does not grow with the payer's payments of the day."""
    handlers = handlers_for(engine)
    limit = 10**12
    quiet, busy = await open_account(handlers, 10**9), await open_account(handlers, 10**9, daily_limit=limit)
    payee = await open_account(handlers, 0)
    volume, amount = 50_000, 10
    async with engine.begin() as connection:
        await connection.execute(
            text(
                """
                INSERT INTO payments (payment_id, request_id, payer_account_id, payee_account_id, payer_name,
                                      payee_name, currency_code, amount_minor, status, created_at, updated_at)
                SELECT gen_random_uuid(), 'bulk-' || n, :payer, :payee, 'Ada', 'Ada', 'EUR', :amount,
                       'APPROVED', now(), now()
                FROM generate_series(1, :volume) AS n
                """
            ),
            {"payer": busy.account_id, "payee": payee.account_id, "amount": amount, "volume": volume},
        )
        # What the counter holds after so many payments (they were written around it).
        await connection.execute(
            text(
                "UPDATE accounts SET daily_usage_day = (now() AT TIME ZONE 'UTC')::date, daily_usage_minor = :used"
                " WHERE account_id = :a"
            ),
            {"used": volume * amount, "a": busy.account_id},
        )
        await connection.execute(text("ANALYZE payments"))
    assert (await usage(engine, busy))[1:] == (volume * amount, volume * amount)

    async with engine_for(migrated_dsn, pool_size=1) as one_connection:
        measured = Handlers(lambda: MeasuredUnitOfWork(one_connection), review_threshold=10**9)
        # The connection's first payment prepares the statements (and asyncpg reads their types).
        await submit(measured, quiet, payee, amount)
        MeasuredUnitOfWork.reads.clear()
        MeasuredUnitOfWork.statements.clear()
        assert (await submit(measured, quiet, payee, amount)).status is PaymentStatus.APPROVED
        assert (await submit(measured, busy, payee, amount)).status is PaymentStatus.APPROVED
    on_quiet, on_busy = MeasuredUnitOfWork.reads
    # The same reads whatever the payer's volume; no scan of the table, and no row but the
    # foreign-key checks of the event and the two ledger entries, on the new payment's key.
    assert on_busy == on_quiet == (0, 0, 3, 3)
    # Under the locks, one round trip each: BEGIN, the lookup with the locks (and the counter),
    # the decision's writes (apply_decision), COMMIT, the WAL position.
    assert MeasuredUnitOfWork.statements == [["BEGIN", "SELECT", "SELECT", "COMMIT", "SELECT"]] * 2
    assert (await usage(engine, busy))[1:] == ((volume + 1) * amount, (volume + 1) * amount)
