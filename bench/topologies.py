"""`python -m bench.topologies [--quick] [--reps N]`: the read path and the drain on one Redis and on a Redis Cluster, side by side.

Each repetition starts a fresh stack on one Redis, measures it and stops it, then does the
same on a Redis Cluster of 3 masters and 3 replicas (`STACK_REDIS=cluster`), so that the
two alternate and share the machine's conditions. On each stack, with the runner and the
phase code of `python -m bench`:

- history GetPayment and ListPayments(20), closed loop on 1, 2 and 3 history processes
  (bench/phases/history.py): throughput, p50/p99, history's CPU per RPC and the CPU of
  every Redis process per RPC;
- the CPU of every Redis process with the stack at rest, before the reads;
- the drain of a backlog (bench/phases/drain.py): changes/s from restart, the
  replicator's CPU per change and the CPU of every Redis process per change (on the
  cluster also the replicas' part of it);
- the commands that each master ran while the replicator drained (`INFO commandstats`
  before and after, the commands run inside scripts included), per payment replicated.

It writes the JSON (bench/results/topologies.json by default), every figure as the
median, min and max of its repetitions per topology, and the ratio cluster ÷ one Redis of
each repetition's pair, and prints Markdown tables. docs/benchmark.md, "One Redis or a
Redis Cluster", says how to read them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from bench import backlog, cpu, environment, report, stats
from bench.figures import Collector
from bench.phases import drain, history, seed
from bench.plan import TOPOLOGIES, TOPOLOGIES_QUICK, Plan
from bench.runner import Runner
from payments_common.keys import DEFAULT_SCHEMA, DEFAULT_SLOT_NAME
from payments_common.redisconn import sync_client
from stack import local
from stack.clients import history_target
from stack.servers import RedisCluster as ClusterShape

ROOT = Path(__file__).resolve().parent.parent

# In the order each repetition runs them.
TOPOLOGIES_RUN: Final = ("single", "cluster")
NAMES: Final = {"single": "one Redis", "cluster": "Redis Cluster"}
HISTORY_PROCESSES: Final = (1, 2, 3)
HISTORY_CALLS: Final = ("get_payment", "list_payments")
HISTORY_METRICS: Final = (
    "throughput_rps",
    "p50_ms",
    "p99_ms",
    "server_cpu_us_per_rpc",
    "redis_cpu_us_per_rpc",
)
DRAIN_METRICS: Final = (
    "changes",
    "changes_per_s",
    "changes_per_s_steady",
    "cpu_us_per_change",
    "redis_cpu_us_per_change",
)
# The masters by their name in the figures: the one node; on a cluster the master of the
# replication slot's keys (its lock, checkpoint and change stream), then the two others.
NODES: Final = {"single": ("node",), "cluster": ("control", "data_1", "data_2")}
# The sum over a topology's masters.
ALL_MASTERS: Final = "all_masters"
ALL_COMMANDS: Final = "all"
# Commands that the benchmark itself sends while the drain is timed, left out of the counts:
# its snapshots of the counts.
OWN_COMMANDS: Final = frozenset({"info"})

# How long the Redis CPU is read with the stack idle, before the reads.
REST_S: Final = 3.0

# Per command: (calls, µs that Redis spent in it: wall time, a script's including its commands').
CommandStats = dict[str, tuple[int, int]]


@contextlib.contextmanager
def redis_topology(topology: str) -> Iterator[None]:
    """STACK_REDIS set to `topology` while the stack starts (`stack.local.up` reads it, its processes inherit it)."""
    old = os.environ.get("STACK_REDIS")
    os.environ["STACK_REDIS"] = topology
    try:
        yield
    finally:
        if old is None:
            del os.environ["STACK_REDIS"]
        else:
            os.environ["STACK_REDIS"] = old


# -- Redis's own counts of commands ------------------------------------------------------------


def masters(runner: Runner) -> dict[str, redis.Redis]:
    """A client of each master of the stack's Redis, by its name in `NODES`.

    On a cluster the master that serves the replication slot's checkpoint is `control`;
    the others are `data_1` and `data_2` in the order of their lowest slot.
    """
    if runner.endpoints.get("REDIS_TOPOLOGY", "single") == "single":
        return {"node": redis.Redis.from_url(runner.redis_url)}
    client = sync_client(runner.redis_url)
    assert isinstance(client, RedisCluster)
    try:
        lowest: dict[tuple[str, int], int] = {}
        for slot, nodes in client.nodes_manager.slots_cache.items():
            primary = (nodes[0].host, int(nodes[0].port))
            lowest[primary] = min(slot, lowest.get(primary, slot))
        control_slot = key_slot(DEFAULT_SCHEMA.checkpoint(DEFAULT_SLOT_NAME).encode())
        control = client.nodes_manager.slots_cache[control_slot][0]
        control_addr = (control.host, int(control.port))
    finally:
        client.close()
    others = sorted((addr for addr in lowest if addr != control_addr), key=lowest.__getitem__)
    named = {"control": control_addr, **{f"data_{i}": addr for i, addr in enumerate(others, 1)}}
    if tuple(named) != NODES["cluster"]:
        raise RuntimeError(f"expected 3 masters, found {len(lowest)}: {sorted(lowest)}")
    return {name: redis.Redis(host=host, port=port) for name, (host, port) in named.items()}


def command_stats(client: redis.Redis) -> CommandStats:
    """`INFO commandstats` of one node: calls and µs of each command since it started."""
    raw: Mapping[str, Mapping[str, Any]] = client.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): (int(values["calls"]), int(values["usec"]))
        for name, values in raw.items()
    }


def difference(before: CommandStats, after: CommandStats) -> CommandStats:
    """What each command added between two snapshots, without those of `OWN_COMMANDS` and those that did not move."""
    found = {}
    for name, (calls, usec) in after.items():
        old_calls, old_usec = before.get(name, (0, 0))
        if name not in OWN_COMMANDS and calls > old_calls:
            found[name] = (calls - old_calls, usec - old_usec)
    return found


@contextlib.contextmanager
def counting(
    nodes: Mapping[str, redis.Redis],
    into: dict[str, CommandStats],
    replicas: Sequence[int],
    spent: list[float],
) -> Iterator[None]:
    """Fills `into` with what each node ran inside the block, and appends to `spent` the CPU seconds of the `replicas`."""
    before = {name: command_stats(client) for name, client in nodes.items()}
    replicas_before = cpu.snapshot(replicas)
    yield
    spent.append(cpu.spent(replicas_before, cpu.snapshot(replicas)))
    for name, client in nodes.items():
        into[name] = difference(before[name], command_stats(client))


def replica_pids(runner: Runner) -> list[int]:
    """The processes of the stack's Redis replicas (none on one Redis), by each node's own `INFO replication`."""
    found = []
    addresses = runner.endpoints["REDIS_NODES"].split(",")
    for address, pid in zip(addresses, runner.pids("redis"), strict=True):
        host, port = address.rsplit(":", 1)
        client = redis.Redis(host=host, port=int(port))
        try:
            if client.info("replication")["role"] != "master":
                found.append(pid)
        finally:
            client.close()
    return found


def at_rest(runner: Runner, seconds: float) -> float:
    """The CPU of every Redis process per second, in ms, with the stack idle: what the nodes cost before any work."""
    before = runner.redis_cpu()
    time.sleep(seconds)
    return cpu.spent(before, runner.redis_cpu()) * 1000 / seconds


# -- one stack -------------------------------------------------------------------------------


@dataclasses.dataclass
class Measured:
    """What one stack gave: its figures went to the topology's collector; these are the rest."""

    commands: dict[str, CommandStats]  # by node, during the drain
    payments: int  # the payments that the drain replicated
    seconds: float
    load_average: list[float]
    versions: dict[str, str]


def warm_up(runner: Runner) -> None:
    """One short window of each call on every history process, not counted.

    A fresh stack's first window would otherwise include the load workers' first channels
    and calls (in `python -m bench` other windows come before history's).
    """
    target = history_target(runner.endpoints["HISTORY_ADDRS"].split(","))
    for call in ("history_get", "history_list"):
        jobs = runner.jobs("closed", call, target, runner.plan.concurrency, 1.0, 0.5, history_channel=True)
        runner.measure(jobs, {}, 1.0, 0.5)


def measure(plan: Plan, root: Path, topology: str, collector: Collector) -> Measured:
    """Starts a stack on `topology`, seeds it, measures history and the drain, and stops it, whatever happens."""
    started = time.monotonic()
    with redis_topology(topology):
        runner = Runner(plan, root, history_count=max(HISTORY_PROCESSES), extra_servers=False)
        runner.collector = collector
        try:
            runner.start()
            seed.run(runner)
            warm_up(runner)
            runner.settle()
            collector.add("redis_at_rest", cpu_ms_per_s=at_rest(runner, REST_S))
            history.measure(runner, None, HISTORY_PROCESSES, redis_cpu=True)
            print(
                f"== drain of {plan.drain_payments * backlog.CHANGES_PER_PAYMENT:,} row changes on {NAMES[topology]}",
                flush=True,
            )
            nodes = masters(runner)
            replicas = replica_pids(runner)
            commands: dict[str, CommandStats] = {}
            replicas_spent: list[float] = []
            try:
                drained = drain.once(
                    runner,
                    runner.payers,
                    plan.drain_payments,
                    lambda _pid: counting(nodes, commands, replicas, replicas_spent),
                )
            finally:
                for client in nodes.values():
                    client.close()
            collector.add("drain", **drained.metrics())
            if replicas:
                collector.add(
                    "drain", redis_replicas_cpu_us_per_change=replicas_spent[0] * 1e6 / drained.changes
                )
            # The drain's own reads of the checkpoint are HGETs on the node that holds it.
            holder = NODES[topology][0]
            calls, usec = commands[holder].get("hget", (0, 0))
            if calls >= drained.checkpoint_reads:
                commands[holder]["hget"] = (calls - drained.checkpoint_reads, usec)
            versions = environment.versions(runner.dsn, runner.redis_url)
        finally:
            print(f"== stopping the stack on {NAMES[topology]}", flush=True)
            runner.stop()
    return Measured(
        commands=commands,
        payments=plan.drain_payments,
        seconds=round(time.monotonic() - started, 1),
        load_average=[round(x, 2) for x in os.getloadavg()],
        versions=versions,
    )


# -- figures -----------------------------------------------------------------------------------


def add_commands(collector: Collector, topology: str, runs: Sequence[Measured]) -> None:
    """`commands.<node>.<command>.{calls,usec}_per_payment` for every repetition, 0 where a command did not run.

    `all` counts a node's commands (each script call and each command it ran), and
    `all_masters` sums the masters. The µs of `all` are not given: a script's µs include
    those of the commands it ran, which Redis also counts under their own names.
    """
    names = sorted({command for run in runs for node in run.commands.values() for command in node})
    for run in runs:
        calls_sum: dict[str, float] = {}
        usec_sum: dict[str, float] = {}
        for node in NODES[topology]:
            counts = run.commands.get(node, {})
            every = sum(calls for calls, _ in counts.values()) / run.payments
            collector.add(f"commands.{node}.{ALL_COMMANDS}", calls_per_payment=every)
            calls_sum[ALL_COMMANDS] = calls_sum.get(ALL_COMMANDS, 0.0) + every
            for command in names:
                calls, usec = counts.get(command, (0, 0))
                per_calls, per_usec = calls / run.payments, usec / run.payments
                collector.add(
                    f"commands.{node}.{command}", calls_per_payment=per_calls, usec_per_payment=per_usec
                )
                calls_sum[command] = calls_sum.get(command, 0.0) + per_calls
                usec_sum[command] = usec_sum.get(command, 0.0) + per_usec
        collector.add(f"commands.{ALL_MASTERS}.{ALL_COMMANDS}", calls_per_payment=calls_sum.pop(ALL_COMMANDS))
        for command in names:
            collector.add(
                f"commands.{ALL_MASTERS}.{command}",
                calls_per_payment=calls_sum[command],
                usec_per_payment=usec_sum[command],
            )


def ratios(single: Collector, cluster: Collector) -> Collector:
    """Cluster ÷ one Redis, repetition by repetition, of the history, drain and all-masters figures."""
    found = Collector()
    for path, values in single.values.items():
        comparable = path.startswith(("history.", "drain.", "redis_at_rest.", f"commands.{ALL_MASTERS}."))
        other = cluster.values.get(path)
        if comparable and other is not None and len(other) == len(values):
            figure, metric = path.rsplit(".", 1)
            for one, many in zip(values, other, strict=True):
                found.add(figure, **{metric: stats.ratio(many, one)})
    return found


def required_figures() -> list[str]:
    """The figures that must be there and positive: what a run is for."""
    paths = []
    for topology in TOPOLOGIES_RUN:
        paths += [
            f"{topology}.history.{call}_{n}.{metric}"
            for call in HISTORY_CALLS
            for n in HISTORY_PROCESSES
            for metric in HISTORY_METRICS
        ]
        paths += [f"{topology}.drain.{metric}" for metric in DRAIN_METRICS]
        paths += [f"{topology}.redis_at_rest.cpu_ms_per_s"]
        script_calls = ("evalsha",) if topology == "single" else ("evalsha", "wait")
        for node in (*NODES[topology], ALL_MASTERS):
            paths += [f"{topology}.commands.{node}.{ALL_COMMANDS}.calls_per_payment"]
            paths += [f"{topology}.commands.{node}.evalsha.usec_per_payment"]
            paths += [f"{topology}.commands.{node}.{command}.calls_per_payment" for command in script_calls]
    paths += ["cluster.drain.redis_replicas_cpu_us_per_change"]
    paths += [
        f"cluster_over_single.history.{call}_{n}.{metric}"
        for call in HISTORY_CALLS
        for n in HISTORY_PROCESSES
        for metric in HISTORY_METRICS
    ]
    paths += [f"cluster_over_single.drain.{metric}" for metric in DRAIN_METRICS]
    # Not the ratio of the CPU at rest: one idle Redis may use less than the CPU clock's tick
    # in the window (0), and then the ratio has no value.
    paths += [f"cluster_over_single.commands.{ALL_MASTERS}.{ALL_COMMANDS}.calls_per_payment"]
    return paths


def missing_figures(results: Mapping[str, Any]) -> list[str]:
    """The required figures that are absent, or whose median, min or max is not a positive number
    (or, for the CPU at rest, a number below zero)."""
    missing = []
    for path in required_figures():
        try:
            spread = report.lookup(results, path)
        except (KeyError, TypeError):
            missing.append(path)
            continue
        values = [spread.get(k) if isinstance(spread, Mapping) else None for k in ("median", "min", "max")]
        idle = ".redis_at_rest." in path
        if not all(
            isinstance(v, int | float) and math.isfinite(v) and (v > 0 or (idle and v == 0)) for v in values
        ):
            missing.append(path)
    return missing


# -- the tables ------------------------------------------------------------------------------------


def _cell(results: Mapping[str, Any], path: str) -> str:
    try:
        spread = report.lookup(results, path)
        median, low, high = (float(spread[k]) for k in ("median", "min", "max"))
    except (KeyError, TypeError, ValueError):
        return "n/a"
    return f"{report.number(median)} ({report.number(low)}-{report.number(high)})"


def _rows() -> Iterator[tuple[str, str, str]]:
    """(label, path under each topology, unit) of the main table."""
    labels = {"get_payment": "GetPayment", "list_payments": "ListPayments(20)"}
    for call in HISTORY_CALLS:
        for n in HISTORY_PROCESSES:
            figure = f"history.{call}_{n}"
            name = f"History {labels[call]} x{n}"
            yield f"{name}, throughput", f"{figure}.throughput_rps", "RPC/s"
            yield f"{name}, p50", f"{figure}.p50_ms", "ms"
            yield f"{name}, p99", f"{figure}.p99_ms", "ms"
            yield f"{name}, history CPU per RPC", f"{figure}.server_cpu_us_per_rpc", "µs"
            yield f"{name}, Redis CPU per RPC (all nodes)", f"{figure}.redis_cpu_us_per_rpc", "µs"
    yield "Drain, changes/s from restart", "drain.changes_per_s", "changes/s"
    yield "Drain, changes/s after the first apply", "drain.changes_per_s_steady", "changes/s"
    yield "Drain, replicator CPU per change", "drain.cpu_us_per_change", "µs"
    yield "Drain, Redis CPU per change (all nodes)", "drain.redis_cpu_us_per_change", "µs"
    yield (
        "Drain, Redis commands per payment (all masters)",
        f"commands.{ALL_MASTERS}.{ALL_COMMANDS}.calls_per_payment",
        "",
    )
    yield (
        "Drain, Redis replicas' CPU per change (in the line above)",
        "drain.redis_replicas_cpu_us_per_change",
        "µs",
    )
    yield "Redis CPU with the stack at rest (all nodes)", "redis_at_rest.cpu_ms_per_s", "ms/s"


def markdown_table(results: Mapping[str, Any]) -> str:
    reps = results["settings"]["reps"]
    lines = [
        f"| figure, median (min-max) of {reps} | one Redis | Redis Cluster | cluster ÷ one Redis | unit |",
        "|---|---:|---:|---:|---|",
    ]
    for label, path, unit in _rows():
        cells = (
            _cell(results, f"{topology}.{path}") for topology in (*TOPOLOGIES_RUN, "cluster_over_single")
        )
        lines.append(f"| {label} | {' | '.join(cells)} | {unit} |")
    return "\n".join(lines)


def _calls(value: float) -> str:
    """Calls per payment: three significant digits, since a script call per batch is far below one per payment."""
    if value == 0:
        return "0"
    return report.number(value) if value >= 10 else f"{value:.3g}"


def commands_table(results: Mapping[str, Any]) -> str:
    """Calls per payment replicated of each command on each master (medians), the busiest first."""
    figures = results["figures"]
    columns = [("single", node) for node in NODES["single"]] + [
        ("cluster", node) for node in (*NODES["cluster"], ALL_MASTERS)
    ]

    def median(topology: str, node: str, command: str, metric: str = "calls_per_payment") -> float:
        try:
            return float(figures[topology]["commands"][node][command][metric]["median"])
        except (KeyError, TypeError):
            return 0.0

    commands = {
        command
        for topology, node in columns
        for command in figures.get(topology, {}).get("commands", {}).get(node, {})
        if command != ALL_COMMANDS
    }
    order = sorted(commands, key=lambda c: -(median("single", "node", c) + median("cluster", ALL_MASTERS, c)))
    header = ["one Redis"] + [f"cluster: {node.replace('_', ' ')}" for _, node in columns[1:]]
    lines = [f"| command, calls per payment | {' | '.join(header)} |", "|---|" + "---:|" * len(columns)]
    for command in [*order, ALL_COMMANDS]:
        values = [median(topology, node, command) for topology, node in columns]
        label = "all commands" if command == ALL_COMMANDS else f"`{command}`"
        lines.append(f"| {label} | {' | '.join(_calls(v) for v in values)} |")
    scripts = [median(topology, node, "evalsha", "usec_per_payment") for topology, node in columns]
    lines.append(
        f"| µs inside `evalsha` per payment, its commands included | {' | '.join(report.number(v) for v in scripts)} |"
    )
    return "\n".join(lines)


# -- the run ---------------------------------------------------------------------------------------


def _uptime() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run(["uptime"], capture_output=True, text=True, check=True).stdout.strip()
    return ""


def run(plan: Plan, root: Path, command: str) -> dict[str, Any]:
    """Every repetition of both topologies, alternating, and the results."""
    started = time.monotonic()
    began_at = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    uptime_before, load_before = _uptime(), [round(x, 2) for x in os.getloadavg()]
    collectors = {topology: Collector() for topology in TOPOLOGIES_RUN}
    runs: dict[str, list[Measured]] = {topology: [] for topology in TOPOLOGIES_RUN}
    order = []
    for rep in range(plan.reps):
        for topology in TOPOLOGIES_RUN:
            print(f"== repetition {rep + 1}/{plan.reps}: {NAMES[topology]}", flush=True)
            measured = measure(plan, root / f"{rep + 1}-{topology}", topology, collectors[topology])
            runs[topology].append(measured)
            order.append(
                {
                    "repetition": rep + 1,
                    "topology": topology,
                    "seconds": measured.seconds,
                    "load_average_after": measured.load_average,
                }
            )
            print(
                f"   {NAMES[topology]} took {measured.seconds:.0f}s, load average {measured.load_average}",
                flush=True,
            )
    for topology in TOPOLOGIES_RUN:
        add_commands(collectors[topology], topology, runs[topology])
    machine = environment.machine_info()
    machine.update(load_average_at_start=load_before, uptime_before=uptime_before, uptime_after=_uptime())
    return {
        "schema_version": 1,
        "mode": plan.mode,
        "note": (
            "quick run: one short repetition of each topology, a small backlog; "
            "a smoke test of the benchmark, not a measurement"
            if plan.mode == "quick"
            else "full run"
        ),
        "started_at": began_at,
        "duration_s": time.monotonic() - started,
        "command": command,
        "machine": machine,
        "versions": runs["single"][0].versions,
        "settings": {
            **dataclasses.asdict(plan),
            "fsync": True,
            "history_processes": max(HISTORY_PROCESSES),
            "load_processes": plan.workers,
            "order": list(TOPOLOGIES_RUN),
            "cluster": {
                "masters": ClusterShape.masters,
                "replicas_per_master": ClusterShape.replicas,
                "node_timeout_ms": local.CLUSTER_NODE_TIMEOUT_MS,
                "replicator_wait_replicas": 1,
            },
            "payments_per_drain": plan.drain_payments,
            "commands_left_out": sorted(OWN_COMMANDS),
        },
        "runs": order,
        "figures": {
            **{topology: collectors[topology].figures() for topology in TOPOLOGIES_RUN},
            "cluster_over_single": ratios(collectors["single"], collectors["cluster"]).figures(),
        },
    }


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.topologies", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the smoke-test size: about 2-3 minutes")
    parser.add_argument(
        "--reps", type=int, default=None, help="repetitions of each topology (default: the plan's)"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/topologies.json")
    parser.add_argument("--root", type=Path, default=None, help="where the stacks' state and logs go")
    args = parser.parse_args(list(argv) if argv is not None else None)
    plan = TOPOLOGIES_QUICK if args.quick else TOPOLOGIES
    if args.reps is not None:
        if args.reps < 1:
            parser.error("--reps must be at least 1")
        plan = dataclasses.replace(plan, reps=args.reps)
    root = args.root or Path(tempfile.mkdtemp(prefix="payments-bench-topologies-"))
    results = run(plan, root, command=" ".join(["python -m bench.topologies", *sys.argv[1:]]))
    report.write_json(results, args.out)
    print()
    print(markdown_table(results))
    print()
    print(commands_table(results))
    print(f"\nresults: {args.out}\nlogs:    {root}")
    missing = missing_figures(results)
    if missing:
        print(f"missing or not positive: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
