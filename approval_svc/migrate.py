"""Runs the schema migrations: `approval-svc migrate` (never implicitly at server start)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def sync_url(database_url: str) -> str:
    """The psycopg2 form of a PostgreSQL URL, for Alembic's synchronous engine."""
    for prefix in ("postgresql+asyncpg://", "postgresql+psycopg2://", "postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+psycopg2://" + database_url[len(prefix) :]
    raise ValueError("the database URL must start with postgresql://")


def alembic_config(database_url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", sync_url(database_url).replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head") -> None:
    """Brings the schema to `revision` (the newest by default)."""
    command.upgrade(alembic_config(database_url), revision)
