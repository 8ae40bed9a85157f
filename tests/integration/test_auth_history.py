"""Who may read the history service, against the real server and read models built by the real replicator.

Every method refuses bad credentials with its reason; a customer reads only its own
accounts and the payments they pay or receive, and never the review queue, which spans
every account; health and reflection need no credentials.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import message

from history_svc.config import Settings
from history_svc.server import SERVICE_NAME
from payments.history.v1 import history_service_pb2 as pb
from payments.history.v1 import history_service_pb2_grpc as pb_grpc
from payments_common.grpcstatus import error_info
from stack.auth import ACCOUNTS_ADMIN, CUSTOMER, HISTORY_READER, PAYMENT_GATEWAY, REVIEWER, LocalAuthority
from stack.servers import PostgresServer
from tests.support.auth import (
    BAD_CREDENTIALS,
    assert_open_without_credentials,
    auth_settings,
    bad_credentials,
    bearer,
)
from tests.support.history import (
    ReplicatedSource,
    RunningHistory,
    replicated_source,
    running_history,
    settings_for,
)

ALL = pb.PAYMENT_DIRECTION_ALL
METHODS = list(pb.DESCRIPTOR.services_by_name["HistoryService"].methods_by_name)
# The methods of every account, and the review queue's: who may call each.
ACCOUNT_READS = ["GetPayment", "ListPayments", "GetAccount", "WatchPayments"]
QUEUE_READERS = [REVIEWER, HISTORY_READER]
Metadata = list[tuple[str, str]]


@dataclass
class Dataset:
    source: ReplicatedSource
    alice: str
    bob: str
    carol: str
    alice_to_bob: str
    bob_to_carol: str


@pytest.fixture(scope="module")
def dataset(postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataset]:
    with replicated_source(postgres_server, tmp_path_factory.mktemp("auth-history")) as source:
        writer = source.writer
        alice, bob, carol = (writer.open_account(name) for name in ("Alice", "Bob", "Carol"))
        alice_to_bob, _ = writer.pay(alice, bob, 100)
        bob_to_carol, _ = writer.pay(bob, carol, 200)
        source.wait_replicated()
        yield Dataset(source, alice, bob, carol, alice_to_bob, bob_to_carol)


@dataclass
class Setup:
    data: Dataset
    authority: LocalAuthority
    history: RunningHistory
    raw: pb_grpc.HistoryServiceAsyncStub  # its calls carry only the metadata a test gives

    def token(self, subject: str, roles: Sequence[str], accounts: Sequence[str] = ()) -> Metadata:
        return bearer(self.authority.token(subject, roles, accounts))

    def customer(self, *accounts: str) -> Metadata:
        return self.token("alice", [CUSTOMER], accounts or (self.data.alice,))


@pytest.fixture(scope="module")
async def setup(dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setup]:
    authority = LocalAuthority.create(tmp_path_factory.mktemp("authority"))
    settings = settings_for(
        dataset.source.redis_url,
        slot_name=dataset.source.slot_name,
        auth=auth_settings(Settings, authority.server_env("HISTORY_")),
    )
    async with (
        running_history(settings, token=authority.service_token()) as history,
        grpc.aio.insecure_channel(history.address) as channel,
    ):
        yield Setup(dataset, authority, history, pb_grpc.HistoryServiceStub(channel))


def requests(data: Dataset) -> dict[str, message.Message]:
    """A request for every method that the service token would have answered with success."""
    return {
        "GetPayment": pb.GetPaymentRequest(payment_id=data.alice_to_bob),
        "ListPayments": pb.ListPaymentsRequest(account_id=data.alice, direction=ALL),
        "GetAccount": pb.GetAccountRequest(account_id=data.alice),
        "WatchPayments": pb.WatchPaymentsRequest(account_id=data.alice),
        "ListHeldPayments": pb.ListHeldPaymentsRequest(),
    }


async def answer(
    stub: pb_grpc.HistoryServiceAsyncStub, method: str, request: message.Message, metadata: Metadata
) -> Any:
    """The method's answer: the response of a unary call; for a watch, the stream once it is established."""
    call = getattr(stub, method)(request, metadata=metadata, timeout=30)
    if method == "WatchPayments":
        # The server sends its initial metadata once the watch is open: past every check.
        await call.initial_metadata()
        if call.done():
            await call.read()  # the status of a watch that failed before it opened
        call.cancel()
        return call
    return await call


async def refused(
    stub: pb_grpc.HistoryServiceAsyncStub, method: str, request: message.Message, metadata: Metadata
) -> tuple[grpc.StatusCode, str]:
    call = getattr(stub, method)(request, metadata=metadata, timeout=30)
    # A watch fails at its first read; a unary call, when awaited.
    outcome = call.read() if method == "WatchPayments" else call
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await outcome
    info = error_info(raised.value)
    assert info is not None, raised.value
    return raised.value.code(), info.reason


def test_every_method_is_covered() -> None:
    assert sorted(METHODS) == sorted([*ACCOUNT_READS, "ListHeldPayments"])


@pytest.mark.parametrize("case", list(BAD_CREDENTIALS))
@pytest.mark.parametrize("method", METHODS)
async def test_every_method_refuses_bad_credentials(setup: Setup, method: str, case: str) -> None:
    metadata = bad_credentials(setup.authority, case)
    assert await refused(setup.raw, method, requests(setup.data)[method], metadata) == (
        grpc.StatusCode.UNAUTHENTICATED,
        BAD_CREDENTIALS[case],
    )


@pytest.mark.parametrize("role", [CUSTOMER, PAYMENT_GATEWAY, REVIEWER, HISTORY_READER])
async def test_the_reading_roles_read(setup: Setup, role: str) -> None:
    for method in ACCOUNT_READS + (["ListHeldPayments"] if role in QUEUE_READERS else []):
        metadata = setup.token(f"someone-{role}", [role], [setup.data.alice])
        await answer(setup.raw, method, requests(setup.data)[method], metadata)


@pytest.mark.parametrize("role", QUEUE_READERS)
async def test_reviewers_and_history_readers_read_the_review_queue(setup: Setup, role: str) -> None:
    page = await setup.raw.ListHeldPayments(
        pb.ListHeldPaymentsRequest(), metadata=setup.token(f"someone-{role}", [role]), timeout=30
    )
    assert page.consistency_token


@pytest.mark.parametrize("role", [CUSTOMER, PAYMENT_GATEWAY])
async def test_a_customer_or_a_gateway_may_not_read_the_review_queue(setup: Setup, role: str) -> None:
    """The queue spans every account: not a customer's, even one whose token names accounts."""
    metadata = setup.token(f"someone-{role}", [role], [setup.data.alice, setup.data.bob])
    assert await refused(setup.raw, "ListHeldPayments", pb.ListHeldPaymentsRequest(), metadata) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "METHOD_NOT_ALLOWED",
    )


@pytest.mark.parametrize("role", [ACCOUNTS_ADMIN, "unknown-role", None])
async def test_other_roles_read_nothing(setup: Setup, role: str | None) -> None:
    metadata = setup.token("someone", [role] if role else [], [setup.data.alice])
    for method in METHODS:
        assert await refused(setup.raw, method, requests(setup.data)[method], metadata) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "METHOD_NOT_ALLOWED",
        )


async def test_a_customer_reads_its_own_account_list_watch_and_payments(setup: Setup) -> None:
    data, alice = setup.data, setup.customer()
    account = await setup.raw.GetAccount(pb.GetAccountRequest(account_id=data.alice), metadata=alice)
    assert account.account.account_id == data.alice
    page = await setup.raw.ListPayments(
        pb.ListPaymentsRequest(account_id=data.alice, direction=ALL), metadata=alice
    )
    assert [view.payment_id for view in page.payments] == [data.alice_to_bob]
    payment = await setup.raw.GetPayment(pb.GetPaymentRequest(payment_id=data.alice_to_bob), metadata=alice)
    assert payment.payment.payment_id == data.alice_to_bob
    await answer(setup.raw, "WatchPayments", pb.WatchPaymentsRequest(account_id=data.alice), alice)
    # Bob reads the payment too: he is its payee. The claim's case does not matter.
    bob = setup.customer(data.bob.upper())
    payment = await setup.raw.GetPayment(pb.GetPaymentRequest(payment_id=data.alice_to_bob), metadata=bob)
    assert payment.payment.payee_account_id == data.bob


async def test_a_customer_reads_nothing_of_another_customer(setup: Setup) -> None:
    data, alice = setup.data, setup.customer()
    others: list[tuple[str, message.Message]] = [
        ("GetAccount", pb.GetAccountRequest(account_id=data.bob)),
        ("ListPayments", pb.ListPaymentsRequest(account_id=data.bob, direction=ALL)),
        ("WatchPayments", pb.WatchPaymentsRequest(account_id=data.bob)),
        ("GetPayment", pb.GetPaymentRequest(payment_id=data.bob_to_carol)),
        # A payment that does not exist is answered the same way: existence does not leak.
        ("GetPayment", pb.GetPaymentRequest(payment_id=str(uuid.uuid4()))),
        # Nor does an account's.
        ("GetAccount", pb.GetAccountRequest(account_id=str(uuid.uuid4()))),
    ]
    for method, request in others:
        assert await refused(setup.raw, method, request, alice) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "NOT_YOUR_ACCOUNT",
        ), (method, request)


async def test_a_reader_of_any_account_learns_what_does_not_exist(setup: Setup) -> None:
    reader = setup.token("support.lee", [HISTORY_READER])
    missing = pb.GetPaymentRequest(payment_id=str(uuid.uuid4()))
    assert await refused(setup.raw, "GetPayment", missing, reader) == (
        grpc.StatusCode.NOT_FOUND,
        "PAYMENT_NOT_FOUND",
    )
    other = await setup.raw.GetPayment(
        pb.GetPaymentRequest(payment_id=setup.data.bob_to_carol), metadata=reader
    )
    assert other.payment.payer_account_id == setup.data.bob


async def test_a_malformed_request_is_invalid_before_it_is_scoped(setup: Setup) -> None:
    request = pb.GetAccountRequest(account_id="not-a-uuid")
    assert await refused(setup.raw, "GetAccount", request, setup.customer()) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )


async def test_health_and_reflection_need_no_credentials(setup: Setup) -> None:
    await assert_open_without_credentials(setup.history.address, SERVICE_NAME)


async def test_a_watch_ends_when_its_token_expires(dataset: Dataset, tmp_path: Path) -> None:
    """A watch delivers while its token is valid, then ends with UNAUTHENTICATED `TOKEN_EXPIRED` at its expiry."""
    authority = LocalAuthority.create(tmp_path)
    auth = auth_settings(Settings, authority.server_env("HISTORY_"))
    settings = settings_for(
        dataset.source.redis_url,
        slot_name=dataset.source.slot_name,
        auth=dataclasses.replace(auth, clock_skew_seconds=0),
    )
    token = authority.token("alice", [CUSTOMER], [dataset.alice], lifetime_seconds=3)
    async with (
        running_history(settings, token=authority.service_token()) as history,
        grpc.aio.insecure_channel(history.address) as channel,
    ):
        stub = pb_grpc.HistoryServiceStub(channel)
        call = stub.WatchPayments(
            pb.WatchPaymentsRequest(account_id=dataset.alice), metadata=bearer(token), timeout=60
        )
        await call.initial_metadata()
        paid, _ = dataset.source.writer.pay(dataset.alice, dataset.bob, 7)
        delivered = await call.read()
        assert isinstance(delivered, pb.WatchPaymentsResponse)
        assert delivered.payment.payment_id == paid
        with pytest.raises(grpc.aio.AioRpcError) as ended:
            await _read_to_the_end(call)
    assert ended.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = error_info(ended.value)
    assert info is not None
    assert info.reason == "TOKEN_EXPIRED"


async def _read_to_the_end(call: Any) -> None:
    while await call.read() is not grpc.aio.EOF:  # type: ignore[attr-defined]
        pass
