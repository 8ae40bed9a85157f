"""The history service's settings, read once from HISTORY_* environment variables."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from payments_common.keys import DEFAULT_NAMESPACE, DEFAULT_SLOT_NAME
from payments_common.settings import EnvReader, SettingsError
from payments_common.tls import TlsSettings

PREFIX = "HISTORY_"
MIN_SECRET_BYTES = 16


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment; see docs/history.md."""

    redis_url: str
    page_token_secret: bytes
    host: str = "[::]"
    port: int = 50052
    metrics_port: int = 9102
    max_connection_age_s: float = 300.0
    consistency_wait_max_s: float = 5.0
    watch_queue_size: int = 256
    grace_s: float = 10.0
    max_message_bytes: int = 4 * 1024 * 1024
    log_level: str = "INFO"
    key_namespace: str = DEFAULT_NAMESPACE
    slot_name: str = DEFAULT_SLOT_NAME
    redis_max_connections: int = 64
    redis_timeout_s: float = 5.0
    tls: TlsSettings = field(default_factory=TlsSettings)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        env = EnvReader(PREFIX, environ)
        secret = env.text("PAGE_TOKEN_SECRET").encode()
        if len(secret) < MIN_SECRET_BYTES:
            raise SettingsError(f"{PREFIX}PAGE_TOKEN_SECRET must be at least {MIN_SECRET_BYTES} bytes")
        redis_url = env.text("REDIS_URL")
        if not redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise SettingsError(f"{PREFIX}REDIS_URL must start with redis://, rediss:// or unix://")
        log_level = env.text("LOG_LEVEL", cls.log_level).upper()
        if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise SettingsError(f"{PREFIX}LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return cls(
            redis_url=redis_url,
            page_token_secret=secret,
            host=env.text("HOST", cls.host),
            port=env.integer("PORT", cls.port, minimum=0),
            metrics_port=env.integer("METRICS_PORT", cls.metrics_port, minimum=0),
            max_connection_age_s=env.number("MAX_CONNECTION_AGE_SECONDS", cls.max_connection_age_s),
            consistency_wait_max_s=env.number("CONSISTENCY_WAIT_MAX_SECONDS", cls.consistency_wait_max_s),
            watch_queue_size=env.integer("WATCH_QUEUE_SIZE", cls.watch_queue_size, minimum=1),
            grace_s=env.number("GRACE_SECONDS", cls.grace_s),
            max_message_bytes=env.integer("MAX_MESSAGE_BYTES", cls.max_message_bytes, minimum=65536),
            log_level=log_level,
            key_namespace=env.text("KEY_NAMESPACE", cls.key_namespace),
            slot_name=env.text("SLOT_NAME", cls.slot_name),
            redis_max_connections=env.integer("REDIS_MAX_CONNECTIONS", cls.redis_max_connections, minimum=2),
            redis_timeout_s=_positive(env, "REDIS_TIMEOUT_SECONDS", cls.redis_timeout_s),
            tls=TlsSettings.from_env(env),
        )


def _positive(env: EnvReader, name: str, default: float) -> float:
    value = env.number(name, default)
    if value <= 0:
        raise SettingsError(f"{PREFIX}{name} must be positive, got {value}")
    return value
