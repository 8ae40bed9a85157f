"""Figure 2, the read path: history GetPayment and ListPayments, closed loop, on one process and then on two."""

from __future__ import annotations

from bench.runner import Runner
from stack.clients import history_target

CALLS = (("history_get", "get_payment"), ("history_list", "list_payments"))


def measure(runner: Runner, floor_us: float) -> None:
    """One repetition: `history.<call>_<processes>` for each call on 1 and 2 processes."""
    addrs = runner.endpoints["HISTORY_ADDRS"].split(",")
    for processes in (1, 2):
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
            )
