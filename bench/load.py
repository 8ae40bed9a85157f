"""Load generators: worker processes, separate from the servers, that run closed- and open-loop gRPC load.

The orchestrator hands each worker a `Job` and gets back a `JobResult` with the latency of
every call that completed inside the measured window. Every worker is its own Python
process with its own event loop (uvloop) and channels, kept for the whole run so that
process start-up and connection set-up never fall inside a window. Windows are
placed on CLOCK_MONOTONIC, which every process on the machine shares, so that the
workers and the orchestrator's CPU readings cover the same interval.

- closed loop: `concurrency` callers, each sending its next call when the previous one
  returns. Throughput is what the servers sustain at that concurrency.
- open loop: calls start at a fixed rate whatever the servers do; latency is counted
  from the moment the call was due, so a stalled server is not hidden (no coordinated
  omission). Calls beyond `max_inflight` are not sent and are reported as dropped.
  Besides the calls due in the window, it counts those that returned inside it
  (`served`): what the servers kept up with when a queue grows.
- visibility: open-loop SubmitPayment to approval while WatchPayments streams on
  history time when each acknowledged payment becomes visible on the query side.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import multiprocessing
import random
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal

import grpc
from google.protobuf import wrappers_pb2

from bench.echo_server import METHOD as ECHO_METHOD

Call = Callable[[], Awaitable[Any]]
CallKind = Literal["echo", "history_get", "history_list", "history_mixed", "approval_submit"]
Mode = Literal["closed", "open", "visibility"]

CURRENCY = "EUR"
CALL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Job:
    """One worker's share of a measurement."""

    mode: Mode
    call: CallKind
    target: str
    start_at: float  # time.monotonic() at which the measured window opens
    duration_s: float
    warmup_s: float = 1.0
    history_channel: bool = False  # round robin with retries, as stack.clients does
    concurrency: int = 0
    rate: float = 0.0
    max_inflight: int = 4000
    payment_ids: tuple[str, ...] = ()
    account_ids: tuple[str, ...] = ()
    payer_ids: tuple[str, ...] = ()
    payee_ids: tuple[str, ...] = ()
    page_size: int = 20
    watch_target: str = ""  # visibility: the history target to watch
    grace_seconds: float = 3.0  # visibility: how long to wait for the last payments to show
    seed: int = 0
    token: str = ""  # the bearer token every call carries (none for the echo server)
    # SubmitPayment: each call carries a sampled W3C traceparent of a trace of its own, as a
    # caller that traced the request sends it.
    traced: bool = False


@dataclass
class JobResult:
    """What one worker measured; latencies and delays in seconds."""

    latencies: list[float] = field(default_factory=list)
    completed: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    # Open loop: the calls that returned OK inside the window, whenever they were due. Below
    # the offered rate times the window when a queue grows, where `completed` (the calls due
    # in the window that returned OK at last) is not.
    served: int = 0
    delays: list[float] = field(default_factory=list)
    submit_delays: list[float] = field(default_factory=list)
    missing: int = 0
    seen_before_ack: int = 0
    failure: str = ""


def _channel(job: Job, target: str, channels: dict[tuple[str, bool], grpc.aio.Channel]) -> grpc.aio.Channel:
    key = (target, job.history_channel)
    if key not in channels:
        from stack.clients import approval_channel, history_channel

        # Approval, or the echo floor (which gets no token).
        open_channel = history_channel if job.history_channel else approval_channel
        channels[key] = open_channel(target, token=job.token or None)
    return channels[key]


def make_call(job: Job, channel: grpc.aio.Channel, rng: random.Random) -> Call:
    """The call that the job repeats, with a fresh random request each time."""
    if job.call == "echo":
        echo = channel.unary_unary(
            ECHO_METHOD,
            request_serializer=wrappers_pb2.StringValue.SerializeToString,
            response_deserializer=wrappers_pb2.StringValue.FromString,
        )
        ids = job.payment_ids or (str(uuid.uuid4()),)
        return lambda: echo(wrappers_pb2.StringValue(value=rng.choice(ids)), timeout=CALL_TIMEOUT_S)
    if job.call in ("history_get", "history_list", "history_mixed"):
        return _reader(job, channel, rng)
    if job.call == "approval_submit":
        return _submitter(job, channel, rng)
    raise ValueError(f"unknown call {job.call!r}")


def _reader(job: Job, channel: grpc.aio.Channel, rng: random.Random) -> Call:
    """GetPayment, ListPayments, or (`history_mixed`) the two in turn: half of the calls each."""
    from payments.history.v1 import history_service_pb2 as history
    from payments.history.v1 import history_service_pb2_grpc as history_grpc

    stub = history_grpc.HistoryServiceStub(channel)
    payment_ids, account_ids = job.payment_ids, job.account_ids

    def get() -> Awaitable[Any]:
        return stub.GetPayment(
            history.GetPaymentRequest(payment_id=rng.choice(payment_ids)), timeout=CALL_TIMEOUT_S
        )

    def list_() -> Awaitable[Any]:
        return stub.ListPayments(
            history.ListPaymentsRequest(
                account_id=rng.choice(account_ids),
                direction=history.PAYMENT_DIRECTION_ALL,
                page_size=job.page_size,
            ),
            timeout=CALL_TIMEOUT_S,
        )

    if job.call == "history_get":
        return get
    if job.call == "history_list":
        return list_
    turns = itertools.cycle((get, list_))
    return lambda: next(turns)()


def _submitter(job: Job, channel: grpc.aio.Channel, rng: random.Random) -> Callable[[], Awaitable[Any]]:
    from payments.approval.v1 import approval_service_pb2 as approval
    from payments.approval.v1 import approval_service_pb2_grpc as approval_grpc
    from payments.type.v1 import money_pb2

    stub = approval_grpc.ApprovalServiceStub(channel)
    payers, payees = job.payer_ids, job.payee_ids or job.payer_ids
    traced = job.traced

    def submit() -> Awaitable[Any]:
        payer = rng.choice(payers)
        payee = rng.choice(payees)
        while payee == payer:
            payee = rng.choice(payees)
        return stub.SubmitPayment(
            approval.SubmitPaymentRequest(
                request_id=str(uuid.uuid4()),
                payer_account_id=payer,
                payee_account_id=payee,
                amount=money_pb2.Money(currency_code=CURRENCY, amount_minor=rng.randint(1, 1000)),
                reference="benchmark",
            ),
            timeout=CALL_TIMEOUT_S,
            metadata=(("traceparent", sampled_traceparent(rng)),) if traced else None,
        )

    return submit


def sampled_traceparent(rng: random.Random) -> str:
    """A W3C traceparent of a new trace, sampled: a caller's span whose trace the server must follow."""
    trace_id = rng.getrandbits(128) or 1
    span_id = rng.getrandbits(64) or 1
    return f"00-{trace_id:032x}-{span_id:016x}-01"


async def _sleep_until(moment: float) -> None:
    delay = moment - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def _error_name(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return str(error.code().name)
    return type(error).__name__


async def closed_loop(job: Job, call: Call) -> JobResult:
    result = JobResult()
    errors: Counter[str] = Counter()
    start, end = job.start_at, job.start_at + job.duration_s
    await _sleep_until(start - job.warmup_s)

    async def caller() -> None:
        while True:
            began = time.monotonic()
            if began >= end:
                return
            try:
                await call()
            except Exception as error:  # counted, never fatal: the load goes on
                finished = time.monotonic()
                if start <= finished <= end:
                    errors[_error_name(error)] += 1
                continue
            finished = time.monotonic()
            if start <= finished <= end:
                result.latencies.append(finished - began)

    await asyncio.gather(*(caller() for _ in range(job.concurrency)))
    result.completed = len(result.latencies)
    result.errors = dict(errors)
    return result


async def open_loop(job: Job, call: Call) -> JobResult:
    result = JobResult()
    errors: Counter[str] = Counter()
    start, end = job.start_at, job.start_at + job.duration_s
    begin = start - job.warmup_s
    interval = 1.0 / job.rate
    inflight: set[asyncio.Task[None]] = set()

    async def timed(due: float) -> None:
        try:
            await call()
        except Exception as error:
            if start <= due < end:
                errors[_error_name(error)] += 1
            return
        finished = time.monotonic()
        if start <= due < end:
            result.latencies.append(finished - due)
        if start <= finished <= end:
            result.served += 1

    await _sleep_until(begin)
    sent = 0
    while True:
        due = begin + sent * interval
        if due >= end:
            break
        now = time.monotonic()
        if due > now:
            await asyncio.sleep(due - now)
            continue
        while due <= now and due < end:
            if len(inflight) >= job.max_inflight:
                if start <= due:
                    result.dropped += 1
            else:
                task = asyncio.create_task(timed(due))
                inflight.add(task)
                task.add_done_callback(inflight.discard)
            sent += 1
            due = begin + sent * interval
    if inflight:
        await asyncio.wait(inflight, timeout=CALL_TIMEOUT_S + 1)
    result.completed = len(result.latencies)
    result.errors = dict(errors)
    return result


async def visibility(job: Job, channels: dict[tuple[str, bool], grpc.aio.Channel]) -> JobResult:
    """Commit-to-visible: from the approval response to the payment's arrival on a WatchPayments stream.

    The payees are watched, the payers are not, so each payment arrives on exactly one
    stream. A payment that arrives before its response (the replicator can beat the
    response back to the client) counts as a delay of zero and is reported.
    """
    from payments.history.v1 import history_service_pb2 as history
    from payments.history.v1 import history_service_pb2_grpc as history_grpc

    result = JobResult()
    errors: Counter[str] = Counter()
    arrivals: dict[str, float] = {}
    acks: dict[str, tuple[float, float]] = {}  # payment -> (request sent, response received)
    history_stub = history_grpc.HistoryServiceStub(_channel(job, job.watch_target, channels))
    watches = []
    for account_id in job.payee_ids:
        stream = history_stub.WatchPayments(history.WatchPaymentsRequest(account_id=account_id))
        await stream.initial_metadata()  # sent once the subscription is in place
        watches.append(stream)

    async def follow(stream: Any) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError, asyncio.CancelledError):
            async for change in stream:
                arrivals.setdefault(change.payment.payment_id, time.monotonic())

    followers = [asyncio.create_task(follow(stream)) for stream in watches]
    approval_job = Job(
        mode="open",
        call="approval_submit",
        target=job.target,
        start_at=job.start_at,
        duration_s=job.duration_s,
        warmup_s=job.warmup_s,
        rate=job.rate,
        payer_ids=job.payer_ids,
        payee_ids=job.payee_ids,
        seed=job.seed,
        token=job.token,
    )
    submit = _submitter(approval_job, _channel(approval_job, job.target, channels), random.Random(job.seed))
    start, end = job.start_at, job.start_at + job.duration_s

    async def submit_and_note() -> None:
        sent = time.monotonic()
        response = await submit()
        if start <= sent < end:
            acks[response.payment.payment_id] = (sent, time.monotonic())

    inner = await open_loop(approval_job, submit_and_note)
    result.errors, result.dropped = inner.errors, inner.dropped
    deadline = time.monotonic() + job.grace_seconds
    while time.monotonic() < deadline and any(pid not in arrivals for pid in acks):  # noqa: ASYNC110
        await asyncio.sleep(0.02)  # a poll keeps the stream readers free of bookkeeping
    for stream in watches:
        stream.cancel()
    for task in followers:
        task.cancel()
    await asyncio.gather(*followers, return_exceptions=True)
    for payment_id, (sent, acked) in acks.items():
        seen = arrivals.get(payment_id)
        if seen is None:
            result.missing += 1
            continue
        if seen < acked:
            result.seen_before_ack += 1
        result.delays.append(max(0.0, seen - acked))
        result.submit_delays.append(seen - sent)
    result.completed = len(acks)
    result.errors = dict(errors) | result.errors
    return result


async def run_job(job: Job, channels: dict[tuple[str, bool], grpc.aio.Channel]) -> JobResult:
    if job.mode == "visibility":
        return await visibility(job, channels)
    call = make_call(job, _channel(job, job.target, channels), random.Random(job.seed))
    if job.mode == "closed":
        return await closed_loop(job, call)
    return await open_loop(job, call)


async def _serve_jobs(connection: Connection) -> None:
    loop = asyncio.get_running_loop()
    channels: dict[tuple[str, bool], grpc.aio.Channel] = {}
    try:
        while True:
            job: Job | None = await loop.run_in_executor(None, connection.recv)
            if job is None:
                return
            try:
                result = await run_job(job, channels)
            except Exception:
                result = JobResult(failure=traceback.format_exc())
            connection.send(result)
    finally:
        for channel in channels.values():
            await channel.close(None)


def _worker_main(connection: Connection) -> None:
    import uvloop

    uvloop.run(_serve_jobs(connection))


class LoadPool:
    """A fixed set of worker processes; `submit` hands out jobs, `collect` waits for their results."""

    def __init__(self, workers: int) -> None:
        context = multiprocessing.get_context("spawn")  # never fork a process that has gRPC loaded
        self._connections: list[Connection] = []
        self._processes: list[Any] = []
        for index in range(workers):
            parent, child = context.Pipe()
            process = context.Process(
                target=_worker_main, args=(child,), name=f"bench-load-{index}", daemon=True
            )
            process.start()
            child.close()
            self._connections.append(parent)
            self._processes.append(process)
        self._busy: set[int] = set()

    @property
    def size(self) -> int:
        return len(self._processes)

    def submit(self, jobs: list[Job]) -> list[int]:
        """Hands each job to an idle worker; returns the workers' numbers, for `collect`."""
        idle = [i for i in range(self.size) if i not in self._busy]
        if len(jobs) > len(idle):
            raise RuntimeError(f"{len(jobs)} jobs for {len(idle)} idle load workers")
        handles = idle[: len(jobs)]
        for index, job in zip(handles, jobs, strict=True):
            self._connections[index].send(job)
            self._busy.add(index)
        return handles

    def collect(self, handles: list[int], timeout: float = 300.0) -> list[JobResult]:
        results = []
        for index in handles:
            connection = self._connections[index]
            if not connection.poll(timeout):
                raise TimeoutError(f"load worker {index} gave no result within {timeout:.0f}s")
            result: JobResult = connection.recv()
            self._busy.discard(index)
            if result.failure:
                raise RuntimeError(f"load worker {index} failed:\n{result.failure}")
            results.append(result)
        return results

    def run(self, jobs: list[Job], timeout: float = 300.0) -> list[JobResult]:
        return self.collect(self.submit(jobs), timeout)

    def close(self) -> None:
        for connection in self._connections:
            with contextlib.suppress(OSError):
                connection.send(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)


def split(total: float, parts: int) -> list[float]:
    """A total (concurrency or rate) shared as evenly as possible among `parts` workers."""
    if parts <= 0:
        raise ValueError("parts must be positive")
    if float(total).is_integer():
        base, extra = divmod(int(total), parts)
        return [float(base + (1 if i < extra else 0)) for i in range(parts)]
    return [total / parts] * parts
