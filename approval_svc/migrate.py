"""Runs the schema migrations: `approval-svc migrate` and `downgrade` (never implicitly at server start)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, pool

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


def current(database_url: str) -> str | None:
    """The revision the schema is at; None before the first migration."""
    engine = create_engine(sync_url(database_url), poolclass=pool.NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def upgrade(database_url: str, revision: str = "head") -> str | None:
    """Brings the schema up to `revision` (the newest by default); returns the revision it is at.

    It only moves up: a schema already past `revision` stays where it is.
    """
    command.upgrade(alembic_config(database_url), revision)
    return current(database_url)


def downgrade(database_url: str, revision: str) -> str | None:
    """Takes the schema back down to `revision`; returns the revision it is at."""
    command.downgrade(alembic_config(database_url), revision)
    return current(database_url)
