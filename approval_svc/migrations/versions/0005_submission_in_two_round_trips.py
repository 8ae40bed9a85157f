"""A submission's writes as a server-side function, and a procedure that commits a decision made without locks.

Revision ID: 0005
Revises: 0004

`apply_decision` is the one statement that writes a submitted payment: the payment, its
event, both accounts (balances, counts, the daily counter), the ledger rows and the
request's record, as the service ran it until now. It returns nothing when the request's
record was written, the record of a request with the same key that committed first, or no
row at all when such a record was committed while the statement waited for it.

`submit_decided` is a decision's write and commit in one call, for a decision made from
accounts read without locks. It locks the accounts (in account order, without waiting: a
lock held by another transaction is a conflict), and writes only if each is still the
version that was read (its `xmin`: any committed change of the row
gives it another); then it writes with `apply_decision`, adds the trace context to the
WAL when it is given, commits, and returns a WAL position read after the commit. It
answers `committed`, `replay` (a request with the same key is recorded: nothing written,
its record is returned) or `conflict` (an account changed, or the key was committed while
it waited: nothing written; decide again under the locks). It must be CALLed outside a
transaction block, since it commits.

The release before does not use them: this revision may go in while it serves.
"""

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_ARGUMENTS = """
    uuid, text, uuid, uuid, text, text, text, bigint, text, text, text, timestamptz, timestamptz, text,
    integer, text, text, text, text, timestamptz,
    timestamptz, uuid[], bigint[], bigint[], bigint[], bigint[], bigint[], bigint[], bigint[], bigint[],
    bigint[], bigint[], bigint[], date[], uuid[], uuid[], text[], bigint[],
    text, text, text, bytea, bytea
"""


def upgrade() -> None:
    op.execute(
        f"""
        CREATE FUNCTION apply_decision({_ARGUMENTS})
        RETURNS TABLE (method text, request_fingerprint bytea, response bytea)
        LANGUAGE plpgsql AS $body$
        BEGIN
        RETURN QUERY
        WITH payment AS (
            INSERT INTO payments (
                payment_id, request_id, payer_account_id, payee_account_id, payer_name, payee_name,
                currency_code, amount_minor, reference, status, decline_reason, created_at, updated_at,
                hold_reason
            )
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
            RETURNING payment_id
        ),
        event AS (
            INSERT INTO payment_events (payment_id, sequence, status, decline_reason, actor, note, created_at)
            SELECT p.payment_id, $15, $16, $17, $18, $19, $20 FROM payment AS p
        ),
        changed AS (
            UPDATE accounts AS a SET
                ledger_balance_minor = a.ledger_balance_minor + d.ledger,
                held_minor = a.held_minor + d.held,
                total_sent_minor = a.total_sent_minor + d.total_sent,
                total_received_minor = a.total_received_minor + d.total_received,
                sent_approved = a.sent_approved + d.sent_approved,
                sent_declined = a.sent_declined + d.sent_declined,
                sent_pending_review = a.sent_pending_review + d.sent_pending_review,
                received_approved = a.received_approved + d.received_approved,
                received_declined = a.received_declined + d.received_declined,
                received_pending_review = a.received_pending_review + d.received_pending_review,
                daily_usage_minor = CASE
                    WHEN a.daily_usage_day = d.usage_day THEN a.daily_usage_minor + d.usage
                    WHEN d.usage > 0 AND (a.daily_usage_day IS NULL OR a.daily_usage_day < d.usage_day)
                        THEN d.usage
                    ELSE a.daily_usage_minor
                END,
                daily_usage_day = CASE
                    WHEN d.usage > 0 AND (a.daily_usage_day IS NULL OR a.daily_usage_day < d.usage_day)
                        THEN d.usage_day
                    ELSE a.daily_usage_day
                END,
                updated_at = $21
            FROM unnest($22, $23, $24, $25, $26, $27, $28, $29, $30, $31, $32, $33, $34)
                 AS d(account_id, ledger, held, total_sent, total_received, sent_approved, sent_declined,
                      sent_pending_review, received_approved, received_declined, received_pending_review,
                      usage, usage_day)
            WHERE a.account_id = d.account_id
        ),
        ledger AS (
            INSERT INTO ledger_entries (account_id, payment_id, kind, amount_minor, created_at)
            SELECT e.account_id, e.payment_id, e.kind, e.amount, $21
            FROM unnest($35, $36, $37, $38) AS e(account_id, payment_id, kind, amount)
        ),
        request AS (
            INSERT INTO idempotency_keys (caller, request_id, method, request_fingerprint, response)
            VALUES ($39, $40, $41, $42, $43)
            ON CONFLICT (caller, request_id) DO NOTHING
            RETURNING 1
        )
        SELECT NULL::text, NULL::bytea, NULL::bytea FROM request
        UNION ALL
        SELECT k.method, k.request_fingerprint, k.response FROM idempotency_keys AS k
        WHERE k.caller = $39 AND k.request_id = $40 AND NOT EXISTS (SELECT FROM request);
        END
        $body$
        """
    )
    op.execute(
        f"""
        CREATE PROCEDURE submit_decided(
            account_ids uuid[], versions text[], trace_context text, {_ARGUMENTS},
            INOUT outcome text DEFAULT NULL, INOUT wal_position pg_lsn DEFAULT NULL,
            INOUT stored_method text DEFAULT NULL, INOUT stored_fingerprint bytea DEFAULT NULL,
            INOUT stored_response bytea DEFAULT NULL
        )
        LANGUAGE plpgsql AS $body$
        DECLARE
            read_versions text[];
            found_any boolean := false;
            written boolean := false;
            r record;
        BEGIN
            -- The accounts as the decision read them, or nothing is written. Compared first
            -- without a lock, then locked without waiting: a row that another transaction is
            -- writing will not be the version read, and the decision is made again under the
            -- locks, which queue for it once.
            SELECT array_agg(a.xmin::text ORDER BY a.account_id) INTO read_versions
            FROM accounts AS a WHERE a.account_id = ANY(account_ids);
            IF read_versions IS DISTINCT FROM versions THEN
                outcome := 'conflict';
                RETURN;
            END IF;
            BEGIN
                SELECT array_agg(s.version ORDER BY s.account_id) INTO read_versions
                FROM (
                    SELECT a.account_id, a.xmin::text AS version FROM accounts AS a
                    WHERE a.account_id = ANY(account_ids)
                    ORDER BY a.account_id
                    FOR NO KEY UPDATE NOWAIT
                ) AS s;
            EXCEPTION WHEN lock_not_available THEN
                outcome := 'conflict';
                RETURN;
            END;
            IF read_versions IS DISTINCT FROM versions THEN
                outcome := 'conflict';
                RETURN;
            END IF;
            FOR r IN SELECT * FROM apply_decision(
                $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22,
                $23, $24, $25, $26, $27, $28, $29, $30, $31, $32, $33, $34, $35, $36, $37, $38, $39, $40,
                $41, $42, $43, $44, $45, $46
            ) LOOP
                found_any := true;
                IF r.method IS NULL THEN
                    written := true;
                ELSE
                    stored_method := r.method;
                    stored_fingerprint := r.request_fingerprint;
                    stored_response := r.response;
                END IF;
            END LOOP;
            IF NOT written THEN
                -- A request with the same key is recorded (replay it), or was committed while
                -- this one waited for it (decide again): either way nothing of this one stays.
                ROLLBACK;
                outcome := CASE WHEN found_any THEN 'replay' ELSE 'conflict' END;
                wal_position := pg_current_wal_insert_lsn();
                RETURN;
            END IF;
            IF trace_context IS NOT NULL THEN
                PERFORM pg_logical_emit_message(true, 'payments.trace', trace_context);
            END IF;
            COMMIT;
            -- Read after the commit: at or past the end of its record.
            wal_position := pg_current_wal_insert_lsn();
            outcome := 'committed';
        END
        $body$
        """
    )


def downgrade() -> None:
    op.execute("DROP PROCEDURE IF EXISTS submit_decided")
    op.execute("DROP FUNCTION IF EXISTS apply_decision")
