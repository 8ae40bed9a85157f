"""One behaviour for every approval store: the same cases against the unit tests' fake and SqlRepository.

`RepositoryContract` holds the cases; each backend subclasses it and provides a
`backend` fixture (units of work, and a look at the ledger, which the protocol never
reads back). The SQL backend runs on a migrated database of a private PostgreSQL.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any, Protocol
from uuid import UUID

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from approval_svc.adapters.repository import IdempotencyKey, SavedRequest, StoredRequest
from approval_svc.adapters.unit_of_work import SqlUnitOfWork, UnitOfWork
from approval_svc.domain import rules
from approval_svc.domain.model import (
    SYSTEM_ACTOR,
    Account,
    AccountChange,
    AccountStatus,
    DeclineReason,
    HoldReason,
    LedgerKind,
    Payment,
    PaymentEvent,
    PaymentStatus,
)
from tests.support.approval import engine_for
from tests.support.fakes import FakeUnitOfWork, Store

LedgerRow = tuple[LedgerKind, int, UUID | None]

# Two callers, as the servicer names them: a request_id is each one's own.
ADA, BOB = "token:ada", "certificate:bob"


def key(request_id: str | None = None, caller: str = ADA) -> IdempotencyKey:
    return IdempotencyKey(caller, request_id or uuid.uuid4().hex)


class Backend(Protocol):
    def unit_of_work(self) -> UnitOfWork: ...

    async def ledger(self, account_id: UUID) -> list[LedgerRow]:
        """The account's ledger entries in the order they were written."""
        ...


def new_account(now: datetime, opening: int = 1_000, owner: str = "Ada") -> Account:
    return Account(
        account_id=uuid.uuid4(),
        owner_name=owner,
        currency="EUR",
        status=AccountStatus.ACTIVE,
        ledger_balance=opening,
        held=0,
        per_payment_limit=5_000,
        daily_limit=10_000,
        created_at=now,
        updated_at=now,
    )


def new_payment(
    payer: Account,
    payee: Account,
    amount: int,
    at: datetime,
    status: PaymentStatus = PaymentStatus.APPROVED,
    request_id: str | None = None,
) -> Payment:
    return Payment(
        payment_id=uuid.uuid4(),
        request_id=request_id or uuid.uuid4().hex,
        payer_account_id=payer.account_id,
        payee_account_id=payee.account_id,
        payer_name=payer.owner_name,
        payee_name=payee.owner_name,
        currency="EUR",
        amount=amount,
        reference="ref",
        status=status,
        decline_reason=DeclineReason.INSUFFICIENT_FUNDS if status is PaymentStatus.DECLINED else None,
        created_at=at,
        updated_at=at,
        hold_reason=(
            HoldReason.AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD if status is PaymentStatus.PENDING_REVIEW else None
        ),
    )


def first_event(payment: Payment) -> PaymentEvent:
    return PaymentEvent(
        payment.payment_id, 1, payment.status, payment.decline_reason, SYSTEM_ACTOR, "", payment.created_at
    )


class RepositoryContract:
    """The cases every backend passes; subclasses provide the `backend` fixture."""

    @pytest.fixture
    def backend(self) -> Backend:
        raise NotImplementedError

    async def open_accounts(self, backend: Backend, *openings: int) -> list[Account]:
        """Accounts opened and committed, as the store read them back."""
        async with backend.unit_of_work() as uow:
            now = await uow.repo.now()
            accounts = [new_account(now, opening, f"owner {n}") for n, opening in enumerate(openings)]
            for account in accounts:
                await uow.repo.add_account(account, rules.opening_entries(account))
            await uow.commit()
        async with backend.unit_of_work() as uow:
            found = await uow.repo.lock_accounts([a.account_id for a in accounts])
        return [found[a.account_id] for a in accounts]

    # -- time and positions

    async def test_the_clock_stands_still_within_a_unit_of_work(self, backend: Backend) -> None:
        async with backend.unit_of_work() as uow:
            lookup = await uow.repo.claim_request(key(), "M", b"f")
            begun, _ = await uow.repo.begin_submission(key(), [])
            assert begun.now == lookup.now == await uow.repo.now()
            assert lookup.now.utcoffset() == timedelta(0)

    async def test_a_commit_returns_a_position_that_later_units_of_work_have_reached(
        self, backend: Backend
    ) -> None:
        async with backend.unit_of_work() as uow:
            await uow.repo.claim_request(key(), "M", b"f")
            first = await uow.commit()
        async with backend.unit_of_work() as uow:
            assert await uow.position() >= first
            await uow.repo.claim_request(key(), "M", b"f")
            second = await uow.commit()
        assert second > first

    # -- accounts

    async def test_an_account_is_stored_as_opened_with_its_opening_entry(self, backend: Backend) -> None:
        async with backend.unit_of_work() as uow:
            now = await uow.repo.now()
            account = new_account(now, opening=1_234)
            await uow.repo.add_account(account, rules.opening_entries(account))
            await uow.commit()
        async with backend.unit_of_work() as uow:
            assert await uow.repo.lock_accounts([account.account_id]) == {account.account_id: account}
        assert await backend.ledger(account.account_id) == [(LedgerKind.OPENING, 1_234, None)]

    async def test_an_account_opened_empty_has_no_ledger_entries(self, backend: Backend) -> None:
        (account,) = await self.open_accounts(backend, 0)
        assert account.ledger_balance == 0
        assert await backend.ledger(account.account_id) == []

    async def test_an_account_id_is_taken_once(self, backend: Backend) -> None:
        (account,) = await self.open_accounts(backend, 10)
        with pytest.raises(asyncpg.UniqueViolationError):
            async with backend.unit_of_work() as uow:
                await uow.repo.add_account(account, [])

    async def test_locking_returns_the_known_accounts_only(self, backend: Backend) -> None:
        first, second = await self.open_accounts(backend, 10, 20)
        async with backend.unit_of_work() as uow:
            assert await uow.repo.lock_accounts([]) == {}
            assert await uow.repo.lock_accounts([uuid.uuid4()]) == {}
            found = await uow.repo.lock_accounts([second.account_id, uuid.uuid4(), first.account_id])
            assert found == {first.account_id: first, second.account_id: second}
            _, locked = await uow.repo.begin_submission(key("r"), [first.account_id, uuid.uuid4()])
            assert locked == {first.account_id: first}

    async def test_an_account_is_frozen_and_unfrozen(self, backend: Backend) -> None:
        (account,) = await self.open_accounts(backend, 10)
        later = account.created_at + timedelta(minutes=1)
        async with backend.unit_of_work() as uow:
            await uow.repo.set_account_status(account.account_id, AccountStatus.FROZEN, later)
            await uow.commit()
        async with backend.unit_of_work() as uow:
            frozen = (await uow.repo.lock_accounts([account.account_id]))[account.account_id]
        assert (frozen.status, frozen.updated_at) == (AccountStatus.FROZEN, later)
        assert frozen.ledger_balance == account.ledger_balance

    async def test_setting_the_status_of_an_unknown_account_changes_nothing(self, backend: Backend) -> None:
        unknown = uuid.uuid4()
        async with backend.unit_of_work() as uow:
            await uow.repo.set_account_status(unknown, AccountStatus.FROZEN, await uow.repo.now())
            await uow.commit()
        async with backend.unit_of_work() as uow:
            assert await uow.repo.lock_accounts([unknown]) == {}

    # -- idempotency records

    async def test_a_first_claim_finds_no_record(self, backend: Backend) -> None:
        async with backend.unit_of_work() as uow:
            lookup = await uow.repo.claim_request(key("first"), "SubmitPayment", b"f")
        assert lookup.stored is None

    async def test_a_claim_is_released_unless_committed(self, backend: Backend) -> None:
        async with backend.unit_of_work() as uow:
            await uow.repo.claim_request(key("released"), "M", b"f")
            await uow.repo.save_response(key("released"), b"never committed")
        async with backend.unit_of_work() as uow:
            assert (await uow.repo.claim_request(key("released"), "M", b"f")).stored is None

    async def test_a_committed_response_is_read_back_by_every_lookup(self, backend: Backend) -> None:
        async with backend.unit_of_work() as uow:
            assert (await uow.repo.claim_request(key("kept"), "FreezeAccount", b"fp")).stored is None
            await uow.repo.save_response(key("kept"), b"the response")
            await uow.commit()
        record = StoredRequest("FreezeAccount", b"fp", b"the response")
        async with backend.unit_of_work() as uow:
            # Another method and fingerprint do not overwrite the record: the caller compares them.
            assert (await uow.repo.claim_request(key("kept"), "Other", b"other")).stored == record
            lookup, _ = await uow.repo.begin_submission(key("kept"), [])
            assert lookup.stored == record
            assert await uow.repo.find_request(key("kept")) == record

    async def test_a_request_claimed_in_this_unit_of_work_has_an_empty_response(
        self, backend: Backend
    ) -> None:
        async with backend.unit_of_work() as uow:
            await uow.repo.claim_request(key("mine"), "M", b"f")
            assert (await uow.repo.claim_request(key("mine"), "M", b"f")).stored == StoredRequest(
                "M", b"f", b""
            )

    async def test_a_response_is_saved_only_for_a_claimed_request(self, backend: Backend) -> None:
        with pytest.raises(RuntimeError):
            async with backend.unit_of_work() as uow:
                await uow.repo.save_response(key("unclaimed"), b"response")

    async def test_a_lookup_misses_an_unknown_request(self, backend: Backend) -> None:
        async with backend.unit_of_work() as uow:
            lookup, _ = await uow.repo.begin_submission(key("unknown"), [])
            assert lookup.stored is None
            assert await uow.repo.find_request(key("unknown")) is None

    async def test_one_request_id_of_two_callers_is_two_records(self, backend: Backend) -> None:
        for caller in (ADA, BOB):
            async with backend.unit_of_work() as uow:
                # The other caller's record of the request_id is neither found nor in the way.
                lookup = await uow.repo.claim_request(key("shared", caller), "SubmitPayment", b"fp")
                assert lookup.stored is None
                await uow.repo.save_response(key("shared", caller), caller.encode())
                await uow.commit()
        async with backend.unit_of_work() as uow:
            for caller in (ADA, BOB):
                record = StoredRequest("SubmitPayment", b"fp", caller.encode())
                claimed = await uow.repo.claim_request(key("shared", caller), "SubmitPayment", b"fp")
                assert claimed.stored == record
                lookup, _ = await uow.repo.begin_submission(key("shared", caller), [])
                assert lookup.stored == record
                assert await uow.repo.find_request(key("shared", caller)) == record
            # A third caller has no record of it.
            lookup, _ = await uow.repo.begin_submission(key("shared", "token:carol"), [])
            assert lookup.stored is None
            assert await uow.repo.find_request(key("shared", "token:carol")) is None

    async def test_a_response_is_saved_only_under_the_caller_that_claimed(self, backend: Backend) -> None:
        async with backend.unit_of_work() as uow:
            await uow.repo.claim_request(key("claimed"), "M", b"f")
            with pytest.raises(RuntimeError):
                await uow.repo.save_response(key("claimed", BOB), b"response")

    # -- payments

    async def test_a_decision_stores_the_payment_its_event_its_effects_and_its_response(
        self, backend: Backend
    ) -> None:
        payer, payee = await self.open_accounts(backend, 1_000, 0)
        async with backend.unit_of_work() as uow:
            now = await uow.repo.now()
            payment = new_payment(payer, payee, 400, now, request_id="decided")
            request = SavedRequest(key("decided"), "SubmitPayment", b"fp", b"the response")
            changes = rules.submission_changes(payment)
            stored = await uow.repo.add_decision(
                payment, first_event(payment), changes, rules.transfer_entries(payment), request
            )
            assert stored is None
            await uow.commit()
        async with backend.unit_of_work() as uow:
            assert await uow.repo.get_payment(payment.payment_id) == payment
            assert await uow.repo.get_payment_with_events(payment.payment_id) == (
                payment,
                [first_event(payment)],
            )
            accounts = await uow.repo.lock_accounts([payer.account_id, payee.account_id])
            lookup = await uow.repo.claim_request(key("decided"), "SubmitPayment", b"fp")
        assert accounts[payer.account_id] == payer.applied(changes[0], now)
        assert accounts[payee.account_id] == payee.applied(changes[1], now)
        assert (accounts[payer.account_id].ledger_balance, accounts[payee.account_id].ledger_balance) == (
            600,
            400,
        )
        assert (accounts[payer.account_id].sent_approved, accounts[payee.account_id].received_approved) == (
            1,
            1,
        )
        # The payer's usage of the day counts the payment; the payee's does not.
        assert accounts[payer.account_id].daily_usage == 400
        assert accounts[payer.account_id].daily_usage_day == rules.utc_day(now)
        assert (accounts[payee.account_id].daily_usage_day, accounts[payee.account_id].daily_usage) == (
            None,
            0,
        )
        assert lookup.stored == StoredRequest("SubmitPayment", b"fp", b"the response")
        assert await backend.ledger(payer.account_id) == [
            (LedgerKind.OPENING, 1_000, None),
            (LedgerKind.DEBIT, -400, payment.payment_id),
        ]
        assert await backend.ledger(payee.account_id) == [(LedgerKind.CREDIT, 400, payment.payment_id)]

    async def test_a_decision_whose_request_id_was_taken_returns_the_first_record(
        self, backend: Backend
    ) -> None:
        """A duplicate that held the locks committed first: its record comes back, for a replay."""
        payer, payee = await self.open_accounts(backend, 1_000, 0)
        async with backend.unit_of_work() as uow:
            await uow.repo.claim_request(key("taken"), "SubmitPayment", b"fp")
            await uow.repo.save_response(key("taken"), b"first")
            await uow.commit()
        async with backend.unit_of_work() as uow:
            payment = new_payment(payer, payee, 10, await uow.repo.now(), request_id="taken")
            request = SavedRequest(key("taken"), "SubmitPayment", b"other", b"second")
            stored = await uow.repo.add_decision(
                payment, first_event(payment), rules.submission_changes(payment), [], request
            )
            # The first record as it is, whatever this request's own fingerprint: the caller compares.
            assert stored == StoredRequest("SubmitPayment", b"fp", b"first")
            # Left without a commit, as the handler leaves it.
        async with backend.unit_of_work() as uow:
            assert await uow.repo.get_payment(payment.payment_id) is None
            assert (
                await uow.repo.claim_request(key("taken"), "SubmitPayment", b"fp")
            ).stored == StoredRequest("SubmitPayment", b"fp", b"first")

    async def test_a_decision_under_another_callers_request_id_is_its_own(self, backend: Backend) -> None:
        payer, payee = await self.open_accounts(backend, 1_000, 0)
        async with backend.unit_of_work() as uow:
            await uow.repo.claim_request(key("taken"), "SubmitPayment", b"fp")
            await uow.repo.save_response(key("taken"), b"ada's")
            await uow.commit()
        async with backend.unit_of_work() as uow:
            payment = new_payment(payer, payee, 10, await uow.repo.now(), request_id="taken")
            request = SavedRequest(key("taken", BOB), "SubmitPayment", b"fp", b"bob's")
            stored = await uow.repo.add_decision(
                payment, first_event(payment), rules.submission_changes(payment), [], request
            )
            assert stored is None
            await uow.commit()
        async with backend.unit_of_work() as uow:
            # The payment keeps the request_id as its caller sent it.
            assert await uow.repo.get_payment(payment.payment_id) == payment
            for caller, response in ((ADA, b"ada's"), (BOB, b"bob's")):
                lookup = await uow.repo.claim_request(key("taken", caller), "SubmitPayment", b"fp")
                assert lookup.stored == StoredRequest("SubmitPayment", b"fp", response)

    async def test_unknown_payments_are_not_found(self, backend: Backend) -> None:
        unknown = uuid.uuid4()
        async with backend.unit_of_work() as uow:
            assert await uow.repo.get_payment(unknown) is None
            assert await uow.repo.lock_payment(unknown) is None
            assert await uow.repo.get_payment_with_events(unknown) is None

    async def test_a_held_payment_is_reviewed_and_its_timeline_grows_in_order(self, backend: Backend) -> None:
        payer, payee = await self.open_accounts(backend, 5_000, 0)
        async with backend.unit_of_work() as uow:
            held = new_payment(payer, payee, 1_500, await uow.repo.now(), PaymentStatus.PENDING_REVIEW)
            await uow.repo.add_payment(held, first_event(held))
            await uow.repo.apply_changes(rules.submission_changes(held), [], held.created_at)
            await uow.commit()
        later = held.created_at + timedelta(minutes=5)
        async with backend.unit_of_work() as uow:
            locked = await uow.repo.lock_payment(held.payment_id)
            assert locked == held
            assert (await uow.repo.lock_accounts([payer.account_id]))[payer.account_id].held == 1_500
            # Only the status, the reason and the time change: the rest of the row stays as submitted.
            approved = dataclasses.replace(
                held, status=PaymentStatus.APPROVED, updated_at=later, reference="not stored"
            )
            event = PaymentEvent(held.payment_id, 2, PaymentStatus.APPROVED, None, "bob", "checked", later)
            await uow.repo.update_payment(approved, event)
            await uow.repo.apply_changes(
                rules.review_changes(approved, approve=True), rules.transfer_entries(approved), later
            )
            await uow.commit()
        async with backend.unit_of_work() as uow:
            found = await uow.repo.get_payment_with_events(held.payment_id)
            accounts = await uow.repo.lock_accounts([payer.account_id, payee.account_id])
        assert found is not None
        payment, timeline = found
        assert (payment.status, payment.updated_at, payment.reference, payment.hold_reason) == (
            PaymentStatus.APPROVED,
            later,
            "ref",
            HoldReason.AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD,
        )
        assert payment.created_at == held.created_at
        assert [(e.sequence, e.status, e.actor, e.note) for e in timeline] == [
            (1, PaymentStatus.PENDING_REVIEW, SYSTEM_ACTOR, ""),
            (2, PaymentStatus.APPROVED, "bob", "checked"),
        ]
        payer_after, payee_after = accounts[payer.account_id], accounts[payee.account_id]
        assert (payer_after.ledger_balance, payer_after.held, payer_after.updated_at) == (3_500, 0, later)
        assert (payer_after.sent_pending_review, payer_after.sent_approved) == (0, 1)
        assert (payee_after.ledger_balance, payee_after.received_approved) == (1_500, 1)

    async def test_updating_an_unknown_payment_changes_nothing(self, backend: Backend) -> None:
        payer, payee = await self.open_accounts(backend, 10, 0)
        async with backend.unit_of_work() as uow:
            ghost = new_payment(payer, payee, 1, await uow.repo.now())
            await uow.repo.update_payment(ghost, first_event(ghost))
            await uow.commit()
        async with backend.unit_of_work() as uow:
            assert await uow.repo.get_payment_with_events(ghost.payment_id) is None

    async def test_a_payment_is_rolled_back_unless_committed(self, backend: Backend) -> None:
        payer, payee = await self.open_accounts(backend, 10, 0)
        async with backend.unit_of_work() as uow:
            payment = new_payment(payer, payee, 1, await uow.repo.now())
            await uow.repo.add_payment(payment, first_event(payment))
            assert await uow.repo.get_payment(payment.payment_id) == payment
        async with backend.unit_of_work() as uow:
            assert await uow.repo.get_payment(payment.payment_id) is None

    # -- balances and limits

    async def test_the_daily_counter_moves_by_the_models_rule(self, backend: Backend) -> None:
        """The store's arithmetic of the counter is Account.applied's, across a day boundary."""
        (account,) = await self.open_accounts(backend, 10_000)
        assert (account.daily_usage_day, account.daily_usage) == (None, 0)
        today = rules.utc_day(account.created_at)
        yesterday, tomorrow = today - timedelta(days=1), today + timedelta(days=1)
        steps = [
            (100, today),  # the first count starts the day
            (20, today),  # the same day adds up
            (0, today),  # a decline counts nothing
            (0, None),  # a change of no day's usage (the payee's side, an approval)
            (-50, yesterday),  # a decline of a payment of an earlier day gives nothing back
            (7, tomorrow),  # the first payment of a later day starts its count
            (-100, today),  # the day before the counter's: nothing back
            (5, today),  # nor anything added
            (-7, tomorrow),  # a decline of a payment of the counter's day gives it back
        ]
        expected = account
        for step, (usage, day) in enumerate(steps):
            change = AccountChange(account.account_id, ledger=1, daily_usage=usage, daily_usage_day=day)
            at = account.created_at + timedelta(seconds=step + 1)
            expected = expected.applied(change, at)
            async with backend.unit_of_work() as uow:
                await uow.repo.apply_changes([change], [], at)
                await uow.commit()
            async with backend.unit_of_work() as uow:
                locked = await uow.repo.lock_accounts([account.account_id])
                _, begun = await uow.repo.begin_submission(key(), [account.account_id])
            assert locked == begun == {account.account_id: expected}, f"step {step}: {usage}, {day}"
        assert (expected.daily_usage_day, expected.daily_usage) == (tomorrow, 0)

    async def test_changes_move_balances_and_counters_and_stamp_the_time(self, backend: Backend) -> None:
        (account,) = await self.open_accounts(backend, 100)
        change = AccountChange(account.account_id, ledger=50, held=30, total_received=50, received_declined=2)
        at = account.created_at + timedelta(seconds=1)
        async with backend.unit_of_work() as uow:
            await uow.repo.apply_changes([change], [], at)
            await uow.commit()
        async with backend.unit_of_work() as uow:
            after = (await uow.repo.lock_accounts([account.account_id]))[account.account_id]
        assert after == account.applied(change, at)

    @pytest.mark.parametrize(
        "change",
        [
            pytest.param({"held": 101}, id="held-above-balance"),
            pytest.param({"held": -1}, id="negative-held"),
            pytest.param({"ledger": -101}, id="negative-balance"),
            pytest.param({"total_sent": -1}, id="negative-total-sent"),
            pytest.param({"total_received": -1}, id="negative-total-received"),
        ],
    )
    async def test_changes_that_break_a_balance_invariant_are_refused(
        self, backend: Backend, change: dict[str, Any]
    ) -> None:
        (account,) = await self.open_accounts(backend, 100)
        with pytest.raises(asyncpg.CheckViolationError):
            async with backend.unit_of_work() as uow:
                await uow.repo.apply_changes(
                    [AccountChange(account.account_id, **change)], [], await uow.repo.now()
                )
        async with backend.unit_of_work() as uow:
            assert await uow.repo.lock_accounts([account.account_id]) == {account.account_id: account}


class FakeBackend:
    def __init__(self) -> None:
        self.store = Store()

    def unit_of_work(self) -> UnitOfWork:
        return FakeUnitOfWork(self.store)

    async def ledger(self, account_id: UUID) -> list[LedgerRow]:
        return [(e.kind, e.amount, e.payment_id) for e in self.store.ledger if e.account_id == account_id]


class SqlBackend:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def unit_of_work(self) -> UnitOfWork:
        return SqlUnitOfWork(self.engine)

    async def ledger(self, account_id: UUID) -> list[LedgerRow]:
        async with self.engine.connect() as connection:
            rows = await connection.execute(
                text(
                    "SELECT kind, amount_minor, payment_id FROM ledger_entries"
                    " WHERE account_id = :account ORDER BY entry_id"
                ),
                {"account": account_id},
            )
            return [(LedgerKind(r.kind), r.amount_minor, r.payment_id) for r in rows]


class TestFakeRepository(RepositoryContract):
    @pytest.fixture
    def backend(self) -> Backend:
        return FakeBackend()


class TestSqlRepository(RepositoryContract):
    @pytest.fixture
    async def backend(self, migrated_dsn: str) -> AsyncIterator[Backend]:
        async with engine_for(migrated_dsn, pool_size=2) as engine:
            yield SqlBackend(engine)
