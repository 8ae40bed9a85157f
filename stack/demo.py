"""The demo: a realistic payment scenario through gRPC against the local stack, told as it happens."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import Awaitable
from pathlib import Path

import grpc

from payments.approval.v1 import approval_service_pb2 as approval
from payments.approval.v1 import approval_service_pb2_grpc as approval_grpc
from payments.history.v1 import history_service_pb2 as history
from payments.history.v1 import history_service_pb2_grpc as history_grpc
from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import money_pb2, payment_pb2
from payments_common.grpcstatus import error_info
from stack import local, tokens
from stack.auth import HISTORY_READER, REVIEWER
from stack.clients import Credentials, Payments, approval_channel, history_channel, history_target

CURRENCY = "EUR"


def money(minor: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code=CURRENCY, amount_minor=minor)


def show(amount: money_pb2.Money) -> str:
    sign = "-" if amount.amount_minor < 0 else ""
    units, cents = divmod(abs(amount.amount_minor), 100)
    return f"{sign}{units:,}.{cents:02d} {amount.currency_code}"


def status_name(status: int) -> str:
    return payment_pb2.PaymentStatus.Name(status).removeprefix("PAYMENT_STATUS_")


def reason_name(reason: int) -> str:
    return payment_pb2.DeclineReason.Name(reason).removeprefix("DECLINE_REASON_")


def hold_reason_name(reason: int) -> str:
    return payment_pb2.HoldReason.Name(reason).removeprefix("HOLD_REASON_")


def age(view: read_model_pb2.PaymentView) -> str:
    """How long a payment has waited since it was submitted, as a reviewer reads it."""
    waited = max(0.0, time.time() - view.create_time.ToMicroseconds() / 1e6)
    return f"{waited:.1f} s" if waited < 60 else f"{waited / 60:.0f} min"


def outcome(payment: approval.Payment) -> str:
    text = status_name(payment.status)
    if payment.status == payment_pb2.PAYMENT_STATUS_DECLINED:
        text += f" ({reason_name(payment.decline_reason)})"
    return text


class Scenario(Payments):
    """The scenario's calls, each told as it happens."""

    def __init__(
        self,
        approval_stub: approval_grpc.ApprovalServiceAsyncStub,
        history_stub: history_grpc.HistoryServiceAsyncStub,
        credentials: Credentials,
    ) -> None:
        super().__init__(approval_stub, history_stub, credentials, CURRENCY)
        self.names: dict[str, str] = {}

    async def open(self, owner: str, opening: int, per_payment: int, daily: int) -> approval.Account:
        account = await super().open(owner, opening, per_payment, daily)
        self.names[account.account_id] = owner
        print(
            f"  opened {owner:<6} {account.account_id}  balance {show(account.ledger_balance)}, "
            f"per-payment limit {show(account.per_payment_limit)}"
        )
        return account

    async def pay(
        self, payer: str, payee: str, minor: int, reference: str = "", request_id: str | None = None
    ) -> approval.Payment:
        payment = await super().pay(payer, payee, minor, reference, request_id)
        print(
            f"  {self.names[payer]:>6} -> {self.names[payee]:<6} {show(money(minor)):>14}  "
            f"{reference!r:<24} => {outcome(payment)}"
        )
        return payment

    async def show_review_queue(self) -> list[read_model_pb2.PaymentView]:
        """The review queue as the reviewer reads it (with the latest consistency token), told."""
        queue = await self.review_queue()
        if not queue:
            print("    (empty)")
        for view in queue:
            print(
                f"    {view.payer_name:>6} -> {view.payee_name:<6} {show(view.amount):>14}  "
                f"{view.reference!r:<24} held {age(view)} ago: {hold_reason_name(view.hold_reason)}"
            )
        return queue


async def _watch(
    story: Scenario,
    account_id: str,
    name: str,
    seen: list[str],
    ready: asyncio.Event,
    wanted: int,
    done: asyncio.Event,
) -> None:
    # The account holder watches their own payments.
    call = story.history.WatchPayments(
        history.WatchPaymentsRequest(account_id=account_id), metadata=story.as_customer(account_id)
    )
    await call.initial_metadata()  # sent once the subscription is in place
    ready.set()
    try:
        async for change in call:
            view = change.payment
            line = (
                f"  [watch {name}] {view.payer_name} -> {view.payee_name} {show(view.amount)} "
                f"is {status_name(view.status)}"
            )
            print(line, flush=True)
            seen.append(view.payment_id)
            if len(seen) >= wanted:
                done.set()
    except grpc.aio.AioRpcError as error:
        if error.code() != grpc.StatusCode.CANCELLED:
            raise


async def refused(call: Awaitable[object]) -> str:
    """The status code and ErrorInfo reason of a call that must fail, as "CODE (REASON)"."""
    try:
        await call
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        return f"{error.code().name} ({info.reason if info else 'no reason'})"
    raise AssertionError("the call was allowed")


async def scenario(approval_addr: str, history_addrs: list[str], credentials: Credentials) -> None:
    async with (
        approval_channel(approval_addr) as a_chan,
        history_channel(history_target(history_addrs)) as h_chan,
    ):
        story = Scenario(
            approval_grpc.ApprovalServiceStub(a_chan), history_grpc.HistoryServiceStub(h_chan), credentials
        )

        print("\n1. Open accounts (as an accounts admin)")
        alice = (await story.open("Alice", 500_000, 200_000, 1_000_000)).account_id
        bob = (await story.open("Bob", 10_000, 50_000, 100_000)).account_id
        carol = (await story.open("Carol", 0, 50_000, 100_000)).account_id
        erin = (await story.open("Erin", 0, 50_000, 100_000)).account_id

        print("\n2. Payments decided at once (each submitted by the payer, with a token for their account)")
        first = await story.pay(alice, bob, 12_500, "dinner")
        await story.pay(bob, alice, 40_000, "rent share")
        await story.pay(alice, carol, 250_000, "car")
        await story.freeze(erin, "suspected fraud")
        print("  Erin's account is frozen")
        await story.pay(alice, erin, 1_000, "gift")

        print("\n3. A large payment held for review, seen in the reviewer's queue, then approved")
        held = await story.pay(alice, carol, 150_000, "deposit")
        reviewer = tokens.SUBJECTS[REVIEWER]
        print(f"  the review queue, as {reviewer} reads it (every account, oldest first):")
        queued = await story.show_review_queue()
        if held.payment_id not in {view.payment_id for view in queued}:
            raise AssertionError("the held payment is not in the review queue")
        decided = await story.approve(held.payment_id, "verified by phone")
        print(f"  {reviewer} (from the token) approved {decided.payment_id} => {outcome(decided)}")
        print("  the review queue after the decision:")
        if held.payment_id in {view.payment_id for view in await story.show_review_queue()}:
            raise AssertionError("an approved payment is still in the review queue")

        print("\n4. A retried request returns the first answer")
        request_id = str(uuid.uuid4())
        original = await story.pay(alice, bob, 2_000, "coffee beans", request_id)
        retried = await story.pay(alice, bob, 2_000, "coffee beans", request_id)
        same = retried.payment_id == original.payment_id
        print(f"  same payment id on retry: {same} ({original.payment_id})")
        if not same:
            raise AssertionError("a retry created a second payment")

        print("\n5. Alice's history from the query side, read by Alice with the latest consistency token")
        token = story.last_token
        page_token, page = "", 1
        while True:
            listed = await story.history.ListPayments(
                history.ListPaymentsRequest(
                    account_id=alice,
                    direction=history.PAYMENT_DIRECTION_ALL,
                    page_size=3,
                    page_token=page_token,
                    min_consistency_token=token,
                ),
                metadata=story.as_customer(alice),
            )
            print(f"  page {page}:")
            for view in listed.payments:
                print(
                    f"    {view.payer_name:>6} -> {view.payee_name:<6} {show(view.amount):>14}  {status_name(view.status)}"
                )
            if not listed.next_page_token:
                break
            page_token, page = listed.next_page_token, page + 1

        print("  balances, read by support (a history reader, who may read any account):")
        for account_id in (alice, bob, carol):
            account = (
                await story.history.GetAccount(
                    history.GetAccountRequest(account_id=account_id, min_consistency_token=token),
                    metadata=story.as_role(HISTORY_READER),
                )
            ).account
            print(
                f"  {account.owner_name:<6} balance {show(account.ledger_balance):>14}, "
                f"available {show(account.available_balance):>14}, "
                f"sent {show(account.total_sent)}, received {show(account.total_received)}"
            )
        timeline = (
            await story.history.GetPayment(
                history.GetPaymentRequest(payment_id=held.payment_id, min_consistency_token=token),
                metadata=story.as_customer(alice),
            )
        ).payment
        print(
            "  timeline of the reviewed payment: "
            + " -> ".join(f"{status_name(e.status)} by {e.actor}" for e in timeline.timeline)
        )

        print("\n6. Bob watching his payments live")
        seen: list[str] = []
        ready, done = asyncio.Event(), asyncio.Event()
        watcher = asyncio.create_task(_watch(story, bob, "Bob", seen, ready, 3, done))
        await ready.wait()
        paid = [await story.pay(alice, bob, 500 * (i + 1), f"watch #{i + 1}") for i in range(3)]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), timeout=10)
        watcher.cancel()
        print(f"  the stream delivered {len(seen)} of {len(paid)} changes")

        print("\n7. Commit-to-visible delay (approval response -> readable from history), 50 payments")
        delays = []
        as_alice, as_support = story.as_customer(alice), story.as_role(HISTORY_READER)
        for i in range(50):
            response = await story.approval.SubmitPayment(
                approval.SubmitPaymentRequest(
                    request_id=str(uuid.uuid4()),
                    payer_account_id=alice,
                    payee_account_id=bob,
                    amount=money(1),
                    reference=f"probe {i}",
                ),
                metadata=as_alice,
            )
            committed = time.perf_counter()
            while True:
                try:
                    await story.history.GetPayment(
                        history.GetPaymentRequest(payment_id=response.payment.payment_id), metadata=as_support
                    )
                    break
                except grpc.aio.AioRpcError as error:
                    if error.code() != grpc.StatusCode.NOT_FOUND:
                        raise
            delays.append((time.perf_counter() - committed) * 1000)
        delays.sort()
        print(
            f"  p50 {statistics.median(delays):.1f} ms, p99 {delays[int(len(delays) * 0.99) - 1]:.1f} ms, "
            f"max {delays[-1]:.1f} ms"
        )
        del first

        print("\n8. Who may do what: calls the servers refuse")
        expected = {
            "no token, to approval": "UNAUTHENTICATED (CREDENTIALS_MISSING)",
            "no token, to history": "UNAUTHENTICATED (CREDENTIALS_MISSING)",
            "Bob paying from Alice's account": "PERMISSION_DENIED (NOT_YOUR_ACCOUNT)",
            "Alice approving a payment": "PERMISSION_DENIED (METHOD_NOT_ALLOWED)",
            "Bob reading Alice's account": "PERMISSION_DENIED (NOT_YOUR_ACCOUNT)",
            "Alice reading the review queue": "PERMISSION_DENIED (METHOD_NOT_ALLOWED)",
        }
        print("  (first a second payment held for review, for Alice to try to approve)")
        second = await story.pay(alice, carol, 150_000, "second deposit")
        seen_refusals = {
            "no token, to approval": await refused(
                story.approval.GetPayment(approval.GetPaymentRequest(payment_id=held.payment_id))
            ),
            "no token, to history": await refused(
                story.history.GetAccount(history.GetAccountRequest(account_id=alice))
            ),
            "Bob paying from Alice's account": await refused(
                story.approval.SubmitPayment(
                    approval.SubmitPaymentRequest(
                        request_id=str(uuid.uuid4()),
                        payer_account_id=alice,
                        payee_account_id=bob,
                        amount=money(100),
                    ),
                    metadata=story.as_customer(bob),
                )
            ),
            "Alice approving a payment": await refused(
                story.approval.ApprovePayment(
                    approval.ApprovePaymentRequest(
                        request_id=str(uuid.uuid4()), payment_id=second.payment_id
                    ),
                    metadata=story.as_customer(alice),
                )
            ),
            "Bob reading Alice's account": await refused(
                story.history.GetAccount(
                    history.GetAccountRequest(account_id=alice), metadata=story.as_customer(bob)
                )
            ),
            "Alice reading the review queue": await refused(
                story.history.ListHeldPayments(
                    history.ListHeldPaymentsRequest(), metadata=story.as_customer(alice)
                )
            ),
        }
        for what, answer in seen_refusals.items():
            print(f"  {what:<34} => {answer}")
        if seen_refusals != expected:
            raise AssertionError(f"expected {expected}")


def run(root: Path, history_count: int = 2) -> int:
    """Brings the stack up, runs the scenario, brings the stack down."""
    print("== bringing the local stack up")
    state = local.up(root, history_count=history_count)
    try:
        print("\n== the scenario")
        credentials = tokens.LocalCredentials(tokens.authority(root))
        asyncio.run(
            scenario(
                state.endpoints["APPROVAL_ADDR"], state.endpoints["HISTORY_ADDRS"].split(","), credentials
            )
        )
        print("\n== done")
        return 0
    finally:
        print("\n== bringing the local stack down")
        local.down(root)
