"""Pure statistics of the benchmark: percentiles of latencies, and the median, min and max of repetitions."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

# The latency percentiles that every measurement reports, as fractions.
PERCENTILES: Final = (0.5, 0.9, 0.99, 0.999)


def percentile(values: Sequence[float], q: float, *, presorted: bool = False) -> float:
    """The q-quantile (0 <= q <= 1) by linear interpolation between closest ranks.

    This is the definition of numpy's default and of `statistics.quantiles(method="inclusive")`:
    the minimum for q = 0, the maximum for q = 1, the median for q = 0.5.
    """
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be within [0, 1], got {q}")
    ordered = values if presorted else sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    fraction = position - low
    return ordered[low] + (ordered[high] - ordered[low]) * fraction


@dataclass(frozen=True)
class Spread:
    """One figure over several repetitions: their median, min and max, and every value."""

    median: float
    min: float
    max: float
    reps: tuple[float, ...]

    def as_dict(self) -> dict[str, object]:
        return {"median": self.median, "min": self.min, "max": self.max, "reps": list(self.reps)}


def spread(values: Iterable[float]) -> Spread:
    """The median, min and max of the repetitions of one figure."""
    reps = tuple(float(v) for v in values)
    if not reps:
        raise ValueError("spread of no repetitions")
    return Spread(median=percentile(reps, 0.5), min=min(reps), max=max(reps), reps=reps)


@dataclass(frozen=True)
class Latency:
    """The latency distribution of one measured window, in milliseconds."""

    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float


def latency(seconds: Iterable[float]) -> Latency:
    """Summarizes latencies given in seconds; raises ValueError when there are none."""
    ordered = sorted(seconds)
    if not ordered:
        raise ValueError("no latencies recorded")
    ms = [value * 1000.0 for value in ordered]
    p50, p90, p99, p999 = (percentile(ms, q, presorted=True) for q in PERCENTILES)
    return Latency(
        count=len(ms),
        mean_ms=math.fsum(ms) / len(ms),
        p50_ms=p50,
        p90_ms=p90,
        p99_ms=p99,
        p999_ms=p999,
        max_ms=ms[-1],
    )


def per_op(total: float, ops: int) -> float:
    """A total divided by a count of operations; NaN when nothing completed, never a division error."""
    return total / ops if ops > 0 else math.nan


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is zero or either side is NaN."""
    if denominator == 0 or math.isnan(numerator) or math.isnan(denominator):
        return math.nan
    return numerator / denominator


def excess(window_total: float, window_s: float, baseline_total: float, baseline_s: float) -> float:
    """What a window used beyond a baseline window's rate: window - baseline rate x window length.

    Used for the PostgreSQL CPU of reads: the baseline window runs only the steady
    writes, the measured window the same writes plus the reads. Never negative: noise
    can make a window cheaper than its baseline, which means "no measurable excess".
    """
    if baseline_s <= 0 or window_s <= 0:
        raise ValueError("windows must have a positive length")
    return max(0.0, window_total - baseline_total / baseline_s * window_s)


def merge(parts: Iterable[Sequence[float]]) -> list[float]:
    """The latencies of several generator processes as one list."""
    merged: list[float] = []
    for part in parts:
        merged.extend(part)
    return merged


def histogram_quantile(buckets: Sequence[tuple[float, float]], q: float) -> float:
    """The q-quantile of a Prometheus histogram, as PromQL's `histogram_quantile` estimates it.

    `buckets` are (upper bound, cumulative count) pairs, the last bound +Inf. Within the
    bucket that holds the quantile the observations are taken as spread evenly from the
    bucket below's bound (0 for the first); a quantile in the +Inf bucket is the highest
    finite bound. NaN when the histogram holds no observation.
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be within [0, 1], got {q}")
    ordered = sorted(buckets)
    if not ordered or not math.isinf(ordered[-1][0]):
        raise ValueError("a histogram's buckets end with +Inf")
    total = ordered[-1][1]
    if total <= 0:
        return math.nan
    rank = q * total
    lower_bound, lower_count = 0.0, 0.0
    for bound, count in ordered:
        if count >= rank and count > lower_count:
            if math.isinf(bound):
                return lower_bound
            return lower_bound + (bound - lower_bound) * (rank - lower_count) / (count - lower_count)
        lower_bound, lower_count = bound, count
    return lower_bound
