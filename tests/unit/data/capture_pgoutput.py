"""Captures real pgoutput messages from a private PostgreSQL into pgoutput_capture.jsonl.

Run once (`PYTHONPATH=. .venv/bin/python tests/unit/data/capture_pgoutput.py`) when the scenario
changes; the decoder's unit tests read the committed capture, with no server.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import psycopg2
import psycopg2.extras

from approval_svc.migrate import upgrade
from stack.servers import running_postgres

OUT = Path(__file__).with_name("pgoutput_capture.jsonl")
ALICE = "00000000-0000-4000-8000-00000000000a"
BOB = "00000000-0000-4000-8000-00000000000b"
PAYMENT = "00000000-0000-4000-8000-000000000001"

# Each step is (label, SQL statements run in one transaction).
STEPS: list[tuple[str, list[str]]] = [
    (
        "accounts",
        [
            "INSERT INTO accounts (account_id, owner_name, currency_code, status, ledger_balance_minor, "
            f"per_payment_limit_minor, daily_limit_minor, created_at, updated_at) VALUES ('{ALICE}', 'Alice', "
            "'EUR', 'ACTIVE', 100000, 50000, 90000, '2026-01-02 03:04:05.123456+00', '2026-01-02 03:04:05.123456+00'), "
            f"('{BOB}', 'Bob', 'EUR', 'ACTIVE', 0, 50000, 90000, '2026-01-02 03:04:06+00', '2026-01-02 03:04:06+00')",
        ],
    ),
    (
        "payment",
        [
            "INSERT INTO payments (payment_id, request_id, payer_account_id, payee_account_id, payer_name, "
            "payee_name, currency_code, amount_minor, reference, status, decline_reason, created_at, updated_at) "
            f"VALUES ('{PAYMENT}', 'r1', '{ALICE}', '{BOB}', 'Alice', 'Bob', 'EUR', 70000, 'TOASTED', "
            "'PENDING_REVIEW', NULL, '2026-01-02 03:05:00+00', '2026-01-02 03:05:00+00')",
            "INSERT INTO payment_events (payment_id, sequence, status, actor, created_at) "
            f"VALUES ('{PAYMENT}', 1, 'PENDING_REVIEW', 'system', '2026-01-02 03:05:00+00')",
            f"UPDATE accounts SET held_minor = 70000, sent_pending_review = 1 WHERE account_id = '{ALICE}'",
        ],
    ),
    (
        "review_keeps_toast",
        [
            "UPDATE payments SET status = 'DECLINED', decline_reason = 'DECLINED_BY_REVIEWER', "
            f"updated_at = '2026-01-02 04:00:00+00' WHERE payment_id = '{PAYMENT}'",
            "INSERT INTO payment_events (payment_id, sequence, status, decline_reason, actor, note, created_at) "
            f"VALUES ('{PAYMENT}', 2, 'DECLINED', 'DECLINED_BY_REVIEWER', 'carol', 'no', '2026-01-02 04:00:00+00')",
        ],
    ),
    ("message", ["SELECT pg_logical_emit_message(true, 'heartbeat', 'tick')"]),
    (
        "add_column",
        [
            "ALTER TABLE accounts ADD COLUMN nickname text",
            "UPDATE accounts SET nickname = 'B' WHERE owner_name = 'Bob'",
        ],
    ),
    (
        "delete",
        [
            f"DELETE FROM payment_events WHERE payment_id = '{PAYMENT}'",
            f"DELETE FROM payments WHERE payment_id = '{PAYMENT}'",
        ],
    ),
    ("truncate", ["TRUNCATE payment_events, payments, accounts CASCADE"]),
]


def main() -> None:
    with running_postgres() as server:
        dsn = server.create_database("capture")
        upgrade(dsn)
        setup = psycopg2.connect(dsn)
        replication = psycopg2.connect(dsn, connection_factory=psycopg2.extras.LogicalReplicationConnection)
        stream = replication.cursor()
        stream.create_replication_slot("capture", output_plugin="pgoutput")
        toasted = secrets.token_hex(6000)  # incompressible, so stored out of line
        for _, statements in STEPS:
            with setup, setup.cursor() as cursor:
                for statement in statements:
                    cursor.execute(statement.replace("'TOASTED'", f"'{toasted}'"))
        stream.start_replication(
            slot_name="capture",
            decode=False,
            options={"proto_version": "1", "publication_names": "payments_read_model", "messages": "true"},
        )
        commits = 0
        lines = []
        deadline = time.monotonic() + 30
        while commits < len(STEPS) and time.monotonic() < deadline:
            message = stream.read_message()
            if message is None:
                time.sleep(0.01)
                continue
            payload = bytes(message.payload)
            lines.append(json.dumps({"kind": chr(payload[0]), "hex": payload.hex()}))
            commits += payload[:1] == b"C"
        replication.close()
        setup.close()
        OUT.write_text("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} messages to {OUT}")


if __name__ == "__main__":
    main()
