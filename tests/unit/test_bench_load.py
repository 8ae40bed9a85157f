"""The load generators' own bookkeeping: the reads in turn, and an open loop's calls served inside its window."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

from bench.figures import Window
from bench.load import Job, make_call, open_loop


class _Recorder:
    """A channel whose calls only note the method they were made for."""

    def __init__(self) -> None:
        self.methods: list[str] = []

    def _call(self, method: str, **_: Any) -> Any:
        def call(request: Any, **__: Any) -> str:
            self.methods.append(method.rsplit("/", 1)[1])
            return method

        return call

    unary_unary = unary_stream = _call


def test_mixed_reads_take_getpayment_and_listpayments_in_turn() -> None:
    channel = _Recorder()
    job = Job(
        mode="open",
        call="history_mixed",
        target="",
        start_at=0.0,
        duration_s=1.0,
        payment_ids=("00000000-0000-0000-0000-000000000001",),
        account_ids=("00000000-0000-0000-0000-000000000002",),
    )
    call = make_call(job, channel, random.Random(1))  # type: ignore[arg-type]
    for _ in range(6):
        call()
    assert channel.methods == ["GetPayment", "ListPayments"] * 3


async def test_an_open_loop_past_its_server_serves_fewer_calls_in_its_window_than_were_due() -> None:
    # One call at a time, 20 ms each: 50 calls/s served, 200/s offered.
    server = asyncio.Semaphore(1)

    async def call() -> None:
        async with server:
            await asyncio.sleep(0.02)

    job = Job(
        mode="open",
        call="history_get",
        target="",
        start_at=time.monotonic() + 0.05,
        duration_s=0.5,
        warmup_s=0.0,
        rate=200.0,
    )
    result = await open_loop(job, call)
    assert result.completed >= 99  # every call due in the window (100) returned, at last
    assert result.served <= 30  # at most 0.5 s / 20 ms, and a late start only lowers it
    assert Window.of([result, result], 0.5, {}).served == 2 * result.served
