"""The benchmark's statistics: percentiles, spreads of repetitions, per-operation costs."""

from __future__ import annotations

import math
import statistics

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench import stats


def test_percentile_of_known_values() -> None:
    values = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert stats.percentile(values, 0.0) == 1.0
    assert stats.percentile(values, 0.5) == 3.0
    assert stats.percentile(values, 1.0) == 5.0
    assert stats.percentile(values, 0.25) == 2.0
    assert stats.percentile(values, 0.9) == pytest.approx(4.6)


def test_percentile_ignores_input_order() -> None:
    assert stats.percentile([5.0, 1.0, 3.0], 0.5) == 3.0


def test_percentile_of_one_value() -> None:
    assert stats.percentile([7.0], 0.99) == 7.0


def test_percentile_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError, match="no values"):
        stats.percentile([], 0.5)
    with pytest.raises(ValueError, match="within"):
        stats.percentile([1.0], 1.5)


@given(st.lists(st.floats(min_value=0, max_value=1e6), min_size=1, max_size=200), st.floats(0, 1))
def test_percentile_matches_statistics_inclusive_and_stays_in_range(values: list[float], q: float) -> None:
    result = stats.percentile(values, q)
    assert min(values) <= result <= max(values)
    if len(values) >= 2:
        expected = statistics.quantiles(values, n=4, method="inclusive")[1]
        assert stats.percentile(values, 0.5) == pytest.approx(expected, rel=1e-9, abs=1e-9)


@given(st.lists(st.floats(min_value=0, max_value=1e3), min_size=1, max_size=50))
def test_percentile_is_monotonic_in_q(values: list[float]) -> None:
    qs = [0.0, 0.1, 0.5, 0.9, 0.99, 1.0]
    results = [stats.percentile(values, q) for q in qs]
    assert results == sorted(results)


def test_spread_gives_median_min_max_and_reps() -> None:
    result = stats.spread([3.0, 1.0, 2.0])
    assert (result.median, result.min, result.max) == (2.0, 1.0, 3.0)
    assert result.reps == (3.0, 1.0, 2.0)
    assert result.as_dict() == {"median": 2.0, "min": 1.0, "max": 3.0, "reps": [3.0, 1.0, 2.0]}


def test_spread_of_even_count_interpolates() -> None:
    assert stats.spread([1.0, 2.0, 3.0, 10.0]).median == 2.5


def test_spread_rejects_no_repetitions() -> None:
    with pytest.raises(ValueError, match="no repetitions"):
        stats.spread([])


def test_latency_is_in_milliseconds() -> None:
    result = stats.latency([0.001, 0.002, 0.003, 0.004, 0.100])
    assert result.count == 5
    assert result.p50_ms == pytest.approx(3.0)
    assert result.max_ms == pytest.approx(100.0)
    assert result.mean_ms == pytest.approx(22.0)
    assert result.p50_ms <= result.p90_ms <= result.p99_ms <= result.p999_ms <= result.max_ms


def test_latency_rejects_nothing_recorded() -> None:
    with pytest.raises(ValueError, match="no latencies"):
        stats.latency([])


def test_per_op_and_ratio_never_divide_by_zero() -> None:
    assert stats.per_op(2.0, 4) == 0.5
    assert math.isnan(stats.per_op(1.0, 0))
    assert stats.ratio(3.0, 2.0) == 1.5
    assert math.isnan(stats.ratio(1.0, 0.0))
    assert math.isnan(stats.ratio(math.nan, 1.0))


def test_excess_subtracts_the_baseline_rate() -> None:
    # Baseline: 1 s of CPU in 10 s; the window: 3 s of CPU in 5 s, so 2.5 s beyond the baseline.
    assert stats.excess(3.0, 5.0, 1.0, 10.0) == pytest.approx(2.5)


def test_excess_is_never_negative() -> None:
    assert stats.excess(0.1, 5.0, 1.0, 5.0) == 0.0


def test_excess_rejects_empty_windows() -> None:
    with pytest.raises(ValueError, match="positive length"):
        stats.excess(1.0, 0.0, 1.0, 1.0)


def test_merge_concatenates_the_parts() -> None:
    assert stats.merge([[1.0], [], [2.0, 3.0]]) == [1.0, 2.0, 3.0]


def test_cpu_spent_ignores_exited_processes_and_counts_new_ones() -> None:
    from bench.cpu import spent

    before = {1: 10.0, 2: 5.0, 3: 100.0}
    after = {1: 10.5, 2: 5.25, 4: 0.125}  # 3 exited, 4 was born
    assert spent(before, after) == pytest.approx(0.875)


def test_cpu_snapshot_of_this_process() -> None:
    import os

    from bench.cpu import snapshot, tree_snapshot

    mine = snapshot([os.getpid(), 2**22 + 1])
    assert list(mine) == [os.getpid()]
    assert mine[os.getpid()] > 0
    assert os.getpid() in tree_snapshot(os.getppid())


def _prometheus_buckets(values: list[float], bounds: tuple[float, ...]) -> list[tuple[float, float]]:
    """The (upper bound, cumulative count) pairs that a prometheus_client Histogram exports for `values`."""
    from prometheus_client import CollectorRegistry, Histogram

    registry = CollectorRegistry()
    histogram = Histogram("delay_seconds", "test", buckets=bounds, registry=registry)
    for value in values:
        histogram.observe(value)
    return [
        (float(sample.labels["le"]), sample.value)
        for family in registry.collect()
        for sample in family.samples
        if sample.name == "delay_seconds_bucket"
    ]


@given(
    st.lists(st.floats(min_value=0.0, max_value=200.0), min_size=1, max_size=300),
    st.floats(min_value=0.0, max_value=1.0),
)
def test_histogram_quantile_lies_in_the_bucket_of_the_exact_quantile(values: list[float], q: float) -> None:
    bounds = (0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0)
    estimate = stats.histogram_quantile(_prometheus_buckets(values, bounds), q)
    # The observation of rank ceil(q * n) (1-based) is in the bucket that PromQL interpolates in.
    ordered = sorted(values)
    exact = ordered[max(0, math.ceil(q * len(ordered)) - 1)]
    upper = next((b for b in bounds if exact <= b), math.inf)
    lower = max((b for b in bounds if b < upper), default=0.0)
    if math.isinf(upper):
        assert estimate == bounds[-1]  # above every bound: the highest finite one, as PromQL says
    else:
        assert lower <= estimate <= upper


def test_histogram_quantile_interpolates_within_a_bucket() -> None:
    # 10 observations up to 1, 10 more up to 2: the median is the first bucket's bound, the
    # 75th percentile halfway through the second bucket.
    buckets = [(1.0, 10.0), (2.0, 20.0), (math.inf, 20.0)]
    assert stats.histogram_quantile(buckets, 0.5) == 1.0
    assert stats.histogram_quantile(buckets, 0.75) == pytest.approx(1.5)
    assert stats.histogram_quantile(buckets, 0.25) == pytest.approx(0.5)


def test_histogram_quantile_of_nothing_is_nan_and_needs_the_inf_bucket() -> None:
    assert math.isnan(stats.histogram_quantile([(1.0, 0.0), (math.inf, 0.0)], 0.99))
    with pytest.raises(ValueError, match="Inf"):
        stats.histogram_quantile([(1.0, 3.0)], 0.5)
    with pytest.raises(ValueError, match="within"):
        stats.histogram_quantile([(math.inf, 3.0)], 1.5)


def test_a_window_of_a_histogram_is_the_difference_of_its_readings() -> None:
    from bench import scrape

    before = {0.01: 2.0, 0.1: 5.0, math.inf: 6.0}
    after = {0.01: 2.0, 0.1: 9.0, math.inf: 11.0}
    assert scrape.window(before, after) == {0.01: 0.0, 0.1: 4.0, math.inf: 5.0}
    # 5 observations, 4 of them in (0.01, 0.1]: the median is inside that bucket, in ms.
    assert 10.0 < scrape.quantile_ms(scrape.window(before, after), 0.5) < 100.0


def test_a_histogram_reset_between_readings_is_no_window() -> None:
    from bench import scrape

    with pytest.raises(ValueError, match="reset"):
        scrape.window({0.1: 5.0, math.inf: 6.0}, {0.1: 1.0, math.inf: 7.0})
    with pytest.raises(ValueError, match="reset"):
        scrape.window({0.1: 5.0, math.inf: 6.0}, {0.2: 5.0, math.inf: 6.0})
