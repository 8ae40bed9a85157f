"""The gRPC server skeleton every service uses: interceptors, health, reflection, serve and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from opentelemetry import context as context_api
from opentelemetry import trace as trace_api
from prometheus_client import Counter, Histogram

from payments_common import audit, tracing
from payments_common.access import Gate, gate_for
from payments_common.audit import TargetOf
from payments_common.errors import FieldViolation, InvalidArgument, ServiceError, internal_error
from payments_common.grpcstatus import status_code, to_grpc_status
from payments_common.identity import Identity, set_caller
from payments_common.logs import method_var, payment_id_var, request_id_var
from payments_common.metrics import metrics_served
from payments_common.settings import ServerSettings

log = logging.getLogger(__name__)

RPC_TOTAL = Counter(
    "grpc_server_handled_total", "RPCs completed, by method and status code.", ["grpc_method", "grpc_code"]
)
RPC_SECONDS = Histogram(
    "grpc_server_handling_seconds",
    "Time to handle an RPC, by method.",
    ["grpc_method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)

# Health service names: `liveness` only says the event loop runs; `readiness`
# and the empty name follow the service's dependencies.
LIVENESS = "liveness"
READINESS = "readiness"

HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


def add_health_and_reflection(
    server: grpc.Server | grpc.aio.Server, health_servicer: Any, service_names: Sequence[str] = ()
) -> None:
    """Adds grpc.health.v1 and reflection of `service_names`, of health and of reflection itself.

    `health_servicer` is a `grpc_health.v1.health` servicer of the server's kind: synchronous
    or `health.aio`.
    """
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*service_names, HEALTH_SERVICE, reflection.SERVICE_NAME], server)


def bind(
    server: grpc.Server | grpc.aio.Server, address: str, credentials: grpc.ServerCredentials | None
) -> int:
    """Binds `address`, speaking TLS when `credentials` are given; returns the bound port."""
    if credentials is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, credentials)


# How often a stream's credentials are checked again while it lasts (a key withdrawn from the
# JWKS ends the streams of the tokens it signed within this time); a token's expiry is checked
# when it comes.
STREAM_RECHECK_SECONDS = 30.0


class CallInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Decides access, maps ServiceError to its status, hides unexpected errors, audits, and records metrics and log context.

    Every method but health and reflection (`/grpc.*`) passes the gate before its request
    is parsed; the caller it admits is what `payments_common.identity.current_caller()`
    returns in the handler. Methods in `audited` get an audit line whatever their outcome.
    """

    def __init__(
        self,
        gate: Gate,
        audited: Mapping[str, TargetOf] | None = None,
        recheck_seconds: float = STREAM_RECHECK_SECONDS,
    ) -> None:
        self._gate = gate
        self._audited = dict(audited or {})
        self._recheck_seconds = recheck_seconds

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        if method.startswith("/grpc."):
            return handler  # health and reflection need no credentials and no wrapping
        call = _Call(
            method, self._gate, handler.request_deserializer, self._audited.get(method), self._recheck_seconds
        )
        # The request is parsed inside the wrapper: when gRPC parses it, bytes that are not
        # the request message fail with UNKNOWN and the parser's exception in the message.
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(call, handler.unary_unary),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(call, handler.unary_stream),
                request_deserializer=None,
                response_serializer=handler.response_serializer,
            )
        # A client-streaming method would reach its handler unchecked: refused instead.
        log.error("%s is client-streaming, which the server skeleton does not serve", method)
        return grpc.unary_unary_rpc_method_handler(_unimplemented)


async def _unimplemented(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
    await context.abort(grpc.StatusCode.UNIMPLEMENTED, "method not served")


@dataclass(frozen=True)
class _Call:
    """What the wrappers need to know of a method: its name, the gate, its request parser, its audit."""

    method: str
    gate: Gate
    deserializer: Callable[[bytes], Any] | None
    target_of: TargetOf | None
    recheck_seconds: float = STREAM_RECHECK_SECONDS

    def audit(self, identity: Identity | None, raw: Any, request: Any, response: Any, outcome: str) -> None:
        if self.target_of is None:
            return
        if request is None:
            # Denied before its request was parsed: the target is read from it all the same.
            with contextlib.suppress(ServiceError):
                request = _parse(raw, self.deserializer)
                request_id_var.set(getattr(request, "request_id", ""))
        try:
            target = self.target_of(request, response)
        except Exception:  # the audit line is written whatever the request holds
            target = {}
        audit.record(self.method, identity, target, outcome)


def _parse(raw: Any, deserializer: Callable[[bytes], Any] | None) -> Any:
    """The request message, or INVALID_ARGUMENT when the bytes are not one."""
    if deserializer is None:
        return raw
    try:
        return deserializer(raw)
    except DecodeError:
        raise InvalidArgument([FieldViolation("request", "not a valid request message")]) from None


# Codes of a call that ended because its client stopped waiting: no status can reach it.
_ENDED_BY_CLIENT = (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED)
# A client gives up at its own deadline and cancels the stream, which the server may see a
# little before its copy of the deadline passes (the request took time to arrive). A call
# cancelled this close to its deadline is counted as DEADLINE_EXCEEDED.
DEADLINE_SKEW_S = 1.0


def _ended(context: grpc.aio.ServicerContext[Any, Any], method: str, code: grpc.StatusCode | None) -> str:
    """Counts and logs (one line, no traceback) a call that ended before its answer; returns the code's name."""
    if code is None:
        remaining = context.time_remaining()
        due = remaining is not None and remaining <= DEADLINE_SKEW_S
        code = grpc.StatusCode.DEADLINE_EXCEEDED if due else grpc.StatusCode.CANCELLED
    RPC_TOTAL.labels(method, code.name).inc()
    log.info("call ended before its answer: %s", code.name, extra={"grpc_code": code.name})
    return code.name


def _ended_by_client(error: Exception) -> grpc.StatusCode | None:
    """The code of a ServiceError that says the client stopped waiting, else None."""
    if isinstance(error, ServiceError):
        code = status_code(error)
        if code in _ENDED_BY_CLIENT:
            return code
    return None


def _as_service_error(error: Exception, method: str) -> ServiceError:
    """The error the client is sent: a ServiceError as it is, anything else as a generic INTERNAL (logged)."""
    if isinstance(error, ServiceError):
        if status_code(error) == grpc.StatusCode.INTERNAL:
            log.error("internal error in %s: %s", method, error.message)
        return error
    log.error("unexpected error in %s", method, exc_info=error)
    return internal_error()


async def _fail(context: grpc.aio.ServicerContext[Any, Any], error: ServiceError, method: str) -> None:
    RPC_TOTAL.labels(method, status_code(error).name).inc()
    await context.abort_with_status(to_grpc_status(error))  # type: ignore[attr-defined]


# A payment id as the contracts give it: a UUID in its canonical text.
_PAYMENT_ID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")


def _note_payment(request: Any) -> None:
    """The payment a request names, in its log lines and its span; not a caller's text that is no id."""
    payment_id = getattr(request, "payment_id", "")
    if isinstance(payment_id, str) and _PAYMENT_ID.fullmatch(payment_id):
        tracing.note_payment(payment_id)


def _wrap_unary(call: _Call, inner: Callable[..., Any]) -> Callable[..., Any]:
    method = call.method

    async def unary(raw: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        if not tracing.active():
            return await handle(raw, context, None)
        span = tracing.start_server_span(method, context.invocation_metadata())
        with trace_api.use_span(span, end_on_exit=False):
            return await handle(raw, context, span)

    async def handle(raw: Any, context: grpc.aio.ServicerContext[Any, Any], span: tracing.Span | None) -> Any:
        method_var.set(method)
        request_id_var.set("")
        payment_id_var.set("")
        started = time.perf_counter()
        identity: Identity | None = None  # known once the credentials are: a refused call's audit names it
        request = response = None
        outcome = "UNKNOWN"  # a handler that aborted the call itself
        try:
            identity = await call.gate.identify(context)
            set_caller(call.gate.authorize(method, identity))
            request = _parse(raw, call.deserializer)
            request_id_var.set(getattr(request, "request_id", ""))
            _note_payment(request)
            response = await inner(request, context)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            # gRPC cancels the handler when the deadline passes or the client cancels.
            outcome = _ended(context, method, None)
            raise
        except Exception as error:  # every other failure becomes a status, never a traceback
            ended = _ended_by_client(error)
            if ended is not None:
                # The handler saw the deadline pass first. Sending a status now would fail
                # in gRPC's core once the call has expired there; end it as gRPC would.
                outcome = _ended(context, method, ended)
                raise asyncio.CancelledError from None
            service_error = _as_service_error(error, method)
            outcome = status_code(service_error).name
            await _fail(context, service_error, method)
            raise  # unreachable: abort raises
        else:
            remaining = context.time_remaining()
            if remaining is not None and remaining <= 0:
                # Done, but too late: gRPC's core would refuse to send the answer (and log a traceback).
                outcome = _ended(context, method, grpc.StatusCode.DEADLINE_EXCEEDED)
                raise asyncio.CancelledError from None
            outcome = "OK"
            RPC_TOTAL.labels(method, outcome).inc()
            return response
        finally:
            RPC_SECONDS.labels(method).observe(time.perf_counter() - started)
            call.audit(identity, raw, request, response, outcome)
            if span is not None:
                tracing.end_server_span(span, outcome)

    return unary


def _wrap_stream(call: _Call, inner: Callable[..., Any]) -> Callable[..., Any]:
    method = call.method

    async def stream(raw: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        method_var.set(method)
        payment_id_var.set("")
        started = time.perf_counter()
        span: tracing.Span | None = None
        if tracing.active():
            span = tracing.start_server_span(method, context.invocation_metadata())
            # The call runs in a task of its own, which ends with it: nothing to detach.
            context_api.attach(trace_api.set_span_in_context(span))
        outcome = "UNKNOWN"
        try:
            identity = await call.gate.identify(context)
            set_caller(call.gate.authorize(method, identity))
            responses = inner(_parse(raw, call.deserializer), context)
            if identity.expires_at is not None:
                responses = _while_admitted(call, context, identity, responses)
            async for response in responses:
                yield response
        except grpc.aio.AbortError:
            raise
        except (asyncio.CancelledError, GeneratorExit):
            # The client cancelled, or the deadline passed: the usual end of a watch.
            outcome = _ended(context, method, None)
            raise
        except Exception as error:
            ended = _ended_by_client(error)
            if ended is not None:
                outcome = _ended(context, method, ended)
                raise asyncio.CancelledError from None
            service_error = _as_service_error(error, method)
            outcome = status_code(service_error).name
            await _fail(context, service_error, method)
            raise
        else:
            outcome = "OK"
        finally:
            RPC_SECONDS.labels(method).observe(time.perf_counter() - started)
            if span is not None:
                tracing.end_server_span(span, outcome)
        RPC_TOTAL.labels(method, "OK").inc()

    return stream


async def _while_admitted(
    call: _Call,
    context: grpc.aio.ServicerContext[Any, Any],
    identity: Identity,
    responses: AsyncIterator[Any],
) -> AsyncIterator[Any]:
    """A stream's responses while its caller's credentials are still accepted.

    A stream outlives the moment its credentials were checked: they are checked again when
    the token expires and every `call.recheck_seconds` (its key may have been withdrawn),
    whether or not a response is due; once refused, the stream ends with the refusal
    (UNAUTHENTICATED `TOKEN_EXPIRED`, say). The handler's next response is awaited in a
    task of its own, so that a check can come while it waits.
    """
    pending: asyncio.Future[Any] | None = None
    check_at = _next_check(identity, call.recheck_seconds)
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(responses))
            done, _ = await asyncio.wait({pending}, timeout=max(check_at - time.time(), 0.0))
            if done:
                finished, pending = pending, None
                try:
                    response = finished.result()
                except StopAsyncIteration:
                    return
                yield response
            if time.time() >= check_at:
                identity = await call.gate.identify(context)
                call.gate.authorize(call.method, identity)
                check_at = _next_check(identity, call.recheck_seconds)
    finally:
        # The handler's own clean-up runs now (a watch unsubscribes), not when it is collected.
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        close = getattr(responses, "aclose", None)
        if close is not None:
            with contextlib.suppress(Exception):
                await close()


def _next_check(identity: Identity, recheck_seconds: float) -> float:
    check_at = time.time() + recheck_seconds
    if identity.expires_at is not None:
        check_at = min(check_at, identity.expires_at)
    return check_at


# The largest metadata of a call (a token with many accounts, say); larger is RESOURCE_EXHAUSTED.
MAX_METADATA_BYTES = 16 * 1024


def channel_args(settings: ServerSettings) -> list[tuple[str, int]]:
    """The gRPC server options for the shared settings: message limits, keepalive, connection age."""
    args = [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", 30_000),
        ("grpc.http2.max_pings_without_data", 0),
        # gRPC refuses at random the calls whose metadata lies between a soft limit (8 KiB by
        # default) and a hard one: one limit, so that a large token is accepted every time.
        ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        ("grpc.absolute_max_metadata_size", MAX_METADATA_BYTES),
    ]
    if settings.max_connection_age_seconds > 0:
        args += [
            ("grpc.max_connection_age_ms", int(settings.max_connection_age_seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", int(settings.grace_seconds * 1000)),
        ]
    return args


@dataclass
class Readiness:
    """Drives the health service: readiness follows a probe of the real dependencies."""

    health: Any
    service_names: Sequence[str]
    probe: Callable[[], Awaitable[bool]]
    interval_seconds: float = 1.0
    ready: bool = False
    _stopping: bool = field(default=False, repr=False)
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def _set_all(self, serving: bool) -> None:
        status = (
            health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", READINESS, *self.service_names):
            await self.health.set(name, status)

    async def check_once(self) -> bool:
        try:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a
            # cancellation that lands as the probe completes, and stop() would hang.
            async with asyncio.timeout(max(self.interval_seconds, 1.0) * 2):
                ok = await self.probe()
        except Exception as error:  # a probe that raises means "not ready"
            log.warning("readiness probe failed: %s", error)
            ok = False
        if ok != self.ready:
            log.info("readiness changed to %s", "SERVING" if ok else "NOT_SERVING")
        self.ready = ok
        await self._set_all(ok)
        return ok

    async def _loop(self) -> None:
        # The flag, not only the cancellation, ends the loop: a probe may lose the cancellation
        # and return as usual (redis-py sends a command through Python 3.11's asyncio.wait_for,
        # which drops a cancellation that lands as the write completes), and the loop would
        # then probe for ever, and stop() wait for it.
        while not self._stopping:
            await self.check_once()
            if self._stopping:
                break
            await asyncio.sleep(self.interval_seconds)

    async def start(self) -> None:
        await self.health.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
        await self.check_once()
        self._task = asyncio.create_task(self._loop(), name="readiness")

    async def stop(self) -> None:
        """Ends the probing, at once or at the end of the probe under way, then reports NOT_SERVING for good."""
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.health.enter_graceful_shutdown()


class _LateAnswerFilter(logging.Filter):
    """Turns gRPC's report of an answer it refused to send into one line without a traceback.

    An answer that is ready just as the call's deadline passes is refused by gRPC's core,
    which logs `ExecuteBatchError` with a traceback: a client that stopped waiting, not a
    failure of the server. The handler wrapper ends such calls itself when it sees the
    deadline passed; this covers the instant between its check and the send.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and type(error).__name__ == "ExecuteBatchError":
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg, record.args = "call ended before its answer could be sent", ()
            method = getattr(record, "method", "") or method_var.get()
            if method:
                RPC_TOTAL.labels(method, grpc.StatusCode.DEADLINE_EXCEEDED.name).inc()
        return True


_LATE_ANSWERS = _LateAnswerFilter()


def build_server(
    settings: ServerSettings,
    register: Callable[[grpc.aio.Server], None],
    service_names: Sequence[str],
    probe: Callable[[], Awaitable[bool]] | None = None,
    *,
    audited: Mapping[str, TargetOf] | None = None,
    readiness_interval_seconds: float = 1.0,
    recheck_seconds: float = STREAM_RECHECK_SECONDS,
) -> tuple[grpc.aio.Server, int, Readiness]:
    """Creates (not starts) a server with health and reflection; returns it, its bound port and its readiness.

    The port speaks TLS when the settings name a certificate. Every call but health and
    reflection is authenticated and authorized as `settings.auth` says (SettingsError when
    it names no way to); the methods of `audited` ("/package.Service/Method") are audited,
    each with the function that reads its target from its request and response. A stream's
    credentials are checked again at the token's expiry and every `recheck_seconds`.
    Readiness follows `probe` (the service's dependencies) and the keys that verify tokens:
    NOT_SERVING until they are held.
    """
    logging.getLogger("grpc._cython.cygrpc").addFilter(_LATE_ANSWERS)  # once: filters are a set
    gate = gate_for(settings)
    interceptor = CallInterceptor(gate, audited, recheck_seconds)
    server = grpc.aio.server(interceptors=[interceptor], options=channel_args(settings))
    register(server)
    health_servicer = health.aio.HealthServicer()  # type: ignore[attr-defined]
    add_health_and_reflection(server, health_servicer, service_names)
    port = bind(server, f"{settings.host}:{settings.port}", settings.tls.server_credentials())

    async def ready() -> bool:
        return await gate.ready() and (probe is None or await probe())

    return server, port, Readiness(health_servicer, service_names, ready, readiness_interval_seconds)


class GrpcService:
    """A built server and its readiness, started and stopped in the order that health checks need.

    A service with tasks of its own (history's change watcher) extends the hooks:
    `starting` runs before the first call can arrive, `draining` once the service
    reports NOT_SERVING, `stopped` after the last call has ended.
    """

    def __init__(self, server: grpc.aio.Server, readiness: Readiness) -> None:
        self.grpc = server
        self.readiness = readiness

    async def starting(self) -> None:
        """Starts what calls need; nothing by default."""

    async def draining(self) -> None:
        """Ends what would hold calls open past the grace (streams); nothing by default."""

    async def stopped(self) -> None:
        """Stops what the calls needed; nothing by default."""

    async def start(self) -> None:
        await self.starting()
        await self.readiness.start()
        await self.grpc.start()

    async def stop(self, grace: float | None) -> None:
        """Reports NOT_SERVING first, so balancers drain, then lets calls in flight finish within `grace`.

        `grace` None ends the calls in flight at once, as `grpc.aio.Server.stop` does.
        """
        await self.readiness.stop()
        await self.draining()
        await self.grpc.stop(grace)
        await self.stopped()


def shutdown_requested() -> asyncio.Event:
    """An event that the process's SIGTERM or SIGINT sets, from now on (not the default: to die at once)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def wait_for_signal() -> None:
    """Returns when the process gets SIGTERM or SIGINT."""
    await shutdown_requested().wait()
    log.info("shutdown signal received")


# How long past its grace a process may take to stop after SIGTERM or SIGINT before it exits
# anyway (with EXIT_STOP_OVERDUE, saying where it was stuck): within the pods' termination
# grace (deploy/k8s/base: preStop 5 s + grace 10 s + this, below 30 s), so that the
# kubelet's SIGKILL never comes first and the reason is in the log.
STOP_MARGIN_SECONDS: Final = 5.0
EXIT_STOP_OVERDUE: Final = 70  # EX_SOFTWARE


def _awaiting(loop: asyncio.AbstractEventLoop) -> list[str]:
    """Where each task of the loop waits: the coroutines it awaits, outermost first, and the innermost's line."""
    try:
        tasks = asyncio.all_tasks(loop)  # retries by itself while the loop changes the set
    except RuntimeError:
        return []
    places = []
    for task in tasks:
        chain, where = [], "?"
        awaited: Any = task.get_coro()
        while awaited is not None:
            frame = getattr(awaited, "cr_frame", None) or getattr(awaited, "ag_frame", None)
            if frame is not None:
                chain.append(frame.f_code.co_qualname)
                where = f"{frame.f_code.co_filename}:{frame.f_lineno}"
            awaited = getattr(awaited, "cr_await", None) or getattr(awaited, "ag_await", None)
        places.append(f"{task.get_name()}: {' > '.join(chain)} ({where})")
    return sorted(places)


def _exit_if_not_stopped(name: str, seconds: float) -> threading.Timer:
    """Arms the exit of a process that has not stopped within `seconds`; cancel it once stopped.

    A thread, so that it fires whatever the event loop does: a dependency's client that
    swallows a cancellation, or a call that blocks the loop.
    """
    loop = asyncio.get_running_loop()

    def overdue() -> None:
        try:
            log.error(
                "%s did not stop within %g s of the signal; exiting",
                name,
                seconds,
                extra={"awaiting": _awaiting(loop), "exit_code": EXIT_STOP_OVERDUE},
            )
            for handler in logging.getLogger().handlers:
                handler.flush()
        finally:
            os._exit(EXIT_STOP_OVERDUE)  # whatever the logging did

    timer = threading.Timer(seconds, overdue)
    timer.daemon = True
    timer.start()
    return timer


async def serve(
    name: str,
    settings: ServerSettings,
    opened: Callable[[], AbstractAsyncContextManager[tuple[GrpcService, int]]],
    *,
    exit_when_overdue: bool = True,
    **details: object,
) -> None:
    """Runs a service until SIGTERM or SIGINT, then stops it gracefully.

    `opened` builds the service on its dependencies and closes them after it stops.
    Metrics are served on their own port from the start; `details` go in the
    start-up log line. A signal that arrives while the service starts stops it
    gracefully once it has started. From the signal, the service has its grace plus
    STOP_MARGIN_SECONDS to stop and close its dependencies; past that the process exits with
    EXIT_STOP_OVERDUE, logging what it was waiting for (unless `exit_when_overdue` is false:
    a caller that is not the service's own process, a test).
    """
    stop = shutdown_requested()
    overdue: threading.Timer | None = None
    with metrics_served(settings.metrics_port):
        try:
            async with opened() as (service, port):
                await service.start()
                log.info(
                    "%s started",
                    name,
                    extra={
                        "port": port,
                        "metrics_port": settings.metrics_port,
                        "tls": settings.tls.mode,
                        "auth": settings.auth.mode(bool(settings.tls.client_ca_file)),
                        **details,
                    },
                )
                await stop.wait()
                log.info("%s stopping", name, extra={"grace_seconds": settings.grace_seconds})
                if exit_when_overdue:
                    overdue = _exit_if_not_stopped(name, settings.grace_seconds + STOP_MARGIN_SECONDS)
                await service.stop(settings.grace_seconds)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().remove_signal_handler(sig)
            if overdue is not None:
                overdue.cancel()
    log.info("%s stopped", name)
