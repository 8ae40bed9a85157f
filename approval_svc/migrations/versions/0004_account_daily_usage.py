"""An account counts its daily usage: accounts.daily_usage_day and daily_usage_minor.

Revision ID: 0004
Revises: 0003

The daily limit was a SUM over the payer's payments of the UTC day, whose cost grew with
the payer's volume of the day; the counter is read with the payer's lock and moved in the
same UPDATE as its balances. `daily_usage_minor` is what the account's APPROVED and
PENDING_REVIEW payments created on the UTC day `daily_usage_day` add up to (NULL: no
payment counted yet, which any day reads as 0).

The columns come without a rewrite of the table (a constant default, and none), then the
counters of the current UTC day are filled in from its payments, in the same transaction:
no payment can be written meanwhile (see `upgrade`), so every counter is exact when it
commits, and a run that fails leaves nothing behind. The release before does not move
the counters: it must not serve once this revision is in (docs/approval.md, "Upgrading
to 0004").
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# A statement that cannot have its lock within this time fails, rather than queue every
# payment behind it while it waits for a long transaction; run the migration again.
LOCK_TIMEOUT = "5s"


def upgrade() -> None:
    op.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    # ACCESS EXCLUSIVE on accounts until the commit: every submission and review locks
    # account rows, so each one in flight ends before this, and each later one waits for
    # the commit and then reads the counters this transaction writes.
    op.execute(
        """
        ALTER TABLE accounts
            ADD COLUMN daily_usage_day date,
            ADD COLUMN daily_usage_minor bigint NOT NULL DEFAULT 0
        """
    )
    # SHARE on payments: no payment is written by anything else until the commit (an
    # operator's UPDATE included), and the backfill, a statement of its own after both
    # locks, sees every payment committed before them.
    op.execute("LOCK TABLE payments IN SHARE MODE")
    # The day of the statement's start, after the locks: a payment's created_at is its
    # transaction's start, before its commit, so none committed so far is of a later day.
    # One range of the (payer_account_id, created_at) index per account: the time is that
    # of the accounts and today's payments, whatever the payments of earlier days. Only
    # the payers with usage today are written: the others read 0 on any day.
    op.execute(
        """
        UPDATE accounts AS a
        SET daily_usage_day = t.day, daily_usage_minor = t.used
        FROM (
            SELECT x.account_id, d.day, u.used
            FROM (SELECT (statement_timestamp() AT TIME ZONE 'UTC')::date AS day) AS d
            CROSS JOIN accounts AS x
            CROSS JOIN LATERAL (
                SELECT sum(p.amount_minor) AS used FROM payments AS p
                WHERE p.payer_account_id = x.account_id
                  AND p.created_at >= d.day::timestamp AT TIME ZONE 'UTC'
                  AND p.status IN ('APPROVED', 'PENDING_REVIEW')
            ) AS u
            WHERE u.used IS NOT NULL
        ) AS t
        WHERE a.account_id = t.account_id
        """
    )


def downgrade() -> None:
    op.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    # The release before computes the usage from the payments again; an upgrade counts it anew.
    op.execute(
        "ALTER TABLE accounts DROP COLUMN IF EXISTS daily_usage_minor, DROP COLUMN IF EXISTS daily_usage_day"
    )
