"""The benchmark's outputs: the required figures and the targets, the JSON file, a Markdown table and a PNG latency chart."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Final

from payments_common.tracing import DEFAULT_SAMPLE_RATIO

# The configurations of the tracing figures (bench/phases/tracing.py), `off` first.
TRACING_CONFIGS: Final = ("off", "sampled_all", "default_ratio")
_RATIO: Final = f"{float(DEFAULT_SAMPLE_RATIO):.0%}"

# Every figure of the results file, as "figures.<path>"; each is a spread of repetitions
# ({"median", "min", "max", "reps"}). The smoke test checks that all are there and finite.
_READ_METRICS: Final = ("throughput_rps", "p50_ms", "p99_ms", "server_cpu_us_per_rpc", "cpu_ratio_to_floor")
_CRUD_METRICS: Final = (
    "crud_throughput_rps",
    "crud_p50_ms",
    "crud_p99_ms",
    "history_throughput_rps",
    "history_p50_ms",
    "history_p99_ms",
    "p50_ratio",
    "p99_ratio",
    "crud_server_cpu_us_per_rpc",
    "pg_cpu_us_per_read_crud",
    "pg_cpu_us_per_read_history",
    "redis_cpu_us_per_read_history",
)
_OFFLOAD_METRICS: Final = (
    "write_throughput_rps",
    "write_p50_ms",
    "write_p99_ms",
    "postgres_cpu_us_per_write",
    "read_rate_offered",
    "read_rate_achieved",
    "read_p99_ms",
    "read_failed",
    "read_sustained",
)
REQUIRED_FIGURES: Final[tuple[str, ...]] = (
    *(f"echo_floor.{m}" for m in ("throughput_rps", "p50_ms", "p99_ms", "server_cpu_us_per_rpc")),
    *(f"approval_submit.{m}" for m in _READ_METRICS),
    "approval_submit.postgres_cpu_us_per_rpc",
    *(
        f"history.{name}.{m}"
        for name in ("get_payment_1", "get_payment_2", "list_payments_1", "list_payments_2")
        for m in _READ_METRICS
    ),
    *(f"crud_baseline.{query}.{m}" for query in ("get_payment", "list_payments") for m in _CRUD_METRICS),
    "crud_baseline.write_rate_achieved",
    *(f"offload.{side}.{m}" for side in ("crud", "history") for m in _OFFLOAD_METRICS),
    "offload.write_throughput_ratio",
    "offload.write_p99_ratio",
    *(
        f"replication.{figure}.{m}"
        for figure in ("commit_to_visible", "commit_to_visible_sustained", "commit_to_visible_80pct")
        for m in ("p50_ms", "p99_ms", "max_ms", "submit_to_visible_p99_ms", "achieved_rate")
    ),
    "replication.commit_to_visible_80pct.offered_rate",
    *(
        f"replication.{figure}.{stage}_{q}_ms"
        for figure in ("commit_to_visible", "commit_to_visible_sustained", "commit_to_visible_80pct")
        for stage in (
            "replicator_commit_to_send",
            "replicator_commit_to_receive",
            "replicator_commit_to_apply",
            "history_apply_to_watch",
        )
        for q in ("p50", "p99")
    ),
    *(
        f"replication.drain.{m}"
        for m in ("changes", "changes_per_s", "changes_per_s_steady", "startup_s", "cpu_us_per_change")
    ),
    *(
        f"tracing.approval_submit.{config}.{m}"
        for config in TRACING_CONFIGS
        for m in ("throughput_rps", "p50_ms", "p99_ms", "server_cpu_us_per_rpc", "postgres_cpu_us_per_rpc")
    ),
    *(
        f"tracing.{figure}.{config}.{m}"
        for figure in ("approval_submit", "drain")
        for config in TRACING_CONFIGS[1:]
        for m in ("throughput_ratio_to_off", "cpu_ratio_to_off")
    ),
    *(
        f"tracing.drain.{config}.{m}"
        for config in TRACING_CONFIGS
        for m in ("changes_per_s", "changes_per_s_steady", "cpu_us_per_change", "traced_transactions")
    ),
    *(f"tracing.exported.approval.{config}.{m}" for config in TRACING_CONFIGS for m in ("spans", "calls")),
    *(f"tracing.exported.replicator.{config}.spans" for config in TRACING_CONFIGS),
    *(f"tracing.exported.replicator.{config}.spans_per_traced_transaction" for config in TRACING_CONFIGS[1:]),
    *(
        f"large_transaction.{m}"
        for m in (
            "changes",
            "commit_to_applied_s",
            "changes_per_s",
            "cpu_us_per_change",
            "rss_before_mb",
            "peak_rss_mb",
            "peak_rss_growth_mb",
        )
    ),
)


def lookup(results: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path under results["figures"]; KeyError when absent."""
    node: Any = results["figures"]
    for part in path.split("."):
        node = node[part]
    return node


# The goals: (name, goal as text, figure path, check of the median).
_TARGETS: tuple[tuple[str, str, str, Callable[[float], bool]], ...] = (
    ("Replicator drain", "≥ 30,000 row changes/s", "replication.drain.changes_per_s", lambda v: v >= 30_000),
    (
        "Replicator CPU per change",
        "≤ 18 µs",
        "replication.drain.cpu_us_per_change",
        lambda v: v <= 18,
    ),
    (
        "Commit-to-visible p99 at 500 payments/s",
        "≤ 15 ms",
        "replication.commit_to_visible.p99_ms",
        lambda v: v <= 15,
    ),
    (
        "Commit-to-visible p99 at 80% of approval's sustained rate",
        "≤ 15 ms",
        "replication.commit_to_visible_80pct.p99_ms",
        lambda v: v <= 15,
    ),
    (
        "History GetPayment CPU per RPC ÷ floor",
        "≤ 1.5x",
        "history.get_payment_1.cpu_ratio_to_floor",
        lambda v: v <= 1.5,
    ),
    (
        "History ListPayments CPU per RPC ÷ floor",
        "≤ 2.5x",
        "history.list_payments_1.cpu_ratio_to_floor",
        lambda v: v <= 2.5,
    ),
    (
        "GetPayment p99: CRUD ÷ history, under writes",
        "≥ 3x",
        "crud_baseline.get_payment.p99_ratio",
        lambda v: v >= 3,
    ),
    (
        "ListPayments p99: CRUD ÷ history, under writes",
        "≥ 3x",
        "crud_baseline.list_payments.p99_ratio",
        lambda v: v >= 3,
    ),
    (
        "Approval SubmitPayment throughput",
        "≥ 1,000 payments/s",
        "approval_submit.throughput_rps",
        lambda v: v >= 1000,
    ),
    (
        "Approval SubmitPayment CPU per payment ÷ floor",
        "≤ 2.5x",
        "approval_submit.cpu_ratio_to_floor",
        lambda v: v <= 2.5,
    ),
)


def targets(figures: dict[str, Any]) -> list[dict[str, Any]]:
    """Each target with the median it is judged on and whether it is met (None when the figure is missing)."""
    found = []
    for name, goal, path, check in _TARGETS:
        try:
            value = float(lookup({"figures": figures}, path)["median"])
        except (KeyError, TypeError):
            value = math.nan
        found.append(
            {
                "name": name,
                "goal": goal,
                "figure": path,
                "value": value,
                "met": None if math.isnan(value) else check(value),
            }
        )
    return found


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def missing_figures(results: Mapping[str, Any]) -> list[str]:
    """The required figures that are absent or not finite numbers (median, min and max)."""
    missing = []
    for path in REQUIRED_FIGURES:
        try:
            spread = lookup(results, path)
        except (KeyError, TypeError):
            missing.append(path)
            continue
        if not isinstance(spread, Mapping) or not all(
            _finite(spread.get(k)) for k in ("median", "min", "max")
        ):
            missing.append(path)
    return missing


def _clean(value: Any) -> Any:
    """NaN and infinities become null: the file stays strict JSON and a missing figure shows."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


def write_json(results: Mapping[str, Any], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_clean(results), indent=2, allow_nan=False) + "\n")


def _each(figure: str, metric: str, traced: bool = False) -> str:
    """The paths of `metric` of a tracing figure, one per configuration (the traced ones only, or all)."""
    configs = TRACING_CONFIGS[1:] if traced else TRACING_CONFIGS
    return "|".join(f"tracing.{figure}.{config}.{metric}" for config in configs)


# Rows of the table: (label, figure path, unit, format).
_ROWS: Final[tuple[tuple[str, str, str], ...]] = (
    ("gRPC floor (echo), throughput", "echo_floor.throughput_rps", "RPC/s"),
    ("gRPC floor (echo), p50 / p99", "echo_floor.p50_ms|echo_floor.p99_ms", "ms"),
    ("gRPC floor (echo), server CPU per RPC", "echo_floor.server_cpu_us_per_rpc", "µs"),
    ("Approval SubmitPayment, throughput", "approval_submit.throughput_rps", "payments/s"),
    ("Approval SubmitPayment, p50 / p99", "approval_submit.p50_ms|approval_submit.p99_ms", "ms"),
    ("Approval SubmitPayment, server CPU per RPC", "approval_submit.server_cpu_us_per_rpc", "µs"),
    ("Approval SubmitPayment, CPU ÷ floor", "approval_submit.cpu_ratio_to_floor", "x"),
    ("Approval SubmitPayment, PostgreSQL CPU per payment", "approval_submit.postgres_cpu_us_per_rpc", "µs"),
    ("History GetPayment x1 process, throughput", "history.get_payment_1.throughput_rps", "RPC/s"),
    ("History GetPayment x1, p50 / p99", "history.get_payment_1.p50_ms|history.get_payment_1.p99_ms", "ms"),
    ("History GetPayment x2 processes, throughput", "history.get_payment_2.throughput_rps", "RPC/s"),
    ("History GetPayment x2, p50 / p99", "history.get_payment_2.p50_ms|history.get_payment_2.p99_ms", "ms"),
    ("History GetPayment, server CPU per RPC", "history.get_payment_1.server_cpu_us_per_rpc", "µs"),
    ("History GetPayment, CPU ÷ floor", "history.get_payment_1.cpu_ratio_to_floor", "x"),
    ("History ListPayments(20) x1, throughput", "history.list_payments_1.throughput_rps", "RPC/s"),
    (
        "History ListPayments(20) x1, p50 / p99",
        "history.list_payments_1.p50_ms|history.list_payments_1.p99_ms",
        "ms",
    ),
    ("History ListPayments(20) x2, throughput", "history.list_payments_2.throughput_rps", "RPC/s"),
    (
        "History ListPayments(20) x2, p50 / p99",
        "history.list_payments_2.p50_ms|history.list_payments_2.p99_ms",
        "ms",
    ),
    ("History ListPayments, server CPU per RPC", "history.list_payments_1.server_cpu_us_per_rpc", "µs"),
    ("History ListPayments, CPU ÷ floor", "history.list_payments_1.cpu_ratio_to_floor", "x"),
    (
        "Under writes: GetPayment p50 / p99, CRUD",
        "crud_baseline.get_payment.crud_p50_ms|crud_baseline.get_payment.crud_p99_ms",
        "ms",
    ),
    (
        "Under writes: GetPayment p50 / p99, history",
        "crud_baseline.get_payment.history_p50_ms|crud_baseline.get_payment.history_p99_ms",
        "ms",
    ),
    ("Under writes: GetPayment p99, CRUD ÷ history", "crud_baseline.get_payment.p99_ratio", "x"),
    ("Under writes: approval writes/s achieved", "crud_baseline.write_rate_achieved", "payments/s"),
    (
        "Under writes: GetPayment PostgreSQL CPU per read, CRUD",
        "crud_baseline.get_payment.pg_cpu_us_per_read_crud",
        "µs",
    ),
    (
        "Under writes: GetPayment PostgreSQL CPU per read, history",
        "crud_baseline.get_payment.pg_cpu_us_per_read_history",
        "µs",
    ),
    (
        "Under writes: ListPayments p50 / p99, CRUD",
        "crud_baseline.list_payments.crud_p50_ms|crud_baseline.list_payments.crud_p99_ms",
        "ms",
    ),
    (
        "Under writes: ListPayments p50 / p99, history",
        "crud_baseline.list_payments.history_p50_ms|crud_baseline.list_payments.history_p99_ms",
        "ms",
    ),
    ("Under writes: ListPayments p99, CRUD ÷ history", "crud_baseline.list_payments.p99_ratio", "x"),
    (
        "Under writes: ListPayments PostgreSQL CPU per read, CRUD",
        "crud_baseline.list_payments.pg_cpu_us_per_read_crud",
        "µs",
    ),
    (
        "Under writes: ListPayments PostgreSQL CPU per read, history",
        "crud_baseline.list_payments.pg_cpu_us_per_read_history",
        "µs",
    ),
    (
        "Under heavy reads: reads/s offered; served with CRUD / history",
        "offload.crud.read_rate_offered|offload.crud.read_rate_achieved|offload.history.read_rate_achieved",
        "reads/s",
    ),
    (
        "Under heavy reads: reads failed or dropped, CRUD / history",
        "offload.crud.read_failed|offload.history.read_failed",
        "reads",
    ),
    (
        "Under heavy reads: read load sustained (1 yes, 0 no), CRUD / history",
        "offload.crud.read_sustained|offload.history.read_sustained",
        "",
    ),
    (
        "Under heavy reads: reads p99, CRUD / history",
        "offload.crud.read_p99_ms|offload.history.read_p99_ms",
        "ms",
    ),
    (
        "Under heavy reads: SubmitPayment throughput, CRUD reads / history reads",
        "offload.crud.write_throughput_rps|offload.history.write_throughput_rps",
        "payments/s",
    ),
    (
        "Under heavy reads: SubmitPayment p50 / p99, CRUD reads",
        "offload.crud.write_p50_ms|offload.crud.write_p99_ms",
        "ms",
    ),
    (
        "Under heavy reads: SubmitPayment p50 / p99, history reads",
        "offload.history.write_p50_ms|offload.history.write_p99_ms",
        "ms",
    ),
    ("Under heavy reads: write throughput, history ÷ CRUD", "offload.write_throughput_ratio", "x"),
    ("Under heavy reads: write p99, CRUD ÷ history", "offload.write_p99_ratio", "x"),
    (
        "Under heavy reads: PostgreSQL CPU per write, CRUD reads / history reads",
        "offload.crud.postgres_cpu_us_per_write|offload.history.postgres_cpu_us_per_write",
        "µs",
    ),
    (
        "Commit-to-visible at 500/s p50 / p99",
        "replication.commit_to_visible.p50_ms|replication.commit_to_visible.p99_ms",
        "ms",
    ),
    ("Commit-to-visible max", "replication.commit_to_visible.max_ms", "ms"),
    (
        "Commit-to-visible at 500/s: payments/s acknowledged",
        "replication.commit_to_visible.achieved_rate",
        "payments/s",
    ),
    ("Submit-to-visible at 500/s p99", "replication.commit_to_visible.submit_to_visible_p99_ms", "ms"),
    (
        "Commit-to-visible at 100/s (sustained) p50 / p99",
        "replication.commit_to_visible_sustained.p50_ms|replication.commit_to_visible_sustained.p99_ms",
        "ms",
    ),
    ("Commit-to-visible at 100/s max", "replication.commit_to_visible_sustained.max_ms", "ms"),
    (
        "Commit-to-visible at 80% of approval's rate: payments/s offered / acknowledged",
        "replication.commit_to_visible_80pct.offered_rate|replication.commit_to_visible_80pct.achieved_rate",
        "payments/s",
    ),
    (
        "Commit-to-visible at 80% of approval's rate p50 / p99 / max",
        "replication.commit_to_visible_80pct.p50_ms|replication.commit_to_visible_80pct.p99_ms"
        "|replication.commit_to_visible_80pct.max_ms",
        "ms",
    ),
    *(
        (
            f"Commit-to-visible {label}, by stage: commit to sent by the walsender p50 / p99; to read "
            "by the replicator p50 / p99; to applied in Redis p50 / p99; appended to handed to the "
            "watch streams (history) p50 / p99",
            f"replication.{figure}.replicator_commit_to_send_p50_ms"
            f"|replication.{figure}.replicator_commit_to_send_p99_ms"
            f"|replication.{figure}.replicator_commit_to_receive_p50_ms"
            f"|replication.{figure}.replicator_commit_to_receive_p99_ms"
            f"|replication.{figure}.replicator_commit_to_apply_p50_ms"
            f"|replication.{figure}.replicator_commit_to_apply_p99_ms"
            f"|replication.{figure}.history_apply_to_watch_p50_ms"
            f"|replication.{figure}.history_apply_to_watch_p99_ms",
            "ms",
        )
        for figure, label in (
            ("commit_to_visible_sustained", "at 100/s"),
            ("commit_to_visible", "at 500/s"),
            ("commit_to_visible_80pct", "at 80%"),
        )
    ),
    ("Replicator drain (from restart)", "replication.drain.changes_per_s", "changes/s"),
    ("Replicator drain (steady, after first apply)", "replication.drain.changes_per_s_steady", "changes/s"),
    ("Replicator CPU per change", "replication.drain.cpu_us_per_change", "µs"),
    ("Large transaction: row changes in one INSERT", "large_transaction.changes", "changes"),
    ("Large transaction: from its commit to the checkpoint", "large_transaction.commit_to_applied_s", "s"),
    ("Large transaction: changes applied per second", "large_transaction.changes_per_s", "changes/s"),
    ("Large transaction: replicator CPU per change", "large_transaction.cpu_us_per_change", "µs"),
    (
        "Large transaction: replicator RSS before / peak during (VmHWM reset at the commit)",
        "large_transaction.rss_before_mb|large_transaction.peak_rss_mb",
        "MB",
    ),
    *(
        (f"Tracing off / all / {_RATIO}: {label}", _each(figure, metric), unit)
        for label, figure, metric, unit in (
            ("SubmitPayment throughput", "approval_submit", "throughput_rps", "payments/s"),
            ("SubmitPayment server CPU per RPC", "approval_submit", "server_cpu_us_per_rpc", "µs"),
            ("SubmitPayment PostgreSQL CPU per payment", "approval_submit", "postgres_cpu_us_per_rpc", "µs"),
            ("drain", "drain", "changes_per_s", "changes/s"),
            ("replicator CPU per change", "drain", "cpu_us_per_change", "µs"),
            ("replicator CPU per change, after the first apply", "drain", "cpu_us_per_change_steady", "µs"),
        )
    ),
    *(
        (
            f"Tracing all / {_RATIO} ÷ off: {label}",
            _each(figure, metric, traced=True),
            "x",
        )
        for label, figure, metric in (
            ("SubmitPayment throughput", "approval_submit", "throughput_ratio_to_off"),
            ("SubmitPayment server CPU per RPC", "approval_submit", "cpu_ratio_to_off"),
            ("drain throughput", "drain", "throughput_ratio_to_off"),
            ("replicator CPU per change", "drain", "cpu_ratio_to_off"),
            ("replicator CPU per change, after the first apply", "drain", "steady_cpu_ratio_to_off"),
        )
    ),
    (
        f"Tracing off / all / {_RATIO}: spans received from approval",
        _each("exported.approval", "spans"),
        "spans",
    ),
    (
        f"Tracing all / {_RATIO}: spans per SubmitPayment answered",
        _each("exported.approval", "spans_per_call", traced=True),
        "spans",
    ),
    (
        f"Tracing off / all / {_RATIO}: spans received from the replicator",
        _each("exported.replicator", "spans"),
        "spans",
    ),
    (
        f"Tracing all / {_RATIO}: spans per traced transaction drained",
        _each("exported.replicator", "spans_per_traced_transaction", traced=True),
        "spans",
    ),
)


def number(value: float) -> str:
    """A figure as the tables show it: thousands grouped, three significant digits below 1,000."""
    if not math.isfinite(value):
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _spread_text(results: Mapping[str, Any], path: str) -> tuple[str, str]:
    try:
        spread = lookup(results, path)
        median, low, high = (
            float(spread[k]) if spread[k] is not None else math.nan for k in ("median", "min", "max")
        )
    except (KeyError, TypeError):
        return "n/a", ""
    return number(median), f"{number(low)}-{number(high)}"


def rows(results: Mapping[str, Any]) -> Iterator[tuple[str, str, str, str]]:
    """(figure, median, min-max, unit) for each row of the table."""
    for label, paths, unit in _ROWS:
        medians, ranges = zip(*(_spread_text(results, p) for p in paths.split("|")), strict=True)
        yield label, " / ".join(medians), " / ".join(r for r in ranges if r), unit


def markdown_table(results: Mapping[str, Any], *, skip_absent: bool = False) -> str:
    """The table of every row; with `skip_absent`, without the rows of figures that were not measured."""
    reps = results.get("settings", {}).get("reps", "?")
    lines = [
        f"| figure | median of {reps} | min-max | unit |",
        "|---|---:|---:|---|",
        *(
            f"| {label} | {median} | {span} | {unit} |"
            for label, median, span, unit in rows(results)
            if not (skip_absent and not span)
        ),
    ]
    return "\n".join(lines)


def targets_table(results: Mapping[str, Any]) -> str:
    lines = ["| target | goal | measured (median) | met |", "|---|---|---:|---|"]
    for target in results.get("targets", []):
        value = target.get("value")
        shown = number(float(value)) if isinstance(value, int | float) else "n/a"
        met = {True: "yes", False: "**no**"}.get(target.get("met"), "n/a")
        lines.append(f"| {target['name']} | {target['goal']} | {shown} | {met} |")
    return "\n".join(lines)


def write_chart(results: Mapping[str, Any], path: Path) -> None:
    """Latency percentiles against offered load, one panel per service, log-scaled latency."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps: Mapping[str, list[Mapping[str, Any]]] = results.get("sweeps", {})
    names = list(sweeps)
    columns = 2
    count = max(1, len(names))
    rows_ = (count + columns - 1) // columns
    figure, axes = plt.subplots(rows_, columns, figsize=(11, 4.2 * rows_), squeeze=False)
    for index, name in enumerate(names):
        axis = axes[index // columns][index % columns]
        points = [p for p in sweeps[name] if p.get("p50_ms") is not None]
        offered = [p["offered_rps"] for p in points]
        for key, style in (("p50_ms", "o-"), ("p90_ms", "s--"), ("p99_ms", "^-")):
            axis.plot(offered, [p[key] for p in points], style, label=key.removesuffix("_ms"))
        axis.set_title(name, fontsize=10)
        axis.set_xlabel("offered load (calls/s, open loop)")
        axis.set_ylabel("latency (ms)")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    for index in range(len(names), rows_ * columns):
        axes[index // columns][index % columns].axis("off")
    machine = results.get("machine", {})
    figure.suptitle(
        f"Latency vs offered load ({results.get('mode', '?')} run, {machine.get('cpus', '?')} CPUs, "
        f"{machine.get('cpu_model', '?')})",
        fontsize=11,
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
