"""The running stack driven by `buf curl` over gRPC with server reflection: the contracts, not our stubs."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from google.rpc import error_details_pb2

BUF = str(Path(sys.executable).parent / "buf")


def buf_curl(address: str, method: str, body: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            BUF,
            "curl",
            "--protocol",
            "grpc",
            "--http2-prior-knowledge",
            "--data",
            json.dumps(body),
            f"http://{address}/{method}",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )


def ok(result: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


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


def test_mutation_then_consistent_query(endpoints: dict[str, str]) -> None:
    approval, history = endpoints["APPROVAL_ADDR"], endpoints["HISTORY_ADDRS"].split(",")[0]
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
        )
    )
    assert read["account"]["accountId"] == account["accountId"]
    assert read["account"]["ownerName"] == "Zoë O'Brien; DROP TABLE accounts;--"
    assert read["account"]["availableBalance"]["amountMinor"] == "12345"


def test_error_carries_status_code_and_reason(endpoints: dict[str, str]) -> None:
    result = buf_curl(
        endpoints["APPROVAL_ADDR"],
        "payments.approval.v1.ApprovalService/CreateAccount",
        {"requestId": str(uuid.uuid4()), "ownerName": "", "currencyCode": "XXZ"},
    )
    assert result.returncode != 0
    error = json.loads(result.stderr)
    assert error["code"] == "invalid_argument"
    assert _reasons(error) == ["INVALID_ARGUMENT"]

    missing = buf_curl(
        endpoints["HISTORY_ADDRS"].split(",")[0],
        "payments.history.v1.HistoryService/GetPayment",
        {"paymentId": str(uuid.uuid4())},
    )
    assert missing.returncode != 0
    error = json.loads(missing.stderr)
    assert error["code"] == "not_found"
    assert _reasons(error) == ["PAYMENT_NOT_FOUND"]


def test_health_of_every_service(endpoints: dict[str, str]) -> None:
    addresses = [
        endpoints["APPROVAL_ADDR"],
        endpoints["REPLICATOR_HEALTH_ADDR"],
        *endpoints["HISTORY_ADDRS"].split(","),
    ]
    for address in addresses:
        for service in ("liveness", "readiness"):
            answer = ok(buf_curl(address, "grpc.health.v1.Health/Check", {"service": service}))
            assert answer["status"] == "SERVING", (address, service)
