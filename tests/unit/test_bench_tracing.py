"""The tracing figures' own parts: the configurations and their order, the ratios, the backlog's traced share, the counting receiver."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.resource.v1 import resource_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from bench import backlog, report
from bench.load import sampled_traceparent
from bench.phases import drain, tracing
from payments_common.tracing import DEFAULT_SAMPLE_RATIO, parse_traceparent
from stack.otlp import SpanCounter, read_counts


def test_each_configuration_takes_each_place_in_turn() -> None:
    orders = [[c.key for c in tracing.rotated(tracing.CONFIGS, rep)] for rep in range(3)]
    assert orders[0] == ["off", "sampled_all", "default_ratio"]
    for place in range(3):
        assert sorted(order[place] for order in orders) == sorted(report.TRACING_CONFIGS)
    assert [c.key for c in tracing.CONFIGS] == list(report.TRACING_CONFIGS)


@pytest.mark.parametrize("reps", [1, 2, 3])
def test_the_drains_end_with_tracing_off(reps: int) -> None:
    orders = [[c.key for c in tracing.drain_order(rep, reps)] for rep in range(reps)]
    assert orders[-1][-1] == "off"
    assert all(sorted(order) == sorted(report.TRACING_CONFIGS) for order in orders)


def test_the_configurations_differ_only_in_what_tracing_does() -> None:
    off, every, default = tracing.CONFIGS
    assert off.env("replicator", "http://127.0.0.1:1")["OTEL_TRACES_EXPORTER"] == "none"
    for config in (every, default):
        env = config.env("replicator", "http://127.0.0.1:1")
        assert env["OTEL_TRACES_EXPORTER"] == "otlp"
        # The services' default sampler, whatever the benchmark's own environment says.
        assert env["OTEL_TRACES_SAMPLER"] == ""
        assert env["OTEL_SERVICE_NAME"] == f"replicator-bench-{config.key}"
    assert (every.traced_calls, every.traced_share) == (True, 1.0)
    assert (default.traced_calls, default.traced_share) == (False, float(DEFAULT_SAMPLE_RATIO))
    assert (off.traced_calls, off.traced_share) == (False, 0.0)


def test_ratios_divide_by_off_of_the_same_repetition() -> None:
    traced = {"throughput_rps": 450.0, "server_cpu_us_per_rpc": 1500.0, "postgres_cpu_us_per_rpc": 0.0}
    off = {"throughput_rps": 500.0, "server_cpu_us_per_rpc": 1200.0, "postgres_cpu_us_per_rpc": 0.0}
    ratios = tracing.ratios_to_off(traced, off, tracing.SUBMIT_RATIOS)
    assert ratios["throughput_ratio_to_off"] == pytest.approx(0.9)
    assert ratios["cpu_ratio_to_off"] == pytest.approx(1.25)
    assert math.isnan(ratios["postgres_cpu_ratio_to_off"])


def test_steady_cpu_leaves_out_the_replicators_start() -> None:
    drained = drain.Drain(
        changes=10_000,
        elapsed_s=2.0,
        startup_s=0.5,
        cpu_s=0.8,
        redis_cpu_s=0.1,
        pg_cpu_s=0.1,
        generation_s=1.0,
        traced=2_500,
        startup_cpu_s=0.3,
    )
    assert drained.cpu_us_per_change == pytest.approx(80)
    assert drained.cpu_us_per_change_steady == pytest.approx(50)


@pytest.mark.parametrize(
    ("count", "share", "traced"),
    [(10_000, 0.01, 100), (2_500, 0.01, 25), (5, 1.0, 5), (7, 0.0, 0), (99, 0.01, 1), (10, 0.25, 2)],
)
def test_a_chunk_traces_its_share_rounded(count: int, share: float, traced: int) -> None:
    assert backlog.traced_in_chunk(count, share) == traced


def test_the_loads_trace_context_is_a_new_sampled_trace_each_time() -> None:
    rng = random.Random(7)
    first, second = sampled_traceparent(rng), sampled_traceparent(rng)
    parsed = parse_traceparent(first)
    assert parsed is not None
    assert parsed.trace_flags.sampled
    other = parse_traceparent(second)
    assert other is not None
    assert other.trace_id != parsed.trace_id


def _request(service: str, spans: int) -> trace_service_pb2.ExportTraceServiceRequest:
    resource = resource_pb2.Resource(
        attributes=[common_pb2.KeyValue(key="service.name", value=common_pb2.AnyValue(string_value=service))]
    )
    scope = trace_pb2.ScopeSpans(spans=[trace_pb2.Span(name=f"s{i}") for i in range(spans)])
    return trace_service_pb2.ExportTraceServiceRequest(
        resource_spans=[trace_pb2.ResourceSpans(resource=resource, scope_spans=[scope])]
    )


def test_the_counting_receiver_counts_each_services_spans_into_its_file(tmp_path: Path) -> None:
    path = tmp_path / "counts.json"
    assert read_counts(path) == {}
    counter = SpanCounter(path)
    counter.Export(_request("approval-svc-bench-sampled_all", 3), None)  # type: ignore[arg-type]
    counter.Export(_request("replicator-bench-sampled_all", 512), None)  # type: ignore[arg-type]
    counter.Export(_request("approval-svc-bench-sampled_all", 2), None)  # type: ignore[arg-type]
    assert read_counts(path) == {"approval-svc-bench-sampled_all": 5, "replicator-bench-sampled_all": 512}
