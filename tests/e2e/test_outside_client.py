"""The running stack driven by `buf curl` over gRPC with server reflection: the contracts, not our stubs.

Tokens come from `python -m stack token` and auth.env, as the README shows; reflection
and health need none.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import psycopg2
from google.rpc import error_details_pb2

from stack.tokens import token_variable
from tests.support import ROOT

BUF = str(Path(sys.executable).parent / "buf")


def buf_curl(
    address: str, method: str, body: dict[str, Any], token: str | None = None
) -> subprocess.CompletedProcess[str]:
    """`buf curl` of one method, with `-H 'authorization: Bearer <token>'` when a token is given."""
    headers = ["-H", f"authorization: Bearer {token}"] if token is not None else []
    return subprocess.run(
        [
            BUF,
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            *headers,
            "--data",
            json.dumps(body),
            f"http://{address}/{method}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def stack_token(root: Path, *args: str) -> str:
    """A token from `python -m stack token` (the command the README documents)."""
    result = subprocess.run(
        [sys.executable, "-m", "stack", "token", "--root", str(root), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def ok(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def refusal(result: subprocess.CompletedProcess[str]) -> tuple[str, list[str]]:
    """The code and ErrorInfo reasons of a call that buf curl reports as failed."""
    assert result.returncode != 0, result.stdout
    error = json.loads(result.stderr)
    return error["code"], _reasons(error)


def _reasons(error: dict[str, Any]) -> list[str]:
    """The ErrorInfo reasons of a buf curl error (it prints details it cannot resolve as base64)."""
    found = []
    for detail in error.get("details", []):
        if detail["type"] == "google.rpc.ErrorInfo":
            raw = detail["value"]
            found.append(
                error_details_pb2.ErrorInfo.FromString(base64.b64decode(raw + "=" * (-len(raw) % 4))).reason
            )
    return found


def test_mutation_then_consistent_query(
    endpoints: dict[str, str], auth_env: dict[str, str], stack_root: Path
) -> None:
    approval, history = endpoints["APPROVAL_ADDR"], endpoints["HISTORY_ADDRS"].split(",")[0]
    admin = auth_env[token_variable("accounts-admin")]
    created = ok(
        buf_curl(
            approval,
            "payments.approval.v1.ApprovalService/CreateAccount",
            {
                "requestId": str(uuid.uuid4()),
                "ownerName": "Zoë O'Brien; DROP TABLE accounts;--",
                "currencyCode": "EUR",
                "openingBalanceMinor": "12345",
                "perPaymentLimitMinor": "5000",
                "dailyLimitMinor": "10000",
            },
            admin,
        )
    )
    account = created["account"]
    assert account["ledgerBalance"] == {"currencyCode": "EUR", "amountMinor": "12345"}
    assert created["consistencyToken"]

    read = ok(
        buf_curl(
            history,
            "payments.history.v1.HistoryService/GetAccount",
            {"accountId": account["accountId"], "minConsistencyToken": created["consistencyToken"]},
            stack_token(stack_root, "--role", "customer", "--account", account["accountId"]),
        )
    )
    assert read["account"]["accountId"] == account["accountId"]
    assert read["account"]["ownerName"] == "Zoë O'Brien; DROP TABLE accounts;--"
    assert read["account"]["availableBalance"]["amountMinor"] == "12345"


def test_error_carries_status_code_and_reason(endpoints: dict[str, str], auth_env: dict[str, str]) -> None:
    result = buf_curl(
        endpoints["APPROVAL_ADDR"],
        "payments.approval.v1.ApprovalService/CreateAccount",
        {"requestId": str(uuid.uuid4()), "ownerName": "", "currencyCode": "XXZ"},
        auth_env[token_variable("accounts-admin")],
    )
    assert result.returncode != 0
    error = json.loads(result.stderr)
    assert error["code"] == "invalid_argument"
    assert _reasons(error) == ["INVALID_ARGUMENT"]

    missing = buf_curl(
        endpoints["HISTORY_ADDRS"].split(",")[0],
        "payments.history.v1.HistoryService/GetPayment",
        {"paymentId": str(uuid.uuid4())},
        auth_env[token_variable("history-reader")],
    )
    assert missing.returncode != 0
    error = json.loads(missing.stderr)
    assert error["code"] == "not_found"
    assert _reasons(error) == ["PAYMENT_NOT_FOUND"]


def test_health_of_every_service(endpoints: dict[str, str]) -> None:
    """Health answers without credentials (as Kubernetes probes call it), on every server."""
    addresses = [
        endpoints["APPROVAL_ADDR"],
        endpoints["REPLICATOR_HEALTH_ADDR"],
        *endpoints["HISTORY_ADDRS"].split(","),
    ]
    for address in addresses:
        for service in ("liveness", "readiness"):
            answer = ok(buf_curl(address, "grpc.health.v1.Health/Check", {"service": service}))
            assert answer["status"] == "SERVING", (address, service)


def test_the_review_queue_is_read_with_a_reviewers_token_and_refused_to_a_customer(
    endpoints: dict[str, str], auth_env: dict[str, str], stack_root: Path
) -> None:
    """The README's ListHeldPayments call, with auth.env's reviewer token; a customer's is refused."""
    history = endpoints["HISTORY_ADDRS"].split(",")[0]
    method = "payments.history.v1.HistoryService/ListHeldPayments"
    page = ok(buf_curl(history, method, {"pageSize": 20}, auth_env[token_variable("reviewer")]))
    assert page["consistencyToken"]
    assert all(view["status"] == "PAYMENT_STATUS_PENDING_REVIEW" for view in page.get("payments", []))
    customer = stack_token(stack_root, "--role", "customer", "--account", str(uuid.uuid4()))
    assert refusal(buf_curl(history, method, {"pageSize": 20}, customer)) == (
        "permission_denied",
        ["METHOD_NOT_ALLOWED"],
    )


def test_a_call_without_a_valid_token_is_unauthenticated_on_both_services(
    endpoints: dict[str, str], auth_env: dict[str, str], stack_root: Path
) -> None:
    """Through the running stack: no token, a malformed one or a foreign one is refused, and nothing is written."""
    approval, history = endpoints["APPROVAL_ADDR"], endpoints["HISTORY_ADDRS"].split(",")[0]
    request_id = str(uuid.uuid4())
    create = (
        approval,
        "payments.approval.v1.ApprovalService/CreateAccount",
        {
            "requestId": request_id,
            "ownerName": "Mallory",
            "currencyCode": "EUR",
            "openingBalanceMinor": "1000000",
            "perPaymentLimitMinor": "1000",
            "dailyLimitMinor": "1000",
        },
    )
    calls = [
        create,
        (approval, "payments.approval.v1.ApprovalService/GetPayment", {"paymentId": str(uuid.uuid4())}),
        (history, "payments.history.v1.HistoryService/GetAccount", {"accountId": str(uuid.uuid4())}),
        (history, "payments.history.v1.HistoryService/ListPayments", {"accountId": str(uuid.uuid4())}),
    ]
    # A token that another authority signed: same issuer and audience, a key the stack does not know.
    foreign = stack_token(stack_root.parent / f"{stack_root.name}-other", "--role", "accounts-admin")
    for address, method, body in calls:
        assert refusal(buf_curl(address, method, body)) == ("unauthenticated", ["CREDENTIALS_MISSING"]), (
            method
        )
        assert refusal(buf_curl(address, method, body, "not.a.token")) == (
            "unauthenticated",
            ["TOKEN_MALFORMED"],
        ), method
        assert refusal(buf_curl(address, method, body, foreign)) == ("unauthenticated", ["UNKNOWN_KEY"]), (
            method
        )

    # A valid token of a role the method does not allow: the caller is known, the call denied.
    reader = auth_env[token_variable("history-reader")]
    assert refusal(buf_curl(*create, reader)) == ("permission_denied", ["METHOD_NOT_ALLOWED"])
    # None of the refused calls wrote anything.
    connection = psycopg2.connect(endpoints["POSTGRES_DSN"])
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM idempotency_keys WHERE request_id = %s", (request_id,))
            assert cursor.fetchone() == (0,)
            cursor.execute("SELECT count(*) FROM accounts WHERE owner_name = 'Mallory'")
            assert cursor.fetchone() == (0,)
    finally:
        connection.close()
    opened = ok(buf_curl(*create, auth_env[token_variable("accounts-admin")]))
    assert opened["account"]["ownerName"] == "Mallory"
