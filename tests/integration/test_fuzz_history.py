"""Property-based tests of every HistoryService RPC with random and malformed fields and credentials.

The whole path runs as real subprocesses (approval, replicator, history), with
authentication on, so that the history service answers from read models built from real
payments. Whatever a request holds, the answer is one of the codes the contract documents
for that RPC (never INTERNAL or UNKNOWN, never a traceback), tampered page and consistency
tokens are refused, a customer reads only its own accounts, the server keeps serving, and
the read models hold no key they did not hold before. Whatever `authorization` metadata a
call carries, the answer is UNAUTHENTICATED with a documented reason that gives nothing
away, or, for a valid token, the normal answer.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import redis
from google.protobuf import message, timestamp_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from approval_svc.migrate import upgrade
from payments.approval.v1 import approval_service_pb2 as approval_pb
from payments.approval.v1 import approval_service_pb2_grpc as approval_grpc
from payments.history.v1 import history_service_pb2 as pb
from payments.history.v1 import history_service_pb2_grpc as pb_grpc
from payments.type.v1 import money_pb2, payment_pb2
from payments_common.grpcstatus import bad_request, error_info
from payments_common.tokens import encode_consistency_token
from stack.auth import ACCOUNTS_ADMIN, CUSTOMER, HISTORY_READER, PAYMENT_GATEWAY, LocalAuthority
from stack.servers import PostgresServer, RedisServer, free_port
from stack.tokens import refused_tokens, token_for
from tests.support.auth import authority, bearer
from tests.support.faults import approval_process, history_process
from tests.support.fuzzing import (
    AUTH_CODES,
    REFUSED,
    UNAUTHENTICATED_REASONS,
    Metadata,
    authorizations,
    check_authorization,
    documented_refusal,
    fields,
    fuzz_settings,
    gives_nothing_away,
)
from tests.support.processes import ServiceProcess
from tests.support.replicator import ReplicatorProcess

SLOT = "fuzz_history"
MAX_MESSAGE_BYTES = 65536
FUZZ = fuzz_settings(max_examples=80)

C = grpc.StatusCode
# Every RPC may also be refused before it runs (AUTH_CODES); `call` checks when.
READ_CODES = {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.UNAVAILABLE, *AUTH_CODES}
ALLOWED: dict[str, set[grpc.StatusCode]] = {
    "GetPayment": READ_CODES,
    "GetAccount": READ_CODES,
    "ListPayments": READ_CODES,
    "WatchPayments": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, *AUTH_CODES},
    # No account to be missing; FAILED_PRECONDITION on a namespace built without the queue.
    "ListHeldPayments": {C.OK, C.INVALID_ARGUMENT, C.UNAVAILABLE, C.FAILED_PRECONDITION, *AUTH_CODES},
}
REASONS = {
    "INVALID_ARGUMENT",
    "INVALID_PAGE_TOKEN",
    "INVALID_CONSISTENCY_TOKEN",
    "PAYMENT_NOT_FOUND",
    "ACCOUNT_NOT_FOUND",
    "CONSISTENCY_NOT_REACHED",
    "READ_MODEL_WITHOUT_REVIEW_QUEUE",
    "METHOD_NOT_ALLOWED",
    "NOT_YOUR_ACCOUNT",
    *UNAUTHENTICATED_REASONS,
}
METACHARACTERS = [
    "'; DROP TABLE payments; --",
    "*1\r\n$8\r\nFLUSHALL\r\n",
    "rm:v1:{slot}* \\ %s",
    "\u202e\u200b\ufeff 名前 🚀",
]


@dataclass
class Target:
    history: ServiceProcess
    redis_url: str
    channel: grpc.Channel
    stub: pb_grpc.HistoryServiceStub
    accounts: list[str]
    payments: list[str]
    token: str
    page_token: str
    held_page_token: str
    held: list[str]
    references: dict[str, str]
    keys_before: set[Any]
    authority: LocalAuthority
    codes: dict[str, set[str]] = field(default_factory=dict)
    _tokens: dict[tuple[str, str], str] = field(default_factory=dict)

    def as_(self, role: str, account: str = "") -> Metadata:
        """The metadata of a call as `role` (a customer acting for `account`)."""
        if (role, account) not in self._tokens:
            self._tokens[role, account] = token_for(self.authority, [role], [account] if account else [])
        return tuple(bearer(self._tokens[role, account]))

    @property
    def reader(self) -> Metadata:
        return self.as_(HISTORY_READER)


@pytest.fixture(scope="module")
def target(postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    work = tmp_path_factory.mktemp("fuzz-history")
    name = f"fh_{uuid.uuid4().hex[:12]}"
    dsn = postgres_server.create_database(name)
    redis_server = RedisServer(base_dir=work / "redis")
    # Low enough that some of the seed's payments are held for review.
    approval = approval_process(
        dsn, free_port(), work / "approval.log", review_threshold_minor=str(HELD_FROM)
    )
    history: ServiceProcess | None = None
    replicator: ReplicatorProcess | None = None
    try:
        upgrade(dsn)
        redis_server.start()
        replicator = ReplicatorProcess(dsn, redis_server.url(0), work / "replicator.log", slot=SLOT).start()
        history = history_process(
            redis_server.url(0),
            free_port(),
            work / "history.log",
            SLOT,
            consistency_wait_max_seconds="0.2",
            max_message_bytes=str(MAX_MESSAGE_BYTES),
        ).start()
        approval.start()
        approval.wait_serving(60)
        history.wait_serving(60)
        accounts, payments, references, token, held = _seed(approval.address)
        reader = tuple(bearer(token_for(authority(), [HISTORY_READER])))
        with grpc.insecure_channel(history.address) as channel:
            stub = pb_grpc.HistoryServiceStub(channel)
            # Waits for the seed to be replicated, and takes a real page token.
            stub.GetAccount(
                pb.GetAccountRequest(account_id=accounts[0], min_consistency_token=token),
                timeout=30,
                metadata=reader,
            )
            first = stub.ListPayments(
                pb.ListPaymentsRequest(
                    account_id=accounts[0],
                    direction=pb.PAYMENT_DIRECTION_ALL,
                    page_size=3,
                    min_consistency_token=token,
                ),
                timeout=30,
                metadata=reader,
            )
            assert first.next_page_token
            queue = stub.ListHeldPayments(
                pb.ListHeldPaymentsRequest(page_size=1, min_consistency_token=token),
                timeout=30,
                metadata=reader,
            )
            assert queue.next_page_token
            client = redis.Redis.from_url(redis_server.url(0))
            keys_before = set(client.keys("*"))
            client.close()
            yield Target(
                history,
                redis_server.url(0),
                channel,
                stub,
                accounts,
                payments,
                token,
                first.next_page_token,
                queue.next_page_token,
                held,
                references,
                keys_before,
                authority(),
            )
    finally:
        approval.stop(5)
        if history is not None:
            history.stop(5)
        if replicator is not None:
            replicator.stop()
        redis_server.remove()
        postgres_server.drop_database(name)


HELD_FROM = 10


def _seed(address: str) -> tuple[list[str], list[str], dict[str, str], str, list[str]]:
    """Three accounts and a dozen payments through the approval service, some with metacharacters.

    Those of HELD_FROM minor units and more (three) are held for review.
    """
    admin, gateway = (tuple(bearer(token_for(authority(), [r]))) for r in (ACCOUNTS_ADMIN, PAYMENT_GATEWAY))
    with grpc.insecure_channel(address) as channel:
        stub = approval_grpc.ApprovalServiceStub(channel)
        accounts = [
            stub.CreateAccount(
                approval_pb.CreateAccountRequest(
                    request_id=f"seed-{n}",
                    owner_name=METACHARACTERS[n],
                    currency_code="EUR",
                    opening_balance_minor=10**6,
                    per_payment_limit_minor=10**6,
                    daily_limit_minor=10**9,
                ),
                timeout=10,
                metadata=admin,
            ).account.account_id
            for n in range(3)
        ]
        payments, references, token = [], {}, ""
        for n in range(12):
            reference = METACHARACTERS[n % len(METACHARACTERS)] + f" #{n}"
            reply = stub.SubmitPayment(
                approval_pb.SubmitPaymentRequest(
                    request_id=f"seed-pay-{n}",
                    payer_account_id=accounts[n % 3],
                    payee_account_id=accounts[(n + 1) % 3],
                    amount=money_pb2.Money(currency_code="EUR", amount_minor=n + 1),
                    reference=reference,
                ),
                timeout=10,
                metadata=gateway,
            )
            payments.append(reply.payment.payment_id)
            references[reply.payment.payment_id] = reference
            token = reply.consistency_token
    held = [p for n, p in enumerate(payments) if n + 1 >= HELD_FROM]
    return accounts, payments, references, token, held


def call(
    target: Target,
    method: str,
    request: message.Message,
    metadata: Metadata | None = None,
    denied: frozenset[str] = frozenset(),
) -> tuple[grpc.StatusCode, str, Any]:
    """Calls one unary RPC and checks the outcome against the contract; returns code, reason and reply.

    Without `metadata` the call carries a history reader's valid token: it must then be
    neither UNAUTHENTICATED nor PERMISSION_DENIED (but for a reason in `denied`).
    """
    rpc: Callable[..., Any] = getattr(target.stub, method)
    reply, reason = None, ""
    try:
        reply = rpc(request, timeout=5, metadata=target.reader if metadata is None else metadata)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
        reason = documented_refusal(method, error, ALLOWED, REASONS)
        if reason == "INVALID_ARGUMENT":
            violations = bad_request(error)
            assert violations is not None
            assert violations.field_violations
        if code == grpc.StatusCode.UNAUTHENTICATED:
            assert reason in UNAUTHENTICATED_REASONS
            gives_nothing_away(error, target.authority)
        if metadata is None:
            assert code != grpc.StatusCode.UNAUTHENTICATED, f"{method}: a valid token was refused"
            assert code != grpc.StatusCode.PERMISSION_DENIED or reason in denied, f"{method}: {reason}"
    target.codes.setdefault(method, set()).add(code.name)
    if reason:
        target.codes.setdefault("reasons", set()).add(reason)
    return code, reason, reply


def as_reader_or_customer(target: Target, data: st.DataObject) -> tuple[Metadata | None, bool]:
    """A history reader (None: `call`'s default), or the customer of accounts[0]; and which."""
    # One call in four: most calls should reach the paths past authorization.
    customer = data.draw(st.sampled_from([False, False, False, True]), "as the customer of accounts[0]")
    return (target.as_(CUSTOMER, target.accounts[0]) if customer else None), customer


def scoped(target: Target, code: grpc.StatusCode, reason: str, reply: Any, method: str) -> None:
    """What a customer of accounts[0] may see: only what involves that account, else NOT_YOUR_ACCOUNT."""
    assert code != grpc.StatusCode.UNAUTHENTICATED
    assert code != grpc.StatusCode.PERMISSION_DENIED or reason == "NOT_YOUR_ACCOUNT", reason
    if code != grpc.StatusCode.OK:
        return
    own = target.accounts[0]
    if method == "GetPayment":
        assert own in (reply.payment.payer_account_id, reply.payment.payee_account_id)
    elif method == "GetAccount":
        assert reply.account.account_id == own
    else:
        assert all(own in (v.payer_account_id, v.payee_account_id) for v in reply.payments)


# -- strategies ---------------------------------------------------------------------------


def ids(known: Callable[[Target], list[str]], target: Target) -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(known(target)),
        st.sampled_from(known(target)).map(str.upper),
        st.sampled_from(known(target)).map(lambda v: "urn:uuid:" + v),
        st.uuids().map(str),
        st.sampled_from(["", " ", "not-a-uuid", "x" * 5000, "'; FLUSHALL", "*\r\n"]),
        st.text(max_size=40),
    )


def tampered(token: str) -> st.SearchStrategy[str]:
    """A token altered in one of the ways a client or an attacker might."""
    return st.one_of(
        st.integers(0, max(0, len(token) - 1)).flatmap(
            lambda i: st.sampled_from("AZaz09-_=.+/").map(lambda c: token[:i] + c + token[i + 1 :])
        ),
        st.integers(0, len(token)).map(lambda i: token[:i]),
        st.text(max_size=20).map(lambda extra: token + extra),
        st.just(token[::-1]),
    )


def consistency_tokens(target: Target) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(""),
        st.just(target.token),
        tampered(target.token),
        st.sampled_from([encode_consistency_token(0), encode_consistency_token(2**64 - 1)]),
        st.integers(0, 2**64 - 1).map(encode_consistency_token),
        st.text(max_size=80),
        st.just("c1." + "A" * 2000),
    )


def page_tokens(target: Target) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(""),
        st.just(target.page_token),
        tampered(target.page_token),
        st.text(max_size=60),
        st.binary(max_size=80).map(lambda raw: base64.urlsafe_b64encode(raw).decode().rstrip("=")),
        st.just("A" * 5000),
    )


def timestamps() -> st.SearchStrategy[timestamp_pb2.Timestamp | None]:
    return st.one_of(
        st.none(),
        st.builds(
            lambda s, n: timestamp_pb2.Timestamp(seconds=s, nanos=n),
            st.one_of(
                st.sampled_from([0, -1, 253402300799, 253402300800, -62135596801]),
                st.integers(-(2**63), 2**63 - 1),
            ),
            st.one_of(st.sampled_from([0, 999_999_999, 1_000_000_000, -1]), st.integers(-(2**31), 2**31 - 1)),
        ),
    )


INT32 = st.one_of(
    st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31), 499, 500, 501]), st.integers(-(2**31), 2**31 - 1)
)


# -- the properties ---------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_get_payment(target: Target, data: st.DataObject) -> None:
    values = fields(
        data,
        {"payment_id": target.payments[0], "min_consistency_token": target.token},
        {
            "payment_id": ids(lambda t: t.payments, target),
            "min_consistency_token": consistency_tokens(target),
        },
    )
    metadata, customer = as_reader_or_customer(target, data)
    code, reason, reply = call(target, "GetPayment", pb.GetPaymentRequest(**values), metadata)
    if customer:
        scoped(target, code, reason, reply, "GetPayment")
    if code == grpc.StatusCode.OK:
        view = reply.payment
        assert view.payment_id in target.references
        assert view.reference == target.references[view.payment_id]


@FUZZ
@given(data=st.data())
def test_get_account(target: Target, data: st.DataObject) -> None:
    values = fields(
        data,
        {"account_id": target.accounts[0], "min_consistency_token": target.token},
        {
            "account_id": ids(lambda t: t.accounts, target),
            "min_consistency_token": consistency_tokens(target),
        },
    )
    metadata, customer = as_reader_or_customer(target, data)
    code, reason, reply = call(target, "GetAccount", pb.GetAccountRequest(**values), metadata)
    if customer:
        scoped(target, code, reason, reply, "GetAccount")
    if code == grpc.StatusCode.OK:
        assert reply.account.account_id in target.accounts


@FUZZ
@given(data=st.data())
def test_list_payments(target: Target, data: st.DataObject) -> None:
    values = fields(
        data,
        {
            "account_id": target.accounts[0],
            "direction": pb.PAYMENT_DIRECTION_ALL,
            "status": 0,
            "start_time": None,
            "end_time": None,
            "page_size": 3,
            "page_token": "",
            "min_consistency_token": "",
        },
        {
            "account_id": ids(lambda t: t.accounts, target),
            "direction": st.one_of(st.sampled_from([0, 1, 2, 3, 4, -1, 99]), INT32),
            "status": st.one_of(st.sampled_from([0, 1, 2, 3, 4, -1, 99]), INT32),
            "start_time": timestamps(),
            "end_time": timestamps(),
            "page_size": INT32,
            "page_token": page_tokens(target),
            "min_consistency_token": consistency_tokens(target),
        },
    )
    code, _, reply = call(target, "ListPayments", pb.ListPaymentsRequest(**values))
    if code == grpc.StatusCode.OK:
        assert all(view.payment_id in target.references for view in reply.payments)
        assert len(reply.payments) <= 500


def held_page_tokens(target: Target) -> st.SearchStrategy[str]:
    return st.one_of(
        st.just(""),
        st.just(target.held_page_token),
        tampered(target.held_page_token),
        # A page token of ListPayments is not one of the queue's.
        st.just(target.page_token),
        st.text(max_size=60),
        st.just("A" * 5000),
    )


@FUZZ
@given(data=st.data())
def test_list_held_payments(target: Target, data: st.DataObject) -> None:
    values = fields(
        data,
        {"page_size": 2, "page_token": "", "min_consistency_token": target.token},
        {
            "page_size": INT32,
            "page_token": held_page_tokens(target),
            "min_consistency_token": consistency_tokens(target),
        },
    )
    metadata, customer = as_reader_or_customer(target, data)
    code, reason, reply = call(target, "ListHeldPayments", pb.ListHeldPaymentsRequest(**values), metadata)
    if customer:
        # The queue spans every account: never a customer's, whatever else the request holds.
        assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED")
    assert code != grpc.StatusCode.FAILED_PRECONDITION, "the namespace was built with the queue"
    if code == grpc.StatusCode.OK:
        assert all(view.payment_id in target.held for view in reply.payments)
        assert all(view.status == payment_pb2.PAYMENT_STATUS_PENDING_REVIEW for view in reply.payments)
        assert len(reply.payments) <= 500
        assert reply.consistency_token
    if not customer and values["page_size"] >= 0 and values["page_token"] == target.page_token:
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


@fuzz_settings(max_examples=40)
@given(data=st.data())
def test_a_customer_lists_only_its_own_account(target: Target, data: st.DataObject) -> None:
    request = pb.ListPaymentsRequest(
        account_id=data.draw(ids(lambda t: t.accounts, target)),
        direction=data.draw(st.sampled_from([1, 2, 3])),  # type: ignore[arg-type]
        page_size=data.draw(st.sampled_from([0, 3, 500])),
    )
    code, reason, reply = call(target, "ListPayments", request, target.as_(CUSTOMER, target.accounts[0]))
    scoped(target, code, reason, reply, "ListPayments")


@FUZZ
@given(data=st.data())
def test_a_tampered_page_token_is_refused(target: Target, data: st.DataObject) -> None:
    # An empty token asks for the first page: not a tampered one.
    token = data.draw(tampered(target.page_token).filter(lambda t: t not in ("", target.page_token)))
    request = pb.ListPaymentsRequest(
        account_id=target.accounts[0], direction=pb.PAYMENT_DIRECTION_ALL, page_size=3, page_token=token
    )
    code, reason, reply = call(target, "ListPayments", request)
    if code == grpc.StatusCode.OK:
        # Only a spelling of the same bytes (base64 ignores unused trailing bits) may pass.
        original = pb.ListPaymentsRequest(
            account_id=target.accounts[0],
            direction=pb.PAYMENT_DIRECTION_ALL,
            page_size=3,
            page_token=target.page_token,
        )
        assert reply == target.stub.ListPayments(original, timeout=5, metadata=target.reader)
    else:
        assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


@FUZZ
@given(data=st.data())
def test_a_page_token_of_another_query_is_refused(target: Target, data: st.DataObject) -> None:
    request = pb.ListPaymentsRequest(
        account_id=data.draw(st.sampled_from(target.accounts[1:])),
        direction=data.draw(st.sampled_from([1, 2, 3])),  # type: ignore[arg-type]
        status=data.draw(st.sampled_from([0, 1, 2, 3])),  # type: ignore[arg-type]
        page_token=target.page_token,
    )
    if request.account_id == target.accounts[0] and request.direction == 3 and request.status == 0:
        return
    code, reason, _ = call(target, "ListPayments", request)
    assert (code, reason) == (grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PAGE_TOKEN")


@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_watch_payments(target: Target, data: st.DataObject) -> None:
    account_id = data.draw(ids(lambda t: t.accounts, target))
    code, _ = open_watch(target, pb.WatchPaymentsRequest(account_id=account_id), target.reader)
    assert code not in AUTH_CODES


def test_an_oversized_request_is_resource_exhausted_and_the_server_keeps_serving(target: Target) -> None:
    with pytest.raises(grpc.RpcError) as exhausted:
        target.stub.GetPayment(
            pb.GetPaymentRequest(payment_id="x" * (MAX_MESSAGE_BYTES + 1)), timeout=10, metadata=target.reader
        )
    assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    reply = target.stub.GetPayment(
        pb.GetPaymentRequest(payment_id=target.payments[0]), timeout=10, metadata=target.reader
    )
    assert reply.payment.payment_id == target.payments[0]


@pytest.mark.parametrize("method", sorted(ALLOWED))
def test_bytes_that_are_not_a_request_are_invalid_argument(target: Target, method: str) -> None:
    path = f"/payments.history.v1.HistoryService/{method}"
    corrupt = b"\x0a\xff\x01"  # field 1, length 255, one byte of it
    outcome: Any
    if method == "WatchPayments":
        outcome = target.channel.unary_stream(path, None, None)(corrupt, timeout=5, metadata=target.reader)
    else:
        outcome = target.channel.unary_unary(path, None, None).future(
            corrupt, timeout=5, metadata=target.reader
        )
    with pytest.raises(grpc.RpcError) as failed:
        list(outcome) if method == "WatchPayments" else outcome.result()
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info(failed.value)
    assert info is not None
    assert info.reason == "INVALID_ARGUMENT"


def test_metacharacters_come_back_verbatim(target: Target) -> None:
    for payment_id, reference in target.references.items():
        reply = target.stub.GetPayment(
            pb.GetPaymentRequest(payment_id=payment_id), timeout=10, metadata=target.reader
        )
        assert reply.payment.reference == reference
    names = {
        target.stub.GetAccount(
            pb.GetAccountRequest(account_id=a), timeout=10, metadata=target.reader
        ).account.owner_name
        for a in target.accounts
    }
    assert names == set(METACHARACTERS[:3])


# -- credentials ---------------------------------------------------------------------------


def request_for(target: Target, method: str) -> message.Message:
    """A valid request of `method`."""
    if method == "GetPayment":
        return pb.GetPaymentRequest(payment_id=target.payments[0])
    if method == "GetAccount":
        return pb.GetAccountRequest(account_id=target.accounts[0])
    if method == "ListPayments":
        return pb.ListPaymentsRequest(account_id=target.accounts[0], direction=pb.PAYMENT_DIRECTION_ALL)
    if method == "ListHeldPayments":
        return pb.ListHeldPaymentsRequest()
    return pb.WatchPaymentsRequest(account_id=target.accounts[0])


def open_watch(
    target: Target, request: pb.WatchPaymentsRequest, metadata: Metadata
) -> tuple[grpc.StatusCode, str]:
    """Opens a WatchPayments stream: OK once it is established, else its code and reason, checked as `call` does."""
    call_: Any = target.stub.WatchPayments(request, timeout=5, metadata=metadata)
    try:
        call_.initial_metadata()  # returns once the stream is established, or the call has failed
        if not call_.done():  # established: code() would block until the stream ends
            target.codes.setdefault("WatchPayments", set()).add("OK")
            return grpc.StatusCode.OK, ""
        code: grpc.StatusCode = call_.code()
        assert code in ALLOWED["WatchPayments"], f"WatchPayments: {code.name} {call_.details()}"
        assert "Traceback" not in (call_.details() or "")
        info = error_info(call_)
        reason = info.reason if info is not None else ""
        if code == grpc.StatusCode.UNAUTHENTICATED:
            assert reason in UNAUTHENTICATED_REASONS
            gives_nothing_away(call_, target.authority)
        target.codes.setdefault("WatchPayments", set()).add(code.name)
        target.codes.setdefault("reasons", set()).add(reason)
        return code, reason
    finally:
        call_.cancel()


def call_with(target: Target, method: str, metadata: Metadata) -> tuple[grpc.StatusCode, str]:
    """Calls `method` with a valid request and `metadata`; returns the code and reason."""
    request = request_for(target, method)
    if isinstance(request, pb.WatchPaymentsRequest):
        return open_watch(target, request, metadata)
    code, reason, _ = call(target, method, request, metadata)
    return code, reason


@FUZZ
@given(method=st.sampled_from(sorted(ALLOWED)), data=st.data())
def test_authorization_metadata(target: Target, method: str, data: st.DataObject) -> None:
    """Random and malformed credentials: UNAUTHENTICATED with a documented reason, or the normal answer."""
    valid = target.reader[0][1].removeprefix("Bearer ")
    metadata, expected = data.draw(authorizations(valid, refused_tokens(target.authority, [HISTORY_READER])))
    code, reason = call_with(target, method, metadata)
    check_authorization(method, code, reason, expected)


@pytest.mark.parametrize("method", sorted(ALLOWED))
def test_each_defect_of_a_token_has_its_reason(target: Target, method: str) -> None:
    for expected, token in refused_tokens(target.authority, [HISTORY_READER]):
        code, reason = call_with(target, method, tuple(bearer(token)))
        check_authorization(method, code, reason, expected or REFUSED)


@pytest.mark.parametrize("method", sorted(ALLOWED))
def test_a_valid_token_of_another_role_is_permission_denied(target: Target, method: str) -> None:
    code, reason = call_with(target, method, target.as_(ACCOUNTS_ADMIN))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED")


def test_credentials_above_the_metadata_limit_are_refused_and_the_server_keeps_serving(
    target: Target,
) -> None:
    with pytest.raises(grpc.RpcError) as exhausted:
        target.stub.GetAccount(
            pb.GetAccountRequest(account_id=target.accounts[0]),
            timeout=10,
            metadata=(("authorization", "Bearer " + "A" * 20_000),),
        )
    # gRPC refuses metadata above its hard limit (16 KiB) before the call reaches the service.
    assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    reply = target.stub.GetAccount(
        pb.GetAccountRequest(account_id=target.accounts[0]), timeout=10, metadata=target.reader
    )
    assert reply.account.account_id == target.accounts[0]


def test_the_server_kept_serving_and_wrote_nothing(target: Target, tmp_path: Path) -> None:
    """Runs after the properties above (pytest keeps the order of the file) and checks what they did."""
    assert target.history.alive
    target.history.wait_serving(10)
    client = redis.Redis.from_url(target.redis_url)
    try:
        assert set(client.keys("*")) == target.keys_before
    finally:
        client.close()
    # The properties reached every documented answer, not only INVALID_ARGUMENT.
    reads = target.codes["GetPayment"] | target.codes["GetAccount"] | target.codes["ListPayments"]
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE"} <= reads
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= target.codes["ListPayments"]
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "UNAUTHENTICATED"} <= target.codes["WatchPayments"]
    assert {"OK", "INVALID_ARGUMENT", "PERMISSION_DENIED"} <= target.codes["ListHeldPayments"]
    assert "PERMISSION_DENIED" in target.codes["GetPayment"] | target.codes["GetAccount"]
    assert target.codes["reasons"] >= UNAUTHENTICATED_REASONS | {"NOT_YOUR_ACCOUNT", "METHOD_NOT_ALLOWED"}
    log = target.history.log_text()
    assert "INTERNAL" not in log
    assert "Traceback" not in log
