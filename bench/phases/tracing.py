"""The cost of tracing on the write path and on the drain: off, every request traced, and the default ratio, in one run.

Three configurations, measured in turn within each repetition (the order rotates from one
repetition to the next), with the spans exported over OTLP/gRPC to a receiver in a
process of its own that only counts them (`python -m stack.otlp`):

- `off`: OTEL_TRACES_EXPORTER=none, tracing off as the services run by default.
- `sampled_all`: tracing on with the default sampler, and every request traced by its
  caller: each SubmitPayment carries a sampled W3C traceparent of a trace of its own, so
  approval follows it, makes its spans, writes the trace context into the transaction and
  exports; every transaction of the drain's backlog carries that trace context.
- `default_ratio`: the same services, requests without a traceparent: approval samples
  DEFAULT_SAMPLE_RATIO of them itself, and that share of the backlog's transactions
  carries a trace context.

SubmitPayment runs on three approval processes of this phase, started with the stack's
approval's own environment and differing only in their OTEL_* variables, closed loop at the
plan's concurrency. The drain is `bench.phases.drain.once` with the replicator restarted
under each configuration's variables. Each repetition also gives the ratios traced ÷ off
of throughput and CPU. The receiver's counts, by the service names given to each
configuration, say how many spans each exported; a process exports its last spans when
it stops, so they are read once every traced process has stopped.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from bench import scrape, stats
from bench.figures import Window, read_metrics
from bench.phases import drain
from bench.runner import Runner
from payments_common.tracing import DEFAULT_SAMPLE_RATIO
from stack import local
from stack.otlp import read_counts
from stack.servers import free_port

SUBMIT_METHOD: Final = "/payments.approval.v1.ApprovalService/SubmitPayment"
# The spans of one traced transaction in the replicator (`replicate`, `replication lag`,
# `apply to Redis`). A traced SubmitPayment makes at least 2 in approval, the call's and
# `commit`: one more `commit` when the decision is taken again under the locks.
REPLICATOR_SPANS_PER_TRANSACTION: Final = 3
SINK: Final = "otlp-sink"


@dataclass(frozen=True)
class Config:
    """One configuration of tracing: the services' exporter, the load's trace context, the backlog's traced share."""

    key: str
    exporter: str  # OTEL_TRACES_EXPORTER
    traced_calls: bool  # every SubmitPayment carries a sampled traceparent
    traced_share: float  # of the drain backlog's transactions

    def env(self, service: str, endpoint: str) -> dict[str, str]:
        """The OTEL_* variables of a process of `service` in this configuration.

        The sampler is left at the services' default whatever this process's environment says.
        """
        return {
            "OTEL_TRACES_EXPORTER": self.exporter,
            "OTEL_SDK_DISABLED": "",
            "OTEL_TRACES_SAMPLER": "",
            "OTEL_TRACES_SAMPLER_ARG": "",
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "OTEL_EXPORTER_OTLP_INSECURE": "true",
            "OTEL_SERVICE_NAME": service_name(service, self),
        }


OFF: Final = Config("off", "none", traced_calls=False, traced_share=0.0)
SAMPLED_ALL: Final = Config("sampled_all", "otlp", traced_calls=True, traced_share=1.0)
DEFAULT_RATIO: Final = Config(
    "default_ratio", "otlp", traced_calls=False, traced_share=float(DEFAULT_SAMPLE_RATIO)
)
CONFIGS: Final[tuple[Config, ...]] = (OFF, SAMPLED_ALL, DEFAULT_RATIO)


def service_name(service: str, config: Config) -> str:
    return f"{service}-bench-{config.key}"


def rotated(configs: Sequence[Config], rep: int) -> list[Config]:
    """The configurations in the order of repetition `rep`: each takes each place in turn."""
    shift = rep % len(configs)
    return [*configs[shift:], *configs[:shift]]


def drain_order(rep: int, reps: int) -> list[Config]:
    """`rotated`, shifted so that the last repetition ends with `off`.

    The replicator left running is then untraced, as the stack's, and each traced one has
    exported its last spans as it stopped, without one more restart.
    """
    return rotated(CONFIGS, rep + 2 - reps)


def run(runner: Runner) -> None:
    endpoint, counts_path = start_sink(runner)
    # The processes start together; none exports before its first window.
    approvals = start_approvals(runner, endpoint, CONFIGS)
    wait_sink(runner, counts_path)
    served = submit_figures(runner, approvals)
    traced = drain_figures(runner, endpoint)
    runner.stop_servers(SINK)
    add_span_counts(runner, read_counts(counts_path), served, traced)


def start_sink(runner: Runner) -> tuple[str, Path]:
    """Starts the counting OTLP receiver, without waiting; returns its endpoint and its counts file."""
    counts = runner.root / "otlp-counts.json"
    port = free_port()
    runner.spawn(SINK, ["-m", "stack.otlp", "--port", str(port), "--counts", str(counts)])
    return f"http://127.0.0.1:{port}", counts


def wait_sink(runner: Runner, counts: Path, timeout: float = 30.0) -> None:
    """Returns once the counting receiver serves (its counts file appears then)."""
    deadline = time.monotonic() + timeout
    while not counts.exists():
        if runner.servers[SINK].poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the OTLP receiver did not start; see {runner.root / f'bench-{SINK}.log'}")
        time.sleep(0.05)


def _environ(pid: int) -> dict[str, str]:
    """A process's environment as it was started."""
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    return dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)


@dataclass(frozen=True)
class Approval:
    """An approval process of this phase: its server name in the runner, its address and its metrics port."""

    name: str
    addr: str
    metrics_port: int


def start_approvals(runner: Runner, endpoint: str, configs: Sequence[Config]) -> dict[str, Approval]:
    """Starts an approval process per configuration, with the stack's approval's environment, without waiting."""
    base = {
        name: value
        for name, value in _environ(runner.pid("approval")).items()
        if not name.startswith("OTEL_")
    }
    approvals = {}
    for config in configs:
        port, metrics_port = free_port(), free_port()
        env = {
            **base,
            "APPROVAL_PORT": str(port),
            "APPROVAL_METRICS_PORT": str(metrics_port),
            **config.env("approval-svc", endpoint),
        }
        approval = Approval(f"approval-{config.key}", f"127.0.0.1:{port}", metrics_port)
        runner.spawn(approval.name, ["-m", "approval_svc", "serve"], env)
        approvals[config.key] = approval
    return approvals


def _alive(process: subprocess.Popen[bytes]) -> Callable[[], bool]:
    return lambda: process.poll() is None


def wait_approvals(runner: Runner, approvals: Mapping[str, Approval]) -> None:
    for approval in approvals.values():
        local.wait_serving(approval.addr, 60, alive=_alive(runner.servers[approval.name]))


def submit_figures(runner: Runner, approvals: Mapping[str, Approval]) -> dict[str, float]:
    """SubmitPayment under each configuration, repetition by repetition; returns the calls each process served.

    The processes are stopped at the end, so that they export the spans they still hold.
    """
    plan = runner.plan
    try:
        wait_approvals(runner, approvals)
        for rep in range(plan.reps):
            windows: dict[str, Window] = {}
            for config in rotated(CONFIGS, rep):
                print(
                    f"== tracing {config.key}: SubmitPayment, repetition {rep + 1}/{plan.reps}",
                    flush=True,
                )
                name = approvals[config.key].name
                window = runner.measure(
                    runner.jobs(
                        "closed",
                        "approval_submit",
                        approvals[config.key].addr,
                        plan.concurrency,
                        traced=config.traced_calls,
                    ),
                    {"approval": runner.cpu_reader(name), "pg": runner.pg_cpu},
                    plan.window_s,
                    plan.warmup_s,
                )
                figure = f"tracing.approval_submit.{config.key}"
                runner.collector.add(figure, **submit_metrics(window))
                runner.collector.add_errors(figure, window.errors, window.dropped)
                windows[config.key] = window
                runner.settle()
                runner.wait_idle(name)
            for config in CONFIGS[1:]:
                runner.collector.add(
                    f"tracing.approval_submit.{config.key}",
                    **ratios_to_off(
                        submit_metrics(windows[config.key]), submit_metrics(windows[OFF.key]), SUBMIT_RATIOS
                    ),
                )
        return {key: float(submitted(approval.metrics_port)) for key, approval in approvals.items()}
    finally:
        runner.stop_servers(*(approval.name for approval in approvals.values()))


def submit_metrics(window: Window) -> dict[str, float]:
    """A SubmitPayment window: `read_metrics` and PostgreSQL's CPU per payment (its processes, the WAL sender's included)."""
    return {
        **read_metrics(window, "approval", None),
        "postgres_cpu_us_per_rpc": window.cpu_us_per_op("pg"),
    }


# What each ratio to `off` divides: (ratio's name, metric).
SUBMIT_RATIOS: Final = (
    ("throughput_ratio_to_off", "throughput_rps"),
    ("cpu_ratio_to_off", "server_cpu_us_per_rpc"),
    ("postgres_cpu_ratio_to_off", "postgres_cpu_us_per_rpc"),
)
DRAIN_RATIOS: Final = (
    ("throughput_ratio_to_off", "changes_per_s"),
    ("steady_throughput_ratio_to_off", "changes_per_s_steady"),
    ("cpu_ratio_to_off", "cpu_us_per_change"),
    ("steady_cpu_ratio_to_off", "cpu_us_per_change_steady"),
)


def ratios_to_off(
    traced: Mapping[str, float], off: Mapping[str, float], pairs: Sequence[tuple[str, str]]
) -> dict[str, float]:
    """A traced configuration's figures over those of `off` in the same repetition, as `pairs` name them."""
    return {name: stats.ratio(traced[metric], off[metric]) for name, metric in pairs}


def submitted(metrics_port: int) -> int:
    """The SubmitPayment calls that an approval process answered OK, from its Prometheus counter."""
    for family in scrape.families(f"127.0.0.1:{metrics_port}"):
        for sample in family.samples:
            if (
                sample.name == "grpc_server_handled_total"
                and sample.labels.get("grpc_method") == SUBMIT_METHOD
                and sample.labels.get("grpc_code") == "OK"
            ):
                return int(sample.value)
    return 0


def drain_figures(runner: Runner, endpoint: str) -> dict[str, float]:
    """The drain under each configuration, repetition by repetition; returns the traced transactions of each."""
    plan = runner.plan
    traced = {config.key: 0.0 for config in CONFIGS}
    last = OFF
    try:
        for rep in range(plan.drain_reps):
            drained: dict[str, dict[str, float]] = {}
            for config in drain_order(rep, plan.drain_reps):
                print(
                    f"== tracing {config.key}: drain of {plan.tracing_drain_payments:,} payments, "
                    f"repetition {rep + 1}/{plan.drain_reps}",
                    flush=True,
                )
                last = config
                once = drain.once(
                    runner,
                    runner.payers,
                    plan.tracing_drain_payments,
                    replicator_env=config.env("replicator", endpoint),
                    traced_share=config.traced_share,
                )
                drained[config.key] = {
                    **once.metrics(),
                    "cpu_us_per_change_steady": once.cpu_us_per_change_steady,
                }
                traced[config.key] += once.traced
                runner.collector.add(
                    f"tracing.drain.{config.key}", **drained[config.key], traced_transactions=once.traced
                )
            for config in CONFIGS[1:]:
                runner.collector.add(
                    f"tracing.drain.{config.key}",
                    **ratios_to_off(drained[config.key], drained[OFF.key], DRAIN_RATIOS),
                )
    except BaseException:
        if last is not OFF:
            # The stack gets an untraced replicator back (the traced one exports its last spans
            # as it stops); the drain's own error is the one to report.
            with contextlib.suppress(Exception):
                runner.stop_replicator()
                runner.start_replicator()
                runner.replicator_ready()
        raise
    return traced


def add_span_counts(
    runner: Runner, counts: Mapping[str, int], served: Mapping[str, float], traced: Mapping[str, float]
) -> None:
    """What the receiver counted from each configuration's processes, against what they should have sent.

    Every SubmitPayment answered by the `sampled_all` process should have sent at least 2
    spans (about DEFAULT_SAMPLE_RATIO of that at the default ratio, the calls' own
    sampling), and every traced transaction of a backlog REPLICATOR_SPANS_PER_TRANSACTION:
    fewer means spans were dropped (the SDK's batch processor drops what its queue cannot hold).
    """
    for config in CONFIGS:
        spans = float(counts.get(service_name("approval-svc", config), 0))
        calls = served.get(config.key, 0.0)
        runner.collector.add(
            f"tracing.exported.approval.{config.key}",
            spans=spans,
            calls=calls,
            spans_per_call=stats.ratio(spans, calls),
        )
        spans = float(counts.get(service_name("replicator", config), 0))
        transactions = traced.get(config.key, 0.0)
        figures = {"spans": spans, "traced_transactions": transactions}
        if config is not OFF:
            figures["spans_expected"] = REPLICATOR_SPANS_PER_TRANSACTION * transactions
            figures["spans_per_traced_transaction"] = stats.ratio(spans, transactions)
        runner.collector.add(f"tracing.exported.replicator.{config.key}", **figures)
