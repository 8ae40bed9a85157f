"""The replicator's alert rules, checked and unit-tested by promtool with synthetic series.

promtool comes with Debian's `prometheus` package (.ci/run installs it). It is never skipped:
without it the alerts are untested, so the tests fail and say how to install it.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from prometheus_client import REGISTRY
from prometheus_client.metrics import MetricWrapperBase

from history_svc import watcher
from replicator import metrics
from tests.support import ROOT

RULES = ROOT / "deploy" / "k8s" / "components" / "alerts" / "replicator.rules.yml"
RUNBOOK = ROOT / "docs" / "operations.md"
GIB = 1024**3

# The labels of a read-model version, as every series of its replicator carries them
# (replicator/metrics.py): the live one, and a second one built beside it (replicator-next).
V1 = {"slot": "payments_read_model", "key_namespace": "rm:v1"}
V2 = {"slot": "payments_read_model_v2", "key_namespace": "rm:v2"}


def _pod(name: str, address: str, version: dict[str, str]) -> str:
    """The labels of the series of one replicator pod in the Kubernetes namespace "payments", as scraped."""
    labels = {
        "namespace": "payments",
        "pod": name,
        "job": "payments/replicator",
        "instance": address,
        **version,
    }
    return ",".join(f'{key}="{value}"' for key, value in labels.items())


# One replicator pod of the live version, a second one (a standby), and the next version's.
A = _pod("replicator-a", "10.0.0.1:9103", V1)
B = _pod("replicator-b", "10.0.0.2:9103", V1)
C = _pod("replicator-next-c", "10.0.0.3:9103", V2)


def _alert(name: str, labels: dict[str, str], summary: str) -> dict[str, Any]:
    """One firing alert as promtool expects it: every label and every annotation."""
    return {
        "exp_labels": labels,
        "exp_annotations": {"summary": summary, "runbook": f"docs/operations.md#{name.lower()}"},
    }


Checks = list[tuple[str, list[dict[str, Any]]]]

# For each alert, promtool tests of the series that must fire it and of those that must not.
CASES: dict[str, list[dict[str, Any]]] = {}


def _cases(alertname: str, *cases: tuple[dict[str, str], Checks]) -> None:
    """Each case: input series (one sample a minute) and, at each time, the alerts expected."""
    CASES[alertname] = [
        {
            "interval": "1m",
            "input_series": [{"series": name, "values": values} for name, values in series.items()],
            "alert_rule_test": [
                {"eval_time": at, "alertname": alertname, "exp_alerts": expected} for at, expected in checks
            ],
        }
        for series, checks in cases
    ]


LAGGING = _alert(
    "ReplicatorLagging",
    {"severity": "warning", "namespace": "payments", **V1},
    "The read models rm:v1 in payments are 40s behind PostgreSQL.",
)
LAGGING_V2 = _alert(
    "ReplicatorLagging",
    {"severity": "warning", "namespace": "payments", **V2},
    "The read models rm:v2 in payments are 40s behind PostgreSQL.",
)
_cases(
    "ReplicatorLagging",
    # 40 s behind from the first minute: pending for 5 minutes, then firing.
    ({f"replicator_lag_seconds{{{A}}}": "0 40x10"}, [("5m", []), ("7m", [LAGGING])]),
    # Two versions side by side: the one that lags is named.
    (
        {f"replicator_lag_seconds{{{A}}}": "0x10", f"replicator_lag_seconds{{{C}}}": "0 40x10"},
        [("7m", [LAGGING_V2])],
    ),
    # A spike shorter than 5 minutes, and a steady lag under the threshold.
    ({f"replicator_lag_seconds{{{A}}}": "0 40 40 40 0x10"}, [("4m", []), ("8m", [])]),
    ({f"replicator_lag_seconds{{{A}}}": "25x15"}, [("10m", [])]),
)


def _retains(version: dict[str, str]) -> dict[str, Any]:
    return _alert(
        "ReplicatorSlotRetainsWal",
        {"severity": "warning", "namespace": "payments", **version},
        f"The replication slot {version['slot']} of payments keeps 2GiB of WAL on PostgreSQL.",
    )


RETAINS = _retains(V1)
_cases(
    "ReplicatorSlotRetainsWal",
    # The owner and a standby both export the slot: one alert, not two.
    (
        {
            f"replicator_slot_wal_retained_bytes{{{A}}}": f"0 {2 * GIB}x15",
            f"replicator_slot_wal_retained_bytes{{{B}}}": f"0 {2 * GIB}x15",
        },
        [("10m", []), ("12m", [RETAINS])],
    ),
    ({f"replicator_slot_wal_retained_bytes{{{A}}}": f"{GIB // 2}x20"}, [("15m", [])]),
    # Two slots, one per version, each exported by its own replicator: one alert each.
    (
        {
            f"replicator_slot_wal_retained_bytes{{{A}}}": f"0 {2 * GIB}x15",
            f"replicator_slot_wal_retained_bytes{{{C}}}": f"0 {2 * GIB}x15",
        },
        [("12m", [RETAINS, _retains(V2)])],
    ),
    # NaN (the slot could not be read) never fires.
    ({f"replicator_slot_wal_retained_bytes{{{A}}}": " ".join(["NaN"] * 20)}, [("15m", [])]),
)


def _at_risk(status: str) -> dict[str, Any]:
    return _alert(
        "ReplicatorSlotAtRisk",
        {"severity": "critical", "namespace": "payments", "wal_status": status, **V1},
        f"The replication slot payments_read_model of payments is {status}: max_slot_wal_keep_size "
        "removes, or has removed, WAL it needs.",
    )


_cases(
    "ReplicatorSlotAtRisk",
    (
        {
            f'replicator_slot_wal_status{{{A},wal_status="reserved"}}': "1 0 0",
            f'replicator_slot_wal_status{{{A},wal_status="unreserved"}}': "0 1 0",
            f'replicator_slot_wal_status{{{A},wal_status="lost"}}': "0 0 1",
        },
        [("0m", []), ("1m", [_at_risk("unreserved")]), ("2m", [_at_risk("lost")])],
    ),
    ({f'replicator_slot_wal_status{{{A},wal_status="extended"}}': "1x5"}, [("3m", [])]),
)


def _no_lock(version: dict[str, str]) -> dict[str, Any]:
    return _alert(
        "ReplicatorNoLockHolder",
        {"severity": "critical", "namespace": "payments", **version},
        f"No replicator in payments holds the lock of slot {version['slot']} (read models "
        f"{version['key_namespace']}): nothing is replicated to them.",
    )


NO_LOCK = _no_lock(V1)
NOTHING_SCRAPED = _alert(
    "ReplicatorNoLockHolder",
    {"severity": "critical"},
    "No replicator is scraped at all: nothing shows that the read models are replicated.",
)
_cases(
    "ReplicatorNoLockHolder",
    # An owner and a standby: one holds it.
    ({f"replicator_lock_held{{{A}}}": "1x10", f"replicator_lock_held{{{B}}}": "0x10"}, [("5m", [])]),
    # The owner lost it and nobody took over for 2 minutes.
    (
        {f"replicator_lock_held{{{A}}}": "1 0x10", f"replicator_lock_held{{{B}}}": "0x10"},
        [("2m", []), ("4m", [NO_LOCK])],
    ),
    # A takeover within a minute does not fire.
    ({f"replicator_lock_held{{{A}}}": "1 0 0x10", f"replicator_lock_held{{{B}}}": "0 0 1x10"}, [("5m", [])]),
    # No replicator scraped at all.
    ({f"replicator_streaming{{{A}}}": "stale"}, [("1m", []), ("3m", [NOTHING_SCRAPED])]),
    # Two versions in one namespace, each with its lock holder.
    ({f"replicator_lock_held{{{A}}}": "1x10", f"replicator_lock_held{{{C}}}": "1x10"}, [("5m", [])]),
    # The next version has none, though the live one has: that version's alert.
    (
        {
            f"replicator_lock_held{{{A}}}": "1x10",
            f"replicator_lock_held{{{B}}}": "0x10",
            f"replicator_lock_held{{{C}}}": "1 0x10",
        },
        [("2m", []), ("4m", [_no_lock(V2)])],
    ),
    # And the other way round.
    (
        {f"replicator_lock_held{{{A}}}": "1 0x10", f"replicator_lock_held{{{C}}}": "1x10"},
        [("4m", [NO_LOCK])],
    ),
)

BOOTSTRAP = _alert(
    "ReplicatorBootstrapInProgress",
    {"severity": "warning", "namespace": "payments", "reason": "slot_lost", **V1},
    "The read models rm:v1 in payments are being rebuilt from a snapshot (reason slot_lost).",
)
BUILDING_V2 = _alert(
    "ReplicatorBootstrapInProgress",
    {"severity": "warning", "namespace": "payments", "reason": "new_deployment", **V2},
    "The read models rm:v2 in payments are being rebuilt from a snapshot (reason new_deployment).",
)
_cases(
    "ReplicatorBootstrapInProgress",
    (
        {
            f'replicator_bootstrap_in_progress{{{A},reason="slot_lost"}}': "0 1 1 0",
            f'replicator_bootstrap_in_progress{{{A},reason="new_deployment"}}': "0 0 0 0",
        },
        [("0m", []), ("1m", [BOOTSTRAP]), ("2m", [BOOTSTRAP]), ("3m", [])],
    ),
    # A new version built beside the live one, which streams.
    (
        {
            f'replicator_bootstrap_in_progress{{{A},reason="new_deployment"}}': "0x5",
            f'replicator_bootstrap_in_progress{{{C},reason="new_deployment"}}': "1 1 0",
        },
        [("1m", [BUILDING_V2]), ("2m", [])],
    ),
)


def _rebuilt(reason: str) -> dict[str, Any]:
    return _alert(
        "ReplicatorRebuilt",
        {"severity": "warning", "namespace": "payments", "reason": reason, **V1},
        f"The read models rm:v1 in payments were rebuilt because data was gone (reason {reason}).",
    )


REBUILT = _rebuilt("redis_empty")
# The start of each pod's process (prometheus_client's process collector, which carries no
# version labels), in seconds of the test's clock: minute m is 60 * m; -7200 is long before.
A_STARTED = f"process_start_time_seconds{{{_pod('replicator-a', '10.0.0.1:9103', {})}}}"
B_STARTED = f"process_start_time_seconds{{{_pod('replicator-b', '10.0.0.2:9103', {})}}}"


def _counts(pod: str, values: dict[str, str]) -> dict[str, str]:
    """The pod's series of replicator_bootstraps_total, one per reason."""
    return {f'replicator_bootstraps_total{{{pod},reason="{reason}"}}': v for reason, v in values.items()}


_cases(
    "ReplicatorRebuilt",
    # A process that runs counts a rebuild: every reason is a series at 0 from its start, so
    # the rebuild is an increase; 30 minutes later it no longer fires.
    (
        {A_STARTED: "-7200x40", **_counts(A, {"redis_empty": "0 0 1x40", "new_deployment": "1x42"})},
        [("1m", []), ("3m", [REBUILT]), ("40m", [])],
    ),
    # A new pod rebuilds as it starts (a rollout restart after slot_lost, say): it counts the
    # rebuild some 50 ms after its start, before its first scrape, so its series first
    # appears at 1 and increase() sees nothing. The old pod's series were at 0, then gone.
    (
        {
            A_STARTED: "-7200x10 stale",
            **_counts(A, {"redis_empty": "0x10 stale", "new_deployment": "1x10 stale"}),
            B_STARTED: "_x11 660x31",
            **_counts(B, {"redis_empty": "_x11 1x31", "new_deployment": "_x11 0x31"}),
        },
        [("10m", []), ("11m", [REBUILT]), ("40m", [REBUILT]), ("42m", [])],
    ),
    # A container restarted in its pod (the same series) rebuilds again: its counter is 1 as
    # before, but its process is new.
    (
        {A_STARTED: "-7200x10 600x31", **_counts(A, {"slot_lost": "1x41", "new_deployment": "0x41"})},
        [("5m", []), ("11m", [_rebuilt("slot_lost")]), ("39m", [_rebuilt("slot_lost")]), ("41m", [])],
    ),
    # A steady series: a rebuild long ago does not fire forever.
    ({A_STARTED: "-7200x40", **_counts(A, {"redis_empty": "1x40"})}, [("1m", []), ("30m", [])]),
    # A first start is no rebuild, in a new pod as in a process that runs.
    ({B_STARTED: "0x10", **_counts(B, {"new_deployment": "1x10", "redis_empty": "0x10"})}, [("3m", [])]),
    ({A_STARTED: "-7200x10", **_counts(A, {"new_deployment": "0 1x10"})}, [("3m", [])]),
)


# Two history pods serving the live version, and one serving the next version. Each exports
# the age of the read models it serves, labelled with that version (history_svc/watcher.py).
H1 = _pod("history-a", "10.0.1.1:9102", V1).replace("payments/replicator", "payments/history")
H2 = _pod("history-b", "10.0.1.2:9102", V1).replace("payments/replicator", "payments/history")
H3 = _pod("history-c", "10.0.1.3:9102", V2).replace("payments/replicator", "payments/history")
# A caught-up replicator on an idle source renews the time every 5 s: a sawtooth under 5 s.
HEARTBEAT = " ".join(["0.5 4.5"] * 10)


def _stale(version: dict[str, str], age: str) -> dict[str, Any]:
    return _alert(
        "ReadModelsStale",
        {"severity": "critical", "namespace": "payments", **version},
        f"The read models {version['key_namespace']} in payments are {age} old: nothing newer has been "
        "replicated to them.",
    )


_cases(
    "ReadModelsStale",
    # The replicator stops: both history processes see the age grow by a minute a minute. Above
    # 60 s from the second minute (62 s), pending for 2 minutes, then firing.
    (
        {f"history_read_model_age_seconds{{{H}}}": "2+60x10" for H in (H1, H2)},
        [("1m", []), ("2m", []), ("3m", [_stale(V1, "3m 2s")])],
    ),
    # A caught-up replicator on an idle source: never.
    ({f"history_read_model_age_seconds{{{H}}}": HEARTBEAT for H in (H1, H2)}, [("10m", [])]),
    # One process cut off from the change stream (its age grows) while the other is fresh: the
    # read models are not stale.
    (
        {
            f"history_read_model_age_seconds{{{H1}}}": "2+60x10",
            f"history_read_model_age_seconds{{{H2}}}": HEARTBEAT,
        },
        [("5m", []), ("9m", [])],
    ),
    # Two versions side by side: the one whose replicator stopped is named.
    (
        {
            f"history_read_model_age_seconds{{{H1}}}": HEARTBEAT,
            f"history_read_model_age_seconds{{{H3}}}": "2+60x10",
        },
        [("3m", [_stale(V2, "3m 2s")])],
    ),
    # A large transaction that takes 90 s to apply, then caught up again: shorter than 2 minutes.
    ({f"history_read_model_age_seconds{{{H1}}}": "1 90 1x10"}, [("1m", []), ("3m", [])]),
    # Unknown (no checkpoint read yet, or none in Redis): NaN never fires.
    ({f"history_read_model_age_seconds{{{H1}}}": " ".join(["NaN"] * 10)}, [("5m", [])]),
)


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail("promtool is not installed: `apt-get install prometheus` (Debian 12; .ci/run does)")
    return found


def _alert_names() -> list[str]:
    return re.findall(r"^\s*- alert: (\w+)$", RULES.read_text(), flags=re.MULTILINE)


def test_the_rules_file_passes_promtool_check() -> None:
    done = subprocess.run(
        [_promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(_alert_names())} rules found" in done.stdout


def test_every_alert_has_cases_and_a_runbook_section() -> None:
    names = _alert_names()
    assert sorted(CASES) == sorted(names)
    headings = set(re.findall(r"^### (\w+)$", RUNBOOK.read_text(), flags=re.MULTILINE))
    assert set(names) <= headings, "docs/operations.md needs a section `### <alert>` for each alert"


@pytest.mark.parametrize("alertname", sorted(CASES))
def test_the_alert_fires_when_it_should_and_only_then(alertname: str, tmp_path: Path) -> None:
    # JSON is YAML: promtool reads the test file as written here.
    tests = tmp_path / f"{alertname}.test.json"
    tests.write_text(
        json.dumps({"rule_files": [str(RULES)], "evaluation_interval": "1m", "tests": CASES[alertname]})
    )
    done = subprocess.run(
        [_promtool(), "test", "rules", str(tests)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def _exported(module: ModuleType) -> set[str]:
    """The names of the series that the metrics defined in `module` export."""
    names: set[str] = set()
    for value in vars(module).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        for family in value.describe():
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(
                family.type, [""]
            )
            names.update(family.name + suffix for suffix in suffixes)
    return names


def test_the_rules_use_only_metrics_the_replicator_and_history_export() -> None:
    used = set(re.findall(r"\breplicator_[a-z_]+", RULES.read_text()))
    assert used, "no metric found in the rules"
    assert used <= _exported(metrics), used - _exported(metrics)
    # ReadModelsStale reads the history service's age of the read models, labelled like the
    # replicator's series with the version it serves.
    from_history = set(re.findall(r"\bhistory_[a-z_]+", RULES.read_text()))
    assert from_history == {"history_read_model_age_seconds"}
    assert from_history <= _exported(watcher)
    assert watcher.READ_MODEL_AGE._labelnames == metrics.VERSION_LABELS
    # Besides its own, ReplicatorRebuilt joins the start of the process, which prometheus_client's
    # process collector puts in the default registry that /metrics serves (Linux only, as the image).
    assert set(re.findall(r"\bprocess_[a-z_]+", RULES.read_text())) == {"process_start_time_seconds"}
    assert REGISTRY.get_sample_value("process_start_time_seconds") is not None


def test_the_prometheus_rule_is_generated_from_the_rules_file() -> None:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_alerts.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
