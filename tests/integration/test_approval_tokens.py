"""Consistency tokens cover their commit whatever synchronous_commit is, and reads with them resolve."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

import grpc
import psycopg2
import pytest
from google.protobuf import message

from payments.approval.v1 import approval_service_pb2 as pb
from payments.history.v1 import history_service_pb2 as history_pb
from payments.type.v1 import money_pb2, payment_pb2
from payments_common.lsn import format_lsn, parse_lsn
from payments_common.tokens import decode_consistency_token
from stack.servers import PostgresServer
from tests.support.approval import RunningServer, running_server
from tests.support.replicator import StartReplicator, replicator  # noqa: F401 - a fixture

THRESHOLD = 1_000


def rid() -> str:
    return uuid.uuid4().hex


def eur(amount: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="EUR", amount_minor=amount)


def set_synchronous_commit(postgres: PostgresServer, dsn: str, value: str) -> None:
    """Sets synchronous_commit for the service's role in its database only, as an operator might."""
    database = urlparse(dsn).path.lstrip("/")
    connection = psycopg2.connect(postgres.dsn())
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'ALTER ROLE postgres IN DATABASE "{database}" SET synchronous_commit = {value}')
    finally:
        connection.close()
    check = psycopg2.connect(dsn)
    try:
        with check.cursor() as cursor:
            cursor.execute("SHOW synchronous_commit")
            assert cursor.fetchone() == (value,)
    finally:
        check.close()


@dataclass
class Mutation:
    name: str
    call: Callable[[], Awaitable[message.Message]]


def mutations(
    svc: RunningServer, accounts: dict[str, pb.Account], held: list[pb.Payment]
) -> Iterator[Mutation]:
    """One call of each mutating RPC, in an order in which each succeeds."""

    def create(owner: str, opening: int) -> Mutation:
        async def call() -> message.Message:
            response = await svc.stub.CreateAccount(
                pb.CreateAccountRequest(
                    request_id=rid(),
                    owner_name=owner,
                    currency_code="EUR",
                    opening_balance_minor=opening,
                    per_payment_limit_minor=10**9,
                    daily_limit_minor=10**10,
                )
            )
            accounts[owner] = response.account
            return response

        return Mutation("CreateAccount", call)

    def submit(amount: int) -> Mutation:
        async def call() -> message.Message:
            response = await svc.stub.SubmitPayment(
                pb.SubmitPaymentRequest(
                    request_id=rid(),
                    payer_account_id=accounts["payer"].account_id,
                    payee_account_id=accounts["payee"].account_id,
                    amount=eur(amount),
                )
            )
            if response.payment.status == payment_pb2.PAYMENT_STATUS_PENDING_REVIEW:
                held.append(response.payment)
            return response

        return Mutation("SubmitPayment", call)

    yield create("payer", 1_000_000)
    yield create("payee", 0)
    yield submit(10)
    yield submit(THRESHOLD)
    yield submit(THRESHOLD)
    yield Mutation(
        "ApprovePayment",
        lambda: svc.stub.ApprovePayment(
            pb.ApprovePaymentRequest(request_id=rid(), payment_id=held[0].payment_id)
        ),
    )
    yield Mutation(
        "DeclinePayment",
        lambda: svc.stub.DeclinePayment(
            pb.DeclinePaymentRequest(request_id=rid(), payment_id=held[1].payment_id)
        ),
    )
    yield Mutation(
        "FreezeAccount",
        lambda: svc.stub.FreezeAccount(
            pb.FreezeAccountRequest(request_id=rid(), account_id=accounts["payee"].account_id, reason="check")
        ),
    )
    yield Mutation(
        "UnfreezeAccount",
        lambda: svc.stub.UnfreezeAccount(
            pb.UnfreezeAccountRequest(request_id=rid(), account_id=accounts["payee"].account_id, reason="ok")
        ),
    )


def next_commit_end(dsn: str, slot: str, timeout: float = 30.0) -> int:
    """The end of the next transaction's commit record, from a test_decoding slot (polled until flushed)."""
    connection = psycopg2.connect(dsn)
    connection.autocommit = True
    deadline = time.monotonic() + timeout
    try:
        with connection.cursor() as cursor:
            while True:
                # test_decoding reports a COMMIT at its transaction's end_lsn: the end of the
                # commit record. The slot only decodes WAL that is flushed. Transactions with no
                # change to a table (an autoanalyze's, which writes only the catalog) are left
                # out: they commit in the database between two mutations whenever they like.
                cursor.execute(
                    "SELECT lsn::text, data FROM pg_logical_slot_get_changes(%s, NULL, NULL,"
                    " 'skip-empty-xacts', '1') WHERE data LIKE 'COMMIT%%'",
                    (slot,),
                )
                rows = cursor.fetchall()
                if rows:
                    assert len(rows) == 1, rows
                    return parse_lsn(rows[0][0])
                assert time.monotonic() < deadline, "no commit was decoded"
                time.sleep(0.01)
    finally:
        connection.close()


@pytest.mark.parametrize("synchronous_commit", ["off", "on"])
async def test_every_mutation_token_is_at_or_past_the_end_of_its_commit_record(
    postgres_server: PostgresServer, migrated_dsn: str, synchronous_commit: str
) -> None:
    set_synchronous_commit(postgres_server, migrated_dsn, synchronous_commit)
    slot = "tok_" + uuid.uuid4().hex[:12]
    connection = psycopg2.connect(migrated_dsn)
    try:
        with connection, connection.cursor() as cursor:
            cursor.execute("SELECT pg_create_logical_replication_slot(%s, 'test_decoding')", (slot,))
    finally:
        connection.close()
    accounts: dict[str, pb.Account] = {}
    held: list[pb.Payment] = []
    short: list[str] = []
    async with running_server(migrated_dsn, review_threshold=THRESHOLD) as svc:
        for mutation in mutations(svc, accounts, held):
            response = await mutation.call()
            token = decode_consistency_token(response.consistency_token)  # type: ignore[attr-defined]
            commit_end = await asyncio.to_thread(next_commit_end, migrated_dsn, slot)
            if token < commit_end:
                short.append(
                    f"{mutation.name}: token {format_lsn(token)} < commit end {format_lsn(commit_end)}"
                )
    assert short == []


@pytest.fixture
async def history_on(redis_url: str) -> AsyncIterator[Callable[[str], Any]]:
    from tests.support.history import running_history, settings_for

    running: list[Any] = []

    async def start(slot: str) -> Any:
        context = running_history(settings_for(redis_url, slot_name=slot, consistency_wait_max_seconds=20.0))
        history = await context.__aenter__()
        running.append(context)
        return history

    yield start
    for context in running:
        await context.__aexit__(None, None, None)


@pytest.mark.slow
@pytest.mark.parametrize("synchronous_commit", ["off", "on"])
async def test_a_read_with_the_token_sees_the_write_and_resolves_when_idle(
    postgres_server: PostgresServer,
    migrated_dsn: str,
    redis_url: str,
    replicator: StartReplicator,  # noqa: F811 - the fixture imported above
    history_on: Callable[[str], Any],
    synchronous_commit: str,
) -> None:
    set_synchronous_commit(postgres_server, migrated_dsn, synchronous_commit)
    process = replicator(migrated_dsn, redis_url)
    process.wait_caught_up()
    history = await history_on(process.slot)
    accounts: dict[str, pb.Account] = {}
    held: list[pb.Payment] = []
    async with running_server(migrated_dsn, review_threshold=THRESHOLD) as svc:
        for mutation in mutations(svc, accounts, held):
            response: Any = await mutation.call()
            token = response.consistency_token
            try:
                if mutation.name in ("CreateAccount", "FreezeAccount", "UnfreezeAccount"):
                    got_account = await history.stub.GetAccount(
                        history_pb.GetAccountRequest(
                            account_id=response.account.account_id, min_consistency_token=token
                        )
                    )
                    seen = got_account.account.status == response.account.status
                else:
                    got_payment = await history.stub.GetPayment(
                        history_pb.GetPaymentRequest(
                            payment_id=response.payment.payment_id, min_consistency_token=token
                        )
                    )
                    seen = got_payment.payment.status == response.payment.status
            except grpc.aio.AioRpcError as error:
                raise AssertionError(f"{mutation.name}: {error.code()} {error.details()}") from None
            assert seen, f"{mutation.name}: the read with the token missed the write"

        # Idle from here: the last write's token and the tokens of replays (read later, so
        # possibly further on, past a replay's own lock records) must still be reached,
        # by the replicator's idle advance over WAL that nothing else flushes.
        again = pb.SubmitPaymentRequest(
            request_id="last-payment",
            payer_account_id=accounts["payer"].account_id,
            payee_account_id=accounts["payee"].account_id,
            amount=eur(7),
        )
        paid = [await svc.stub.SubmitPayment(again), await svc.stub.SubmitPayment(again)]
        unfreeze = pb.UnfreezeAccountRequest(
            request_id="last", account_id=accounts["payer"].account_id, reason="x"
        )
        unfrozen = [await svc.stub.UnfreezeAccount(unfreeze), await svc.stub.UnfreezeAccount(unfreeze)]
        assert paid[0].payment == paid[1].payment
        for response in paid:
            got_payment = await history.stub.GetPayment(
                history_pb.GetPaymentRequest(
                    payment_id=response.payment.payment_id, min_consistency_token=response.consistency_token
                )
            )
            assert got_payment.payment.status == payment_pb2.PAYMENT_STATUS_APPROVED
        for response in unfrozen:
            got_account = await history.stub.GetAccount(
                history_pb.GetAccountRequest(
                    account_id=accounts["payer"].account_id, min_consistency_token=response.consistency_token
                )
            )
            assert got_account.account.status == payment_pb2.ACCOUNT_STATUS_ACTIVE
