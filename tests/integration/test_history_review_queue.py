"""ListHeldPayments, the review queue, against the real replicator, Redis, history server and approval service.

Each test runs on one Redis node and on a Redis Cluster (`topology`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest

from payments.approval.v1 import approval_service_pb2 as approval
from payments.history.v1 import history_service_pb2 as pb
from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import money_pb2
from payments.type.v1 import payment_pb2 as types
from payments_common.grpcstatus import bad_request, error_info
from payments_common.keys import META_FEATURES_FIELD, KeySchema
from payments_common.redisconn import async_client
from payments_common.tokens import decode_consistency_token, encode_consistency_token
from stack.servers import PostgresServer
from tests.support.approval import RunningServer, running_server
from tests.support.history import (
    ReplicatedSource,
    RunningHistory,
    at,
    replicated_source,
    running_history,
    settings_for,
    topology,
)
from tests.support.history_cluster import set_checkpoint

__all__ = ["topology"]

# Before any payment created during the tests: the dataset's payments are the oldest in the queue.
T0 = datetime(2020, 3, 1, 12, 0, tzinfo=UTC)
THRESHOLD = 50_000
HELD = types.PAYMENT_STATUS_PENDING_REVIEW
BY_AMOUNT = types.HOLD_REASON_AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD
KEYS = KeySchema()


@dataclass
class Dataset:
    source: ReplicatedSource
    accounts: dict[str, str]
    # The payments held and still held, oldest first, with their amounts.
    queue: list[tuple[str, int]]
    decided: list[str]
    # The source's position once the dataset was written (a consistency token).
    written: str


@pytest.fixture(scope="module")
def dataset(
    postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory, topology: str
) -> Iterator[Dataset]:
    work_dir: Path = tmp_path_factory.mktemp("review-queue")
    with replicated_source(postgres_server, work_dir, topology) as source:
        writer = source.writer
        accounts = {name: writer.open_account(name) for name in ("Alice", "Bob", "Carol", "Dave")}
        alice, bob, carol, dave = accounts.values()
        # Held payments of every account, written out of time order; some decided at once.
        plan = [
            (alice, bob, "PENDING_REVIEW", 7),
            (bob, carol, "APPROVED", 3),
            (carol, dave, "PENDING_REVIEW", 2),
            (dave, alice, "PENDING_REVIEW", 11),
            (alice, carol, "DECLINED", 4),
            (bob, alice, "PENDING_REVIEW", 1),
            *((alice, dave, "PENDING_REVIEW", second) for second in (5, 6, 8, 9, 10, 12, 13)),
            (carol, bob, "PENDING_REVIEW", 14),  # approved by an operator below
            (dave, bob, "PENDING_REVIEW", 15),  # declined by an operator below
        ]
        held: list[tuple[int, str, int]] = []
        for payer, payee, status, second in plan:
            amount = 60_000 + second
            payment_id, _ = writer.pay(payer, payee, amount, status, created_at=at(T0, second))
            if status == "PENDING_REVIEW":
                held.append((second, payment_id, amount))
        held.sort()
        (*kept, approved, declined) = held
        writer.approve_held(approved[1])
        writer.review(declined[1], approve=False)
        written = writer.position()
        source.wait_replicated()
        yield Dataset(source, accounts, [(p, a) for _, p, a in kept], [approved[1], declined[1]], written)


@pytest.fixture(scope="module")
async def history(dataset: Dataset) -> AsyncIterator[RunningHistory]:
    settings = settings_for(dataset.source.redis_url, slot_name=dataset.source.slot_name)
    async with running_history(settings) as running:
        yield running


@pytest.fixture
async def approval_service(dataset: Dataset) -> AsyncIterator[RunningServer]:
    async with running_server(dataset.source.dsn, review_threshold=THRESHOLD) as running:
        yield running


async def _walk(history: RunningHistory, size: int, token: str = "") -> list[pb.ListHeldPaymentsResponse]:
    pages = []
    request = pb.ListHeldPaymentsRequest(page_size=size, min_consistency_token=token)
    while True:
        page = await history.stub.ListHeldPayments(request, timeout=10)
        pages.append(page)
        if not page.next_page_token:
            return pages
        request.page_token = page.next_page_token


async def _queued(history: RunningHistory, token: str = "") -> list[str]:
    return [view.payment_id for page in await _walk(history, 500, token) for view in page.payments]


async def _fails(call: object, code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    assert raised.value.code() == code
    info = error_info(raised.value)
    assert info is not None
    assert info.reason == reason
    return raised.value


async def test_the_queue_holds_every_held_payment_of_every_account_oldest_first_over_pages(
    dataset: Dataset, history: RunningHistory
) -> None:
    pages = await _walk(history, 4)
    # Payments held by other tests of this module come after the dataset's: they are newer.
    seen = [view for page in pages for view in page.payments][: len(dataset.queue)]
    assert [(view.payment_id, view.amount.amount_minor) for view in seen] == dataset.queue
    sizes = [len(page.payments) for page in pages]
    assert len(pages) >= 3
    assert sizes[:-1] == [4] * (len(pages) - 1)
    assert 1 <= sizes[-1] <= 4
    assert not set(dataset.decided) & {view.payment_id for page in pages for view in page.payments}
    names = {account_id: name for name, account_id in dataset.accounts.items()}
    for view in seen:
        assert view.status == HELD
        assert view.hold_reason == BY_AMOUNT
        assert (view.payer_name, view.payee_name) == (
            names[view.payer_account_id],
            names[view.payee_account_id],
        )
        assert view.amount.currency_code == "EUR"
        assert view.create_time.ToDatetime(UTC) < datetime.now(UTC)  # its age is now minus this
        assert not view.timeline
    created = [view.create_time.ToMicroseconds() for view in seen]
    assert created == sorted(created)
    # Every page says the position it was read at, at or past the dataset's writes. (Not the
    # WAL's position now: the server's other databases move it, whatever the replicator has.)
    written = decode_consistency_token(dataset.written)
    assert all(decode_consistency_token(page.consistency_token) >= written for page in pages)


async def test_pages_are_the_stored_views(dataset: Dataset, history: RunningHistory) -> None:
    client = async_client(dataset.source.redis_url)
    try:
        page = await history.stub.ListHeldPayments(pb.ListHeldPaymentsRequest(page_size=3), timeout=10)
        for view in page.payments:
            stored = await client.hget(KEYS.payment(view.payment_id), "view")
            assert isinstance(stored, bytes)
            assert view == read_model_pb2.PaymentView.FromString(stored)
    finally:
        await client.aclose()


async def test_page_size_zero_is_the_default_and_a_negative_one_is_refused(
    dataset: Dataset, history: RunningHistory
) -> None:
    page = await history.stub.ListHeldPayments(pb.ListHeldPaymentsRequest(), timeout=10)
    assert [v.payment_id for v in page.payments][: len(dataset.queue)] == [p for p, _ in dataset.queue]
    assert len(page.payments) <= 50
    capped = await history.stub.ListHeldPayments(pb.ListHeldPaymentsRequest(page_size=10_000), timeout=10)
    assert list(capped.payments)[: len(dataset.queue)] == list(page.payments)[: len(dataset.queue)]
    error = await _fails(
        history.stub.ListHeldPayments(pb.ListHeldPaymentsRequest(page_size=-1)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    violations = bad_request(error)
    assert violations is not None
    assert [v.field for v in violations.field_violations] == ["page_size"]


async def test_a_page_token_altered_or_of_another_list_is_refused(
    dataset: Dataset, history: RunningHistory
) -> None:
    first = await history.stub.ListHeldPayments(pb.ListHeldPaymentsRequest(page_size=2), timeout=10)
    token = first.next_page_token
    listed = await history.stub.ListPayments(
        pb.ListPaymentsRequest(
            account_id=dataset.accounts["Alice"], direction=pb.PAYMENT_DIRECTION_ALL, page_size=2
        ),
        timeout=10,
    )
    for other in (token[:-2] + ("AA" if token[-2:] != "AA" else "BB"), "garbage!", listed.next_page_token):
        await _fails(
            history.stub.ListHeldPayments(pb.ListHeldPaymentsRequest(page_size=2, page_token=other)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "INVALID_PAGE_TOKEN",
        )


async def test_a_held_submission_is_in_the_queue_with_its_token_and_leaves_on_approval_and_decline(
    dataset: Dataset, history: RunningHistory, approval_service: RunningServer
) -> None:
    stub = approval_service.stub
    alice, bob = dataset.accounts["Alice"], dataset.accounts["Bob"]

    async def submit(amount: int) -> approval.SubmitPaymentResponse:
        return await stub.SubmitPayment(
            approval.SubmitPaymentRequest(
                request_id=str(uuid.uuid4()),
                payer_account_id=alice,
                payee_account_id=bob,
                amount=money_pb2.Money(currency_code="EUR", amount_minor=amount),
                reference="review me",
            ),
            timeout=10,
        )

    to_approve, to_decline = await submit(THRESHOLD), await submit(THRESHOLD + 1)
    for held in (to_approve, to_decline):
        assert held.payment.status == HELD
        assert held.payment.hold_reason == BY_AMOUNT
    # Read with the token of the last submission: both are in the queue, whichever server answers.
    page = await history.stub.ListHeldPayments(
        pb.ListHeldPaymentsRequest(page_size=500, min_consistency_token=to_decline.consistency_token),
        timeout=10,
    )
    views = {view.payment_id: view for view in page.payments}
    assert views[to_approve.payment.payment_id].hold_reason == BY_AMOUNT
    assert views[to_decline.payment.payment_id].reference == "review me"
    assert decode_consistency_token(page.consistency_token) >= decode_consistency_token(
        to_decline.consistency_token
    )

    approved = await stub.ApprovePayment(
        approval.ApprovePaymentRequest(
            request_id=str(uuid.uuid4()), payment_id=to_approve.payment.payment_id
        ),
        timeout=10,
    )
    queued = await _queued(history, approved.consistency_token)
    assert to_approve.payment.payment_id not in queued
    assert to_decline.payment.payment_id in queued
    declined = await stub.DeclinePayment(
        approval.DeclinePaymentRequest(
            request_id=str(uuid.uuid4()), payment_id=to_decline.payment.payment_id
        ),
        timeout=10,
    )
    queued = await _queued(history, declined.consistency_token)
    assert not {to_approve.payment.payment_id, to_decline.payment.payment_id} & set(queued)
    # The reason stays with the decided payment.
    reply = await history.stub.GetPayment(
        pb.GetPaymentRequest(
            payment_id=to_decline.payment.payment_id, min_consistency_token=declined.consistency_token
        )
    )
    assert (reply.payment.status, reply.payment.hold_reason) == (types.PAYMENT_STATUS_DECLINED, BY_AMOUNT)


async def test_a_deleted_payment_leaves_the_queue(dataset: Dataset, history: RunningHistory) -> None:
    writer = dataset.source.writer
    gone, token = await asyncio.to_thread(
        writer.pay, dataset.accounts["Carol"], dataset.accounts["Dave"], 70_000, "PENDING_REVIEW"
    )
    assert gone in await _queued(history, token)
    await asyncio.to_thread(writer.execute, "DELETE FROM payment_events WHERE payment_id = %s", (gone,))
    await asyncio.to_thread(writer.execute, "DELETE FROM payments WHERE payment_id = %s", (gone,))
    assert gone not in await _queued(history, await asyncio.to_thread(writer.position))


async def test_a_token_far_ahead_or_malformed_is_refused(dataset: Dataset, history: RunningHistory) -> None:
    ahead = encode_consistency_token(decode_consistency_token(dataset.source.writer.position()) + 10**12)
    await _fails(
        history.stub.ListHeldPayments(pb.ListHeldPaymentsRequest(min_consistency_token=ahead), timeout=1.5),
        grpc.StatusCode.UNAVAILABLE,
        "CONSISTENCY_NOT_REACHED",
    )
    await _fails(
        history.stub.ListHeldPayments(pb.ListHeldPaymentsRequest(min_consistency_token="c1.nope")),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_CONSISTENCY_TOKEN",
    )


async def test_a_namespace_built_without_the_queue_is_failed_precondition(
    dataset: Dataset, history: RunningHistory
) -> None:
    """The replicator's namespace as a bootstrap by a version without the queue leaves it: no features."""
    client = async_client(dataset.source.redis_url)
    features = await client.hget(KEYS.meta(), META_FEATURES_FIELD)
    assert features == b"review_queue"
    await client.hdel(KEYS.meta(), META_FEATURES_FIELD)
    try:
        error = await _fails(
            history.stub.ListHeldPayments(pb.ListHeldPaymentsRequest()),
            grpc.StatusCode.FAILED_PRECONDITION,
            "READ_MODEL_WITHOUT_REVIEW_QUEUE",
        )
        info = error_info(error)
        assert info is not None
        assert dict(info.metadata) == {"namespace": KEYS.namespace}
        # The other reads do not depend on it.
        await history.stub.GetAccount(pb.GetAccountRequest(account_id=dataset.accounts["Alice"]))
    finally:
        await client.hset(KEYS.meta(), META_FEATURES_FIELD, features)
        await client.aclose()
    assert await _queued(history)


async def test_a_namespace_not_built_yet_is_unavailable_then_without_the_queue(dataset: Dataset) -> None:
    """No checkpoint and no features: being built (or its data lost), retry; a checkpoint without them: built without."""
    other = KeySchema("rm:test-unbuilt")
    settings = settings_for(
        dataset.source.redis_url, slot_name=dataset.source.slot_name, namespace=other.namespace
    )
    client = async_client(dataset.source.redis_url)
    checkpoints: list[str] = []
    try:
        async with running_history(settings) as unbuilt:
            await _fails(
                unbuilt.stub.ListHeldPayments(pb.ListHeldPaymentsRequest()),
                grpc.StatusCode.UNAVAILABLE,
                "READ_MODEL_UNAVAILABLE",
            )
            checkpoints = await set_checkpoint(
                client, dataset.source.redis_url, other, dataset.source.slot_name, 1
            )
            await _fails(
                unbuilt.stub.ListHeldPayments(pb.ListHeldPaymentsRequest()),
                grpc.StatusCode.FAILED_PRECONDITION,
                "READ_MODEL_WITHOUT_REVIEW_QUEUE",
            )
            await client.hset(other.meta(), META_FEATURES_FIELD, "review_queue")
            empty = await unbuilt.stub.ListHeldPayments(pb.ListHeldPaymentsRequest())
            assert (list(empty.payments), empty.next_page_token) == ([], "")
            assert decode_consistency_token(empty.consistency_token) == 1
    finally:
        for key in (other.meta(), *checkpoints):
            await client.delete(key)
        await client.aclose()
