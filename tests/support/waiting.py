"""Waiting for what another process or task brings about: a condition polled until it holds, or a deadline.

Only where nothing can tell the test that the condition holds (another process's state,
its log, a metric); never to let time pass.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


async def eventually(
    check: Callable[[], Any], within_s: float = 30.0, what: str = "the condition", interval: float = 0.05
) -> Any:
    """Polls `check` (plain, or returning an awaitable) until it returns a truthy value, and returns that value.

    Fails with `what` once `within_s` seconds have passed.
    """
    deadline = time.monotonic() + within_s
    while True:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not reached within {within_s}s (last: {last!r})")
        await asyncio.sleep(interval)


def wait_until(
    check: Callable[[], object],
    within_s: float = 30.0,
    what: str = "the condition",
    interval: float = 0.02,
    detail: Callable[[], str] | None = None,
) -> None:
    """The blocking `eventually`, for tests and threads without an event loop.

    `detail` adds to the failure what helps to explain it (a process's log, say).
    """
    deadline = time.monotonic() + within_s
    while not check():
        if time.monotonic() >= deadline:
            more = f"\n{detail()}" if detail is not None else ""
            raise AssertionError(f"{what}: not reached within {within_s}s{more}")
        time.sleep(interval)
