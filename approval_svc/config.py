"""The service's settings, read once from APPROVAL_* environment variables."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar
from urllib.parse import urlsplit, urlunsplit

from payments.approval.v1 import approval_service_pb2 as pb
from payments_common.policy import method_names
from payments_common.settings import EnvReader, ServerSettings

_URL_SCHEMES = ("postgresql://", "postgres://", "postgresql+asyncpg://")


@dataclass(frozen=True, kw_only=True)
class Settings(ServerSettings):
    """Everything the service reads from its environment; see docs/approval.md."""

    PREFIX: ClassVar[str] = "APPROVAL_"
    SERVED_METHODS: ClassVar[tuple[str, ...]] = tuple(
        method_names(pb.DESCRIPTOR.services_by_name["ApprovalService"])
    )
    # A customer pays from, and reads the payments of, its own accounts (approval_svc/servicer.py);
    # no other method confines a caller to accounts.
    SCOPED_METHODS: ClassVar[tuple[str, ...]] = tuple(
        name for name in SERVED_METHODS if name.endswith(("/SubmitPayment", "/GetPayment"))
    )

    database_url: str = field(repr=False)
    port: int = 50051
    metrics_port: int = 9101
    review_threshold_minor: int = 1_000_000
    db_pool_size: int = 10
    db_pool_timeout_seconds: float = 5.0

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
    def read(cls, env: EnvReader) -> dict[str, Any]:
        return {
            **super().read(env),
            "database_url": env.url("DATABASE_URL", _URL_SCHEMES),
            "review_threshold_minor": env.integer(
                "REVIEW_THRESHOLD_MINOR", cls.review_threshold_minor, minimum=1
            ),
            "db_pool_size": env.integer("DB_POOL_SIZE", cls.db_pool_size, minimum=1),
            "db_pool_timeout_seconds": env.positive("DB_POOL_TIMEOUT_SECONDS", cls.db_pool_timeout_seconds),
        }
