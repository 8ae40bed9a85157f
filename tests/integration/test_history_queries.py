"""Every history query, filter and error path, against read models built by the real replicator.

Each test runs on one Redis node and on a Redis Cluster (`topology`): the guarantees are the same.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import timestamp_pb2
from prometheus_client import REGISTRY
from redis.asyncio import Redis

from history_svc.paging import ListQuery
from history_svc.queries import ReadModel
from payments.history.v1 import history_service_pb2 as pb
from payments.history.v1 import history_service_pb2_grpc
from payments.readmodel.v1 import read_model_pb2 as read_model
from payments.type.v1 import payment_pb2 as types
from payments_common.grpcstatus import bad_request, error_info
from payments_common.keys import KeySchema
from payments_common.redisconn import AsyncClient, async_client
from payments_common.tokens import decode_consistency_token, encode_consistency_token
from stack.servers import PostgresServer
from tests.support.auth import aio_channel
from tests.support.history import (
    ReplicatedSource,
    RunningHistory,
    at,
    replicated_source,
    running_history,
    settings_for,
    topology,
)
from tests.support.waiting import eventually

__all__ = ["topology"]

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
SENT, RECEIVED, ALL = pb.PAYMENT_DIRECTION_SENT, pb.PAYMENT_DIRECTION_RECEIVED, pb.PAYMENT_DIRECTION_ALL
APPROVED, DECLINED, HELD = (
    types.PAYMENT_STATUS_APPROVED,
    types.PAYMENT_STATUS_DECLINED,
    types.PAYMENT_STATUS_PENDING_REVIEW,
)
_STATUS = {"APPROVED": APPROVED, "DECLINED": DECLINED, "PENDING_REVIEW": HELD}


@dataclass(frozen=True)
class Record:
    payment_id: str
    payer: str
    payee: str
    status: int
    second: int


@dataclass
class Dataset:
    source: ReplicatedSource
    alice: str
    bob: str
    carol: str
    dave: str
    records: list[Record]
    reviewed: str

    def expected(
        self, account: str, direction: int, status: int = 0, start: int | None = None, end: int | None = None
    ) -> list[str]:
        chosen = [
            r
            for r in self.records
            if (
                (direction in (SENT, ALL) and r.payer == account)
                or (direction in (RECEIVED, ALL) and r.payee == account)
            )
            and status in (0, r.status)
            and (start is None or r.second >= start)
            and (end is None or r.second < end)
        ]
        return [r.payment_id for r in sorted(chosen, key=lambda r: (r.second, r.payment_id), reverse=True)]


@pytest.fixture(scope="module")
def dataset(
    postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory, topology: str
) -> Iterator[Dataset]:
    work_dir: Path = tmp_path_factory.mktemp("history-queries")
    with replicated_source(postgres_server, work_dir, topology) as source:
        writer = source.writer
        alice, bob = writer.open_account("Alice"), writer.open_account("Bob")
        carol, dave = writer.open_account("Carol"), writer.open_account("Dave")
        plan = [
            *((alice, bob, "APPROVED") for _ in range(5)),
            (alice, carol, "DECLINED"),
            (alice, carol, "DECLINED"),
            *((carol, alice, "APPROVED") for _ in range(3)),
            (alice, bob, "PENDING_REVIEW"),  # approved by an operator below
            (alice, dave, "PENDING_REVIEW"),
            (bob, alice, "APPROVED"),
        ]
        records = []
        for second, (payer, payee, status) in enumerate(plan, start=1):
            payment_id, _ = writer.pay(payer, payee, 100 * second, status, created_at=at(T0, second))
            records.append(Record(payment_id, payer, payee, _STATUS[status], second))
        reviewed = records[10]
        writer.approve_held(reviewed.payment_id)
        records[10] = Record(reviewed.payment_id, alice, bob, APPROVED, reviewed.second)
        source.wait_replicated()
        yield Dataset(source, alice, bob, carol, dave, records, reviewed.payment_id)


@pytest.fixture(scope="module")
async def history(dataset: Dataset) -> AsyncIterator[RunningHistory]:
    settings = settings_for(dataset.source.redis_url, slot_name=dataset.source.slot_name)
    async with running_history(settings) as running:
        yield running


def _stamp(second: int) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(at(T0, second))
    return stamp


async def _walk(history: RunningHistory, request: pb.ListPaymentsRequest) -> list[str]:
    ids: list[str] = []
    while True:
        page = await history.stub.ListPayments(request, timeout=10)
        ids += [view.payment_id for view in page.payments]
        if not page.next_page_token:
            return ids
        request.page_token = page.next_page_token


async def _fails(call: object, code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    assert raised.value.code() == code
    info = error_info(raised.value)
    assert info is not None
    assert info.reason == reason
    return raised.value


# -- GetPayment -----------------------------------------------------------------------------


async def test_get_payment_returns_the_view_with_its_timeline(
    dataset: Dataset, history: RunningHistory
) -> None:
    reply = await history.stub.GetPayment(pb.GetPaymentRequest(payment_id=dataset.reviewed), timeout=10)
    view = reply.payment
    assert view.payment_id == dataset.reviewed
    assert (view.payer_account_id, view.payee_account_id) == (dataset.alice, dataset.bob)
    assert (view.payer_name, view.payee_name) == ("Alice", "Bob")
    assert view.status == APPROVED
    assert view.amount.amount_minor == 1100
    assert view.amount.currency_code == "EUR"
    assert [entry.sequence for entry in view.timeline] == [1, 2]
    assert [entry.status for entry in view.timeline] == [HELD, APPROVED]
    assert view.timeline[1].actor == "operator.jane"
    assert view.create_time.ToDatetime(UTC) == at(T0, 11)


async def _stored_view(client: AsyncClient, payment_id: str, with_timeline: bool) -> Any:
    """The view as the replicator stored it, assembled the plain way: parse, then add the timeline."""
    keys = KeySchema()
    raw: Any = await client.hget(keys.payment(payment_id), "view")
    if raw is None:
        return None
    view = read_model.PaymentView.FromString(raw)
    if with_timeline:
        entries: dict[Any, Any] = await client.hgetall(keys.payment_timeline(payment_id))
        for _, entry in sorted(entries.items(), key=lambda item: int(item[0])):
            view.timeline.append(read_model.TimelineEntry.FromString(entry))
    return view


async def test_responses_built_from_stored_bytes_parse_to_the_stored_views(
    dataset: Dataset, history: RunningHistory
) -> None:
    client = async_client(dataset.source.redis_url)
    try:
        for record in dataset.records:
            reply = await history.stub.GetPayment(
                pb.GetPaymentRequest(payment_id=record.payment_id), timeout=10
            )
            assert reply == pb.GetPaymentResponse(
                payment=await _stored_view(client, record.payment_id, with_timeline=True)
            )
        request = pb.ListPaymentsRequest(account_id=dataset.alice, direction=ALL, page_size=4)
        seen = 0
        while True:
            page = await history.stub.ListPayments(request, timeout=10)
            expected = [
                await _stored_view(client, view.payment_id, with_timeline=False) for view in page.payments
            ]
            assert list(page.payments) == expected
            assert all(not view.timeline for view in page.payments)
            seen += len(page.payments)
            if not page.next_page_token:
                break
            request.page_token = page.next_page_token
        assert seen == len(dataset.expected(dataset.alice, ALL))
    finally:
        await client.aclose()


async def test_a_tombstone_is_not_found_and_left_out_of_lists(
    dataset: Dataset, history: RunningHistory
) -> None:
    writer = dataset.source.writer
    erin, frank = writer.open_account("Erin"), writer.open_account("Frank")
    kept, _ = writer.pay(erin, frank, 100, created_at=at(T0, 100))
    gone, token = writer.pay(erin, frank, 200, created_at=at(T0, 101))
    dataset.source.wait_replicated(token)
    client = async_client(dataset.source.redis_url)
    try:
        await client.hdel(KeySchema().payment(gone), "view")
    finally:
        await client.aclose()
    await _fails(
        history.stub.GetPayment(pb.GetPaymentRequest(payment_id=gone), timeout=10),
        grpc.StatusCode.NOT_FOUND,
        "PAYMENT_NOT_FOUND",
    )
    page = await history.stub.ListPayments(
        pb.ListPaymentsRequest(account_id=erin, direction=ALL, page_size=1), timeout=10
    )
    # The deleted payment took the first place; the page is short, the cursor moves past it.
    assert list(page.payments) == []
    assert page.next_page_token
    request = pb.ListPaymentsRequest(
        account_id=erin, direction=ALL, page_token=page.next_page_token, page_size=1
    )
    page = await history.stub.ListPayments(request, timeout=10)
    assert [view.payment_id for view in page.payments] == [kept]


async def test_get_payment_accepts_any_uuid_spelling(dataset: Dataset, history: RunningHistory) -> None:
    reply = await history.stub.GetPayment(pb.GetPaymentRequest(payment_id=dataset.reviewed.upper()))
    assert reply.payment.payment_id == dataset.reviewed


async def test_get_payment_of_an_unknown_payment_is_not_found(history: RunningHistory) -> None:
    call = history.stub.GetPayment(pb.GetPaymentRequest(payment_id="0b0e1a7c-55d0-4a5e-9a59-3c1a0e6f2d11"))
    await _fails(call, grpc.StatusCode.NOT_FOUND, "PAYMENT_NOT_FOUND")


@pytest.mark.parametrize("payment_id", ["", "not-a-uuid", "0b0e1a7c"])
async def test_get_payment_needs_a_uuid(history: RunningHistory, payment_id: str) -> None:
    error = await _fails(
        history.stub.GetPayment(pb.GetPaymentRequest(payment_id=payment_id)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    violations = bad_request(error)
    assert violations is not None
    assert [v.field for v in violations.field_violations] == ["payment_id"]


# -- GetAccount -----------------------------------------------------------------------------


async def test_get_account_returns_balances_totals_and_counts(
    dataset: Dataset, history: RunningHistory
) -> None:
    account = (await history.stub.GetAccount(pb.GetAccountRequest(account_id=dataset.alice))).account
    sent_approved = sum(
        100 * r.second for r in dataset.records if r.payer == dataset.alice and r.status == APPROVED
    )
    received = sum(
        100 * r.second for r in dataset.records if r.payee == dataset.alice and r.status == APPROVED
    )
    held = sum(100 * r.second for r in dataset.records if r.payer == dataset.alice and r.status == HELD)
    assert account.account_id == dataset.alice
    assert account.owner_name == "Alice"
    assert account.currency_code == "EUR"
    assert account.status == types.ACCOUNT_STATUS_ACTIVE
    assert account.total_sent.amount_minor == sent_approved
    assert account.total_received.amount_minor == received
    assert account.ledger_balance.amount_minor == 1_000_000 - sent_approved + received
    assert account.available_balance.amount_minor == 1_000_000 - sent_approved + received - held
    counts = account.counts
    assert (counts.sent_approved, counts.sent_declined, counts.sent_pending_review) == (6, 2, 1)
    assert (counts.received_approved, counts.received_declined, counts.received_pending_review) == (4, 0, 0)


async def test_get_account_of_an_unknown_account_is_not_found(history: RunningHistory) -> None:
    call = history.stub.GetAccount(pb.GetAccountRequest(account_id="0b0e1a7c-55d0-4a5e-9a59-3c1a0e6f2d11"))
    await _fails(call, grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


async def test_get_account_needs_a_uuid(history: RunningHistory) -> None:
    call = history.stub.GetAccount(pb.GetAccountRequest(account_id="alice"))
    await _fails(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")


async def test_a_deleted_account_is_not_found_by_every_account_read(
    dataset: Dataset, history: RunningHistory
) -> None:
    writer = dataset.source.writer
    gone = writer.open_account("Gone")
    dataset.source.wait_replicated()
    token = await asyncio.to_thread(writer.delete_account, gone)
    # The replicator keeps a tombstone: the account's hash with its position and no view.
    calls = [
        history.stub.GetAccount(pb.GetAccountRequest(account_id=gone, min_consistency_token=token)),
        history.stub.ListPayments(
            pb.ListPaymentsRequest(account_id=gone, direction=ALL, min_consistency_token=token)
        ),
    ]
    for call in calls:
        await _fails(call, grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    client = async_client(dataset.source.redis_url)
    try:
        assert await client.hexists(KeySchema().account(gone), "lsn")
    finally:
        await client.aclose()
    stream = history.stub.WatchPayments(pb.WatchPaymentsRequest(account_id=gone))
    await _fails(stream.read(), grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    assert history.server.watcher.subscriptions == 0


# -- ListPayments ---------------------------------------------------------------------------


@pytest.mark.parametrize("direction", [SENT, RECEIVED, ALL])
@pytest.mark.parametrize("status", [0, APPROVED, DECLINED, HELD])
async def test_list_filters_by_direction_and_status_newest_first(
    dataset: Dataset, history: RunningHistory, direction: int, status: int
) -> None:
    for account in (dataset.alice, dataset.bob, dataset.carol):
        request = pb.ListPaymentsRequest(account_id=account, direction=direction, status=status)  # type: ignore[arg-type]
        assert await _walk(history, request) == dataset.expected(account, direction, status)


@pytest.mark.parametrize(("start", "end"), [(3, None), (None, 9), (3, 9), (9, 10), (13, None), (None, 1)])
async def test_list_filters_by_time_range(
    dataset: Dataset, history: RunningHistory, start: int | None, end: int | None
) -> None:
    request = pb.ListPaymentsRequest(account_id=dataset.alice, direction=ALL)
    if start is not None:
        request.start_time.CopyFrom(_stamp(start))
    if end is not None:
        request.end_time.CopyFrom(_stamp(end))
    assert await _walk(history, request) == dataset.expected(dataset.alice, ALL, 0, start, end)


@pytest.mark.parametrize("size", [1, 2, 5, 0, 10_000])
async def test_list_pages_through_everything_once(
    dataset: Dataset, history: RunningHistory, size: int
) -> None:
    request = pb.ListPaymentsRequest(account_id=dataset.alice, direction=ALL, page_size=size)
    first = await history.stub.ListPayments(request)
    expected = dataset.expected(dataset.alice, ALL)
    assert len(first.payments) == min(len(expected), size or 50)
    assert all(len(view.timeline) == 0 for view in first.payments)
    assert await _walk(history, request) == expected


async def test_the_last_page_has_no_token(dataset: Dataset, history: RunningHistory) -> None:
    expected = dataset.expected(dataset.bob, ALL)
    page = await history.stub.ListPayments(
        pb.ListPaymentsRequest(account_id=dataset.bob, direction=ALL, page_size=len(expected))
    )
    assert [view.payment_id for view in page.payments] == expected
    assert page.next_page_token == ""


async def test_an_account_without_payments_lists_nothing(dataset: Dataset, history: RunningHistory) -> None:
    page = await history.stub.ListPayments(pb.ListPaymentsRequest(account_id=dataset.dave, direction=SENT))
    assert list(page.payments) == []
    assert page.next_page_token == ""


async def test_list_of_an_unknown_account_is_not_found(history: RunningHistory) -> None:
    call = history.stub.ListPayments(
        pb.ListPaymentsRequest(account_id="0b0e1a7c-55d0-4a5e-9a59-3c1a0e6f2d11", direction=ALL)
    )
    await _fails(call, grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")


@pytest.mark.parametrize(
    ("changes", "fields"),
    [
        ({"page_size": -1}, ["page_size"]),
        ({"direction": pb.PAYMENT_DIRECTION_UNSPECIFIED}, ["direction"]),
        ({"account_id": ""}, ["account_id"]),
        ({"account_id": "x", "page_size": -5}, ["account_id", "page_size"]),
        ({"status": 42}, ["status"]),
        ({"start_time": 5, "end_time": 5}, ["end_time"]),
        ({"start_time": 6, "end_time": 5}, ["end_time"]),
    ],
)
async def test_list_refuses_invalid_requests(
    dataset: Dataset, history: RunningHistory, changes: dict[str, int | str], fields: list[str]
) -> None:
    request = pb.ListPaymentsRequest(account_id=dataset.alice, direction=ALL)
    for name, value in changes.items():
        if name.endswith("_time"):
            getattr(request, name).CopyFrom(_stamp(int(value)))
        else:
            setattr(request, name, value)
    error = await _fails(
        history.stub.ListPayments(request), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT"
    )
    violations = bad_request(error)
    assert violations is not None
    assert [v.field for v in violations.field_violations] == fields


async def _second_page_token(history: RunningHistory, request: pb.ListPaymentsRequest) -> str:
    page = await history.stub.ListPayments(request)
    assert page.next_page_token
    return page.next_page_token


async def test_an_altered_page_token_is_refused(dataset: Dataset, history: RunningHistory) -> None:
    request = pb.ListPaymentsRequest(account_id=dataset.alice, direction=ALL, page_size=2)
    token = await _second_page_token(history, request)
    for altered in (token[:-2] + ("AA" if token[-2:] != "AA" else "BB"), token[5:], "x" + token, "garbage!"):
        request.page_token = altered
        await _fails(
            history.stub.ListPayments(request), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"
        )


@pytest.mark.parametrize(
    "changes",
    [
        {"direction": SENT},
        {"status": APPROVED},
        {"start_time": 1},
        {"end_time": 20},
        {"account": "bob"},
    ],
)
async def test_a_page_token_of_another_query_is_refused(
    dataset: Dataset, history: RunningHistory, changes: dict[str, int | str]
) -> None:
    token = await _second_page_token(
        history, pb.ListPaymentsRequest(account_id=dataset.alice, direction=ALL, page_size=2)
    )
    request = pb.ListPaymentsRequest(account_id=dataset.alice, direction=ALL, page_size=2, page_token=token)
    for name, value in changes.items():
        if name == "account":
            request.account_id = dataset.bob
        elif name.endswith("_time"):
            getattr(request, name).CopyFrom(_stamp(int(value)))
        else:
            setattr(request, name, value)
    await _fails(history.stub.ListPayments(request), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


async def test_a_page_token_signed_with_another_secret_is_refused(
    dataset: Dataset, history: RunningHistory
) -> None:
    token = await _second_page_token(
        history, pb.ListPaymentsRequest(account_id=dataset.alice, direction=ALL, page_size=2)
    )
    settings = settings_for(dataset.source.redis_url, page_token_secret=b"another-secret-of-the-other-fleet")
    async with running_history(settings) as foreign:
        request = pb.ListPaymentsRequest(
            account_id=dataset.alice, direction=ALL, page_size=2, page_token=token
        )
        await _fails(
            foreign.stub.ListPayments(request), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN"
        )


async def test_a_page_token_with_the_shared_secret_works_on_any_server(
    dataset: Dataset, history: RunningHistory
) -> None:
    request = pb.ListPaymentsRequest(account_id=dataset.alice, direction=ALL, page_size=4)
    first = await history.stub.ListPayments(request)
    async with running_history(settings_for(dataset.source.redis_url)) as other:
        request.page_token = first.next_page_token
        second = await other.stub.ListPayments(request)
    assert [v.payment_id for v in [*first.payments, *second.payments]] == dataset.expected(
        dataset.alice, ALL
    )[:8]


# -- Read-your-writes -----------------------------------------------------------------------


async def test_a_read_with_the_token_of_a_new_payment_sees_it(
    dataset: Dataset, history: RunningHistory
) -> None:
    writer = dataset.source.writer
    erin, frank = writer.open_account("Erin"), writer.open_account("Frank")
    for _ in range(3):
        payment_id, token = await asyncio.to_thread(writer.pay, erin, frank, 250)
        got = await history.stub.GetPayment(
            pb.GetPaymentRequest(payment_id=payment_id, min_consistency_token=token), timeout=10
        )
        assert got.payment.payment_id == payment_id
        assert [entry.status for entry in got.payment.timeline] == [APPROVED]
        listed = await history.stub.ListPayments(
            pb.ListPaymentsRequest(
                account_id=frank, direction=RECEIVED, page_size=1, min_consistency_token=token
            ),
            timeout=10,
        )
        assert listed.payments[0].payment_id == payment_id
    account = await history.stub.GetAccount(
        pb.GetAccountRequest(account_id=erin, min_consistency_token=token), timeout=10
    )
    assert account.account.counts.sent_approved == 3
    assert account.account.total_sent.amount_minor == 750


async def test_a_token_far_ahead_fails_clearly_within_the_deadline(
    dataset: Dataset, history: RunningHistory
) -> None:
    ahead = encode_consistency_token(decode_consistency_token(dataset.source.writer.position()) + 10**12)
    calls = [
        history.stub.GetPayment(
            pb.GetPaymentRequest(payment_id=dataset.reviewed, min_consistency_token=ahead), timeout=1.5
        ),
        history.stub.GetAccount(
            pb.GetAccountRequest(account_id=dataset.alice, min_consistency_token=ahead), timeout=1.5
        ),
        history.stub.ListPayments(
            pb.ListPaymentsRequest(account_id=dataset.alice, direction=ALL, min_consistency_token=ahead),
            timeout=1.5,
        ),
    ]
    for call in calls:
        error = await _fails(call, grpc.StatusCode.UNAVAILABLE, "CONSISTENCY_NOT_REACHED")
        info = error_info(error)
        assert info is not None
        assert set(info.metadata) == {"min_lsn", "checkpoint_lsn"}
    assert history.server.watcher.waiting == 0


async def test_without_a_deadline_the_server_caps_the_wait(dataset: Dataset) -> None:
    ahead = encode_consistency_token(decode_consistency_token(dataset.source.writer.position()) + 10**12)
    settings = settings_for(
        dataset.source.redis_url, slot_name=dataset.source.slot_name, consistency_wait_max_seconds=0.3
    )
    async with running_history(settings) as capped:
        call = capped.stub.GetAccount(
            pb.GetAccountRequest(account_id=dataset.alice, min_consistency_token=ahead)
        )
        await _fails(call, grpc.StatusCode.UNAVAILABLE, "CONSISTENCY_NOT_REACHED")


async def test_a_malformed_consistency_token_is_refused(dataset: Dataset, history: RunningHistory) -> None:
    bad = "c1.not-a-token"
    calls = [
        history.stub.GetPayment(pb.GetPaymentRequest(payment_id=dataset.reviewed, min_consistency_token=bad)),
        history.stub.GetAccount(pb.GetAccountRequest(account_id=dataset.alice, min_consistency_token=bad)),
        history.stub.ListPayments(
            pb.ListPaymentsRequest(account_id=dataset.alice, direction=ALL, min_consistency_token=bad)
        ),
    ]
    for call in calls:
        error = await _fails(call, grpc.StatusCode.INVALID_ARGUMENT, "INVALID_CONSISTENCY_TOKEN")
        violations = bad_request(error)
        assert violations is not None
        assert [v.field for v in violations.field_violations] == ["min_consistency_token"]


# -- WatchPayments --------------------------------------------------------------------------


async def _next(stream: Any) -> pb.WatchPaymentsResponse:
    message = await stream.read()
    assert isinstance(message, pb.WatchPaymentsResponse)
    return message


async def _drain(stream: AsyncIterable[pb.WatchPaymentsResponse]) -> None:
    async with asyncio.timeout(30):
        async for _ in stream:
            pass


async def test_watch_streams_the_changes_of_the_payer_and_the_payee(
    dataset: Dataset, history: RunningHistory
) -> None:
    writer = dataset.source.writer
    gina, hal, ivy = writer.open_account("Gina"), writer.open_account("Hal"), writer.open_account("Ivy")
    dataset.source.wait_replicated()
    streams = {
        name: history.stub.WatchPayments(pb.WatchPaymentsRequest(account_id=account))
        for name, account in (("gina", gina), ("hal", hal), ("ivy", ivy))
    }
    for stream in streams.values():
        await stream.initial_metadata()
    # Each write replicated before the next, so that each is a batch of its own.
    held, _ = await asyncio.to_thread(writer.pay, gina, hal, 300, "PENDING_REVIEW")
    await asyncio.to_thread(dataset.source.wait_replicated)
    await asyncio.to_thread(writer.approve_held, held)
    await asyncio.to_thread(dataset.source.wait_replicated)
    other, _ = await asyncio.to_thread(writer.pay, ivy, gina, 5)
    async with asyncio.timeout(30):
        gina_seen = [await _next(streams["gina"]) for _ in range(3)]
        hal_seen = [await _next(streams["hal"]) for _ in range(2)]
        ivy_seen = [await _next(streams["ivy"])]
    for stream in streams.values():
        stream.cancel()

    assert [(m.payment.payment_id, m.payment.status) for m in gina_seen] == [
        (held, HELD),
        (held, APPROVED),
        (other, APPROVED),
    ]
    assert [(m.payment.payment_id, m.payment.status) for m in hal_seen] == [(held, HELD), (held, APPROVED)]
    # Ivy's first message is her own payment: the payment between Gina and Hal never reached her.
    assert [m.payment.payment_id for m in ivy_seen] == [other]
    assert [e.status for e in gina_seen[1].payment.timeline] == [HELD, APPROVED]
    # A stream's token reads at least what the stream showed.
    token = gina_seen[1].consistency_token
    reply = await history.stub.GetPayment(pb.GetPaymentRequest(payment_id=held, min_consistency_token=token))
    assert reply.payment.status == APPROVED
    positions = [decode_consistency_token(m.consistency_token) for m in gina_seen]
    assert positions == sorted(positions)


async def test_a_watch_that_falls_behind_is_ended_with_watch_too_slow(dataset: Dataset) -> None:
    writer = dataset.source.writer
    jay, kim = writer.open_account("Jay"), writer.open_account("Kim")
    dataset.source.wait_replicated()
    settings = settings_for(dataset.source.redis_url, slot_name=dataset.source.slot_name, watch_queue_size=2)
    async with (
        running_history(settings) as small,
        # Without BDP probing the client's HTTP/2 window stays at its first size (64 KiB), so
        # a client that stops reading stops the server's sends soon.
        aio_channel(small.address, options=[("grpc.http2.bdp_probe", 0)]) as channel,
    ):
        stub: history_service_pb2_grpc.HistoryServiceAsyncStub = history_service_pb2_grpc.HistoryServiceStub(
            channel
        )
        stream = stub.WatchPayments(pb.WatchPaymentsRequest(account_id=jay))
        await stream.initial_metadata()
        # One source transaction is one batch: five changes at once into a buffer of two are
        # taken whole while none waits, so a client that keeps up is not ended.
        paid = await asyncio.to_thread(writer.pay_many, jay, kim, 5)
        got = []
        async with asyncio.timeout(30):
            for _ in paid:
                message = await stream.read()
                assert isinstance(message, pb.WatchPaymentsResponse), message
                got.append(message.payment.payment_id)
        assert got == paid
        # A client that stops reading: once gRPC holds all it will for it, batches wait in the
        # buffer, and the next one overflows it.
        ended = REGISTRY.get_sample_value("history_watch_too_slow_total") or 0.0

        async def behind() -> bool:
            await asyncio.to_thread(writer.pay_many, jay, kim, 200)
            return (REGISTRY.get_sample_value("history_watch_too_slow_total") or 0.0) > ended

        await eventually(behind, 120, "the stream ended as too slow", interval=0)
        await _fails(_drain(stream), grpc.StatusCode.RESOURCE_EXHAUSTED, "WATCH_TOO_SLOW")
        assert small.server.watcher.subscriptions == 0


async def test_watch_of_an_unknown_or_malformed_account_fails(history: RunningHistory) -> None:
    unknown = history.stub.WatchPayments(
        pb.WatchPaymentsRequest(account_id="0b0e1a7c-55d0-4a5e-9a59-3c1a0e6f2d11")
    )
    await _fails(unknown.read(), grpc.StatusCode.NOT_FOUND, "ACCOUNT_NOT_FOUND")
    malformed = history.stub.WatchPayments(pb.WatchPaymentsRequest(account_id="nope"))
    await _fails(malformed.read(), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT")
    assert history.server.watcher.subscriptions == 0


# -- Shutdown -------------------------------------------------------------------------------


async def test_shutdown_ends_watch_streams_and_finishes_calls_in_flight(dataset: Dataset) -> None:
    writer = dataset.source.writer
    lee, mo = writer.open_account("Lee"), writer.open_account("Mo")
    dataset.source.wait_replicated()
    settings = settings_for(
        dataset.source.redis_url, slot_name=dataset.source.slot_name, consistency_wait_max_seconds=30
    )
    async with running_history(settings) as doomed:
        stream = doomed.stub.WatchPayments(pb.WatchPaymentsRequest(account_id=lee))
        await stream.initial_metadata()
        # Waits for a position past the source's WAL of now: the next write reaches it (or, on
        # the PostgreSQL server the tests share, another database's write first).
        beyond = encode_consistency_token(decode_consistency_token(writer.position()) + 1)
        waiting = asyncio.ensure_future(
            doomed.stub.GetAccount(
                pb.GetAccountRequest(account_id=lee, min_consistency_token=beyond), timeout=30
            )
        )
        await eventually(lambda: doomed.server.watcher.waiting == 1)
        stopping = asyncio.ensure_future(doomed.server.stop(20))
        async with asyncio.timeout(30):
            assert [message async for message in stream] == []
        assert await stream.code() == grpc.StatusCode.OK
        await asyncio.to_thread(writer.pay, lee, mo, 1)
        # Answered while the server stops, not cut off.
        reply = await waiting
        assert reply.account.account_id == lee
        await stopping


# -- Cost -----------------------------------------------------------------------------------


class RoundTrips:
    """Counts the round trips of one Redis client: each command, or each pipeline, is one."""

    def __init__(self, client: Redis) -> None:
        self.client = client
        self.count = 0
        command: Callable[..., Awaitable[Any]] = client.execute_command
        pipeline = client.pipeline

        async def counted_command(*args: Any, **options: Any) -> Any:
            self.count += 1
            return await command(*args, **options)

        def counted_pipeline(*args: Any, **options: Any) -> Any:
            pipe = pipeline(*args, **options)
            execute = pipe.execute

            async def counted_execute(*args: Any, **options: Any) -> Any:
                self.count += 1
                return await execute(*args, **options)

            pipe.execute = counted_execute  # type: ignore[method-assign]
            return pipe

        client.execute_command = counted_command  # type: ignore[method-assign]
        client.pipeline = counted_pipeline  # type: ignore[method-assign]

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


# It counts the one-node scripts and their client: a cluster reads through its masters.
@pytest.mark.parametrize("topology", ["one node"], indirect=True)
async def test_round_trips_per_query_do_not_grow_with_the_page_size(dataset: Dataset) -> None:
    client = Redis.from_url(dataset.source.redis_url)
    trips = RoundTrips(client)
    read_model = ReadModel(client, KeySchema(), dataset.source.slot_name)
    try:
        await client.script_flush()
        trips.take()
        # The first run of a script that Redis does not know yet costs one more: EVAL after NOSCRIPT.
        assert await read_model.payment_response(dataset.reviewed) is not None
        assert await read_model.page(ListQuery(dataset.alice, "all", 0), None, 1) is not None
        assert trips.take() == 4
        for size in (1, 5, 500):
            page = await read_model.page(ListQuery(dataset.alice, "all", 0), None, size)
            assert page is not None
            assert len(pb.ListPaymentsResponse.FromString(page.payments).payments) == min(
                size, len(dataset.expected(dataset.alice, ALL))
            )
            assert trips.take() == 1
        assert await read_model.payment_response(dataset.reviewed) is not None
        assert trips.take() == 1
        assert await read_model.payment_response(dataset.reviewed, min_lsn=1) is not None
        assert trips.take() == 1
        assert await read_model.page(ListQuery(dataset.alice, "all", 0), None, 5, min_lsn=1) is not None
        assert trips.take() == 1
        assert await read_model.account(dataset.alice) is not None
        assert trips.take() == 1
        assert (
            await read_model.page(ListQuery(dataset.alice, "all", 0, 10**15, 10**15 + 1), None, 50)
            is not None
        )
        assert trips.take() == 1
    finally:
        await client.aclose()
