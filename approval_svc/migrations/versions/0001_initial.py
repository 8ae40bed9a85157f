"""The system of record: accounts, payments, their events, the ledger, idempotency keys.

Revision ID: 0001
Revises:
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# The read side is fed from these tables by logical replication. Their default
# replica identity (the primary key) is enough: the replicator upserts views from
# the new row and deletes by key, and never needs the old row.
# A migration is a snapshot, so the name is written out rather than imported: were the
# default to change, this revision must still create (and drop) what it created.
# tests/unit/test_replicator_config.py holds it equal to the replicator's default,
# payments_common.keys.DEFAULT_PUBLICATION.
PUBLICATION = "payments_read_model"


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE accounts (
            account_id uuid PRIMARY KEY,
            owner_name text NOT NULL CHECK (char_length(owner_name) BETWEEN 1 AND 200),
            currency_code char(3) NOT NULL,
            status text NOT NULL CHECK (status IN ('ACTIVE', 'FROZEN')),
            ledger_balance_minor bigint NOT NULL CHECK (ledger_balance_minor >= 0),
            held_minor bigint NOT NULL DEFAULT 0
                CHECK (held_minor >= 0 AND held_minor <= ledger_balance_minor),
            per_payment_limit_minor bigint NOT NULL CHECK (per_payment_limit_minor > 0),
            daily_limit_minor bigint NOT NULL CHECK (daily_limit_minor > 0),
            total_sent_minor bigint NOT NULL DEFAULT 0 CHECK (total_sent_minor >= 0),
            total_received_minor bigint NOT NULL DEFAULT 0 CHECK (total_received_minor >= 0),
            sent_approved bigint NOT NULL DEFAULT 0,
            sent_declined bigint NOT NULL DEFAULT 0,
            sent_pending_review bigint NOT NULL DEFAULT 0,
            received_approved bigint NOT NULL DEFAULT 0,
            received_declined bigint NOT NULL DEFAULT 0,
            received_pending_review bigint NOT NULL DEFAULT 0,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );

        CREATE TABLE payments (
            payment_id uuid PRIMARY KEY,
            request_id text NOT NULL,
            payer_account_id uuid NOT NULL REFERENCES accounts,
            payee_account_id uuid NOT NULL REFERENCES accounts,
            payer_name text NOT NULL,
            payee_name text NOT NULL,
            currency_code char(3) NOT NULL,
            amount_minor bigint NOT NULL CHECK (amount_minor > 0),
            reference text NOT NULL DEFAULT '',
            status text NOT NULL CHECK (status IN ('APPROVED', 'DECLINED', 'PENDING_REVIEW')),
            decline_reason text,
            created_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            CHECK ((status = 'DECLINED') = (decline_reason IS NOT NULL))
        );
        -- The daily limit sums a payer's payments of one UTC day.
        CREATE INDEX payments_payer_created ON payments (payer_account_id, created_at);
        CREATE INDEX payments_payee_created ON payments (payee_account_id, created_at);

        CREATE TABLE payment_events (
            payment_id uuid NOT NULL REFERENCES payments,
            sequence integer NOT NULL CHECK (sequence > 0),
            status text NOT NULL CHECK (status IN ('APPROVED', 'DECLINED', 'PENDING_REVIEW')),
            decline_reason text,
            actor text NOT NULL,
            note text NOT NULL DEFAULT '',
            created_at timestamptz NOT NULL DEFAULT now(),
            PRIMARY KEY (payment_id, sequence)
        );

        -- Double entry: every movement of funds is a debit and a credit of the same
        -- amount; an opening balance is one credit with no payment.
        CREATE TABLE ledger_entries (
            entry_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            account_id uuid NOT NULL REFERENCES accounts,
            payment_id uuid REFERENCES payments,
            kind text NOT NULL CHECK (kind IN ('OPENING', 'DEBIT', 'CREDIT')),
            amount_minor bigint NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX ledger_entries_account ON ledger_entries (account_id);

        -- AIP-155: the first response to each request_id, written in the same
        -- transaction as the effect.
        CREATE TABLE idempotency_keys (
            request_id text PRIMARY KEY,
            method text NOT NULL,
            request_fingerprint bytea NOT NULL,
            response bytea NOT NULL,
            created_at timestamptz NOT NULL DEFAULT now()
        );
        """
    )
    op.execute(f"CREATE PUBLICATION {PUBLICATION} FOR TABLE accounts, payments, payment_events")


def downgrade() -> None:
    op.execute(f"DROP PUBLICATION IF EXISTS {PUBLICATION}")
    op.execute("DROP TABLE idempotency_keys, ledger_entries, payment_events, payments, accounts")
