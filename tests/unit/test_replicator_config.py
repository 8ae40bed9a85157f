"""The replicator's settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from payments_common.keys import DEFAULT_NAMESPACE, DEFAULT_PUBLICATION
from payments_common.settings import SettingsError
from replicator.config import Settings

REQUIRED = {"REPLICATOR_DATABASE_URL": "postgresql://db/x", "REPLICATOR_REDIS_URL": "redis://r:6379/0"}


def test_defaults() -> None:
    settings = Settings.from_env(REQUIRED)
    assert settings.slot_name == "payments_read_model"
    assert settings.publication == "payments_read_model"
    assert settings.namespace == "rm:v1"
    assert (settings.health_port, settings.metrics_port) == (50053, 9103)
    assert settings.stream_maxlen == 10_000
    assert settings.lock_ttl_seconds == 10.0


def test_the_first_migration_creates_the_default_publication() -> None:
    """The migration writes the name out (a migration is a snapshot); it must be the replicator's default."""
    path = Path(__file__).parents[2] / "approval_svc/migrations/versions/0001_initial.py"
    spec = importlib.util.spec_from_file_location("migration_0001", path)
    assert spec is not None
    assert spec.loader is not None
    migration = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(migration)
    assert migration.PUBLICATION == DEFAULT_PUBLICATION


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_required_settings(missing: str) -> None:
    env = {k: v for k, v in REQUIRED.items() if k != missing}
    with pytest.raises(SettingsError, match=missing):
        Settings.from_env(env)


def test_rejects_malformed_values() -> None:
    with pytest.raises(SettingsError):
        Settings.from_env({**REQUIRED, "REPLICATOR_DATABASE_URL": "mysql://x"})
    with pytest.raises(SettingsError):
        Settings.from_env({**REQUIRED, "REPLICATOR_LOCK_TTL_SECONDS": "0.5"})
    with pytest.raises(SettingsError):
        Settings.from_env({**REQUIRED, "REPLICATOR_STREAM_MAXLEN": "0"})
    with pytest.raises(SettingsError):
        Settings.from_env({**REQUIRED, "REPLICATOR_SLOT_NAME": "Bad-Name"})


def test_the_key_namespace_is_a_setting_with_the_shared_default() -> None:
    assert Settings.from_env(REQUIRED).namespace == DEFAULT_NAMESPACE
    assert Settings.from_env({**REQUIRED, "REPLICATOR_KEY_NAMESPACE": "rm:v2"}).namespace == "rm:v2"


@pytest.mark.parametrize(
    "namespace",
    [
        "rm:*",
        "rm:",
        ":v1",
        "rm::v1",
        "rm v1",
        "rm:{v1}",
        "rm:v[12]",
        "rm?v1",
        "rm:account",
        "payment:v1",
        "rm:owner",
        "rm:meta",
    ],
)
def test_a_namespace_that_would_widen_a_key_pattern_is_refused(namespace: str) -> None:
    """A rebuild removes the version's keys by pattern: a glob character, an empty part or a part named
    like a kind of key (`rm:account` would look like `rm`'s accounts) would reach other keys."""
    with pytest.raises(SettingsError, match="REPLICATOR_KEY_NAMESPACE"):
        Settings.from_env({**REQUIRED, "REPLICATOR_KEY_NAMESPACE": namespace})


def test_a_cluster_waits_for_one_replica_by_default_and_one_node_for_none() -> None:
    cluster = Settings.from_env({**REQUIRED, "REPLICATOR_REDIS_URL": "redis+cluster://a:7000,b:7001"})
    assert cluster.cluster
    assert cluster.wait_replicas == 1
    assert Settings.from_env(REQUIRED).wait_replicas == 0
    none = Settings.from_env(
        {**REQUIRED, "REPLICATOR_REDIS_URL": "redis+cluster://a:7000", "REPLICATOR_REDIS_WAIT_REPLICAS": "0"}
    )
    assert none.wait_replicas == 0


def test_waiting_for_replicas_is_refused_on_one_node() -> None:
    with pytest.raises(SettingsError, match="REPLICATOR_REDIS_WAIT_REPLICAS applies to a Redis Cluster"):
        Settings.from_env({**REQUIRED, "REPLICATOR_REDIS_WAIT_REPLICAS": "1"})


def test_a_cluster_url_without_seeds_is_refused() -> None:
    with pytest.raises(SettingsError, match="REPLICATOR_REDIS_URL each seed must be host:port"):
        Settings.from_env({**REQUIRED, "REPLICATOR_REDIS_URL": "redis+cluster://cluster"})
