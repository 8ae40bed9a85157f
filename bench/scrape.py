"""The services' /metrics as the benchmark reads them: families, histograms summed over processes, a window's change."""

from __future__ import annotations

import math
import urllib.request
from collections.abc import Iterable, Mapping

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from bench import stats

# Upper bound -> cumulative count, +Inf included.
Buckets = dict[float, float]


def families(addr: str) -> list[Metric]:
    """Every metric family that the process at `addr` (host:port) serves on /metrics."""
    with urllib.request.urlopen(f"http://{addr}/metrics", timeout=10) as response:
        return list(text_string_to_metric_families(response.read().decode()))


def histograms(addrs: Iterable[str], names: Iterable[str]) -> dict[str, Buckets]:
    """The buckets of each histogram of `names` (every series of it added up), each process read once."""
    wanted = set(names)
    found: dict[str, Buckets] = {name: {} for name in wanted}
    addrs = list(addrs)
    for addr in addrs:
        for family in families(addr):
            if family.name not in wanted:
                continue
            buckets = found[family.name]
            for sample in family.samples:
                if sample.name == f"{family.name}_bucket":
                    bound = float(sample.labels["le"])
                    buckets[bound] = buckets.get(bound, 0.0) + sample.value
    for name, buckets in found.items():
        if math.inf not in buckets:
            raise LookupError(f"no histogram {name} at {', '.join(addrs)}")
    return found


def window(before: Mapping[float, float], after: Mapping[float, float]) -> Buckets:
    """What was observed between two readings of the same histogram.

    Raises ValueError when a count went down (a process restarted between the readings):
    the difference would be no distribution at all.
    """
    if set(before) != set(after) or any(after[bound] < before[bound] for bound in after):
        raise ValueError("the histogram was reset between the two readings")
    return {bound: count - before[bound] for bound, count in after.items()}


def quantile_ms(buckets: Mapping[float, float], q: float) -> float:
    """The q-quantile of a histogram of seconds, in milliseconds (NaN when it observed nothing)."""
    return stats.histogram_quantile(list(buckets.items()), q) * 1000.0
