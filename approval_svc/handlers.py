"""The use cases: each runs the rules in one unit of work, with AIP-155 idempotency and bounded retries."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Generic, TypeVar
from uuid import UUID, uuid4

from approval_svc import metrics
from approval_svc.adapters.repository import (
    IdempotencyKey,
    SavedRequest,
    StoredRequest,
    Submission,
    SubmissionPath,
)
from approval_svc.adapters.unit_of_work import UnitOfWork
from approval_svc.domain import commands, rules
from approval_svc.domain.errors import (
    AccountNotFound,
    DatabaseUnavailable,
    InvalidRequest,
    OwnPaymentReview,
    PaymentNotFound,
    PaymentNotUnderReview,
    RequestIdReused,
    TransactionConflict,
)
from approval_svc.domain.model import (
    MAX_AMOUNT,
    SYSTEM_ACTOR,
    Account,
    AccountStatus,
    DeclineReason,
    LedgerEntry,
    Payment,
    PaymentEvent,
    PaymentStatus,
)
from payments_common import tracing

log = logging.getLogger(__name__)

T = TypeVar("T")

# Sequence numbers of a payment's timeline: the decision at submission, then the review.
SUBMISSION_SEQUENCE = 1
REVIEW_SEQUENCE = 2


@dataclass(frozen=True)
class RequestKey(Generic[T]):
    """How to recognise a mutation's retries, and how to store its response (AIP-155).

    A request_id is the caller's own: `caller` names who sent it, and a retry is the same
    request from the same caller. `fingerprint` identifies the request's content;
    `encode` turns the result into the bytes of the response that a retry gets back.
    """

    caller: str
    request_id: str
    method: str
    fingerprint: bytes
    encode: Callable[[T], bytes]

    @property
    def stored_as(self) -> IdempotencyKey:
        """The key of the request's record."""
        return IdempotencyKey(self.caller, self.request_id)


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """A mutation's result: either `value` (done now) or `replay` (the stored first response).

    `position` is a WAL position at or after the commit of the effect.
    """

    value: T | None
    replay: bytes | None
    position: int


UnitOfWorkFactory = Callable[[], UnitOfWork]
# Opens the path of one call for one submission (SqlSubmissionPath); None: every submission is decided
# under the locks in Python.
SubmissionPathFactory = Callable[[], AbstractAsyncContextManager[SubmissionPath]]


def _submission_records(
    payment: Payment, key: RequestKey[Payment]
) -> tuple[PaymentEvent, list[LedgerEntry], SavedRequest]:
    """What a decided submission writes besides the payment: its first event, its ledger entries, its record."""
    event = PaymentEvent(
        payment.payment_id,
        SUBMISSION_SEQUENCE,
        payment.status,
        payment.decline_reason,
        SYSTEM_ACTOR,
        "",
        payment.created_at,
    )
    entries = rules.transfer_entries(payment) if payment.status is PaymentStatus.APPROVED else []
    request = SavedRequest(key.stored_as, key.method, key.fingerprint, key.encode(payment))
    return event, entries, request


def _submitted(
    command: commands.SubmitPayment,
    request_id: str,
    payment_id: UUID,
    names: tuple[str, str],
    decision: rules.Decision,
    at: datetime,
) -> Payment:
    """The payment that `command` became, decided at `at`; `names` are the payer's and the payee's."""
    return Payment(
        payment_id=payment_id,
        request_id=request_id,
        payer_account_id=command.payer_account_id,
        payee_account_id=command.payee_account_id,
        payer_name=names[0],
        payee_name=names[1],
        currency=command.currency,
        amount=command.amount,
        reference=command.reference,
        status=decision.status,
        decline_reason=decision.decline_reason,
        created_at=at,
        updated_at=at,
        hold_reason=decision.hold_reason,
    )


def _note_decided(payment: Payment) -> None:
    """Names the committed payment in the call's log lines and span (never a decision that was not kept)."""
    tracing.note_payment(str(payment.payment_id))
    tracing.set_attributes({"payment.status": payment.status.name})


def _stored_response(stored: StoredRequest | None, key: RequestKey[T]) -> bytes | None:
    if stored is None:
        return None
    if stored.method != key.method or stored.fingerprint != key.fingerprint:
        raise RequestIdReused(key.request_id)
    metrics.REPLAYS.labels(key.method).inc()
    return stored.response


class Handlers:
    """The command side's use cases, each in its own unit of work."""

    def __init__(
        self,
        uow_factory: UnitOfWorkFactory,
        review_threshold: int,
        new_id: Callable[[], UUID] = uuid4,
        max_attempts: int = 8,
        submissions: SubmissionPathFactory | None = None,
    ) -> None:
        self._uow_factory = uow_factory
        self._submissions = submissions
        self._review_threshold = review_threshold
        self._new_id = new_id
        self._max_attempts = max_attempts

    async def _run(self, work: Callable[[UnitOfWork], Awaitable[T]]) -> T:
        attempt = 1
        while True:
            try:
                async with self._uow_factory() as uow:
                    return await work(uow)
            except TransactionConflict:
                if attempt >= self._max_attempts:
                    raise DatabaseUnavailable("the database stayed too busy to commit; retry") from None
            metrics.RETRIES.inc()
            # Jitter spreads the retries of transactions that collided at the same moment.
            await asyncio.sleep(random.uniform(0, 0.001 * 2**attempt))
            attempt += 1

    async def _run_idempotent(
        self, key: RequestKey[T], act: Callable[[UnitOfWork, datetime], Awaitable[T]]
    ) -> Outcome[T]:
        """Runs `act` once per caller and request_id (AIP-155), in `_run`'s unit of work.

        The key is claimed before `act` takes any lock; a retry gets the stored response
        back. `act` is given the transaction's timestamp; its result is recorded as the
        response and committed with its effect.
        """

        async def work(uow: UnitOfWork) -> Outcome[T]:
            lookup = await uow.repo.claim_request(key.stored_as, key.method, key.fingerprint)
            replay = _stored_response(lookup.stored, key)
            if replay is not None:
                return Outcome(None, replay, await uow.position())
            value = await act(uow, lookup.now)
            await uow.repo.save_response(key.stored_as, key.encode(value))
            return Outcome(value, None, await uow.commit())

        return await self._run(work)

    async def create_account(
        self, command: commands.CreateAccount, key: RequestKey[Account]
    ) -> Outcome[Account]:
        async def open_account(uow: UnitOfWork, now: datetime) -> Account:
            account = Account(
                account_id=self._new_id(),
                owner_name=command.owner_name,
                currency=command.currency,
                status=AccountStatus.ACTIVE,
                ledger_balance=command.opening_balance,
                held=0,
                per_payment_limit=command.per_payment_limit,
                daily_limit=command.daily_limit,
                created_at=now,
                updated_at=now,
            )
            await uow.repo.add_account(account, rules.opening_entries(account))
            return account

        outcome = await self._run_idempotent(key, open_account)
        if outcome.value is not None:
            log.info("account opened", extra={"account_id": str(outcome.value.account_id)})
        return outcome

    async def submit_payment(
        self, command: commands.SubmitPayment, key: RequestKey[Payment]
    ) -> Outcome[Payment]:
        """Decides and records a payment, once per request_id.

        First in one round trip: a procedure that takes the accounts' locks, decides with
        the rules in PostgreSQL (held to `rules` by a contract test), writes and commits.
        What it refuses (an account missing, a credit the payee cannot hold, a usage counted
        for a later day, the key committed meanwhile) is decided again here, under the
        locks, with the rules in Python, which give each case its error.
        """
        if self._submissions is not None:
            quick = await self._submit_in_one_call(command, key)
            if quick is not None:
                if quick.value is not None:
                    _count_decision(quick.value, SYSTEM_ACTOR)
                return quick

        async def work(uow: UnitOfWork) -> Outcome[Payment]:
            repo = uow.repo
            lookup, accounts = await repo.begin_submission(
                key.stored_as, [command.payer_account_id, command.payee_account_id]
            )
            replay = _stored_response(lookup.stored, key)
            if replay is not None:
                return Outcome(None, replay, await uow.position())
            now = lookup.now
            try:
                payment = self._decide(command, key.request_id, accounts, now)
            except (AccountNotFound, InvalidRequest):
                # The lookup above ran before the locks were granted: a duplicate that held
                # them may have committed since (its credit may be what no longer fits). Its
                # answer is this one's. The decision's write checks the key the same way.
                replay = _stored_response(await repo.find_request(key.stored_as), key)
                if replay is not None:
                    return Outcome(None, replay, await uow.position())
                raise
            event, entries, request = _submission_records(payment, key)
            stored = await repo.add_decision(
                payment, event, rules.submission_changes(payment), entries, request
            )
            replay = _stored_response(stored, key)
            if replay is not None:
                # Nothing of this decision is committed: the unit of work rolls it back.
                return Outcome(None, replay, await uow.position())
            committed = Outcome(payment, None, await uow.commit())
            _note_decided(payment)
            return committed

        outcome = await self._run(work)
        if outcome.value is not None:
            _count_decision(outcome.value, SYSTEM_ACTOR)
        return outcome

    async def _submit_in_one_call(
        self, command: commands.SubmitPayment, key: RequestKey[Payment]
    ) -> Outcome[Payment] | None:
        """The submission in one round trip, or None when it must be decided under the locks in Python.

        A call that gets no connection fails as the locked path would (it would wait for one
        again), and so does one that the database does not answer within the command timeout
        (it would queue for the same locks again); one whose connection fails once it has it
        is decided again under the locks, on another, where the request's record is found if
        its commit went through.
        """
        assert self._submissions is not None
        submission = Submission(
            key.stored_as,
            key.method,
            key.fingerprint,
            self._new_id(),
            command.payer_account_id,
            command.payee_account_id,
            command.currency,
            command.amount,
            command.reference,
            # A threshold above any amount (no payment is held) does not fit a bigint: None.
            self._review_threshold if self._review_threshold <= MAX_AMOUNT else None,
        )
        opened = False
        try:
            async with self._submissions() as path:
                opened = True
                submitted = await path.submit(submission)
        except TransactionConflict:
            metrics.SUBMISSIONS_IN_ONE_CALL.labels("conflict").inc()
            return None
        except DatabaseUnavailable as error:
            if not opened:
                raise
            if isinstance(error.__cause__, TimeoutError):
                # The database did not answer within the command timeout (the call may be
                # queued for a lock): deciding again would queue a second time.
                metrics.SUBMISSIONS_IN_ONE_CALL.labels("timeout").inc()
                raise
            metrics.SUBMISSIONS_IN_ONE_CALL.labels("unavailable").inc()
            return None
        metrics.SUBMISSIONS_IN_ONE_CALL.labels(submitted.outcome).inc()
        if submitted.outcome == "replay":
            return Outcome(None, _stored_response(submitted.stored, key), submitted.position)
        if submitted.decided is None:
            return None
        decided = submitted.decided
        payment = _submitted(
            command,
            key.request_id,
            submission.payment_id,
            (decided.payer_name, decided.payee_name),
            decided.decision,
            decided.created_at,
        )
        _note_decided(payment)
        return Outcome(payment, None, submitted.position)

    def _decide(
        self, command: commands.SubmitPayment, request_id: str, accounts: dict[UUID, Account], now: datetime
    ) -> Payment:
        """The submitted payment as the rules decide it, from the locked accounts at `now`."""
        payer = accounts.get(command.payer_account_id)
        if payer is None:
            raise AccountNotFound(str(command.payer_account_id), "payer_account_id")
        payee = accounts.get(command.payee_account_id)
        if payee is None:
            raise AccountNotFound(str(command.payee_account_id), "payee_account_id")
        used = rules.daily_usage(payer, rules.utc_day(now))
        decision = rules.decide(payer, payee, command.currency, command.amount, used, self._review_threshold)
        if decision.status is not PaymentStatus.DECLINED:
            rules.check_credit_fits(payee, command.amount)
        return _submitted(
            command, request_id, self._new_id(), (payer.owner_name, payee.owner_name), decision, now
        )

    async def review_payment(
        self, command: commands.ReviewPayment, key: RequestKey[Payment]
    ) -> Outcome[Payment]:
        async def review(uow: UnitOfWork, now: datetime) -> Payment:
            repo = uow.repo
            # The key is claimed: a duplicate of this request waits for this transaction.
            # The payment first, then its accounts in the usual order: SubmitPayment
            # never waits for a payment lock, so this order cannot deadlock with it.
            held = await repo.lock_payment(command.payment_id)
            if held is None:
                raise PaymentNotFound(str(command.payment_id))
            if {held.payer_account_id, held.payee_account_id} & command.reviewer_accounts:
                raise OwnPaymentReview()
            if held.status is not PaymentStatus.PENDING_REVIEW:
                raise PaymentNotUnderReview(str(held.payment_id), held.status.value)
            accounts = await repo.lock_accounts([held.payer_account_id, held.payee_account_id])
            if command.approve:
                rules.check_credit_fits(accounts[held.payee_account_id], held.amount)
            payment = dataclasses.replace(
                held,
                status=PaymentStatus.APPROVED if command.approve else PaymentStatus.DECLINED,
                decline_reason=None if command.approve else DeclineReason.DECLINED_BY_REVIEWER,
                updated_at=now,
            )
            event = PaymentEvent(
                payment.payment_id,
                REVIEW_SEQUENCE,
                payment.status,
                payment.decline_reason,
                command.reviewer,
                command.note,
                now,
            )
            await repo.update_payment(payment, event)
            entries = rules.transfer_entries(payment) if command.approve else []
            await repo.apply_changes(rules.review_changes(payment, command.approve), entries, now)
            return payment

        outcome = await self._run_idempotent(key, review)
        if outcome.value is not None:
            _count_decision(outcome.value, "reviewer")
            log.info(
                "payment reviewed",
                extra={
                    "payment_id": str(outcome.value.payment_id),
                    "status": outcome.value.status.value,
                    "reviewer": command.reviewer,
                },
            )
        return outcome

    async def set_account_status(
        self, command: commands.SetAccountStatus, key: RequestKey[Account]
    ) -> Outcome[Account]:
        async def set_status(uow: UnitOfWork, now: datetime) -> Account:
            account = (await uow.repo.lock_accounts([command.account_id])).get(command.account_id)
            if account is None:
                raise AccountNotFound(str(command.account_id), "account_id")
            if account.status is not command.status:
                await uow.repo.set_account_status(account.account_id, command.status, now)
                account = dataclasses.replace(account, status=command.status, updated_at=now)
            return account

        outcome = await self._run_idempotent(key, set_status)
        if outcome.value is not None:
            # The reason has no column of its own; the log is its record.
            log.info(
                "account status set",
                extra={
                    "account_id": str(command.account_id),
                    "status": command.status.value,
                    "reason": command.reason,
                },
            )
        return outcome

    async def get_payment(self, payment_id: UUID) -> tuple[Payment, list[PaymentEvent]]:
        async def work(uow: UnitOfWork) -> tuple[Payment, list[PaymentEvent]]:
            found = await uow.repo.get_payment_with_events(payment_id)
            if found is None:
                raise PaymentNotFound(str(payment_id))
            return found

        return await self._run(work)


def _count_decision(payment: Payment, decider: str) -> None:
    reason = payment.decline_reason.value if payment.decline_reason else ""
    metrics.DECISIONS.labels(payment.status.value, reason, decider).inc()
