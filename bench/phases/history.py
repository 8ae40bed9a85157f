"""Figure 2, the read path: history GetPayment and ListPayments, closed loop, on one process and then on more."""

from __future__ import annotations

from collections.abc import Sequence

from bench.runner import Runner
from stack.clients import history_target

CALLS = (("history_get", "get_payment"), ("history_list", "list_payments"))


def measure(
    runner: Runner, floor_us: float | None, counts: Sequence[int] = (1, 2), *, redis_cpu: bool = False
) -> None:
    """One repetition: `history.<call>_<processes>` for each call on each of `counts` processes.

    Without a floor (`floor_us` None) there is no ratio to it; with `redis_cpu` each
    figure also has the CPU of every Redis process per RPC.
    """
    addrs = runner.endpoints["HISTORY_ADDRS"].split(",")
    if max(counts) > len(addrs):
        raise ValueError(f"{max(counts)} history processes wanted, the stack has {len(addrs)}")
    for processes in counts:
        target = history_target(addrs[:processes])
        names = [f"history-{i}" for i in range(1, processes + 1)]
        for call, figure in CALLS:
            runner.closed_loop_figure(
                f"history.{figure}_{processes}",
                call,
                target,
                server="history",
                floor_us=floor_us,
                processes=names,
                history_channel=True,
                redis_cpu=redis_cpu,
            )
