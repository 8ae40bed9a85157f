"""The demo scenario as assertions, through the real processes of the local stack and their contracts only.

Every call carries the token of the role that may make it (stack.clients.Payments): an
accounts admin opens and freezes, the payer's customer pays, the reviewer approves, and
the account holder reads their own history.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import AsyncIterator

import grpc
import pytest

from payments.approval.v1 import approval_service_pb2 as approval
from payments.approval.v1 import approval_service_pb2_grpc as approval_grpc
from payments.history.v1 import history_service_pb2 as history
from payments.history.v1 import history_service_pb2_grpc as history_grpc
from payments.type.v1 import payment_pb2 as types
from payments_common.grpcstatus import error_info
from stack.auth import REVIEWER
from stack.clients import Payments, approval_channel, history_channel, history_target
from stack.tokens import SUBJECTS, LocalCredentials


async def open_account(
    client: Payments, owner: str, opening: int, per_payment: int = 200_000, daily: int = 1_000_000
) -> str:
    return (await client.open(owner, opening, per_payment, daily)).account_id


@pytest.fixture
async def client(endpoints: dict[str, str], credentials: LocalCredentials) -> AsyncIterator[Payments]:
    target = history_target(endpoints["HISTORY_ADDRS"].split(","))
    async with approval_channel(endpoints["APPROVAL_ADDR"]) as a, history_channel(target) as h:
        yield Payments(approval_grpc.ApprovalServiceStub(a), history_grpc.HistoryServiceStub(h), credentials)


async def test_the_scenario(client: Payments, endpoints: dict[str, str]) -> None:
    alice = await open_account(client, "Alice", 500_000, per_payment=200_000, daily=300_000)
    bob = await open_account(client, "Bob", 10_000)
    carol = await open_account(client, "Carol", 0)
    erin = await open_account(client, "Erin", 0)

    approved = await client.pay(alice, bob, 12_500, reference="dinner")
    assert approved.status == types.PAYMENT_STATUS_APPROVED

    poor = await client.pay(bob, alice, 40_000)
    assert (poor.status, poor.decline_reason) == (
        types.PAYMENT_STATUS_DECLINED,
        types.DECLINE_REASON_INSUFFICIENT_FUNDS,
    )

    too_big = await client.pay(alice, carol, 250_000)
    assert too_big.decline_reason == types.DECLINE_REASON_PER_PAYMENT_LIMIT_EXCEEDED

    await client.freeze(erin)
    frozen = await client.pay(alice, erin, 1_000)
    assert frozen.decline_reason == types.DECLINE_REASON_ACCOUNT_FROZEN

    held = await client.pay(alice, carol, 150_000, reference="deposit")
    assert held.status == types.PAYMENT_STATUS_PENDING_REVIEW
    assert held.hold_reason == types.HOLD_REASON_AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD
    # The reviewer's view of the queue, read with the submission's token: who pays whom, how much, why.
    queued = {view.payment_id: view for view in await client.review_queue()}
    view = queued[held.payment_id]
    assert (view.payer_name, view.payee_name, view.amount.amount_minor, view.reference) == (
        "Alice",
        "Carol",
        150_000,
        "deposit",
    )
    assert view.hold_reason == types.HOLD_REASON_AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD
    decided = await client.approve(held.payment_id)
    assert decided.status == types.PAYMENT_STATUS_APPROVED
    assert held.payment_id not in {view.payment_id for view in await client.review_queue()}
    # A declined one leaves the queue too.
    dan = await open_account(client, "Dan", 200_000)
    refused = await client.pay(dan, carol, 120_000, reference="too good to be true")
    assert refused.payment_id in {view.payment_id for view in await client.review_queue()}
    declined = await client.approval.DeclinePayment(
        approval.DeclinePaymentRequest(request_id=str(uuid.uuid4()), payment_id=refused.payment_id),
        metadata=client.as_role(REVIEWER),
    )
    assert declined.payment.decline_reason == types.DECLINE_REASON_DECLINED_BY_REVIEWER
    client.last_token = declined.consistency_token
    assert refused.payment_id not in {view.payment_id for view in await client.review_queue()}
    with pytest.raises(grpc.aio.AioRpcError) as twice:
        await client.approve(held.payment_id)
    assert twice.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert (info := error_info(twice.value)) is not None
    assert info.reason == "PAYMENT_NOT_UNDER_REVIEW"

    # The stack reviews payments of 1,000.00 and more, so these stay below that.
    over_daily = await client.pay(alice, carol, 90_000)
    assert over_daily.status == types.PAYMENT_STATUS_APPROVED  # 12,500 + 150,000 + 90,000 of 300,000 used
    daily = await client.pay(alice, carol, 90_000)
    assert daily.decline_reason == types.DECLINE_REASON_DAILY_LIMIT_EXCEEDED

    request_id = str(uuid.uuid4())
    first = await client.pay(alice, bob, 2_000, request_id=request_id)
    again = await client.pay(alice, bob, 2_000, request_id=request_id)
    assert again.payment_id == first.payment_id
    with pytest.raises(grpc.aio.AioRpcError) as reused:
        await client.pay(alice, bob, 3_000, request_id=request_id)
    assert reused.value.code() == grpc.StatusCode.ALREADY_EXISTS

    # The query side, read with the latest token, already includes every write.
    token = client.last_token
    expected = {p.payment_id: p for p in (approved, poor, too_big, frozen, decided, over_daily, daily, first)}
    alice_ids = {pid for pid, p in expected.items() if alice in (p.payer_account_id, p.payee_account_id)}
    listed: list[str] = []
    page_token = ""
    while True:
        page = await client.history.ListPayments(
            history.ListPaymentsRequest(
                account_id=alice,
                direction=history.PAYMENT_DIRECTION_ALL,
                page_size=3,
                page_token=page_token,
                min_consistency_token=token,
            ),
            metadata=client.as_customer(alice),
        )
        assert len(page.payments) <= 3
        for view in page.payments:
            source = expected[view.payment_id]
            assert (view.status, view.decline_reason, view.amount.amount_minor) == (
                source.status,
                source.decline_reason,
                source.amount.amount_minor,
            )
        listed += [v.payment_id for v in page.payments]
        if not page.next_page_token:
            break
        page_token = page.next_page_token
    assert len(listed) == len(set(listed))
    assert set(listed) == alice_ids

    account = (
        await client.history.GetAccount(
            history.GetAccountRequest(account_id=alice, min_consistency_token=token),
            metadata=client.as_customer(alice),
        )
    ).account
    sent = 12_500 + 150_000 + 90_000 + 2_000
    assert account.ledger_balance.amount_minor == 500_000 - sent
    assert account.available_balance.amount_minor == 500_000 - sent
    assert account.total_sent.amount_minor == sent
    assert account.counts.sent_approved == 4
    assert account.counts.sent_declined == 3
    assert account.counts.received_declined == 1

    timeline = (
        await client.history.GetPayment(
            history.GetPaymentRequest(payment_id=held.payment_id, min_consistency_token=token),
            metadata=client.as_customer(alice),
        )
    ).payment.timeline
    assert [e.status for e in timeline] == [
        types.PAYMENT_STATUS_PENDING_REVIEW,
        types.PAYMENT_STATUS_APPROVED,
    ]
    # The reviewer recorded is the token's subject; the request named nobody.
    assert timeline[1].actor == SUBJECTS[REVIEWER]

    # A live stream sees a new payment to Bob.
    stream = client.history.WatchPayments(
        history.WatchPaymentsRequest(account_id=bob), metadata=client.as_customer(bob)
    )
    await stream.initial_metadata()  # the subscription is in place: every later change follows
    live = await client.pay(alice, bob, 700)
    async with asyncio.timeout(30):
        async for change in stream:
            if change.payment.payment_id == live.payment_id:
                assert change.payment.status == types.PAYMENT_STATUS_APPROVED
                break
    stream.cancel()

    # The read models equal the system of record, row for row.
    reconcile = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "replicator",
        "reconcile",
        env={
            **os.environ,
            "REPLICATOR_DATABASE_URL": endpoints["POSTGRES_DSN"],
            "REPLICATOR_REDIS_URL": endpoints["REDIS_URL"],
        },
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(reconcile.communicate(), timeout=120)
    assert reconcile.returncode == 0, output.decode()
