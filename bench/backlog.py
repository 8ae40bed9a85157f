"""Writes payments straight into PostgreSQL, as the approval service would commit them, for a backlog.

Each payment is its own transaction, like SubmitPayment's: a `payments` row, its first
`payment_events` row, the payer's and the payee's `accounts` updates (4 row changes
that the publication replicates), plus the two `ledger_entries` and the
`idempotency_keys` row that approval writes in the same transaction (not published,
but in the WAL that the replicator's slot decodes). Every CHECK constraint holds: the
accounts are opened with balances far above what the payments move.

The session turns `synchronous_commit` off so that generating the backlog does not wait
for a disk flush per transaction; the WAL and the replicated changes are the same.

With `traced_share`, that share of the transactions (evenly spread, exactly rounded per
chunk) also carries what a traced SubmitPayment writes before its COMMIT: the
transactional logical message `payments.trace` holding a sampled W3C traceparent of its
own trace, for the replicator to continue.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg2

from payments_common.lsn import parse_lsn
from payments_common.tracing import WAL_MESSAGE_PREFIX

# Row changes per payment that the publication carries: payments + payment_events + 2 accounts.
CHANGES_PER_PAYMENT = 4

_GENERATE = """
DO $$
DECLARE
    ids uuid[] := %(ids)s::uuid[];
    k integer := array_length(ids, 1);
    j integer;
    payer uuid;
    payee uuid;
    pid uuid;
    amt bigint;
BEGIN
    FOR i IN 1..%(count)s LOOP
        j := 1 + floor(random() * k)::integer;
        payer := ids[j];
        payee := ids[1 + (j + floor(random() * (k - 1))::integer) %% k];
        pid := gen_random_uuid();
        amt := 1 + floor(random() * 1000)::bigint;
        INSERT INTO payments (payment_id, request_id, payer_account_id, payee_account_id, payer_name,
                              payee_name, currency_code, amount_minor, reference, status)
        SELECT pid, 'backlog-' || pid, payer, payee, a.owner_name, b.owner_name, a.currency_code, amt,
               'benchmark backlog', 'APPROVED'
        FROM accounts AS a, accounts AS b WHERE a.account_id = payer AND b.account_id = payee;
        INSERT INTO payment_events (payment_id, sequence, status, actor) VALUES (pid, 1, 'APPROVED', 'system');
        UPDATE accounts SET ledger_balance_minor = ledger_balance_minor - amt,
                            total_sent_minor = total_sent_minor + amt,
                            sent_approved = sent_approved + 1, updated_at = now()
        WHERE account_id = payer;
        UPDATE accounts SET ledger_balance_minor = ledger_balance_minor + amt,
                            total_received_minor = total_received_minor + amt,
                            received_approved = received_approved + 1, updated_at = now()
        WHERE account_id = payee;
        INSERT INTO ledger_entries (account_id, payment_id, kind, amount_minor)
        VALUES (payer, pid, 'DEBIT', -amt), (payee, pid, 'CREDIT', amt);
        INSERT INTO idempotency_keys (caller, request_id, method, request_fingerprint, response)
        VALUES ('token:backlog', 'backlog-' || pid, 'SubmitPayment', sha256(pid::text::bytea),
                decode(repeat('5a', 240), 'hex'));
        -- The i-th of `count` is traced when i * traced / count passes an integer: exactly
        -- `traced` of them, evenly spread.
        IF (i::bigint * %(traced)s) / %(count)s > ((i - 1)::bigint * %(traced)s) / %(count)s THEN
            PERFORM pg_logical_emit_message(
                true, %(prefix)s, '00-' || md5(pid::text) || '-' || left(md5(random()::text), 16) || '-01');
        END IF;
        COMMIT;
    END LOOP;
END
$$
"""

# The last transaction: one more row change, and the WAL position reached just before its
# commit. Only that commit ends beyond this position, so a checkpoint at or past it
# means the replicator has applied the whole backlog.
_MARKER = "UPDATE accounts SET updated_at = now() WHERE account_id = %s"
_POSITION = "SELECT pg_current_wal_insert_lsn()::text"


@dataclass(frozen=True)
class Backlog:
    """What was written: how many row changes, up to which WAL position, in how long."""

    payments: int
    changes: int
    target_lsn: int
    elapsed_s: float
    traced: int = 0  # transactions that carry a sampled trace context


def traced_in_chunk(count: int, share: float) -> int:
    """How many of a chunk's `count` transactions carry a trace context: `share` of them, rounded."""
    return min(count, max(0, round(count * share)))


def generate(
    dsn: str, account_ids: Sequence[str], payments: int, chunk: int = 10_000, traced_share: float = 0.0
) -> Backlog:
    """Commits `payments` payments between random pairs of `account_ids`, one transaction each.

    `traced_share` of them (0 to 1) carry a sampled trace context, as traced submissions do.
    """
    if len(account_ids) < 2:
        raise ValueError("a backlog needs at least two accounts")
    if not 0.0 <= traced_share <= 1.0:
        raise ValueError("traced_share is a share, between 0 and 1")
    ids = "{" + ",".join(account_ids) + "}"
    started = time.monotonic()
    connection = psycopg2.connect(dsn)
    connection.autocommit = True  # a DO block may COMMIT only outside a transaction block
    try:
        with connection.cursor() as cursor:
            cursor.execute("SET synchronous_commit = off")
            left, traced = payments, 0
            while left > 0:
                count = min(chunk, left)
                marked = traced_in_chunk(count, traced_share)
                cursor.execute(
                    _GENERATE, {"ids": ids, "count": count, "traced": marked, "prefix": WAL_MESSAGE_PREFIX}
                )
                left -= count
                traced += marked
            cursor.execute("SET synchronous_commit = on")
        connection.autocommit = False
        with connection.cursor() as cursor:
            cursor.execute(_MARKER, (account_ids[0],))
            cursor.execute(_POSITION)
            row = cursor.fetchone()
            assert row is not None
            target = parse_lsn(row[0])
        connection.commit()
    finally:
        connection.close()
    return Backlog(
        payments=payments,
        changes=payments * CHANGES_PER_PAYMENT + 1,
        target_lsn=target,
        elapsed_s=time.monotonic() - started,
        traced=traced,
    )
