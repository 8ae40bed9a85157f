"""Property-based tests of every ApprovalService RPC with random and malformed fields and credentials.

The server runs as a real subprocess with authentication on. Whatever a request holds, the
answer is one of the codes the contract documents for that RPC (never INTERNAL, never
UNKNOWN, never a traceback in the message), the server keeps serving, and the database
holds nothing that a rejected call tried to create. Whatever `authorization` metadata a
call carries, the answer is UNAUTHENTICATED with a documented reason that gives nothing
away, or, for a valid token, the normal answer.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import psycopg2
import pytest
from google.protobuf import message
from hypothesis import given
from hypothesis import strategies as st

from approval_svc.migrate import upgrade
from payments.approval.v1 import approval_service_pb2 as pb
from payments.approval.v1 import approval_service_pb2_grpc as pb_grpc
from payments.type.v1 import money_pb2
from payments_common.grpcstatus import bad_request
from payments_common.identity import MAX_SUBJECT
from stack.auth import ACCOUNTS_ADMIN, CUSTOMER, HISTORY_READER, PAYMENT_GATEWAY, REVIEWER, LocalAuthority
from stack.servers import PostgresServer, free_port
from stack.tokens import SUBJECTS, refused_tokens, token_for
from tests.support.auth import authority, bearer
from tests.support.faults import approval_process
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

MAX_MESSAGE_BYTES = 65536
FUZZ = fuzz_settings(max_examples=100)

C = grpc.StatusCode
# The codes each RPC may answer (see approval_service.proto, docs/approval.md, docs/security.md).
ALLOWED: dict[str, set[grpc.StatusCode]] = {
    "CreateAccount": {C.OK, C.INVALID_ARGUMENT, C.ALREADY_EXISTS, *AUTH_CODES},
    "SubmitPayment": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS, *AUTH_CODES},
    "ApprovePayment": {
        C.OK,
        C.INVALID_ARGUMENT,
        C.NOT_FOUND,
        C.FAILED_PRECONDITION,
        C.ALREADY_EXISTS,
        *AUTH_CODES,
    },
    "DeclinePayment": {
        C.OK,
        C.INVALID_ARGUMENT,
        C.NOT_FOUND,
        C.FAILED_PRECONDITION,
        C.ALREADY_EXISTS,
        *AUTH_CODES,
    },
    "FreezeAccount": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS, *AUTH_CODES},
    "UnfreezeAccount": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, C.ALREADY_EXISTS, *AUTH_CODES},
    "GetPayment": {C.OK, C.INVALID_ARGUMENT, C.NOT_FOUND, *AUTH_CODES},
}
REASONS = {
    "INVALID_ARGUMENT",
    "ACCOUNT_NOT_FOUND",
    "PAYMENT_NOT_FOUND",
    "PAYMENT_NOT_UNDER_REVIEW",
    "REQUEST_ID_REUSED",
    "METHOD_NOT_ALLOWED",
    "NOT_YOUR_ACCOUNT",
    "REVIEWER_MISMATCH",
    *UNAUTHENTICATED_REASONS,
}
# The role each RPC is called as, unless a property draws another caller.
CALLER = {
    "CreateAccount": ACCOUNTS_ADMIN,
    "SubmitPayment": PAYMENT_GATEWAY,
    "ApprovePayment": REVIEWER,
    "DeclinePayment": REVIEWER,
    "FreezeAccount": ACCOUNTS_ADMIN,
    "UnfreezeAccount": ACCOUNTS_ADMIN,
    "GetPayment": REVIEWER,
}


@dataclass
class Target:
    """The running server, the ids that exist, and what every call did."""

    process: ServiceProcess
    dsn: str
    channel: grpc.Channel
    stub: pb_grpc.ApprovalServiceStub
    accounts: list[str]
    held: list[str]
    authority: LocalAuthority
    accepted: set[str] = field(default_factory=set)
    rejected: set[str] = field(default_factory=set)
    codes: dict[str, set[str]] = field(default_factory=dict)
    _tokens: dict[tuple[str, str], str] = field(default_factory=dict)

    def as_(self, role: str, account: str = "") -> Metadata:
        """The metadata of a call as `role` (a customer acting for `account`)."""
        if (role, account) not in self._tokens:
            self._tokens[role, account] = token_for(self.authority, [role], [account] if account else [])
        return tuple(bearer(self._tokens[role, account]))


@pytest.fixture(scope="module")
def target(postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    name = f"fa_{uuid.uuid4().hex[:12]}"
    dsn = postgres_server.create_database(name)
    upgrade(dsn)
    log = tmp_path_factory.mktemp("fuzz-approval") / "approval.log"
    process = approval_process(
        dsn, free_port(), log, max_message_bytes=str(MAX_MESSAGE_BYTES), review_threshold_minor="1000"
    )
    process.start()
    try:
        process.wait_serving(60)
        admin, gateway = (
            tuple(bearer(token_for(authority(), [r]))) for r in (ACCOUNTS_ADMIN, PAYMENT_GATEWAY)
        )
        with grpc.insecure_channel(process.address) as channel:
            stub = pb_grpc.ApprovalServiceStub(channel)
            accounts = [
                stub.CreateAccount(
                    pb.CreateAccountRequest(
                        request_id=f"seed-{n}",
                        owner_name=f"Seed {n}",
                        currency_code=currency,
                        opening_balance_minor=balance,
                        per_payment_limit_minor=10**12,
                        daily_limit_minor=10**15,
                    ),
                    timeout=10,
                    metadata=admin,
                ).account.account_id
                for n, (currency, balance) in enumerate(
                    [("EUR", 10**9), ("EUR", 2**63 - 1), ("USD", 10**9), ("EUR", 0)]
                )
            ]
            held = [
                stub.SubmitPayment(
                    pb.SubmitPaymentRequest(
                        request_id=f"seed-held-{n}",
                        payer_account_id=accounts[0],
                        payee_account_id=accounts[3],
                        amount=money_pb2.Money(currency_code="EUR", amount_minor=5000),
                    ),
                    timeout=10,
                    metadata=gateway,
                ).payment.payment_id
                for n in range(3)
            ]
            yield Target(process, dsn, channel, stub, accounts, held, authority())
    finally:
        process.stop(5)
        postgres_server.drop_database(name)


def call(
    target: Target,
    method: str,
    request: message.Message,
    metadata: Metadata | None = None,
    denied: frozenset[str] = frozenset(),
) -> tuple[grpc.StatusCode, str]:
    """Calls one RPC and checks the outcome against the contract; returns the code and reason.

    Without `metadata` the call carries a valid token of the method's CALLER: it must then
    not be UNAUTHENTICATED, and PERMISSION_DENIED only for a reason in `denied`.
    """
    rpc: Callable[..., Any] = getattr(target.stub, method)
    reason = ""
    try:
        rpc(request, timeout=10, metadata=target.as_(CALLER[method]) if metadata is None else metadata)
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
        reason = documented_refusal(method, error, ALLOWED, REASONS)
        if code == grpc.StatusCode.INVALID_ARGUMENT:
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
    request_id = getattr(request, "request_id", None)
    if request_id is not None:
        (target.accepted if code == grpc.StatusCode.OK else target.rejected).add(request_id)
    return code, reason


# -- strategies ---------------------------------------------------------------------------

METACHARACTERS = [
    "'; DROP TABLE payments; --",
    '" OR 1=1 --',
    "\\",
    "%s %(x)s {0}",
    "*1\r\n$8\r\nFLUSHALL\r\n",
    "rm:v1:{slot}*",
    "\u202e\u200b\ufeff",
    "名前 🚀 é",
]
INT64 = st.one_of(
    st.sampled_from([0, 1, -1, 2**63 - 1, -(2**63), 2**62, 2**31, -(2**31) - 1]),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
CURRENCIES = st.one_of(
    st.sampled_from(["EUR", "USD", "eur", "XXX", "EU", "EURO", "", " EUR", "€", "JPY"]),
    st.text(max_size=5),
)


def texts(maximum: int) -> st.SearchStrategy[str]:
    """Empty, short, at and beyond the limit, huge, unicode, control characters and metacharacters."""
    return st.one_of(
        st.just(""),
        st.just(" "),
        st.sampled_from(METACHARACTERS),
        st.text(max_size=20),
        st.text(alphabet=st.characters(codec="utf-8"), min_size=1, max_size=10),
        st.just("a\x00b"),
        st.just("x" * maximum),
        st.just("x" * (maximum + 1)),
        st.just("é" * maximum),
        st.just("y" * 8_000),  # several such fields stay below the message limit
    )


def request_ids() -> st.SearchStrategy[str]:
    return st.one_of(
        st.uuids().map(str),
        st.builds(lambda t: f"r-{uuid.uuid4().hex[:8]}-{t}", st.text(max_size=10)),
        texts(64),
    )


def ids(known: Callable[[Target], list[str]]) -> Callable[[Target], st.SearchStrategy[str]]:
    def strategy(target: Target) -> st.SearchStrategy[str]:
        return st.one_of(
            st.sampled_from(known(target)),
            st.sampled_from(known(target)).map(str.upper),
            st.sampled_from(known(target)).map(lambda v: "{" + v + "}"),
            st.uuids().map(str),
            st.sampled_from(["", "not-a-uuid", "00000000-0000-0000-0000-000000000000", "x" * 5000]),
            st.text(max_size=40),
        )

    return strategy


account_ids = ids(lambda t: t.accounts)
payment_ids = ids(lambda t: t.held)


def money() -> st.SearchStrategy[money_pb2.Money]:
    return st.builds(lambda c, a: money_pb2.Money(currency_code=c, amount_minor=a), CURRENCIES, INT64)


# -- the properties ---------------------------------------------------------------------


def fresh_id() -> str:
    return str(uuid.uuid4())


@FUZZ
@given(data=st.data())
def test_create_account(target: Target, data: st.DataObject) -> None:
    values = fields(
        data,
        {
            "request_id": fresh_id(),
            "owner_name": "Ada",
            "currency_code": "EUR",
            "opening_balance_minor": 100,
            "per_payment_limit_minor": 100,
            "daily_limit_minor": 100,
        },
        {
            "request_id": request_ids(),
            "owner_name": texts(200),
            "currency_code": CURRENCIES,
            "opening_balance_minor": INT64,
            "per_payment_limit_minor": INT64,
            "daily_limit_minor": INT64,
        },
    )
    call(target, "CreateAccount", pb.CreateAccountRequest(**values))


@FUZZ
@given(data=st.data())
def test_submit_payment(target: Target, data: st.DataObject) -> None:
    values = fields(
        data,
        {
            "request_id": fresh_id(),
            "payer_account_id": target.accounts[1],
            "payee_account_id": target.accounts[0],
            "amount": money_pb2.Money(currency_code="EUR", amount_minor=1),
            "reference": "ref",
        },
        {
            "request_id": request_ids(),
            "payer_account_id": account_ids(target),
            "payee_account_id": account_ids(target),
            "amount": st.one_of(st.none(), money()),
            "reference": texts(140),
        },
    )
    # A payment gateway may pay from any account; the payer's customer only from its own.
    if data.draw(st.booleans(), "as the payer's customer"):
        metadata = target.as_(CUSTOMER, target.accounts[1])
        code, reason = call(target, "SubmitPayment", pb.SubmitPaymentRequest(**values), metadata)
        assert code != grpc.StatusCode.UNAUTHENTICATED
        if values["payer_account_id"] != target.accounts[1] and code == grpc.StatusCode.OK:
            raise AssertionError("a customer paid from an account not theirs")
        assert code != grpc.StatusCode.PERMISSION_DENIED or reason == "NOT_YOUR_ACCOUNT"
    else:
        call(target, "SubmitPayment", pb.SubmitPaymentRequest(**values))


@FUZZ
@given(data=st.data(), method=st.sampled_from(["ApprovePayment", "DeclinePayment"]))
def test_review_payment(target: Target, data: st.DataObject, method: str) -> None:
    kind = pb.ApprovePaymentRequest if method == "ApprovePayment" else pb.DeclinePaymentRequest
    values = fields(
        data,
        # The reviewer is the token's subject; the deprecated field may only repeat it.
        {"request_id": fresh_id(), "payment_id": target.held[-1], "reviewer": "", "note": ""},
        {
            "request_id": request_ids(),
            "payment_id": payment_ids(target),
            "reviewer": st.one_of(st.just(SUBJECTS[REVIEWER]), texts(MAX_SUBJECT)),
            "note": texts(500),
        },
    )
    call(target, method, kind(**values), denied=frozenset({"REVIEWER_MISMATCH"}))


@FUZZ
@given(data=st.data(), method=st.sampled_from(["FreezeAccount", "UnfreezeAccount"]))
def test_freeze_and_unfreeze(target: Target, data: st.DataObject, method: str) -> None:
    kind = pb.FreezeAccountRequest if method == "FreezeAccount" else pb.UnfreezeAccountRequest
    values = fields(
        data,
        {"request_id": fresh_id(), "account_id": target.accounts[2], "reason": "check"},
        {"request_id": request_ids(), "account_id": account_ids(target), "reason": texts(500)},
    )
    call(target, method, kind(**values))


@FUZZ
@given(data=st.data())
def test_get_payment(target: Target, data: st.DataObject) -> None:
    request = pb.GetPaymentRequest(payment_id=data.draw(payment_ids(target)))
    if data.draw(st.booleans(), "as the payer's customer"):
        # The held payments are paid from accounts[0]; any other answer is NOT_YOUR_ACCOUNT.
        code, reason = call(target, "GetPayment", request, target.as_(CUSTOMER, target.accounts[0]))
        assert code != grpc.StatusCode.UNAUTHENTICATED
        assert code != grpc.StatusCode.PERMISSION_DENIED or reason == "NOT_YOUR_ACCOUNT"
    else:
        call(target, "GetPayment", request)


@FUZZ
@given(
    method=st.sampled_from(sorted(ALLOWED)),
    raw=st.one_of(
        st.binary(max_size=200),
        st.sampled_from([b"\xff\xff\xff", b"\x0a\xff\x01", b"\x08" + b"\xff" * 10, b"\x12\x05ab"]),
    ),
)
def test_bytes_that_are_not_a_request(target: Target, method: str, raw: bytes) -> None:
    """Bytes that do not parse as the request: INVALID_ARGUMENT (or a valid answer, when they do parse)."""
    rpc = target.channel.unary_unary(
        f"/payments.approval.v1.ApprovalService/{method}",
        request_serializer=None,
        response_deserializer=None,
    )
    code, details = grpc.StatusCode.OK, ""
    try:
        rpc(raw, timeout=10, metadata=target.as_(CALLER[method]))
    except grpc.RpcError as error:
        code, details = error.code(), error.details() or ""
    assert code in ALLOWED[method] | {grpc.StatusCode.INVALID_ARGUMENT}, f"{method}: {code.name} {details}"
    assert "Traceback" not in details
    assert "DecodeError" not in details


def test_an_oversized_request_is_resource_exhausted_and_the_server_keeps_serving(target: Target) -> None:
    request = pb.CreateAccountRequest(
        request_id="too-big", owner_name="x" * (MAX_MESSAGE_BYTES + 1), currency_code="EUR"
    )
    with pytest.raises(grpc.RpcError) as exhausted:
        target.stub.CreateAccount(request, timeout=10, metadata=target.as_(ACCOUNTS_ADMIN))
    assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # Nothing was stored, and the next call is served as usual.
    assert target.stub.GetPayment(
        pb.GetPaymentRequest(payment_id=target.held[0]), timeout=10, metadata=target.as_(REVIEWER)
    ).payment
    assert _stored(target.dsn, {"too-big"}) == (set(), set())


def test_metacharacters_are_stored_and_returned_verbatim(target: Target) -> None:
    for n, text in enumerate(METACHARACTERS):
        account = target.stub.CreateAccount(
            pb.CreateAccountRequest(
                request_id=f"meta-{n}",
                owner_name=text,
                currency_code="EUR",
                opening_balance_minor=100,
                per_payment_limit_minor=100,
                daily_limit_minor=100,
            ),
            timeout=10,
            metadata=target.as_(ACCOUNTS_ADMIN),
        ).account
        assert account.owner_name == text
        paid = target.stub.SubmitPayment(
            pb.SubmitPaymentRequest(
                request_id=f"meta-pay-{n}",
                payer_account_id=account.account_id,
                payee_account_id=target.accounts[0],
                amount=money_pb2.Money(currency_code="EUR", amount_minor=1),
                reference=text,
            ),
            timeout=10,
            metadata=target.as_(PAYMENT_GATEWAY),
        ).payment
        assert paid.reference == text
        read = target.stub.GetPayment(
            pb.GetPaymentRequest(payment_id=paid.payment_id), timeout=10, metadata=target.as_(REVIEWER)
        )
        assert read.payment.reference == text
        assert (
            _column(target.dsn, "SELECT reference FROM payments WHERE payment_id = %s", paid.payment_id)
            == text
        )
        assert (
            _column(target.dsn, "SELECT owner_name FROM accounts WHERE account_id = %s", account.account_id)
            == text
        )


# -- credentials ---------------------------------------------------------------------------


def request_for(target: Target, method: str) -> message.Message:
    """A valid request of `method`, with a request_id of its own."""
    requests: dict[str, Callable[[], message.Message]] = {
        "CreateAccount": lambda: pb.CreateAccountRequest(
            request_id=fresh_id(),
            owner_name="Eve",
            currency_code="EUR",
            opening_balance_minor=10**6,
            per_payment_limit_minor=10,
            daily_limit_minor=10,
        ),
        "SubmitPayment": lambda: pb.SubmitPaymentRequest(
            request_id=fresh_id(),
            payer_account_id=target.accounts[1],
            payee_account_id=target.accounts[0],
            amount=money_pb2.Money(currency_code="EUR", amount_minor=1),
        ),
        "ApprovePayment": lambda: pb.ApprovePaymentRequest(request_id=fresh_id(), payment_id=target.held[0]),
        "DeclinePayment": lambda: pb.DeclinePaymentRequest(request_id=fresh_id(), payment_id=target.held[1]),
        "FreezeAccount": lambda: pb.FreezeAccountRequest(
            request_id=fresh_id(), account_id=target.accounts[2]
        ),
        "UnfreezeAccount": lambda: pb.UnfreezeAccountRequest(
            request_id=fresh_id(), account_id=target.accounts[2]
        ),
        "GetPayment": lambda: pb.GetPaymentRequest(payment_id=target.held[2]),
    }
    return requests[method]()


@FUZZ
@given(method=st.sampled_from(sorted(ALLOWED)), data=st.data())
def test_authorization_metadata(target: Target, method: str, data: st.DataObject) -> None:
    """Random and malformed credentials: UNAUTHENTICATED with a documented reason, or the normal answer."""
    valid = target.as_(CALLER[method])[0][1].removeprefix("Bearer ")
    refused = refused_tokens(target.authority, [CALLER[method]])
    metadata, expected = data.draw(authorizations(valid, refused))
    code, reason = call(target, method, request_for(target, method), metadata)
    check_authorization(method, code, reason, expected)


@pytest.mark.parametrize("method", sorted(ALLOWED))
def test_each_defect_of_a_token_has_its_reason(target: Target, method: str) -> None:
    for expected, token in refused_tokens(target.authority, [CALLER[method]]):
        code, reason = call(target, method, request_for(target, method), tuple(bearer(token)))
        check_authorization(method, code, reason, expected or REFUSED)


@pytest.mark.parametrize("method", sorted(ALLOWED))
def test_a_valid_token_of_another_role_is_permission_denied(target: Target, method: str) -> None:
    request = request_for(target, method)
    code, reason = call(target, method, request, target.as_(HISTORY_READER))
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "METHOD_NOT_ALLOWED")


def test_credentials_above_the_metadata_limit_are_refused_and_the_server_keeps_serving(
    target: Target,
) -> None:
    request = pb.CreateAccountRequest(
        request_id=fresh_id(),
        owner_name="Eve",
        currency_code="EUR",
        per_payment_limit_minor=1,
        daily_limit_minor=1,
    )
    target.rejected.add(request.request_id)
    with pytest.raises(grpc.RpcError) as exhausted:
        target.stub.CreateAccount(
            request, timeout=10, metadata=(("authorization", "Bearer " + "A" * 20_000),)
        )
    # gRPC refuses metadata above its hard limit (16 KiB) before the call reaches the service.
    assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert target.stub.GetPayment(
        pb.GetPaymentRequest(payment_id=target.held[0]), timeout=10, metadata=target.as_(REVIEWER)
    ).payment


def test_rejected_calls_left_nothing_and_the_server_still_serves(target: Target) -> None:
    """Runs after the properties above (pytest keeps the order of the file) and checks what they did."""
    assert target.process.alive
    target.process.wait_serving(10)
    never_accepted = target.rejected - target.accepted
    assert len(never_accepted) > 50
    assert _stored(target.dsn, never_accepted) == (set(), set())
    # The properties reached the interesting answers, not only INVALID_ARGUMENT.
    assert {"OK", "INVALID_ARGUMENT"} <= target.codes["CreateAccount"]
    assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "PERMISSION_DENIED"} <= target.codes["SubmitPayment"]
    assert {"UNAUTHENTICATED", "PERMISSION_DENIED"} <= target.codes["CreateAccount"]
    assert target.codes["reasons"] >= UNAUTHENTICATED_REASONS
    log = target.process.log_text()
    assert "INTERNAL" not in log
    assert "Traceback" not in log


def _stored(dsn: str, request_ids: set[str]) -> tuple[set[str], set[str]]:
    """The request_ids among these that have an idempotency key, and those that have a payment."""
    request_ids = {r for r in request_ids if "\x00" not in r}  # PostgreSQL text cannot hold them anyway
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT request_id FROM idempotency_keys WHERE request_id = ANY(%s)", (list(request_ids),)
            )
            keys = {row[0] for row in cursor.fetchall()}
            cursor.execute("SELECT request_id FROM payments WHERE request_id = ANY(%s)", (list(request_ids),))
            payments = {row[0] for row in cursor.fetchall()}
    finally:
        connection.close()
    return keys, payments


def _column(dsn: str, query: str, key: str) -> str:
    connection = psycopg2.connect(dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute(query, (key,))
            row = cursor.fetchone()
    finally:
        connection.close()
    assert row is not None
    return str(row[0])
