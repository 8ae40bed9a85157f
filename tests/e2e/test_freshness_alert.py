"""ReadModelsStale in a real Prometheus: the local stack under payments, its replicator stopped, then started again.

The stack runs as `STACK_PROMETHEUS=1 make up` runs it, in a root of its own: a Prometheus
scrapes every process every second and evaluates the alert rules as often. It loads a copy
of the shipped rules in which only ReadModelsStale's threshold and `for:` are shortened, so
that the test takes seconds, not minutes; the shipped values are promtool's to test
(tests/integration/test_alert_rules.py). Nothing here sleeps to let time pass: each step
polls Prometheus's HTTP API until what it waits for holds, within a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import pytest

from payments.history.v1 import history_service_pb2 as history_pb
from payments.history.v1 import history_service_pb2_grpc as history_grpc
from payments_common.keys import DEFAULT_NAMESPACE, DEFAULT_SLOT_NAME
from stack import tokens
from stack.auth import ROLES
from stack.local import ALERT_RULES, PROMETHEUS_INTERVAL_SECONDS
from tests.e2e.conftest import read_endpoints
from tests.support import ROOT
from tests.support.auth import aio_channel
from tests.support.faults import PaymentLoad, open_accounts
from tests.support.waiting import eventually

pytestmark = pytest.mark.slow

ALERT = "ReadModelsStale"
# The copy's values. Under load a running replicator keeps the age at milliseconds, so 3 s is
# far above it; stopped, the age passes it 3 s later, and the alert fires 2 s after that.
THRESHOLD_SECONDS = 3
FOR = "2s"
# Each wait below ends within seconds when the stack behaves; the deadlines allow for a slow machine.
DEADLINE_S = 90.0


def shortened_rules(shipped: str) -> str:
    """The shipped rules file with ReadModelsStale's threshold and `for:` shortened, and nothing else changed."""
    lines = shipped.splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if re.fullmatch(rf"\s*- alert: {ALERT}\n", line))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"\s*- alert: ", lines[i])), len(lines))
    changed = []
    for i in range(start, end):
        expr = re.fullmatch(r"(\s*expr: .*\(history_read_model_age_seconds\) > )\d+\n", lines[i])
        duration = re.fullmatch(r"(\s*for: )\S+\n", lines[i])
        if expr:
            lines[i] = f"{expr.group(1)}{THRESHOLD_SECONDS}\n"
            changed.append(i)
        elif duration:
            lines[i] = f"{duration.group(1)}{FOR}\n"
            changed.append(i)
    assert len(changed) == 2, f"{ALERT} should have one threshold and one `for:`: {changed}"
    return "".join(lines)


def test_the_copy_differs_from_the_shipped_rules_in_that_alerts_threshold_and_for_only() -> None:
    shipped = ALERT_RULES.read_text()
    copy = shortened_rules(shipped)
    before, after = shipped.splitlines(), copy.splitlines()
    assert len(before) == len(after)
    differing = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert [new.strip() for _, new in differing] == [
        f"expr: min by (namespace, slot, key_namespace) (history_read_model_age_seconds) > {THRESHOLD_SECONDS}",
        f"for: {FOR}",
    ]
    assert [old.strip() for old, _ in differing] == [
        "expr: min by (namespace, slot, key_namespace) (history_read_model_age_seconds) > 60",
        "for: 2m",
    ]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as reply:
        document = json.load(reply)
    assert document["status"] == "success", document
    return document["data"]


def _alerts(prometheus: str) -> list[dict[str, Any]]:
    """The alerts of ReadModelsStale that are pending or firing now."""
    return [a for a in _get(f"{prometheus}/api/v1/alerts")["alerts"] if a["labels"]["alertname"] == ALERT]


def _query(prometheus: str, expr: str) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = _get(
        f"{prometheus}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    )["result"]
    return result


def _unix(rfc3339: str) -> float:
    """Prometheus's activeAt (RFC 3339, nanoseconds) as Unix seconds."""
    trimmed = re.sub(r"(\.\d{6})\d*", r"\1", rfc3339).replace("Z", "+00:00")
    return datetime.fromisoformat(trimmed).timestamp()


def _stack(*args: str, env: dict[str, str] | None = None, timeout: float = 240) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stack", *args],
        env={**os.environ, **(env or {})},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, f"python -m stack {' '.join(args)}:\n{done.stdout}\n{done.stderr}"


@pytest.fixture
def stack_with_prometheus(tmp_path: Path) -> Iterator[Path]:
    """A stack of its own, up as `STACK_PROMETHEUS=1 make up` brings it, with the copy of the rules."""
    rules = tmp_path / "rules.yml"
    rules.write_text(shortened_rules(ALERT_RULES.read_text()))
    root = tmp_path / "stack"
    try:
        _stack("up", "--root", str(root), env={"STACK_PROMETHEUS": "1", "STACK_PROMETHEUS_RULES": str(rules)})
        yield root
    finally:
        _stack("down", "--root", str(root), timeout=120)


@contextlib.asynccontextmanager
async def running(load: PaymentLoad) -> AsyncIterator[None]:
    task = asyncio.create_task(load.run())
    try:
        yield
    finally:
        load.stopping.set()
        await task


async def test_the_alert_fires_while_the_replicator_is_stopped_and_resolves_when_it_runs_again(
    stack_with_prometheus: Path,
) -> None:
    root = stack_with_prometheus
    endpoints = read_endpoints(root)
    prometheus = endpoints["PROMETHEUS_URL"]
    histories = endpoints["HISTORY_ADDRS"].split(",")

    # Prometheus loaded the copy: every shipped alert, ReadModelsStale with the shortened values.
    loaded = {r["name"]: r for g in _get(f"{prometheus}/api/v1/rules")["groups"] for r in g["rules"]}
    shipped = re.findall(r"^\s*- alert: (\w+)$", ALERT_RULES.read_text(), flags=re.MULTILINE)
    assert sorted(loaded) == sorted(shipped)
    assert loaded[ALERT]["duration"] == 2
    assert loaded[ALERT]["query"].endswith(f"> {THRESHOLD_SECONDS}")

    token = tokens.authority(root).token("spiffe://payments.local/ns/tests/sa/freshness", ROLES)
    accounts = await open_accounts(endpoints["APPROVAL_ADDR"], 10, 1_000_000, token)
    # Two clients, each paying about 25 times a second: steady, and light enough for 2 cores.
    load = PaymentLoad(endpoints["APPROVAL_ADDR"], accounts, workers=2, token=token, think_s=0.04)
    async with running(load):
        # Both history processes are scraped and report an age (Prometheus scrapes new targets
        # up to 5 s after it starts): the alert has something to read.
        await eventually(
            lambda: len(_query(prometheus, "history_read_model_age_seconds >= 0")) == len(histories),
            DEADLINE_S,
            "an age of the read models from every history process",
            interval=PROMETHEUS_INTERVAL_SECONDS / 4,
        )
        await load.wait_acks(50)
        assert _alerts(prometheus) == []

        # The replicator stops; payments go on. Its series are gone, yet the alert fires.
        stopped_at = time.time()
        await asyncio.to_thread(_stack, "stop", "replicator", "--root", str(root))

        def firing() -> list[dict[str, Any]]:
            return [a for a in _alerts(prometheus) if a["state"] == "firing"]

        (alert,) = await eventually(firing, DEADLINE_S, f"{ALERT} firing", interval=0.25)
        assert alert["labels"] == {
            "alertname": ALERT,
            "severity": "critical",
            "slot": DEFAULT_SLOT_NAME,
            "key_namespace": DEFAULT_NAMESPACE,
        }
        assert alert["annotations"]["runbook"] == "docs/operations.md#readmodelsstale"
        # It became pending after the stop, not before.
        assert _unix(alert["activeAt"]) >= stopped_at
        assert _query(prometheus, 'up{job="replicator"}')[0]["value"][1] == "0"
        # Approval goes on acknowledging payments meanwhile: history must have them in the end.
        await load.wait_acks(len(load.acks) + 20)

        # Started again, it catches up and the alert resolves.
        await asyncio.to_thread(_stack, "start", "replicator", "--root", str(root))
        await eventually(lambda: _alerts(prometheus) == [], DEADLINE_S, f"{ALERT} resolved", interval=0.25)
        await load.wait_acks(len(load.acks) + 20)

    assert load.unexpected == []
    assert load.unresolved == []
    # Every payment approval acknowledged is in history, as acknowledged, read with its token.
    missing = await _missing_from_history(histories, token, load)
    assert missing == [], f"{len(missing)} of {len(load.acks)} acknowledged payments: {missing[:5]}"


async def _missing_from_history(histories: list[str], token: str, load: PaymentLoad) -> list[str]:
    options = [("grpc.lb_policy_name", "round_robin")]
    async with aio_channel("ipv4:" + ",".join(histories), token, options=options) as channel:
        stub = history_grpc.HistoryServiceStub(channel)
        limit = asyncio.Semaphore(16)

        async def check(ack: Any) -> str | None:
            async with limit:
                try:
                    reply = await stub.GetPayment(
                        history_pb.GetPaymentRequest(
                            payment_id=ack.payment_id, min_consistency_token=ack.token
                        ),
                        timeout=10,
                    )
                except grpc.aio.AioRpcError as error:
                    return f"{ack.payment_id}: {error.code().name}"
            if reply.payment.payment_id != ack.payment_id or reply.payment.status != ack.status:
                return f"{ack.payment_id}: read {reply.payment.payment_id} status {reply.payment.status}"
            return None

        outcomes = await asyncio.gather(*(check(ack) for ack in load.acks))
    return [outcome for outcome in outcomes if outcome is not None]
