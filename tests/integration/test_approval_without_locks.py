"""A submission decided without locks: two round trips, and nothing written unless its inputs are as it read them.

The handlers read the request's record and the accounts (with their row versions) without
locks, decide, then CALL `submit_decided` (migration 0005), which writes and commits only
if the accounts are still those versions. Anything else is decided again under the locks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from types import TracebackType
from typing import Any, ClassVar, Self
from uuid import UUID

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from approval_svc import metrics
from approval_svc.adapters.repository import IdempotencyKey, Peek, SavedRequest, Submitted
from approval_svc.adapters.unit_of_work import SqlSubmissionPath, SqlUnitOfWork
from approval_svc.domain import commands
from approval_svc.domain.model import (
    Account,
    AccountChange,
    DeclineReason,
    LedgerEntry,
    Payment,
    PaymentEvent,
    PaymentStatus,
)
from approval_svc.handlers import Handlers, RequestKey
from tests.support.approval import engine_for, handlers_for, key, open_account


@pytest.fixture
async def engine(migrated_dsn: str) -> AsyncIterator[AsyncEngine]:
    async with engine_for(migrated_dsn) as created:
        yield created


class _Interleaved(SqlSubmissionPath):
    """The path with `between` run after the read and before the write: what another call did meanwhile."""

    def __init__(self, engine: AsyncEngine, between: Callable[[], Awaitable[None]]) -> None:
        super().__init__(engine)
        self._between = between
        self.outcomes: list[str] = []

    async def commit(
        self,
        payment: Payment,
        event: PaymentEvent,
        changes: Sequence[AccountChange],
        entries: Sequence[LedgerEntry],
        request: SavedRequest,
        versions: dict[UUID, str],
    ) -> Submitted:
        await self._between()
        submitted = await super().commit(payment, event, changes, entries, request, versions)
        self.outcomes.append(submitted.outcome)
        return submitted


class _Logged(SqlSubmissionPath):
    """The path, recording the first word of every statement it sends."""

    statements: ClassVar[list[str]] = []

    async def __aenter__(self) -> Self:
        entered = await super().__aenter__()
        self._require().add_query_logger(self._log)
        return entered

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._require().remove_query_logger(self._log)
        await super().__aexit__(exc_type, exc, tb)

    @classmethod
    def _log(cls, record: Any) -> None:
        cls.statements.append(record.query.split()[0].upper())


async def _balance(engine: AsyncEngine, account: Account) -> int:
    async with engine.connect() as connection:
        value = await connection.scalar(
            text("SELECT ledger_balance_minor FROM accounts WHERE account_id = :a"), {"a": account.account_id}
        )
    return int(value)


def _submission(payer: Account, payee: Account, amount: int) -> commands.SubmitPayment:
    return commands.SubmitPayment(payer.account_id, payee.account_id, "EUR", amount, "")


async def test_a_payment_is_decided_in_two_round_trips(engine: AsyncEngine) -> None:
    handlers = Handlers(lambda: SqlUnitOfWork(engine), 10**9, submissions=lambda: _Logged(engine))
    payer, payee = await open_account(handlers, 10**6), await open_account(handlers, 0)
    # The connection's first call prepares the statements.
    await handlers.submit_payment(_submission(payer, payee, 10), key("SubmitPayment"))
    _Logged.statements.clear()
    before = metrics.SUBMISSIONS_WITHOUT_LOCKS.labels("committed")._value.get()
    outcome = await handlers.submit_payment(_submission(payer, payee, 10), key("SubmitPayment"))
    assert outcome.value is not None
    assert outcome.value.status is PaymentStatus.APPROVED
    # The read without locks and the write that commits (asyncpg may report them in either order).
    assert sorted(_Logged.statements) == ["CALL", "SELECT"]
    assert metrics.SUBMISSIONS_WITHOUT_LOCKS.labels("committed")._value.get() == before + 1
    assert await _balance(engine, payer) == 10**6 - 20


async def test_a_decision_on_an_account_that_changed_since_it_was_read_is_made_again_under_the_locks(
    engine: AsyncEngine,
) -> None:
    plain = handlers_for(engine, 10**9)
    payer, payee = await open_account(plain, 100), await open_account(plain, 0)

    async def another_payment_takes_the_balance() -> None:
        taken = await plain.submit_payment(_submission(payer, payee, 80), key("SubmitPayment"))
        assert taken.value is not None
        assert taken.value.status is PaymentStatus.APPROVED

    paths: list[_Interleaved] = []

    def path() -> _Interleaved:
        # Only the first submission has another one come in between.
        made = _Interleaved(engine, another_payment_takes_the_balance if not paths else _nothing)
        paths.append(made)
        return made

    handlers = Handlers(lambda: SqlUnitOfWork(engine), 10**9, submissions=path)
    # Read with 100 available, 50 would be approved; by its write only 20 are left.
    outcome = await handlers.submit_payment(_submission(payer, payee, 50), key("SubmitPayment"))
    assert paths[0].outcomes == ["conflict"]
    assert outcome.value is not None
    assert (outcome.value.status, outcome.value.decline_reason) == (
        PaymentStatus.DECLINED,
        DeclineReason.INSUFFICIENT_FUNDS,
    )
    assert await _balance(engine, payer) == 20
    async with engine.connect() as connection:
        written = await connection.scalar(
            text("SELECT count(*) FROM payments WHERE payer_account_id = :a"), {"a": payer.account_id}
        )
    assert written == 2  # the one that came in between, and this one's decline: nothing twice


async def _nothing() -> None:
    return None


async def test_a_request_recorded_between_the_read_and_the_write_is_replayed_and_nothing_is_written(
    engine: AsyncEngine, migrated_dsn: str
) -> None:
    handlers = handlers_for(engine, 10**9)
    payer, payee = await open_account(handlers, 10**6), await open_account(handlers, 0)
    request: RequestKey[Payment] = key("SubmitPayment", fingerprint=b"same")

    async def recorded_meanwhile() -> None:
        # Another call with the same key committed its record, and touched no account of this one.
        connection = await asyncpg.connect(migrated_dsn)
        try:
            await connection.execute(
                "INSERT INTO idempotency_keys (caller, request_id, method, request_fingerprint, response)"
                " VALUES ($1, $2, $3, $4, $5)",
                request.caller,
                request.request_id,
                request.method,
                b"same",
                b"the first answer",
            )
        finally:
            await connection.close()

    path = _Interleaved(engine, recorded_meanwhile)
    quick = Handlers(lambda: SqlUnitOfWork(engine), 10**9, submissions=lambda: path)
    outcome = await quick.submit_payment(_submission(payer, payee, 10), request)
    assert path.outcomes == ["replay"]
    assert (outcome.value, outcome.replay) == (None, b"the first answer")
    assert await _balance(engine, payer) == 10**6
    async with engine.connect() as connection:
        assert await connection.scalar(text("SELECT count(*) FROM payments")) == 0


async def test_the_read_answers_a_recorded_request_with_its_record_and_a_position_past_its_commit(
    engine: AsyncEngine,
) -> None:
    handlers = handlers_for(engine, 10**9)
    payer, payee = await open_account(handlers, 10**6), await open_account(handlers, 0)
    request: RequestKey[Payment] = key("SubmitPayment")
    first = await handlers.submit_payment(_submission(payer, payee, 10), request)
    async with SqlSubmissionPath(engine) as path:
        peek: Peek = await path.peek(IdempotencyKey(request.caller, request.request_id), [payer.account_id])
    assert peek.stored is not None
    assert peek.stored.response == b"stored"
    assert peek.position >= first.position
    again = await handlers.submit_payment(_submission(payer, payee, 10), request)
    assert (again.value, again.replay) == (None, b"stored")
    assert again.position >= first.position
    assert await _balance(engine, payer) == 10**6 - 10
