"""A histogram read from the services' /metrics, summed over processes, and its change over a window."""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Iterable, Mapping

from prometheus_client.parser import text_string_to_metric_families

from bench import stats

# Upper bound -> cumulative count, +Inf included.
Buckets = dict[float, float]


def histogram(addrs: Iterable[str], name: str) -> Buckets:
    """The buckets of the histogram `name` (every series of it added up) over the processes at `addrs`."""
    buckets: Buckets = {}
    for addr in addrs:
        with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            if family.name != name:
                continue
            for sample in family.samples:
                if sample.name == f"{name}_bucket":
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
    if math.inf not in buckets:
        raise LookupError(f"no histogram {name} at {', '.join(addrs)}")
    return buckets


def window(before: Mapping[float, float], after: Mapping[float, float]) -> Buckets:
    """What was observed between two readings of the same histogram."""
    return {bound: count - before.get(bound, 0.0) for bound, count in after.items()}


def quantile_ms(buckets: Mapping[float, float], q: float) -> float:
    """The q-quantile of a histogram of seconds, in milliseconds (NaN when it observed nothing)."""
    return stats.histogram_quantile(list(buckets.items()), q) * 1000.0
