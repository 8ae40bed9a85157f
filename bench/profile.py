"""`python -m bench.profile`: where each service spends its CPU under the benchmark's load, sampled with py-spy.

Starts the stack as the benchmark does, drives one load at a time (approval
SubmitPayment, history GetPayment, history ListPayments, the replicator draining a
backlog) while `py-spy record` samples the busy threads of the process that serves it,
and prints the functions with the largest inclusive and self shares of the samples.
The raw stacks go to bench/results/profile-*.txt (collapsed format, for flame graphs).
With `--tracing`, the same for tracing at 100% as the tracing figures measure it
(`bench.phases.tracing`, `sampled_all`): SubmitPayment on an approval process that traces,
every call carrying a sampled traceparent, and the replicator draining a backlog whose
every transaction is traced, spans exported to the counting receiver
(profile-*-traced.txt).
py-spy is not a dependency of the project: `.venv/bin/pip install py-spy` first.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from bench.phases import drain, seed, tracing
from bench.plan import QUICK
from bench.runner import ROOT, Runner
from stack.clients import history_target
from stack.otlp import read_counts

_LINE = re.compile(r":\d+\)$")


def summarize(
    stacks: Iterable[str], top: int = 25
) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """(inclusive, self) shares of the samples per function, from py-spy's collapsed "raw" lines."""
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in stacks:
        line = line.rstrip()
        if not line:
            continue
        frames_text, _, count_text = line.rpartition(" ")
        count = int(count_text)
        # Frames go from the outermost call inwards (no thread names: py-spy runs without
        # --threads). A coroutine that gRPC's Cython layer resumes has a stack that starts
        # at the coroutine, not at the module's main.
        frames = [_LINE.sub(")", frame) for frame in frames_text.split(";")]
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            own[frames[-1]] += count
    if total == 0:
        return [], []

    def shares(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(frame, 100.0 * n / total) for frame, n in counter.most_common(top)]

    return shares(inclusive), shares(own)


def _record(pid: int, out: Path, seconds: float) -> subprocess.Popen[bytes]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return subprocess.Popen(
        [
            spy,
            "record",
            "-p",
            str(pid),
            "-o",
            str(out),
            "-f",
            "raw",
            "-r",
            "250",
            "-d",
            str(int(seconds)),
            "--nonblocking",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


@contextlib.contextmanager
def _sampled(pid: int, out: Path, seconds: float = 120) -> Iterator[None]:
    """Samples `pid` into `out` until the block ends (or for `seconds` at most)."""
    spy = _record(pid, out, seconds)
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


def _report(title: str, out: Path) -> None:
    if not out.exists():
        print(f"\n### {title}: no samples ({out} missing)")
        return
    inclusive, own = summarize(out.read_text().splitlines())
    print(f"\n### {title}\n\ninclusive (% of busy samples):")
    for frame, share in inclusive:
        print(f"  {share:5.1f}%  {frame}")
    print("self:")
    for frame, share in own[:15]:
        print(f"  {share:5.1f}%  {frame}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--seconds", type=float, default=12.0, help="length of each sampled load")
    parser.add_argument("--drain-payments", type=int, default=50_000)
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench/results")
    parser.add_argument("--summarize", type=Path, nargs="*", help="only summarize these recorded files")
    parser.add_argument(
        "--tracing",
        action="store_true",
        help="SubmitPayment and the drain with every call and transaction traced",
    )
    args = parser.parse_args(argv)
    if args.summarize:
        for path in args.summarize:
            _report(str(path), path)
        return 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    runner = Runner(QUICK, Path(tempfile.mkdtemp(prefix="payments-profile-")))
    seconds = args.seconds
    try:
        runner.start()
        seed.run(runner)
        if args.tracing:
            _traced(runner, args.out_dir, seconds, args.drain_payments)
            return 0
        history = history_target(runner.endpoints["HISTORY_ADDRS"].split(",")[:1])
        loads = (
            ("approval", "approval_submit", runner.endpoints["APPROVAL_ADDR"], False),
            ("history-1", "history_get", history, True),
            ("history-1", "history_list", history, True),
            ("echo", "echo", runner.endpoints["BENCH_ECHO_ADDR"], False),
        )
        for server, call, target, history_channel in loads:
            out = args.out_dir / f"profile-{call}.txt"
            print(f"== sampling {server} under closed-loop {call} for {seconds:.0f}s", flush=True)
            spy = _record(runner.pid(server), out, seconds + 1)
            runner.measure(
                runner.jobs(
                    "closed",
                    call,
                    target,
                    runner.plan.concurrency,
                    duration_s=seconds,
                    history_channel=history_channel,
                ),
                {},
                seconds,
                0.5,
            )
            spy.wait(timeout=60)
            runner.settle()
            _report(f"{server} under {call}", out)

        # The replicator, catching up on a backlog: the benchmark's drain, sampled.
        out = args.out_dir / "profile-replicator-drain.txt"
        print(f"== sampling the replicator draining {args.drain_payments:,} payments", flush=True)
        drain.once(runner, runner.payers, args.drain_payments, observe=lambda pid: _sampled(pid, out))
        _report("replicator draining a backlog", out)
    finally:
        runner.stop()
    return 0


def _traced(runner: Runner, out_dir: Path, seconds: float, drain_payments: int) -> None:
    """SubmitPayment, then the drain, every call and every transaction traced, each sampled."""
    config = tracing.SAMPLED_ALL
    endpoint, counts = tracing.start_sink(runner)
    approval = tracing.start_approvals(runner, endpoint, [config])[config.key]
    tracing.wait_sink(runner, counts)
    tracing.wait_approvals(runner, {config.key: approval})
    out = out_dir / "profile-approval_submit-traced.txt"
    print(
        f"== sampling {approval.name} under closed-loop traced approval_submit for {seconds:.0f}s", flush=True
    )
    spy = _record(runner.pid(approval.name), out, seconds + 1)
    runner.measure(
        runner.jobs(
            "closed",
            "approval_submit",
            approval.addr,
            runner.plan.concurrency,
            duration_s=seconds,
            traced=True,
        ),
        {},
        seconds,
        0.5,
    )
    spy.wait(timeout=60)
    runner.settle()
    _report(f"{approval.name} under traced approval_submit", out)

    out = out_dir / "profile-replicator-drain-traced.txt"
    print(f"== sampling the replicator draining {drain_payments:,} traced payments", flush=True)
    drain.once(
        runner,
        runner.payers,
        drain_payments,
        observe=lambda pid: _sampled(pid, out),
        replicator_env=config.env("replicator", endpoint),
        traced_share=config.traced_share,
    )
    _report("replicator draining a traced backlog", out)
    # The traced replicator exports its last spans as it stops, before the receiver does.
    runner.stop_replicator()
    runner.start_replicator()
    runner.replicator_ready()
    runner.stop_servers(approval.name, tracing.SINK)
    print(f"spans received: {read_counts(counts)}")


if __name__ == "__main__":
    sys.exit(main())
