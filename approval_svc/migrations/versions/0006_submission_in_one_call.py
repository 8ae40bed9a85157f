"""A payment decided, written and committed by one procedure: the rules and the response in PostgreSQL.

Revision ID: 0006
Revises: 0005

`submit_payment` is a submission in one round trip. It answers a retry from the request's
record without taking a lock; otherwise it locks the two accounts (in account order,
queueing for them), decides with the rules below, writes with `apply_decision` (0005), adds the
trace context to the WAL when it is given, commits, and returns a WAL position read after
the commit. It answers `committed` (with what was decided), `replay` (a request with the
same key is recorded, before the call or by a duplicate that held the locks first, whose
key the write finds: nothing of this call is kept, the record is returned) or `refused` (an account
is missing, the payee's balance cannot hold the credit, the payer's daily usage is
already counted for a later day, or the key was committed while it waited: nothing
written; the service decides again under the locks, in Python, which gives each its
error). It must be CALLed outside a transaction block, since it commits.

The rules are those of `approval_svc.domain.rules`, which stay the definition: the
locked path and the unit tests' store run them, and
tests/contract/test_approval_rules_in_sql.py holds these functions to them:
- `payment_daily_usage`: `rules.daily_usage`, NULL where it raises (a later day);
- `payment_decision`: `rules.decide`, a NULL threshold standing for one above any amount;
- `submitted_payment_response`: the SubmitPaymentResponse that the servicer stores as the
  request's first response, byte for byte (enum numbers of payments.type.v1).

The release before does not use them: this revision may go in while it serves;
`submit_decided` stays for that release and goes in a later revision.
"""

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ENCODING = [
    # A protobuf varint of a value that is never negative here (amounts, seconds, enum numbers).
    """
    CREATE FUNCTION pb_varint(value bigint) RETURNS bytea
    LANGUAGE plpgsql IMMUTABLE STRICT AS $body$
    DECLARE
        encoded bytea := '';
        rest bigint := value;
    BEGIN
        IF rest < 0 THEN
            RAISE EXCEPTION 'pb_varint: % is negative', value;
        END IF;
        WHILE rest >= 128 LOOP
            encoded := encoded || set_byte('\\x00'::bytea, 0, ((rest & 127) | 128)::integer);
            rest := rest >> 7;
        END LOOP;
        RETURN encoded || set_byte('\\x00'::bytea, 0, rest::integer);
    END
    $body$
    """,
    # payments.approval.v1.SubmitPaymentResponse{payment}, as the servicer stores it (no token).
    # Each field's tag is a constant byte: (field number << 3) | wire type. A string or an
    # enum at its default is left out, as proto3 does; a message field that is set is not.
    """
    CREATE FUNCTION submitted_payment_response(
        payment_id uuid, payer_account_id uuid, payee_account_id uuid, currency_code text, amount_minor bigint,
        reference text, status text, decline_reason text, created_at timestamptz, hold_reason text
    ) RETURNS bytea
    LANGUAGE plpgsql STABLE AS $body$
    DECLARE
        epoch numeric := EXTRACT(EPOCH FROM created_at);
        seconds bigint := floor(epoch);
        nanos bigint := (epoch - floor(epoch)) * 1000000000;
        status_number bigint;
        reason_number bigint;
        hold_number bigint;
        money bytea;
        stamp bytea := '';
        text_bytes bytea;
        payment bytea;
    BEGIN
        status_number := CASE status
            WHEN 'APPROVED' THEN 1 WHEN 'DECLINED' THEN 2 WHEN 'PENDING_REVIEW' THEN 3 END;
        reason_number := CASE coalesce(decline_reason, '')
            WHEN '' THEN 0
            WHEN 'INSUFFICIENT_FUNDS' THEN 1
            WHEN 'PER_PAYMENT_LIMIT_EXCEEDED' THEN 2
            WHEN 'DAILY_LIMIT_EXCEEDED' THEN 3
            WHEN 'ACCOUNT_FROZEN' THEN 4
            WHEN 'CURRENCY_MISMATCH' THEN 5
            WHEN 'DECLINED_BY_REVIEWER' THEN 6 END;
        hold_number := CASE coalesce(hold_reason, '')
            WHEN '' THEN 0 WHEN 'AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD' THEN 1 END;
        IF status_number IS NULL OR reason_number IS NULL OR hold_number IS NULL THEN
            RAISE EXCEPTION 'submitted_payment_response: no enum number for %, %, %', status, decline_reason, hold_reason;
        END IF;
        -- payments.type.v1.Money: currency_code = 1, amount_minor = 2.
        money := '';
        IF currency_code <> '' THEN
            text_bytes := convert_to(currency_code, 'UTF8');
            money := '\\x0a'::bytea || pb_varint(length(text_bytes)) || text_bytes;
        END IF;
        IF amount_minor <> 0 THEN
            money := money || '\\x10'::bytea || pb_varint(amount_minor);
        END IF;
        -- google.protobuf.Timestamp: seconds = 1, nanos = 2.
        IF seconds <> 0 THEN
            stamp := '\\x08'::bytea || pb_varint(seconds);
        END IF;
        IF nanos <> 0 THEN
            stamp := stamp || '\\x10'::bytea || pb_varint(nanos);
        END IF;
        -- A UUID's text is 36 bytes (0x24).
        payment := '\\x0a24'::bytea || convert_to(payment_id::text, 'UTF8')
            || '\\x1224'::bytea || convert_to(payer_account_id::text, 'UTF8')
            || '\\x1a24'::bytea || convert_to(payee_account_id::text, 'UTF8')
            || '\\x22'::bytea || pb_varint(length(money)) || money;
        IF reference <> '' THEN
            text_bytes := convert_to(reference, 'UTF8');
            payment := payment || '\\x2a'::bytea || pb_varint(length(text_bytes)) || text_bytes;
        END IF;
        IF status_number <> 0 THEN
            payment := payment || '\\x30'::bytea || pb_varint(status_number);
        END IF;
        IF reason_number <> 0 THEN
            payment := payment || '\\x38'::bytea || pb_varint(reason_number);
        END IF;
        payment := payment
            || '\\x42'::bytea || pb_varint(length(stamp)) || stamp
            || '\\x4a'::bytea || pb_varint(length(stamp)) || stamp;
        IF hold_number <> 0 THEN
            payment := payment || '\\x50'::bytea || pb_varint(hold_number);
        END IF;
        RETURN '\\x0a'::bytea || pb_varint(length(payment)) || payment;
    END
    $body$
    """,
]

_RULES = [
    """
    CREATE FUNCTION payment_daily_usage(payer accounts, today date) RETURNS bigint
    LANGUAGE sql IMMUTABLE AS $body$
        SELECT CASE
            WHEN payer.daily_usage_day IS NULL OR payer.daily_usage_day < today THEN 0
            WHEN payer.daily_usage_day = today THEN payer.daily_usage_minor
        END
    $body$
    """,
    """
    CREATE FUNCTION payment_decision(
        payer accounts, payee accounts, currency text, amount bigint, daily_used bigint,
        review_threshold bigint,
        OUT status text, OUT decline_reason text, OUT hold_reason text
    )
    LANGUAGE plpgsql IMMUTABLE AS $body$
    BEGIN
        IF payer.status = 'FROZEN' OR payee.status = 'FROZEN' THEN
            status := 'DECLINED'; decline_reason := 'ACCOUNT_FROZEN';
        ELSIF currency <> payer.currency_code OR currency <> payee.currency_code THEN
            status := 'DECLINED'; decline_reason := 'CURRENCY_MISMATCH';
        ELSIF amount > payer.per_payment_limit_minor THEN
            status := 'DECLINED'; decline_reason := 'PER_PAYMENT_LIMIT_EXCEEDED';
        ELSIF amount > payer.daily_limit_minor - daily_used THEN
            status := 'DECLINED'; decline_reason := 'DAILY_LIMIT_EXCEEDED';
        ELSIF amount > payer.ledger_balance_minor - payer.held_minor THEN
            status := 'DECLINED'; decline_reason := 'INSUFFICIENT_FUNDS';
        ELSIF amount >= review_threshold THEN  -- NULL: a threshold above any amount
            status := 'PENDING_REVIEW'; hold_reason := 'AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD';
        ELSE
            status := 'APPROVED';
        END IF;
    END
    $body$
    """,
]

_SUBMIT_PAYMENT = """
    CREATE PROCEDURE submit_payment(
        key_caller text, key_request_id text, key_method text, key_fingerprint bytea,
        new_payment_id uuid, payer_id uuid, payee_id uuid, currency text, amount bigint, reference text,
        review_threshold bigint, trace_context text,
        INOUT outcome text DEFAULT NULL, INOUT wal_position pg_lsn DEFAULT NULL,
        INOUT stored_method text DEFAULT NULL, INOUT stored_fingerprint bytea DEFAULT NULL,
        INOUT stored_response bytea DEFAULT NULL, INOUT decided_at timestamptz DEFAULT NULL,
        INOUT decided_status text DEFAULT NULL, INOUT decided_decline_reason text DEFAULT NULL,
        INOUT decided_hold_reason text DEFAULT NULL, INOUT payer_name text DEFAULT NULL,
        INOUT payee_name text DEFAULT NULL
    )
    LANGUAGE plpgsql AS $body$
    DECLARE
        -- The transaction's clock, as the locked path's: the payment's time and its UTC day.
        moment timestamptz := now();
        today date := (now() AT TIME ZONE 'UTC')::date;
        payer accounts;
        payee accounts;
        locked accounts;
        used bigint;
        decision record;
        held bigint := 0;
        moved bigint := 0;
        usage bigint := 0;
        entry_accounts uuid[] := '{}';
        entry_payments uuid[] := '{}';
        entry_kinds text[] := '{}';
        entry_amounts bigint[] := '{}';
        response bytea;
        found_any boolean := false;
        written boolean := false;
        r record;
    BEGIN
        -- A retry is answered from its record without waiting for any lock.
        SELECT k.method, k.request_fingerprint, k.response
        INTO stored_method, stored_fingerprint, stored_response
        FROM idempotency_keys AS k WHERE k.caller = key_caller AND k.request_id = key_request_id;
        IF FOUND THEN
            outcome := 'replay';
            wal_position := pg_current_wal_insert_lsn();
            RETURN;
        END IF;
        FOR locked IN
            SELECT a.* FROM accounts AS a WHERE a.account_id IN (payer_id, payee_id)
            ORDER BY a.account_id FOR NO KEY UPDATE
        LOOP
            IF locked.account_id = payer_id THEN payer := locked; ELSE payee := locked; END IF;
        END LOOP;
        IF payer.account_id IS NULL OR payee.account_id IS NULL THEN
            outcome := 'refused';
            RETURN;
        END IF;
        used := payment_daily_usage(payer, today);
        IF used IS NULL THEN
            outcome := 'refused';
            RETURN;
        END IF;
        SELECT * INTO decision FROM payment_decision(payer, payee, currency, amount, used, review_threshold);
        IF decision.status <> 'DECLINED' AND (
            payee.ledger_balance_minor > 9223372036854775807 - amount
            OR payee.total_received_minor > 9223372036854775807 - amount
        ) THEN
            outcome := 'refused';
            RETURN;
        END IF;
        -- What the decision does to the accounts: rules.submission_changes and transfer_entries.
        IF decision.status = 'APPROVED' THEN
            moved := amount;
            usage := amount;
            entry_accounts := ARRAY[payer_id, payee_id];
            entry_payments := ARRAY[new_payment_id, new_payment_id];
            entry_kinds := ARRAY['DEBIT', 'CREDIT'];
            entry_amounts := ARRAY[-amount, amount];
        ELSIF decision.status = 'PENDING_REVIEW' THEN
            held := amount;
            usage := amount;
        END IF;
        response := submitted_payment_response(
            new_payment_id, payer_id, payee_id, currency, amount, reference,
            decision.status, decision.decline_reason, moment, decision.hold_reason
        );
        FOR r IN SELECT * FROM apply_decision(
            new_payment_id, key_request_id, payer_id, payee_id, payer.owner_name, payee.owner_name,
            currency, amount, reference, decision.status, decision.decline_reason, moment, moment,
            decision.hold_reason,
            1, decision.status, decision.decline_reason, 'system', '', moment,
            moment,
            ARRAY[payer_id, payee_id],
            ARRAY[-moved, moved],
            ARRAY[held, 0],
            ARRAY[moved, 0],
            ARRAY[0, moved],
            ARRAY[(decision.status = 'APPROVED')::integer, 0]::bigint[],
            ARRAY[(decision.status = 'DECLINED')::integer, 0]::bigint[],
            ARRAY[(decision.status = 'PENDING_REVIEW')::integer, 0]::bigint[],
            ARRAY[0, (decision.status = 'APPROVED')::integer]::bigint[],
            ARRAY[0, (decision.status = 'DECLINED')::integer]::bigint[],
            ARRAY[0, (decision.status = 'PENDING_REVIEW')::integer]::bigint[],
            ARRAY[usage, 0],
            ARRAY[CASE WHEN usage > 0 THEN today END, NULL]::date[],
            entry_accounts,
            entry_payments,
            entry_kinds,
            entry_amounts,
            key_caller, key_request_id, key_method, key_fingerprint, response
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
            -- A request with the same key is recorded (replay it), or was committed while this one
            -- waited for it (decide again under the locks): either way nothing of this one stays.
            ROLLBACK;
            outcome := CASE WHEN found_any THEN 'replay' ELSE 'refused' END;
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
        decided_at := moment;
        decided_status := decision.status;
        decided_decline_reason := decision.decline_reason;
        decided_hold_reason := decision.hold_reason;
        payer_name := payer.owner_name;
        payee_name := payee.owner_name;
    END
    $body$
"""

_ROUTINES = [
    "PROCEDURE submit_payment",
    "FUNCTION payment_decision",
    "FUNCTION payment_daily_usage",
    "FUNCTION submitted_payment_response",
    "FUNCTION pb_varint",
]


def upgrade() -> None:
    for statement in [*_ENCODING, *_RULES, _SUBMIT_PAYMENT]:
        op.execute(statement)


def downgrade() -> None:
    for routine in _ROUTINES:
        op.execute(f"DROP {routine}")
