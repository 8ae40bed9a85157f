"""The history service's settings, read once from HISTORY_* environment variables."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from payments.history.v1 import history_service_pb2 as pb
from payments_common.keys import DEFAULT_NAMESPACE, DEFAULT_SLOT_NAME, namespace_problem, slot_problem
from payments_common.policy import method_names
from payments_common.settings import EnvReader, ServerSettings, SettingsError

MIN_SECRET_BYTES = 16


@dataclass(frozen=True, kw_only=True)
class Settings(ServerSettings):
    """Everything the service reads from its environment; see docs/history.md."""

    PREFIX: ClassVar[str] = "HISTORY_"
    SERVED_METHODS: ClassVar[tuple[str, ...]] = tuple(
        method_names(pb.DESCRIPTOR.services_by_name["HistoryService"])
    )
    # Every read but the review queue's confines a customer to its accounts
    # (history_svc/servicer.py); the queue spans every account, so no customer role may have it.
    SCOPED_METHODS: ClassVar[tuple[str, ...]] = tuple(
        name for name in SERVED_METHODS if not name.endswith("/ListHeldPayments")
    )

    # Credentials stay out of the repr (and so out of any log line that shows the settings).
    redis_url: str = field(repr=False)
    page_token_secret: bytes = field(repr=False)
    port: int = 50052
    metrics_port: int = 9102
    max_connection_age_seconds: float = 300.0
    consistency_wait_max_seconds: float = 5.0
    watch_queue_size: int = 256
    # The read-model version to serve, and the slot whose checkpoint answers consistency tokens.
    namespace: str = DEFAULT_NAMESPACE
    slot_name: str = DEFAULT_SLOT_NAME
    redis_max_connections: int = 64
    redis_timeout_seconds: float = 5.0

    @classmethod
    def read(cls, env: EnvReader) -> dict[str, Any]:
        secret = env.text("PAGE_TOKEN_SECRET").encode()
        if len(secret) < MIN_SECRET_BYTES:
            raise SettingsError(f"{cls.PREFIX}PAGE_TOKEN_SECRET must be at least {MIN_SECRET_BYTES} bytes")
        return {
            **super().read(env),
            "redis_url": env.redis_url("REDIS_URL"),
            "page_token_secret": secret,
            "consistency_wait_max_seconds": env.number(
                "CONSISTENCY_WAIT_MAX_SECONDS", cls.consistency_wait_max_seconds
            ),
            "watch_queue_size": env.integer("WATCH_QUEUE_SIZE", cls.watch_queue_size, minimum=1),
            # KEY_NAMESPACE, not NAMESPACE: the variable's name predates the field's.
            "namespace": _checked(
                env.text("KEY_NAMESPACE", cls.namespace), namespace_problem, "KEY_NAMESPACE"
            ),
            "slot_name": _checked(env.text("SLOT_NAME", cls.slot_name), slot_problem, "SLOT_NAME"),
            "redis_max_connections": env.integer(
                "REDIS_MAX_CONNECTIONS", cls.redis_max_connections, minimum=2
            ),
            "redis_timeout_seconds": env.positive("REDIS_TIMEOUT_SECONDS", cls.redis_timeout_seconds),
        }


def _checked(value: str, problem_of: Callable[[str], str | None], name: str) -> str:
    problem = problem_of(value)
    if problem:
        raise SettingsError(f"{Settings.PREFIX}{name} {problem}")
    return value
