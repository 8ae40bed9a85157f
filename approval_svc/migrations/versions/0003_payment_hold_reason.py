"""A payment records why it was held for review: payments.hold_reason, NULL for one never held.

Revision ID: 0003
Revises: 0002

Built for a large table, as 0002: the column is added without a default (no rewrite) and
its CHECK without a scan, in one short transaction under `lock_timeout`; the payments
held before this revision get their reason and the CHECK is validated afterwards, each in
a transaction of its own, while writes go on. Each step may be run again after a failure.
The server of the release before writes no hold reason: a payment it holds after this
migration has none (HOLD_REASON_UNSPECIFIED in the API), so deploy the new server with it.
"""

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# A statement that cannot have its lock within this time fails, rather than queue every
# write of the table behind it while it waits for a long transaction; run the migration
# again.
LOCK_TIMEOUT = "5s"

# The reasons, as approval_svc.domain.model.HoldReason names them (a migration is a
# snapshot, so they are written out; tests/unit/test_approval_rules.py holds them equal).
HOLD_REASONS = ("AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD",)

_CHECK = "payments_hold_reason_check"


def upgrade() -> None:
    reasons = ", ".join(f"'{reason}'" for reason in HOLD_REASONS)
    op.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    op.execute("ALTER TABLE payments ADD COLUMN IF NOT EXISTS hold_reason text")
    # NOT VALID: the constraint holds for every write from now on without a scan of the
    # table under its exclusive lock; VALIDATE below scans it without blocking writes.
    op.execute(
        f"""
        ALTER TABLE payments
            DROP CONSTRAINT IF EXISTS {_CHECK},
            ADD CONSTRAINT {_CHECK} CHECK (hold_reason IN ({reasons})) NOT VALID
        """
    )
    with op.get_context().autocommit_block():
        # Until this revision the rules held a payment for one reason only, its amount at or
        # above the review threshold, and always at submission: the first event of every
        # payment ever held is PENDING_REVIEW.
        op.execute(
            """
            UPDATE payments AS p SET hold_reason = 'AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD'
            FROM payment_events AS e
            WHERE e.payment_id = p.payment_id AND e.sequence = 1 AND e.status = 'PENDING_REVIEW'
              AND p.hold_reason IS NULL
            """
        )
        op.execute(f"ALTER TABLE payments VALIDATE CONSTRAINT {_CHECK}")


def downgrade() -> None:
    op.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
    # The reasons go with the column; an upgrade records them again for the payments held so far.
    op.execute("ALTER TABLE payments DROP COLUMN IF EXISTS hold_reason")
