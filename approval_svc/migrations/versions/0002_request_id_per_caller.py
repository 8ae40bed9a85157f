"""Idempotency keys belong to their caller: (caller, request_id) is the key of idempotency_keys.

Revision ID: 0002
Revises: 0001

Built for a large table: the new column is added with a constant default (no rewrite),
the new key's index is built CONCURRENTLY (writes go on), and the key is swapped onto
it in one short transaction. Each step may be run again after a failure: a rerun picks
up where the last one stopped. The server of the release before reads keys by
request_id alone (`ON CONFLICT (request_id)`): its mutations fail once the key is
swapped, so it must not serve while this migration runs (docs/approval.md).
"""

from alembic import op
from sqlalchemy import text

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# The caller of every key recorded before this migration: the anonymous caller, as
# approval_svc.servicer.caller_key names it (a migration is a snapshot, so the value is
# written out; tests/unit/test_approval_caller_key.py holds the two equal).
ANONYMOUS_CALLER = "none:anonymous"

# A statement that cannot have its lock within this time fails, rather than queue every
# write of the table behind it while it waits for a long transaction; run the migration
# again.
LOCK_TIMEOUT = "5s"

_NEW_KEY = "idempotency_keys_caller_request_id"
_OLD_KEY = "idempotency_keys_request_id"


def _build_unique_index(name: str, columns: str) -> None:
    """Builds a unique index without blocking writes; an invalid one left by a failed build is replaced."""
    with op.get_context().autocommit_block():
        op.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
        op.execute(f"CREATE UNIQUE INDEX CONCURRENTLY {name} ON idempotency_keys ({columns})")


def upgrade() -> None:
    op.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    # A constant default fills the existing rows without rewriting the table (PostgreSQL 11+).
    op.execute(
        f"ALTER TABLE idempotency_keys ADD COLUMN IF NOT EXISTS caller text NOT NULL DEFAULT '{ANONYMOUS_CALLER}'"
    )
    _build_unique_index(_NEW_KEY, "caller, request_id")
    op.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    # The swap needs the table's exclusive lock only for as long as it takes to drop the
    # old index and rename the new one. Without a default, a write that names no caller
    # fails rather than land with the anonymous caller's keys.
    op.execute(
        f"""
        ALTER TABLE idempotency_keys
            DROP CONSTRAINT idempotency_keys_pkey,
            ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY USING INDEX {_NEW_KEY},
            ALTER COLUMN caller DROP DEFAULT
        """
    )


def downgrade() -> None:
    # Two callers' keys with one request_id cannot both stay under a key of request_id
    # alone, and which one to drop is not for a migration to choose.
    shared = op.get_bind().scalar(
        text(
            "SELECT count(*) FROM (SELECT FROM idempotency_keys GROUP BY request_id HAVING count(*) > 1) AS s"
        )
    )
    if shared:
        raise RuntimeError(
            f"cannot downgrade below 0002: {shared} request_ids are recorded for more than one caller"
            " (SELECT request_id, caller FROM idempotency_keys WHERE request_id IN (SELECT request_id"
            " FROM idempotency_keys GROUP BY request_id HAVING count(*) > 1)); remove the keys to drop first"
        )
    _build_unique_index(_OLD_KEY, "request_id")
    op.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    op.execute(
        f"""
        ALTER TABLE idempotency_keys
            DROP CONSTRAINT idempotency_keys_pkey,
            ADD CONSTRAINT idempotency_keys_pkey PRIMARY KEY USING INDEX {_OLD_KEY},
            DROP COLUMN caller
        """
    )
