"""The replicator's settings, read once from `REPLICATOR_*` environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from payments_common.keys import (
    DEFAULT_NAMESPACE,
    DEFAULT_PUBLICATION,
    DEFAULT_SLOT_NAME,
    namespace_problem,
    slot_problem,
)
from payments_common.redisurl import is_cluster
from payments_common.settings import EnvReader, ServiceSettings, SettingsError


def wait_replicas(env: EnvReader) -> int | None:
    """REPLICATOR_REDIS_WAIT_REPLICAS: a count of replicas, on a cluster only."""
    if not env.text("REDIS_WAIT_REPLICAS", ""):
        return None
    count = env.integer("REDIS_WAIT_REPLICAS", 0, minimum=0)
    if count and not is_cluster(env.text("REDIS_URL", "")):
        raise SettingsError(
            f"{env.prefix}REDIS_WAIT_REPLICAS applies to a Redis Cluster (redis+cluster://); "
            f"{env.prefix}REDIS_URL names one node"
        )
    return count


@dataclass(frozen=True, kw_only=True)
class Settings(ServiceSettings):
    """Everything the replicator reads from its environment; see docs/replicator.md.

    It serves no API, only grpc.health.v1 on `health_port` (with the shared TLS settings).
    """

    PREFIX: ClassVar[str] = "REPLICATOR_"

    # Credentials stay out of the repr (and so out of any log line that shows the settings).
    database_url: str = field(repr=False)
    redis_url: str = field(repr=False)
    slot_name: str = DEFAULT_SLOT_NAME
    publication: str = DEFAULT_PUBLICATION
    # The read-model version this replicator writes (`rm:v1`): every key, the checkpoint and
    # the lock start with it. REPLICATOR_KEY_NAMESPACE, as history's HISTORY_KEY_NAMESPACE.
    namespace: str = DEFAULT_NAMESPACE
    health_port: int = 50053
    metrics_port: int = 9103
    stream_maxlen: int = 10_000
    lock_ttl_seconds: float = 10.0
    batch_max_changes: int = 2000
    # A transaction with more row changes than this is applied in chunks of this size
    # (memory stays bounded); the checkpoint moves only with its last chunk.
    transaction_chunk_changes: int = 10_000
    # Positions are confirmed to PostgreSQL only after Redis has held them this long, so
    # that Redis's fsync (`appendfsync everysec`) has written them before the slot forgets.
    ack_delay_seconds: float = 2.0
    # How long one Redis command may take before the session restarts (not the lock's TTL:
    # the lock is renewed from a thread of its own).
    redis_timeout_seconds: float = 30.0
    # How often the slot's gauges are read from pg_replication_slots (with metrics served).
    slot_sample_seconds: float = 10.0
    # On a Redis Cluster: how many replicas of each master must have a batch's writes before
    # a position past them is confirmed (WAIT); None reads as 1 on a cluster.
    redis_wait_replicas: int | None = None

    @property
    def cluster(self) -> bool:
        return is_cluster(self.redis_url)

    @property
    def wait_replicas(self) -> int:
        """The replicas that must acknowledge a node's writes: the setting, else 1 on a cluster, 0 on one node."""
        if self.redis_wait_replicas is not None:
            return self.redis_wait_replicas
        return 1 if self.cluster else 0

    @classmethod
    def read(cls, env: EnvReader) -> dict[str, Any]:
        slot_name = env.text("SLOT_NAME", cls.slot_name)
        problem = slot_problem(slot_name)
        if problem:
            raise SettingsError(f"{cls.PREFIX}SLOT_NAME {problem}")
        namespace = env.text("KEY_NAMESPACE", cls.namespace)
        # A rebuild removes the version's keys, found by pattern.
        problem = namespace_problem(namespace)
        if problem:
            raise SettingsError(f"{cls.PREFIX}KEY_NAMESPACE {problem}")
        lock_ttl = env.number("LOCK_TTL_SECONDS", cls.lock_ttl_seconds)
        if lock_ttl < 1:
            raise SettingsError(f"{cls.PREFIX}LOCK_TTL_SECONDS must be at least 1, got {lock_ttl}")
        return {
            **super().read(env),
            "database_url": env.url("DATABASE_URL", ("postgresql://", "postgres://")),
            "redis_url": env.redis_url("REDIS_URL"),
            "slot_name": slot_name,
            "namespace": namespace,
            "publication": env.text("PUBLICATION", cls.publication),
            "health_port": env.port("HEALTH_PORT", cls.health_port),
            "stream_maxlen": env.integer("STREAM_MAXLEN", cls.stream_maxlen, minimum=1),
            "lock_ttl_seconds": lock_ttl,
            "batch_max_changes": env.integer("BATCH_MAX_CHANGES", cls.batch_max_changes, minimum=1),
            "transaction_chunk_changes": env.integer(
                "TRANSACTION_CHUNK_CHANGES", cls.transaction_chunk_changes, minimum=1
            ),
            "ack_delay_seconds": env.number("ACK_DELAY_SECONDS", cls.ack_delay_seconds),
            "redis_timeout_seconds": env.positive("REDIS_TIMEOUT_SECONDS", cls.redis_timeout_seconds),
            "slot_sample_seconds": env.positive("SLOT_SAMPLE_SECONDS", cls.slot_sample_seconds),
            "redis_wait_replicas": wait_replicas(env),
        }
