"""The service's settings, read once from APPROVAL_* environment variables."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

from payments_common.settings import EnvReader, SettingsError
from payments_common.tls import TlsSettings

PREFIX = "APPROVAL_"

_URL_SCHEMES = ("postgresql://", "postgres://", "postgresql+asyncpg://")


@dataclass(frozen=True)
class Settings:
    """Everything the service reads from its environment; see docs/approval.md."""

    database_url: str = field(repr=False)
    host: str = "[::]"
    port: int = 50051
    metrics_port: int = 9101
    review_threshold_minor: int = 1_000_000
    db_pool_size: int = 10
    db_pool_timeout_seconds: float = 5.0
    grace_seconds: float = 10.0
    max_message_bytes: int = 4 * 1024 * 1024
    log_level: str = "INFO"
    tls: TlsSettings = field(default_factory=TlsSettings)

    @property
    def async_database_url(self) -> str:
        """The URL in the form SQLAlchemy's asyncpg dialect wants."""
        _, _, rest = self.database_url.partition("://")
        return "postgresql+asyncpg://" + rest

    @property
    def redacted_database_url(self) -> str:
        """The URL without its password, for logs."""
        parts = urlsplit(self.database_url)
        if parts.password is None:
            return self.database_url
        netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
        return urlunsplit(parts._replace(netloc=netloc))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Reads the settings; raises SettingsError naming the variable at fault."""
        env = EnvReader(PREFIX, os.environ if environ is None else environ)
        database_url = env.text("DATABASE_URL")
        if not database_url.startswith(_URL_SCHEMES):
            raise SettingsError(f"{PREFIX}DATABASE_URL must be a postgresql:// URL")
        log_level = env.text("LOG_LEVEL", "INFO").upper()
        if log_level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise SettingsError(f"{PREFIX}LOG_LEVEL must be DEBUG, INFO, WARNING, ERROR or CRITICAL")
        port = env.integer("PORT", 50051, minimum=0)
        metrics_port = env.integer("METRICS_PORT", 9101, minimum=0)
        for name, value in (("PORT", port), ("METRICS_PORT", metrics_port)):
            if value > 65535:
                raise SettingsError(f"{PREFIX}{name} must be at most 65535, got {value}")
        return cls(
            database_url=database_url,
            host=env.text("HOST", "[::]"),
            port=port,
            metrics_port=metrics_port,
            review_threshold_minor=env.integer("REVIEW_THRESHOLD_MINOR", 1_000_000, minimum=1),
            db_pool_size=env.integer("DB_POOL_SIZE", 10, minimum=1),
            db_pool_timeout_seconds=env.number("DB_POOL_TIMEOUT_SECONDS", 5.0),
            grace_seconds=env.number("GRACE_SECONDS", 10.0),
            max_message_bytes=env.integer("MAX_MESSAGE_BYTES", 4 * 1024 * 1024, minimum=1024),
            log_level=log_level,
            tls=TlsSettings.from_env(env),
        )
