"""OpenTelemetry tracing: off unless the standard OTEL_* environment variables switch it on.

Tracing is on when `OTEL_TRACES_EXPORTER` names an exporter (`otlp`, or `console` to print
spans) and `OTEL_SDK_DISABLED` is not `true`; everything else is the OpenTelemetry SDK's own
configuration: `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`), headers, certificate
and timeout for the OTLP/gRPC exporter, `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`,
`OTEL_BSP_*` for the batch processor. The sampler is `OTEL_TRACES_SAMPLER`; unset, it is
`parentbased_traceidratio` at `OTEL_TRACES_SAMPLER_ARG` (default DEFAULT_SAMPLE_RATIO here):
a caller's sampled trace is always followed, and a share of the others.

Off, nothing is created: no provider, no span, no trace context written to the WAL, and the
call paths test one module flag (`active()`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Final

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, Span, SpanContext, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from payments_common import logs
from payments_common.lsn import format_lsn
from payments_common.settings import SettingsError

log = logging.getLogger(__name__)

# The prefix of the transactional logical message that carries a mutation's trace context
# through the write-ahead log to the replicator (pg_logical_emit_message).
WAL_MESSAGE_PREFIX: Final = "payments.trace"
# Unless OTEL_TRACES_SAMPLER says otherwise: one trace in a hundred, and every trace that a
# caller sampled.
DEFAULT_SAMPLE_RATIO: Final = "0.01"
EXPORTERS: Final = ("otlp", "console")
# How long a stopping process waits for its last spans to be exported.
SHUTDOWN_SECONDS: Final = 3.0
# The longest attribute value kept (a caller's text in a field it sent is cut there), unless
# OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT or OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT says otherwise.
MAX_ATTRIBUTE_LENGTH: Final = 256
# The longest tracestate taken from a caller (W3C: 32 members, 512 characters are enough).
MAX_TRACESTATE_LENGTH: Final = 512

# A W3C traceparent of version 00: the only text written into SQL, so it is checked first.
_TRACEPARENT = re.compile(r"00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")

_PROPAGATOR: Final = TraceContextTextMapPropagator()
_tracer: Tracer | None = None
_provider: Any = None


def active() -> bool:
    """Whether this process traces."""
    return _tracer is not None


def tracer() -> Tracer:
    if _tracer is None:
        raise RuntimeError("tracing is off")
    return _tracer


def enabled_by(environ: Mapping[str, str]) -> bool:
    """Whether the environment switches tracing on (SettingsError for an exporter not supported)."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    exporters = [name.strip().lower() for name in environ.get("OTEL_TRACES_EXPORTER", "").split(",")]
    exporters = [name for name in exporters if name and name != "none"]
    for name in exporters:
        if name not in EXPORTERS:
            raise SettingsError(
                f"OTEL_TRACES_EXPORTER: {name!r} is not supported here (one of {', '.join(EXPORTERS)}, or none)"
            )
    if "otlp" in exporters:
        for variable in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
            protocol = environ.get(variable, "").strip()
            if protocol and protocol != "grpc":
                raise SettingsError(f"{variable}: {protocol!r} is not supported here (grpc)")
            if protocol:
                break
    return bool(exporters)


def configure(service: str, environ: Mapping[str, str] | None = None) -> bool:
    """Switches tracing on when the environment says so; returns whether it is on.

    SettingsError when the OTEL_* variables name what this service cannot do. `environ`
    decides whether tracing is on and the sampler; the SDK's exporter, resource and limits
    read the process's own environment.
    """
    env = os.environ if environ is None else environ
    if not enabled_by(env):
        return False
    # Imported only when on: an untraced process loads none of the SDK.
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import SpanLimits, TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter

    sampler = _sampler(env)
    # OTEL_SERVICE_NAME or a service.name in OTEL_RESOURCE_ATTRIBUTES wins over the default name.
    resource = Resource.create({})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service}))
    # A caller's text in an attribute (a field it sent) is cut, unless the standard variables say otherwise.
    length_set = any(
        env.get(name)
        for name in ("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT")
    )
    limits = SpanLimits() if length_set else SpanLimits(max_attribute_length=MAX_ATTRIBUTE_LENGTH)
    provider = TracerProvider(resource=resource, sampler=sampler, span_limits=limits)
    names = {name.strip().lower() for name in env.get("OTEL_TRACES_EXPORTER", "").split(",")}
    exporters: list[SpanExporter] = []
    if "otlp" in names:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporters.append(OTLPSpanExporter())
    if "console" in names:
        exporters.append(ConsoleSpanExporter())
    for exporter in exporters:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    install(provider, service)
    log.info(
        "tracing on", extra={"exporters": sorted(names - {"none", ""}), "sampler": str(provider.sampler)}
    )
    return True


# The samplers of the OpenTelemetry specification that OTEL_TRACES_SAMPLER may name.
_SAMPLERS: Final = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


def _sampler(env: Mapping[str, str]) -> Any:
    """The sampler the environment names, checked: an unknown name or a ratio outside 0-1 is refused."""
    from opentelemetry.sdk.trace import sampling

    name = env.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if name and name not in _SAMPLERS:
        raise SettingsError(f"OTEL_TRACES_SAMPLER: {name!r} is not one of {', '.join(_SAMPLERS)}")
    if name in ("always_on", "always_off", "parentbased_always_on", "parentbased_always_off"):
        root = sampling.ALWAYS_ON if name.endswith("always_on") else sampling.ALWAYS_OFF
        return sampling.ParentBased(root) if name.startswith("parentbased_") else root
    # Unset: ours, parent-based at DEFAULT_SAMPLE_RATIO. Named without a ratio: 1, as the specification says.
    text = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip() or (DEFAULT_SAMPLE_RATIO if not name else "1")
    try:
        ratio = float(text)
    except ValueError:
        raise SettingsError(f"OTEL_TRACES_SAMPLER_ARG: {text!r} is not a ratio between 0 and 1") from None
    if not 0.0 <= ratio <= 1.0:
        raise SettingsError(f"OTEL_TRACES_SAMPLER_ARG: {text!r} is not a ratio between 0 and 1")
    if name == "traceidratio":
        return sampling.TraceIdRatioBased(ratio)
    return sampling.ParentBasedTraceIdRatio(ratio)


def configure_or_exit(service: str) -> bool:
    """`configure`, or exit status 2 with one line on stderr naming the variable at fault."""
    try:
        return configure(service)
    except SettingsError as error:
        print(f"{service}: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def install(provider: Any, service: str) -> None:
    """Traces with `provider` (an SDK TracerProvider) from now on; log lines carry the trace's ids."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer(service)
    logs.trace_ids = current_ids


def shutdown(timeout_seconds: float = SHUTDOWN_SECONDS) -> None:
    """Exports what is pending, for `timeout_seconds` at most, and switches tracing off; nothing when off.

    A collector that does not answer must not hold a stopping process past its grace: the
    export goes on in a daemon thread, which the process's exit ends.
    """
    global _tracer, _provider
    provider, _provider, _tracer = _provider, None, None
    logs.trace_ids = None
    if provider is None:
        return

    def export_the_rest() -> None:
        try:
            provider.shutdown()
        except Exception as error:  # the process is stopping: never fail it for its spans
            log.warning("could not export the last spans: %s", error)

    exporting = threading.Thread(target=export_the_rest, name="tracing-shutdown", daemon=True)
    exporting.start()
    exporting.join(timeout_seconds)
    if exporting.is_alive():
        log.warning(
            "the last spans were not exported within %.0fs of the stop; they are lost", timeout_seconds
        )


def extract(carrier: Mapping[str, str]) -> Context:
    """The trace context that `carrier` (gRPC metadata, say) propagates, W3C trace context."""
    return _PROPAGATOR.extract(carrier)


def traceparent(span_context: SpanContext) -> str:
    """The W3C traceparent of `span_context`."""
    flags = f"{int(span_context.trace_flags):02x}"
    return f"00-{span_context.trace_id:032x}-{span_context.span_id:016x}-{flags}"


def parse_traceparent(text: str | bytes) -> SpanContext | None:
    """The span context of a W3C traceparent, or None when it is not one."""
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not _TRACEPARENT.fullmatch(text):
        return None
    _, trace_id, span_id, flags = text.split("-")
    context = SpanContext(
        int(trace_id, 16), int(span_id, 16), is_remote=True, trace_flags=trace.TraceFlags(int(flags, 16))
    )
    return context if context.is_valid else None


def sampled_traceparent() -> str | None:
    """The traceparent of the current span when it is sampled (what to write to the WAL), else None."""
    if _tracer is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not (context.is_valid and context.trace_flags.sampled):
        return None
    return traceparent(context)


@contextlib.contextmanager
def span(name: str, attributes: Mapping[str, Any] | None = None) -> Iterator[Span | None]:
    """A child span of the current one while the block runs; None (and nothing created) when off."""
    if _tracer is None:
        yield None
        return
    with _tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def set_attributes(attributes: Mapping[str, Any]) -> None:
    """Sets attributes on the current span (nothing when off or not recording)."""
    if _tracer is None:
        return
    current = trace.get_current_span()
    if current.is_recording():
        current.set_attributes(attributes)


def note_payment(payment_id: str) -> None:
    """Names the payment that the current request concerns: in its log lines, and in its span."""
    logs.payment_id_var.set(payment_id)
    set_attributes({"payment.id": payment_id})


def current_ids() -> tuple[str, str] | None:
    """The current trace and span ids as hex, for log lines; None when off or outside a span."""
    if _tracer is None:
        return None
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


# The codes that mark a server span as failed (OpenTelemetry's semantic conventions for gRPC):
# the others are the caller's doing.
_SERVER_ERRORS: Final = frozenset(
    {"UNKNOWN", "DEADLINE_EXCEEDED", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS"}
)
_GRPC_CODES: Final = {
    name: number
    for number, name in enumerate(
        [
            "OK",
            "CANCELLED",
            "UNKNOWN",
            "INVALID_ARGUMENT",
            "DEADLINE_EXCEEDED",
            "NOT_FOUND",
            "ALREADY_EXISTS",
            "PERMISSION_DENIED",
            "RESOURCE_EXHAUSTED",
            "FAILED_PRECONDITION",
            "ABORTED",
            "OUT_OF_RANGE",
            "UNIMPLEMENTED",
            "INTERNAL",
            "UNAVAILABLE",
            "DATA_LOSS",
            "UNAUTHENTICATED",
        ]
    )
}


def start_server_span(method: str, metadata: Iterable[tuple[str, Any]] | None) -> Span:
    """The span of one call of `method` ("/package.Service/Method"), child of the caller's trace context."""
    carrier = {
        key: value
        for key, value in metadata or ()
        if isinstance(value, str)
        and (
            (key == "traceparent" and len(value) <= 55)
            or (key == "tracestate" and len(value) <= MAX_TRACESTATE_LENGTH)
        )
    }
    name = method.lstrip("/")
    service, _, short = name.rpartition("/")
    return tracer().start_span(
        name,
        context=extract(carrier),
        kind=SpanKind.SERVER,
        attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": short},
    )


def end_server_span(span: Span, code: str) -> None:
    """Ends a call's span with its gRPC status code (a name: "OK", "NOT_FOUND", ...)."""
    span.set_attribute("rpc.grpc.status_code", _GRPC_CODES.get(code, 2))
    if code in _SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, code))
    span.end()


def delivered(applied: SpanContext, payment_id: str, lsn: int) -> None:
    """Records a watch stream's delivery of a change in the trace of the span that applied it.

    A child of `applied` (the replicator's span), linked to the stream's own span, which
    lasts as long as the stream.
    """
    stream = trace.get_current_span().get_span_context()
    tracer().start_span(
        "deliver",
        context=trace.set_span_in_context(trace.NonRecordingSpan(applied)),
        kind=SpanKind.PRODUCER,
        links=[Link(stream)] if stream.is_valid else None,
        attributes={"payment.id": payment_id, "db.consistency_lsn": format_lsn(lsn)},
    ).end()


def links(contexts: Sequence[SpanContext]) -> list[Link]:
    return [Link(context) for context in contexts]


def now_ns() -> int:
    return time.time_ns()


__all__ = [
    "DEFAULT_SAMPLE_RATIO",
    "WAL_MESSAGE_PREFIX",
    "Link",
    "Span",
    "SpanContext",
    "SpanKind",
    "Status",
    "StatusCode",
    "active",
    "configure",
    "current_ids",
    "extract",
    "install",
    "links",
    "parse_traceparent",
    "sampled_traceparent",
    "set_attributes",
    "shutdown",
    "span",
    "traceparent",
    "tracer",
]
