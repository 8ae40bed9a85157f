"""How old the read models are, as history reports it: bounded on an idle source while the replicator runs, growing once it stops.

`history_read_model_age_seconds` is the freshness signal of the alert ReadModelsStale
(deploy/k8s/components/alerts/replicator.rules.yml). It must not depend on the replicator
being alive, and must not grow on a source that writes nothing while the replicator is alive
and caught up: the replicator's heartbeat (replicator/runner.py) renews the checkpoint's
source time at an unchanged position.
"""

from __future__ import annotations

import itertools
import math
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import redis
from prometheus_client.parser import text_string_to_metric_families

from payments_common.keys import CHECKPOINT_LSN_FIELD, CHECKPOINT_SOURCE_TIME_FIELD, DEFAULT_SCHEMA
from replicator.runner import HEARTBEAT_INTERVAL_SECONDS
from stack.servers import PostgresServer, free_port
from tests.support.history import HistoryProcess, history_processes, replicated_source
from tests.support.waiting import wait_until

AGE = "history_read_model_age_seconds"


def read_model_age(metrics_port: int, slot: str) -> float:
    """The age a history process exports for the read models of `slot` in rm:v1; fails on other labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    (family,) = [f for f in text_string_to_metric_families(text) if f.name == AGE]
    (sample,) = family.samples
    assert sample.labels == {"slot": slot, "key_namespace": DEFAULT_SCHEMA.namespace}
    return float(sample.value)


@dataclass(frozen=True)
class Look:
    """One look at Redis's checkpoint (its position and covered source time) and at history's age."""

    lsn: int
    source_time_us: int
    age: float


def test_an_idle_source_stays_fresh_and_a_stopped_replicator_makes_it_age(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    with replicated_source(postgres_server, tmp_path) as source:
        payer, payee = source.writer.open_account("Ida"), source.writer.open_account("Ivo")
        source.writer.pay(payer, payee, 100)
        source.wait_replicated()
        metrics_port = free_port()

        def make(_: int) -> HistoryProcess:
            return HistoryProcess(
                source.redis_url,
                free_port(),
                tmp_path / "history.log",
                extra_env={"HISTORY_SLOT_NAME": source.slot_name, "HISTORY_METRICS_PORT": str(metrics_port)},
            )

        client = redis.Redis.from_url(source.redis_url)
        checkpoint_key = DEFAULT_SCHEMA.checkpoint(source.slot_name)
        looks: list[Look] = []

        def look() -> Look:
            lsn, source_time = client.hmget(
                checkpoint_key, [CHECKPOINT_LSN_FIELD, CHECKPOINT_SOURCE_TIME_FIELD]
            )
            assert lsn is not None
            assert source_time is not None
            seen = Look(int(lsn), int(source_time), read_model_age(metrics_port, source.slot_name))
            looks.append(seen)
            return seen

        def renewed_twice_in_place() -> bool:
            """Two renewals of the source time at an unchanged position: only the heartbeat does that."""
            last = look()
            renewals = {
                later.source_time_us
                for earlier, later in itertools.pairwise(looks)
                if later.lsn == earlier.lsn == last.lsn and later.source_time_us > earlier.source_time_us
            }
            return len(renewals) >= 2

        try:
            with history_processes(make, 1):
                wait_until(
                    lambda: not math.isnan(read_model_age(metrics_port, source.slot_name)), 30, "an age"
                )
                # Nothing writes to the source from here on. Its read models stay fresh: the
                # replicator renews the time its checkpoint covers, at the same position.
                start = len(looks)
                wait_until(
                    renewed_twice_in_place,
                    8 * HEARTBEAT_INTERVAL_SECONDS,
                    "two heartbeats of the idle replicator",
                    interval=0.2,
                    detail=source.replicator.log_tail,
                )
                idle = looks[start:]
                assert max(seen.age for seen in idle) < 2 * HEARTBEAT_INTERVAL_SECONDS, idle

                # Stopped, nothing renews it: the age grows past any bound the heartbeat keeps.
                assert source.replicator.stop() == 0
                stopped_at = look()
                wait_until(
                    lambda: look().age > 2 * HEARTBEAT_INTERVAL_SECONDS,
                    8 * HEARTBEAT_INTERVAL_SECONDS,
                    "the age of the read models past twice the heartbeat interval",
                    interval=0.2,
                )
                after = looks[looks.index(stopped_at) :]
                assert {seen.source_time_us for seen in after} == {stopped_at.source_time_us}
                ages = [seen.age for seen in after]
                assert ages == sorted(ages), ages
        finally:
            client.close()
