"""Who may call the approval service, against the real server: each refusal has its status and reason, and stores nothing.

Tokens are signed by keys the tests generate (stack.auth.LocalAuthority, in a tmp dir);
PostgreSQL is compared before and after every refused call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import grpc
import pytest
from google.protobuf import message
from grpc_health.v1 import health_pb2, health_pb2_grpc

from approval_svc.config import Settings
from approval_svc.migrate import upgrade
from approval_svc.servicer import SERVICE_NAME
from payments.approval.v1 import approval_service_pb2 as pb
from payments.approval.v1 import approval_service_pb2_grpc as pb_grpc
from payments.type.v1 import money_pb2, payment_pb2
from payments_common.grpcstatus import error_info
from payments_common.tls import channel_credentials
from stack.auth import (
    ACCOUNTS_ADMIN,
    CUSTOMER,
    HISTORY_READER,
    PAYMENT_GATEWAY,
    REVIEWER,
    ROLES,
    LocalAuthority,
    default_policy,
)
from stack.clients import with_bearer
from stack.servers import PostgresServer, free_port
from tests.support import ROOT
from tests.support.approval import RunningServer, running_server
from tests.support.auth import (
    BAD_CREDENTIALS,
    assert_open_without_credentials,
    auth_settings,
    bad_credentials,
    bearer,
    service_token,
)
from tests.support.faults import approval_process, make_pki
from tests.support.processes import ServiceProcess
from tests.support.waiting import eventually

THRESHOLD = 5_000
Metadata = list[tuple[str, str]]


def rid() -> str:
    return uuid.uuid4().hex


def eur(amount: int) -> money_pb2.Money:
    return money_pb2.Money(currency_code="EUR", amount_minor=amount)


async def snapshot(dsn: str) -> dict[str, tuple[int, str]]:
    """Every table of the system of record, as a row count and a digest of its rows."""
    connection = await asyncpg.connect(dsn)
    try:
        return {
            table: tuple(
                await connection.fetchrow(
                    f"SELECT count(*), coalesce(md5(string_agg(t::text, '|' ORDER BY t::text)), '') FROM {table} t"
                )
            )
            for table in ("accounts", "payments", "payment_events", "ledger_entries", "idempotency_keys")
        }
    finally:
        await connection.close()


@dataclass
class Setup:
    """A server that trusts `authority`, and what it holds: Alice's and Bob's accounts, a held payment."""

    authority: LocalAuthority
    server: RunningServer
    dsn: str
    alice: str
    alice_savings: str
    bob: str
    carol: str
    held: str  # Alice -> Bob, under review
    elsewhere: str  # Bob -> Carol

    def token(self, subject: str, roles: Sequence[str], accounts: Sequence[str] = ()) -> Metadata:
        return bearer(self.authority.token(subject, roles, accounts))

    def customer(self, *accounts: str) -> Metadata:
        return self.token("alice", [CUSTOMER], list(accounts or (self.alice, self.alice_savings)))


@pytest.fixture(scope="module")
async def setup(
    postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Setup]:
    authority = LocalAuthority.create(tmp_path_factory.mktemp("authority"))
    name = f"auth_approval_{uuid.uuid4().hex[:8]}"
    dsn = postgres_server.create_database(name)
    try:
        upgrade(dsn)
        auth = auth_settings(Settings, authority.server_env("APPROVAL_"))
        async with running_server(
            dsn, review_threshold=THRESHOLD, auth=auth, token=authority.service_token()
        ) as server:
            stub = server.stub

            async def account(owner: str) -> str:
                response = await stub.CreateAccount(create_request(owner, 100_000, 50_000, 100_000))
                return response.account.account_id

            alice, savings, bob, carol = [await account(n) for n in ("Alice", "Alice", "Bob", "Carol")]
            held = await stub.SubmitPayment(
                pb.SubmitPaymentRequest(
                    request_id=rid(), payer_account_id=alice, payee_account_id=bob, amount=eur(THRESHOLD)
                )
            )
            elsewhere = await stub.SubmitPayment(
                pb.SubmitPaymentRequest(
                    request_id=rid(), payer_account_id=bob, payee_account_id=carol, amount=eur(10)
                )
            )
            assert held.payment.status == payment_pb2.PAYMENT_STATUS_PENDING_REVIEW
            yield Setup(
                authority,
                server,
                dsn,
                alice,
                savings,
                bob,
                carol,
                held.payment.payment_id,
                elsewhere.payment.payment_id,
            )
    finally:
        postgres_server.drop_database(name)


@pytest.fixture
async def raw(setup: Setup) -> AsyncIterator[pb_grpc.ApprovalServiceAsyncStub]:
    """A stub whose calls carry only the metadata each test gives them."""
    async with grpc.aio.insecure_channel(setup.server.address) as channel:
        yield pb_grpc.ApprovalServiceStub(channel)


def create_request(
    owner: str = "Mallory", opening: int = 10**9, per_payment: int = 10**9, daily: int = 10**9
) -> pb.CreateAccountRequest:
    return pb.CreateAccountRequest(
        request_id=rid(),
        owner_name=owner,
        currency_code="EUR",
        opening_balance_minor=opening,
        per_payment_limit_minor=per_payment,
        daily_limit_minor=daily,
    )


def open_payer_and_payee(stub: pb_grpc.ApprovalServiceStub) -> tuple[str, str]:
    """Two accounts of 10.00 EUR each (limits 10.00), through a blocking stub; their ids."""
    payer, payee = (
        stub.CreateAccount(create_request(name, 1000, 1000, 1000), timeout=10).account.account_id
        for name in ("Payer", "Payee")
    )
    return payer, payee


def requests(setup: Setup) -> dict[str, message.Message]:
    """A request for every method that the service token would have answered with success."""
    return {
        "CreateAccount": create_request(),
        "SubmitPayment": pb.SubmitPaymentRequest(
            request_id=rid(), payer_account_id=setup.alice, payee_account_id=setup.carol, amount=eur(100)
        ),
        "ApprovePayment": pb.ApprovePaymentRequest(request_id=rid(), payment_id=setup.held),
        "DeclinePayment": pb.DeclinePaymentRequest(request_id=rid(), payment_id=setup.held),
        "FreezeAccount": pb.FreezeAccountRequest(request_id=rid(), account_id=setup.bob),
        "UnfreezeAccount": pb.UnfreezeAccountRequest(request_id=rid(), account_id=setup.bob),
        "GetPayment": pb.GetPaymentRequest(payment_id=setup.held),
    }


METHODS = list(pb.DESCRIPTOR.services_by_name["ApprovalService"].methods_by_name)


async def refused(call: Awaitable[Any]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call
    info = error_info(raised.value)
    assert info is not None, raised.value
    return raised.value.code(), info.reason


def test_every_method_is_covered() -> None:
    assert sorted(METHODS) == sorted(
        [
            "CreateAccount",
            "SubmitPayment",
            "ApprovePayment",
            "DeclinePayment",
            "FreezeAccount",
            "UnfreezeAccount",
            "GetPayment",
        ]
    )


@pytest.mark.parametrize("case", list(BAD_CREDENTIALS))
@pytest.mark.parametrize("method", METHODS)
async def test_every_method_refuses_bad_credentials_and_stores_nothing(
    setup: Setup, raw: pb_grpc.ApprovalServiceAsyncStub, method: str, case: str
) -> None:
    before = await snapshot(setup.dsn)
    call = getattr(raw, method)(requests(setup)[method], metadata=bad_credentials(setup.authority, case))
    assert await refused(call) == (grpc.StatusCode.UNAUTHENTICATED, BAD_CREDENTIALS[case])
    assert await snapshot(setup.dsn) == before


async def test_the_refusal_names_nothing_the_server_expects(
    setup: Setup, raw: pb_grpc.ApprovalServiceAsyncStub
) -> None:
    expected = (setup.authority.ISSUER, setup.authority.AUDIENCE, setup.authority.current_kid)
    for case in BAD_CREDENTIALS:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await raw.GetPayment(
                pb.GetPaymentRequest(payment_id=setup.held), metadata=bad_credentials(setup.authority, case)
            )
        info = error_info(raised.value)
        assert info is not None
        text = f"{raised.value.details()} {dict(info.metadata)}"
        assert [value for value in expected if value in text] == []


async def test_health_and_reflection_need_no_credentials(
    raw: pb_grpc.ApprovalServiceAsyncStub, setup: Setup
) -> None:
    await assert_open_without_credentials(setup.server.address, SERVICE_NAME)


# Which roles may call which method, by the default policy: everything else is METHOD_NOT_ALLOWED.
ALLOWED = {
    "CreateAccount": {ACCOUNTS_ADMIN},
    "SubmitPayment": {CUSTOMER, PAYMENT_GATEWAY},
    "ApprovePayment": {REVIEWER},
    "DeclinePayment": {REVIEWER},
    "FreezeAccount": {ACCOUNTS_ADMIN},
    "UnfreezeAccount": {ACCOUNTS_ADMIN},
    "GetPayment": {CUSTOMER, PAYMENT_GATEWAY, REVIEWER},
}


@pytest.mark.parametrize("role", [*ROLES, "unknown-role"])
async def test_a_role_may_call_only_its_methods(
    setup: Setup, raw: pb_grpc.ApprovalServiceAsyncStub, role: str
) -> None:
    metadata = setup.token(f"someone-{role}", [role], [setup.alice])
    for method in METHODS:
        if role in ALLOWED[method]:
            continue
        before = await snapshot(setup.dsn)
        call = getattr(raw, method)(requests(setup)[method], metadata=metadata)
        assert await refused(call) == (grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED"), method
        assert await snapshot(setup.dsn) == before


async def test_a_token_without_roles_may_call_nothing(
    setup: Setup, raw: pb_grpc.ApprovalServiceAsyncStub
) -> None:
    for method in METHODS:
        call = getattr(raw, method)(requests(setup)[method], metadata=setup.token("nobody", []))
        assert await refused(call) == (grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED")


async def test_a_customer_pays_only_from_its_own_accounts(
    setup: Setup, raw: pb_grpc.ApprovalServiceAsyncStub
) -> None:
    before = await snapshot(setup.dsn)
    from_bob = pb.SubmitPaymentRequest(
        request_id=rid(), payer_account_id=setup.bob, payee_account_id=setup.alice, amount=eur(100)
    )
    assert await refused(raw.SubmitPayment(from_bob, metadata=setup.customer())) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "NOT_YOUR_ACCOUNT",
    )
    assert await snapshot(setup.dsn) == before
    # Its own account, to anyone's: accepted. The account id's case does not matter.
    own = pb.SubmitPaymentRequest(
        request_id=rid(), payer_account_id=setup.alice.upper(), payee_account_id=setup.bob, amount=eur(100)
    )
    paid = await raw.SubmitPayment(own, metadata=setup.customer(setup.alice))
    assert paid.payment.status == payment_pb2.PAYMENT_STATUS_APPROVED
    # A payment gateway acts for any payer.
    gateway = setup.token("spiffe://payments.local/ns/payments/sa/payment-gateway", [PAYMENT_GATEWAY])
    for_bob = await raw.SubmitPayment(
        pb.SubmitPaymentRequest(
            request_id=rid(), payer_account_id=setup.bob, payee_account_id=setup.alice, amount=eur(1)
        ),
        metadata=gateway,
    )
    assert for_bob.payment.payer_account_id == setup.bob


async def test_a_token_of_more_than_ten_kilobytes_is_accepted_every_time(
    setup: Setup, raw: pb_grpc.ApprovalServiceAsyncStub
) -> None:
    """A customer with hundreds of accounts: its token is larger than gRPC's default soft limit (8 KiB)."""
    many = [setup.alice, *(str(uuid.uuid4()) for _ in range(200))]
    credentials = setup.customer(*many)
    assert 10 * 1024 < len(credentials[0][1]) < 14 * 1024
    request = pb.GetPaymentRequest(payment_id=str(uuid.uuid4()))
    for _ in range(40):
        # Scoped to its accounts, the customer learns nothing of a payment that is not theirs.
        assert await refused(raw.GetPayment(request, metadata=credentials)) == (
            grpc.StatusCode.PERMISSION_DENIED,
            "NOT_YOUR_ACCOUNT",
        )


async def test_a_customer_reads_only_payments_of_its_accounts(
    setup: Setup, raw: pb_grpc.ApprovalServiceAsyncStub
) -> None:
    mine = await raw.GetPayment(pb.GetPaymentRequest(payment_id=setup.held), metadata=setup.customer())
    assert mine.payment.payment_id == setup.held
    # Bob reads it too: he is its payee.
    bobs = await raw.GetPayment(
        pb.GetPaymentRequest(payment_id=setup.held), metadata=setup.customer(setup.bob)
    )
    assert bobs.payment.payment_id == setup.held
    for payment_id in (setup.elsewhere, str(uuid.uuid4())):  # another's, and one that does not exist
        assert await refused(
            raw.GetPayment(pb.GetPaymentRequest(payment_id=payment_id), metadata=setup.customer())
        ) == (grpc.StatusCode.PERMISSION_DENIED, "NOT_YOUR_ACCOUNT")
    # Anyone else learns that a payment does not exist.
    assert await refused(
        raw.GetPayment(
            pb.GetPaymentRequest(payment_id=str(uuid.uuid4())), metadata=setup.token("jane", [REVIEWER])
        )
    ) == (grpc.StatusCode.NOT_FOUND, "PAYMENT_NOT_FOUND")


async def held_payment(setup: Setup) -> str:
    response = await setup.server.stub.SubmitPayment(
        pb.SubmitPaymentRequest(
            request_id=rid(),
            payer_account_id=setup.alice_savings,
            payee_account_id=setup.carol,
            amount=eur(THRESHOLD),
        )
    )
    assert response.payment.status == payment_pb2.PAYMENT_STATUS_PENDING_REVIEW
    return response.payment.payment_id


async def test_the_reviewer_is_the_caller_and_may_not_decide_under_another_name(
    setup: Setup, raw: pb_grpc.ApprovalServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="payments.audit")
    jane = setup.token("operator.jane", [REVIEWER])
    first, second = await held_payment(setup), await held_payment(setup)
    before = await snapshot(setup.dsn)
    approve = pb.ApprovePaymentRequest(request_id=rid(), payment_id=first, reviewer="operator.bob")
    decline = pb.DeclinePaymentRequest(request_id=rid(), payment_id=first, reviewer="operator.bob")
    # One after the other: a grpc.aio call starts when it is made.
    assert await refused(raw.ApprovePayment(approve, metadata=jane)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "REVIEWER_MISMATCH",
    )
    assert await refused(raw.DeclinePayment(decline, metadata=jane)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "REVIEWER_MISMATCH",
    )
    assert await snapshot(setup.dsn) == before

    # Naming herself, or no one: the decision is hers, and so is the timeline's event.
    approved = await raw.ApprovePayment(
        pb.ApprovePaymentRequest(request_id=rid(), payment_id=first, reviewer="operator.jane", note="ok"),
        metadata=jane,
    )
    declined = await raw.DeclinePayment(
        pb.DeclinePaymentRequest(request_id=rid(), payment_id=second), metadata=jane
    )
    assert approved.payment.status == payment_pb2.PAYMENT_STATUS_APPROVED
    assert declined.payment.status == payment_pb2.PAYMENT_STATUS_DECLINED
    for payment_id in (first, second):
        got = await setup.server.stub.GetPayment(pb.GetPaymentRequest(payment_id=payment_id))
        assert [event.actor for event in got.events] == ["system", "operator.jane"]

    audit = [r for r in caplog.records if r.name == "payments.audit"]
    assert [(r.method, r.identity, r.target, r.outcome) for r in audit] == [  # type: ignore[attr-defined]
        (f"/{SERVICE_NAME}/ApprovePayment", "operator.jane", {"payment_id": first}, "PERMISSION_DENIED"),
        (f"/{SERVICE_NAME}/DeclinePayment", "operator.jane", {"payment_id": first}, "PERMISSION_DENIED"),
        (f"/{SERVICE_NAME}/ApprovePayment", "operator.jane", {"payment_id": first}, "OK"),
        (f"/{SERVICE_NAME}/DeclinePayment", "operator.jane", {"payment_id": second}, "OK"),
    ]


async def test_nobody_reviews_a_payment_from_or_to_their_own_account(
    setup: Setup, raw: pb_grpc.ApprovalServiceAsyncStub
) -> None:
    """Separation of duties: a reviewer whose token binds the payer's or the payee's account needs another reviewer."""
    payer_side = setup.token("operator.alice", [CUSTOMER, REVIEWER], [setup.alice_savings])
    payee_side = setup.token("operator.carol", [REVIEWER], [setup.carol.upper()])
    payment_id = await held_payment(setup)
    before = await snapshot(setup.dsn)
    # Text that names no account cannot be told apart from the parties' accounts: refused too.
    unreadable = setup.token("operator.dan", [REVIEWER], [f" {setup.alice_savings}\n"])
    for reviewer in (payer_side, payee_side, unreadable):
        assert await refused(
            raw.ApprovePayment(
                pb.ApprovePaymentRequest(request_id=rid(), payment_id=payment_id), metadata=reviewer
            )
        ) == (grpc.StatusCode.PERMISSION_DENIED, "OWN_PAYMENT_REVIEW")
        assert await refused(
            raw.DeclinePayment(
                pb.DeclinePaymentRequest(request_id=rid(), payment_id=payment_id), metadata=reviewer
            )
        ) == (grpc.StatusCode.PERMISSION_DENIED, "OWN_PAYMENT_REVIEW")
    assert await snapshot(setup.dsn) == before
    # A reviewer bound to other accounts decides it.
    other = setup.token("operator.jane", [REVIEWER], [setup.bob])
    approved = await raw.ApprovePayment(
        pb.ApprovePaymentRequest(request_id=rid(), payment_id=payment_id), metadata=other
    )
    assert approved.payment.status == payment_pb2.PAYMENT_STATUS_APPROVED


async def test_a_retry_of_a_review_matches_whether_or_not_it_names_the_reviewer(
    setup: Setup, raw: pb_grpc.ApprovalServiceAsyncStub
) -> None:
    jane = setup.token("operator.jane", [REVIEWER])
    payment_id, request_id = await held_payment(setup), rid()
    first = await raw.ApprovePayment(
        pb.ApprovePaymentRequest(request_id=request_id, payment_id=payment_id), metadata=jane
    )
    again = await raw.ApprovePayment(
        pb.ApprovePaymentRequest(request_id=request_id, payment_id=payment_id, reviewer="operator.jane"),
        metadata=jane,
    )
    assert again.payment == first.payment
    # The same request from another reviewer is not a retry, nor a reuse: a request_id is its
    # caller's own, so Sam's is a request of his, on a payment that Jane has decided.
    sam = setup.token("operator.sam", [REVIEWER])
    assert await refused(
        raw.ApprovePayment(
            pb.ApprovePaymentRequest(request_id=request_id, payment_id=payment_id), metadata=sam
        )
    ) == (grpc.StatusCode.FAILED_PRECONDITION, "PAYMENT_NOT_UNDER_REVIEW")


async def test_privileged_calls_are_audited_whatever_their_outcome(
    setup: Setup, raw: pb_grpc.ApprovalServiceAsyncStub, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="payments.audit")
    admin = setup.token("operator.sam", [ACCOUNTS_ADMIN])
    frozen = await raw.FreezeAccount(
        pb.FreezeAccountRequest(request_id=rid(), account_id=setup.carol), metadata=admin
    )
    await raw.UnfreezeAccount(
        pb.UnfreezeAccountRequest(request_id=rid(), account_id=setup.carol), metadata=admin
    )
    opened = await raw.CreateAccount(create_request(), metadata=admin)
    await refused(
        raw.FreezeAccount(
            pb.FreezeAccountRequest(request_id=rid(), account_id=setup.bob), metadata=setup.customer()
        )
    )
    await refused(raw.FreezeAccount(pb.FreezeAccountRequest(request_id=rid(), account_id=setup.bob)))
    await refused(raw.CreateAccount(pb.CreateAccountRequest(request_id=rid()), metadata=admin))
    # Reads and payments are not privileged: no audit line.
    await raw.GetPayment(pb.GetPaymentRequest(payment_id=setup.held), metadata=setup.customer())
    audit = [r for r in caplog.records if r.name == "payments.audit"]
    freeze, unfreeze, create = (
        f"/{SERVICE_NAME}/FreezeAccount",
        f"/{SERVICE_NAME}/UnfreezeAccount",
        f"/{SERVICE_NAME}/CreateAccount",
    )
    assert [(r.method, r.identity, r.identity_source, r.target, r.outcome) for r in audit] == [  # type: ignore[attr-defined]
        (freeze, "operator.sam", "token", {"account_id": setup.carol}, "OK"),
        (unfreeze, "operator.sam", "token", {"account_id": setup.carol}, "OK"),
        (create, "operator.sam", "token", {"account_id": opened.account.account_id}, "OK"),
        # Refused: the line names who tried, when the credentials said it.
        (freeze, "alice", "token", {"account_id": setup.bob}, "PERMISSION_DENIED"),
        (freeze, "", "", {"account_id": setup.bob}, "UNAUTHENTICATED"),
        (create, "operator.sam", "token", {}, "INVALID_ARGUMENT"),
    ]
    assert frozen.account.status == payment_pb2.ACCOUNT_STATUS_FROZEN


# -- key rotation ------------------------------------------------------------------------------


async def test_a_key_rotated_in_the_jwks_file_is_accepted_and_a_removed_one_refused(
    migrated_dsn: str, tmp_path: Path
) -> None:
    authority = LocalAuthority.create(tmp_path)
    auth = auth_settings(Settings, authority.server_env("APPROVAL_"))
    async with (
        running_server(migrated_dsn, auth=auth, token=authority.service_token()) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.ApprovalServiceStub(channel)
        await _rotation(authority, stub, authority.rotate, authority.retire)


async def _rotation(
    authority: LocalAuthority,
    stub: pb_grpc.ApprovalServiceAsyncStub,
    rotate: Callable[[], str],
    retire: Callable[[str], None],
) -> None:
    """Old and new keys both work while both are published; a token of a removed key is refused."""

    def read(token: str) -> Awaitable[Any]:
        # A payment that does not exist: NOT_FOUND proves the token was accepted.
        return stub.GetPayment(pb.GetPaymentRequest(payment_id=str(uuid.uuid4())), metadata=bearer(token))

    async def outcome(token: str) -> str:
        try:
            await read(token)
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            return info.reason if info else error.code().name
        return "OK"

    old_kid = authority.current_kid
    old = authority.token("operator.jane", [REVIEWER])
    assert await outcome(old) == "PAYMENT_NOT_FOUND"
    rotate()
    new = authority.token("operator.jane", [REVIEWER])
    await eventually(lambda: _is(outcome(new), "PAYMENT_NOT_FOUND"), 30, "the new key accepted")
    assert await outcome(old) == "PAYMENT_NOT_FOUND"
    retire(old_kid)
    await eventually(lambda: _is(outcome(old), "UNKNOWN_KEY"), 60, "the removed key refused")
    assert await outcome(new) == "PAYMENT_NOT_FOUND"


T = TypeVar("T")


async def _is(outcome: Awaitable[T], expected: T) -> bool:
    return await outcome == expected


class _JwksHandler(BaseHTTPRequestHandler):
    """Serves the authority's JWKS file as it is now, and counts the requests."""

    path_to_serve: Path
    served: list[str]

    def do_GET(self) -> None:
        body = self.path_to_serve.read_bytes()
        self.served.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def jwks_server(path: Path, port: int = 0) -> Iterator[tuple[str, list[str]]]:
    """A real HTTP server on 127.0.0.1 (a free port by default) serving the JWKS at `path`; yields its URL and its requests."""
    served: list[str] = []
    handler = type("Handler", (_JwksHandler,), {"path_to_serve": path, "served": served})
    server = ThreadingHTTPServer(("127.0.0.1", port), handler)
    thread = threading.Thread(target=server.serve_forever, name="jwks-http", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/.well-known/jwks.json", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_a_jwks_served_over_http_is_fetched_cached_and_follows_rotation(
    migrated_dsn: str, tmp_path: Path
) -> None:
    authority = LocalAuthority.create(tmp_path)
    with jwks_server(authority.jwks_path) as (url, served):
        env = {
            **authority.server_env("APPROVAL_"),
            "APPROVAL_AUTH_JWKS_URL": url,
            "APPROVAL_AUTH_JWKS_CACHE_SECONDS": "1",
        }
        del env["APPROVAL_AUTH_JWKS_FILE"]
        auth = auth_settings(Settings, env)
        assert (auth.jwks_file, auth.jwks_url) == ("", url)
        async with (
            running_server(migrated_dsn, auth=auth, token=authority.service_token()) as server,
            grpc.aio.insecure_channel(server.address) as channel,
        ):
            stub = pb_grpc.ApprovalServiceStub(channel)
            # Many calls with made-up keys do not make the server fetch for each of them.
            for _ in range(20):
                with pytest.raises(grpc.aio.AioRpcError):
                    await stub.GetPayment(
                        pb.GetPaymentRequest(payment_id=str(uuid.uuid4())),
                        metadata=bearer(authority.foreign_token("x", [REVIEWER])),
                    )
            assert 1 <= len(served) <= 2
            await _rotation(authority, stub, authority.rotate, authority.retire)
        assert set(served) == {"/.well-known/jwks.json"}


async def test_until_the_jwks_url_answers_a_token_is_unavailable_then_it_is_accepted(
    migrated_dsn: str, tmp_path: Path
) -> None:
    """A server whose key source is down is not ready and answers UNAVAILABLE KEYS_UNAVAILABLE (retry).

    Once the source answers, readiness fetches the keys by itself (a server that is not
    ready gets no calls to fetch them for), and the token is accepted.
    """
    authority = LocalAuthority.create(tmp_path)
    port = free_port()
    url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    env = {**authority.server_env("APPROVAL_"), "APPROVAL_AUTH_JWKS_URL": url}
    del env["APPROVAL_AUTH_JWKS_FILE"]
    async with (
        running_server(
            migrated_dsn, auth=auth_settings(Settings, env), token=authority.service_token()
        ) as server,
        grpc.aio.insecure_channel(server.address) as channel,
    ):
        stub = pb_grpc.ApprovalServiceStub(channel)
        health = health_pb2_grpc.HealthStub(channel)

        async def readiness() -> int:
            reply = await health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=10)
            return int(reply.status)

        NOT_SERVING, SERVING = (
            health_pb2.HealthCheckResponse.NOT_SERVING,
            health_pb2.HealthCheckResponse.SERVING,
        )
        await eventually(lambda: _is(readiness(), NOT_SERVING), 30, "readiness NOT_SERVING")
        request = pb.GetPaymentRequest(payment_id=str(uuid.uuid4()))
        credentials = bearer(authority.token("operator.ann", [REVIEWER]))
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stub.GetPayment(request, metadata=credentials)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
        info = error_info(refused.value)
        assert info is not None
        assert info.reason == "KEYS_UNAVAILABLE"

        async def answer() -> str:
            try:
                await stub.GetPayment(request, metadata=credentials)
            except grpc.aio.AioRpcError as error:
                info = error_info(error)
                return info.reason if info else error.code().name
            return "OK"

        with jwks_server(authority.jwks_path, port):
            # No call comes meanwhile: readiness fetches the keys by itself.
            await eventually(lambda: _is(readiness(), SERVING), 60, "readiness SERVING")
            assert await answer() == "PAYMENT_NOT_FOUND"


# -- client certificates ---------------------------------------------------------------------

GATEWAY = "spiffe://payments.local/ns/payments/sa/payment-gateway"


def test_a_client_certificate_is_an_identity(migrated_dsn: str, tmp_path: Path) -> None:
    """Mutual TLS: a call without a token acts as its certificate's SPIFFE ID (else its CN), with the policy's roles."""
    gateway_pki = make_pki(tmp_path / "gateway", label="gateway", client_uri=GATEWAY)
    plain_pki = make_pki(tmp_path / "plain", label="plain")
    bundle = tmp_path / "client-cas.pem"
    bundle.write_bytes(gateway_pki.ca_cert.read_bytes() + plain_pki.ca_cert.read_bytes())
    policy = default_policy({f"{SERVICE_NAME}/{m}": sorted(roles) for m, roles in ALLOWED.items()}) | {
        "identities": {GATEWAY: [PAYMENT_GATEWAY], "plain client": [HISTORY_READER]}
    }
    policy_file = tmp_path / "policy.json"
    policy_file.write_text(json.dumps(policy))
    process = approval_process(
        migrated_dsn,
        free_port(),
        tmp_path / "approval.log",
        tls_cert_file=str(gateway_pki.server_cert),
        tls_key_file=str(gateway_pki.server_key),
        tls_client_ca_file=str(bundle),
        auth_policy_file=str(policy_file),
    )

    def credentials(pki: Any) -> grpc.ChannelCredentials:
        return channel_credentials(str(gateway_pki.ca_cert), str(pki.client_cert), str(pki.client_key))

    process.start()
    try:
        process.wait_serving(60, credentials=credentials(gateway_pki))
        with grpc.secure_channel(process.address, credentials(gateway_pki)) as gateway:
            # The tests' service token still speaks for a call that carries it.
            with with_bearer(
                grpc.secure_channel(process.address, credentials(gateway_pki)), service_token()
            ) as admin:
                payer, payee = open_payer_and_payee(pb_grpc.ApprovalServiceStub(admin))
            stub = pb_grpc.ApprovalServiceStub(gateway)
            paid = stub.SubmitPayment(
                pb.SubmitPaymentRequest(
                    request_id=rid(), payer_account_id=payer, payee_account_id=payee, amount=eur(10)
                ),
                timeout=10,
            )
            assert paid.payment.status == payment_pb2.PAYMENT_STATUS_APPROVED
            with pytest.raises(grpc.RpcError) as denied:
                stub.FreezeAccount(pb.FreezeAccountRequest(request_id=rid(), account_id=payee), timeout=10)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # A certificate without a URI SAN is known by its CN; its role may not pay.
        with grpc.secure_channel(process.address, credentials(plain_pki)) as plain:
            with pytest.raises(grpc.RpcError) as refused_plain:
                pb_grpc.ApprovalServiceStub(plain).SubmitPayment(
                    pb.SubmitPaymentRequest(
                        request_id=rid(), payer_account_id=payer, payee_account_id=payee, amount=eur(10)
                    ),
                    timeout=10,
                )
            assert refused_plain.value.code() == grpc.StatusCode.PERMISSION_DENIED
            info = error_info(refused_plain.value)
            assert info is not None
            assert info.reason == "METHOD_NOT_ALLOWED"
    finally:
        process.stop(5)
    lines = [json.loads(line) for line in process.log_text().splitlines() if line.startswith("{")]
    started = next(line for line in lines if line["message"] == "approval service started")
    assert (started["tls"], started["auth"]) == ("mutual", "token+certificate")
    audit = [line for line in lines if line["logger"] == "payments.audit"]
    assert [(a["method"], a["identity"], a["identity_source"], a["target"], a["outcome"]) for a in audit][
        -1
    ] == (
        f"/{SERVICE_NAME}/FreezeAccount",
        GATEWAY,
        "certificate",
        {"account_id": payee},
        "PERMISSION_DENIED",
    )
    assert service_token() not in process.log_text()


# -- start-up ----------------------------------------------------------------------------------


def _serve(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    import os

    clean = {k: v for k, v in os.environ.items() if not k.startswith(("APPROVAL_", "HISTORY_"))}
    return subprocess.run(
        [sys.executable, "-m", env.pop("MODULE"), "serve"],
        env={**clean, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(
    ("module", "required"),
    [
        ("approval_svc", {"APPROVAL_DATABASE_URL": "postgresql://u@127.0.0.1:1/x"}),
        (
            "history_svc",
            {"HISTORY_REDIS_URL": "redis://127.0.0.1:1/0", "HISTORY_PAGE_TOKEN_SECRET": "s" * 32},
        ),
    ],
)
def test_a_server_with_no_way_to_authenticate_does_not_start(module: str, required: dict[str, str]) -> None:
    prefix = "APPROVAL_" if module == "approval_svc" else "HISTORY_"
    result = _serve({"MODULE": module, **required})
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = result.stderr.strip().splitlines()
    for variable in ("AUTH_JWKS_FILE", "AUTH_JWKS_URL", "TLS_CLIENT_CA_FILE", "AUTH_DISABLED"):
        assert prefix + variable in line


def test_a_policy_naming_a_method_not_served_stops_start_up(tmp_path: Path) -> None:
    authority = LocalAuthority.create(tmp_path)
    env = {
        "MODULE": "approval_svc",
        "APPROVAL_DATABASE_URL": "postgresql://u@127.0.0.1:1/x",
        **authority.server_env("APPROVAL_"),
        # The history service's policy: its methods are not approval's.
        "APPROVAL_AUTH_POLICY_FILE": str(authority.policy_path("HISTORY_")),
    }
    result = _serve(env)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    assert "APPROVAL_AUTH_POLICY_FILE" in line
    assert "does not serve" in line


def test_with_authentication_disabled_it_warns_and_the_request_names_the_reviewer(
    migrated_dsn: str, tmp_path: Path
) -> None:
    process: ServiceProcess = approval_process(
        migrated_dsn,
        free_port(),
        tmp_path / "approval.log",
        auth_disabled="true",
        review_threshold_minor="50",
    )
    process.start()
    try:
        process.wait_serving(60)
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.ApprovalServiceStub(channel)
            payer, payee = open_payer_and_payee(stub)
            held = stub.SubmitPayment(
                pb.SubmitPaymentRequest(
                    request_id=rid(), payer_account_id=payer, payee_account_id=payee, amount=eur(100)
                ),
                timeout=10,
            ).payment.payment_id
            with pytest.raises(grpc.RpcError) as unnamed:
                stub.ApprovePayment(pb.ApprovePaymentRequest(request_id=rid(), payment_id=held), timeout=10)
            assert unnamed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            stub.ApprovePayment(
                pb.ApprovePaymentRequest(request_id=rid(), payment_id=held, reviewer="desk 4"), timeout=10
            )
            events = stub.GetPayment(pb.GetPaymentRequest(payment_id=held), timeout=10).events
            assert [event.actor for event in events] == ["system", "desk 4"]
    finally:
        process.stop(5)
    lines = [json.loads(line) for line in process.log_text().splitlines() if line.startswith("{")]
    warnings = [line for line in lines if line["level"] == "warning" and "DISABLED" in line["message"]]
    assert [w["message"] for w in warnings] == [
        "authentication is DISABLED: every caller may call every method"
    ]
    started = next(line for line in lines if line["message"] == "approval service started")
    assert started["auth"] == "disabled"
    approve = [
        line
        for line in lines
        if line["logger"] == "payments.audit" and line["method"].endswith("/ApprovePayment")
    ]
    assert [(a["identity"], a["identity_source"], a["target"], a["outcome"]) for a in approve] == [
        ("anonymous", "none", {"payment_id": held}, "INVALID_ARGUMENT"),
        ("anonymous", "none", {"payment_id": held}, "OK"),
    ]
