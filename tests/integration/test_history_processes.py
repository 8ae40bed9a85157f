"""Real `python -m history_svc serve` processes: round-robin over three while one dies and returns, SIGTERM, CLI."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest

from payments.history.v1 import history_service_pb2 as pb
from payments.history.v1 import history_service_pb2_grpc
from payments_common.grpcstatus import error_info
from stack.servers import PostgresServer, free_port
from tests.support import ROOT
from tests.support.auth import aio_channel, service_token
from tests.support.history import (
    HistoryProcess,
    ReplicatedSource,
    history_processes,
    replicated_source,
)
from tests.support.waiting import eventually

ALL = pb.PAYMENT_DIRECTION_ALL


def docs_client() -> dict[str, Any]:
    """Runs the Python client of docs/history.md as it stands and returns what it defines."""
    text = (ROOT / "docs" / "history.md").read_text()
    block = next(
        code for code in re.findall(r"```python\n(.*?)```", text, re.S) if "def history_channel" in code
    )
    namespace: dict[str, Any] = {"__name__": "docs_history_client"}
    exec(compile(block, "docs/history.md", "exec"), namespace)
    return namespace


@dataclass
class Dataset:
    source: ReplicatedSource
    payer: str
    payee: str
    sent: list[str]


@pytest.fixture(scope="module")
def dataset(postgres_server: PostgresServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataset]:
    with replicated_source(postgres_server, tmp_path_factory.mktemp("history-processes")) as source:
        payer, payee = source.writer.open_account("Olga"), source.writer.open_account("Pete")
        start = datetime.now(UTC) - timedelta(hours=2)
        sent = [
            source.writer.pay(payer, payee, 10 + n, created_at=start + timedelta(seconds=n))[0]
            for n in range(23)
        ]
        source.wait_replicated()
        yield Dataset(source, payer, payee, list(reversed(sent)))


def _process(dataset: Dataset, work_dir: Path, **env: str) -> HistoryProcess:
    return HistoryProcess(
        dataset.source.redis_url,
        free_port(),
        work_dir / f"history-{uuid.uuid4().hex[:8]}.log",
        extra_env={"HISTORY_SLOT_NAME": dataset.source.slot_name, **env},
    )


def _handled(metrics_port: int) -> int:
    """How many HistoryService calls a process answered, from its Prometheus metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return int(
        sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("grpc_server_handled_total{") and "/payments.history.v1." in line
        )
    )


async def test_the_docs_client_reads_every_page(dataset: Dataset, tmp_path: Path) -> None:
    client = docs_client()
    with history_processes(lambda _: _process(dataset, tmp_path), 3) as processes:
        pages = await client["sent_payments"]([p.address for p in processes], dataset.payer, service_token())
    assert [view.payment_id for page in pages for view in page.payments] == dataset.sent


async def test_three_processes_keep_answering_while_one_is_killed_and_restarted(
    dataset: Dataset, tmp_path: Path
) -> None:
    metrics_ports = [free_port() for _ in range(3)]

    def make(index: int) -> HistoryProcess:
        return _process(
            dataset,
            tmp_path,
            HISTORY_METRICS_PORT=str(metrics_ports[index]),
            HISTORY_MAX_CONNECTION_AGE_SECONDS="3",
            HISTORY_GRACE_SECONDS="1",
        )

    client = docs_client()
    credentials = client["bearer"](service_token())
    successes = 0
    failures: list[str] = []
    stop = asyncio.Event()

    async def reader(stub: history_service_pb2_grpc.HistoryServiceAsyncStub, index: int) -> None:
        nonlocal successes
        turn = index
        while not stop.is_set():
            turn += 1
            try:
                if turn % 3 == 0:
                    payment_id = dataset.sent[turn % len(dataset.sent)]
                    reply = await stub.GetPayment(
                        pb.GetPaymentRequest(payment_id=payment_id), timeout=10, metadata=credentials
                    )
                    assert reply.payment.payment_id == payment_id
                elif turn % 3 == 1:
                    account = await stub.GetAccount(
                        pb.GetAccountRequest(account_id=dataset.payer), timeout=10, metadata=credentials
                    )
                    assert account.account.counts.sent_approved == len(dataset.sent)
                else:
                    # Pages of one walk land on different processes: the token is good on all.
                    request = pb.ListPaymentsRequest(account_id=dataset.payer, direction=ALL, page_size=5)
                    ids: list[str] = []
                    while True:
                        page = await stub.ListPayments(request, timeout=10, metadata=credentials)
                        ids += [view.payment_id for view in page.payments]
                        if not page.next_page_token:
                            break
                        request.page_token = page.next_page_token
                    assert ids == dataset.sent
                successes += 1
            except (grpc.aio.AioRpcError, AssertionError) as error:
                if isinstance(error, grpc.aio.AioRpcError):
                    info = error_info(error)
                    failures.append(f"{error.code().name} {info.reason if info else ''}")
                else:
                    failures.append(f"wrong answer: {error}")

    with history_processes(make, 3) as processes:
        async with client["history_channel"]([p.address for p in processes]) as channel:
            stub: history_service_pb2_grpc.HistoryServiceAsyncStub = (
                history_service_pb2_grpc.HistoryServiceStub(channel)
            )
            readers = [asyncio.create_task(reader(stub, index)) for index in range(4)]
            try:
                await eventually(lambda: successes >= 40, within_s=60)
                assert all(await asyncio.to_thread(lambda: [_handled(port) > 0 for port in metrics_ports]))

                victim = processes[1]
                victim.kill()
                mark = successes
                await eventually(lambda: successes >= mark + 40, within_s=60)

                victim.start()
                await asyncio.to_thread(victim.wait_serving)
                # The restarted process gets its share again once the channel reconnects to it.
                await eventually(lambda: asyncio.to_thread(_handled, metrics_ports[1]), within_s=60)
                mark = successes
                await eventually(lambda: successes >= mark + 40, within_s=60)
            finally:
                stop.set()
                await asyncio.gather(*readers)
    assert failures == []


async def test_sigterm_ends_watch_streams_and_exits_cleanly(dataset: Dataset, tmp_path: Path) -> None:
    process = _process(dataset, tmp_path)
    with history_processes(lambda _: process, 1):
        async with aio_channel(process.address) as channel:
            stub = history_service_pb2_grpc.HistoryServiceStub(channel)
            stream = stub.WatchPayments(pb.WatchPaymentsRequest(account_id=dataset.payee))
            await stream.initial_metadata()
            code = await asyncio.to_thread(process.terminate)
            async with asyncio.timeout(20):
                assert [message async for message in stream] == []
            assert await stream.code() == grpc.StatusCode.OK
    assert code == 0
    assert "Traceback" not in process.log_path.read_text()


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"HISTORY_REDIS_URL": "redis://127.0.0.1:1/0"},
        {"HISTORY_REDIS_URL": "redis://127.0.0.1:1/0", "HISTORY_PAGE_TOKEN_SECRET": "too-short"},
    ],
)
def test_missing_settings_stop_start_up_with_exit_code_2(env: dict[str, str]) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("HISTORY_")}
    result = subprocess.run(
        [sys.executable, "-m", "history_svc", "serve"],
        env={**clean, "PYTHONPATH": str(ROOT), **env},
        cwd=ROOT,
        capture_output=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert b"Traceback" not in result.stderr
