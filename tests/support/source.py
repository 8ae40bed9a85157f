"""The system of record written by hand with plain SQL, as the approval service would: accounts, payments, reviews.

Each write is one transaction in the current schema, with balances and counters kept
consistent, so that the real replicator builds read models from it. `SourceLoad` keeps
writing in a thread while a test does something else.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg2

from payments_common.lsn import parse_lsn
from payments_common.tokens import encode_consistency_token
from tests.support.waiting import wait_until


class SourceWriter:
    """Writes rows of the system of record on one connection.

    New accounts open with `balance_minor` and the two limits unless `open_account` is told otherwise.
    """

    def __init__(
        self,
        database_url: str,
        balance_minor: int = 10_000_000,
        per_payment_limit_minor: int = 1_000_000_000,
        daily_limit_minor: int = 1_000_000_000,
    ) -> None:
        self.connection = psycopg2.connect(database_url)
        self.balance_minor = balance_minor
        self.per_payment_limit_minor = per_payment_limit_minor
        self.daily_limit_minor = daily_limit_minor

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> SourceWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def execute(self, query: str, args: tuple[object, ...] = ()) -> None:
        with self.connection, self.connection.cursor() as cursor:
            # Without arguments, a literal % (the modulo operator) is no placeholder.
            cursor.execute(query, args or None)

    def position(self) -> str:
        """A consistency token for everything committed so far."""
        with self.connection, self.connection.cursor() as cursor:
            cursor.execute("SELECT pg_current_wal_lsn()::text")
            row = cursor.fetchone()
        assert row is not None
        return encode_consistency_token(parse_lsn(row[0]))

    def open_account(
        self,
        owner: str,
        balance_minor: int | None = None,
        currency: str = "EUR",
        status: str = "ACTIVE",
        account_id: str | None = None,
    ) -> str:
        account_id = account_id or str(uuid.uuid4())
        self.execute(
            "INSERT INTO accounts (account_id, owner_name, currency_code, status, ledger_balance_minor,"
            " per_payment_limit_minor, daily_limit_minor) VALUES (%s, %s, %s, %s, %s, %s, %s)",
            (
                account_id,
                owner,
                currency,
                status,
                self.balance_minor if balance_minor is None else balance_minor,
                self.per_payment_limit_minor,
                self.daily_limit_minor,
            ),
        )
        return account_id

    def delete_account(self, account_id: str) -> str:
        """Deletes an account that has no payments; returns a consistency token."""
        self.execute("DELETE FROM accounts WHERE account_id = %s", (account_id,))
        return self.position()

    # -- payments as the replicator tests write them: the database's clock, request_id = payment_id

    def submit(
        self,
        payer: str,
        payee: str,
        amount_minor: int,
        status: str = "APPROVED",
        decline_reason: str | None = None,
        reference: str = "",
        payment_id: str | None = None,
    ) -> str:
        """Inserts a payment with its first event and updates both accounts, in one transaction."""
        payment_id = payment_id or str(uuid.uuid4())
        with self.connection, self.connection.cursor() as cursor:
            self._insert(
                cursor,
                payer,
                payee,
                amount_minor,
                status,
                payment_id=payment_id,
                request_id=payment_id,
                decline_reason=decline_reason,
                reference=reference,
            )
        return payment_id

    def review(self, payment_id: str, approve: bool, actor: str = "reviewer", note: str = "") -> None:
        """Approves or declines a payment held for review, with its next timeline event."""
        status = "APPROVED" if approve else "DECLINED"
        reason = None if approve else "DECLINED_BY_REVIEWER"
        with self.connection, self.connection.cursor() as cursor:
            cursor.execute(
                "UPDATE payments SET status = %s, decline_reason = %s, updated_at = now() "
                "WHERE payment_id = %s AND status = 'PENDING_REVIEW' "
                "RETURNING payer_account_id, payee_account_id, amount_minor",
                (status, reason, payment_id),
            )
            row = cursor.fetchone()
            assert row is not None, "the payment is not pending review"
            payer, payee, amount = row
            cursor.execute(
                "INSERT INTO payment_events (payment_id, sequence, status, decline_reason, actor, note) "
                "SELECT %s, max(sequence) + 1, %s, %s, %s, %s FROM payment_events WHERE payment_id = %s",
                (payment_id, status, reason, actor, note, payment_id),
            )
            self._book(cursor, payer, payee, amount, "PENDING_REVIEW", -1)
            self._book(cursor, payer, payee, amount, status, +1)

    # -- payments as the history tests write them: a given time, and a consistency token back

    def pay(
        self,
        payer: str,
        payee: str,
        amount_minor: int,
        status: str = "APPROVED",
        created_at: datetime | None = None,
        reference: str = "",
    ) -> tuple[str, str]:
        """Records one payment in one transaction; returns its id and a consistency token."""
        with self.connection, self.connection.cursor() as cursor:
            payment_id = self._pay(cursor, payer, payee, amount_minor, status, created_at, reference)
        return payment_id, self.position()

    def pay_many(self, payer: str, payee: str, count: int, amount_minor: int = 1) -> list[str]:
        """Records `count` approved payments in one source transaction (so in one replicated batch)."""
        with self.connection, self.connection.cursor() as cursor:
            return [
                self._pay(cursor, payer, payee, amount_minor, "APPROVED", None, f"bulk {n}")
                for n in range(count)
            ]

    def approve_held(self, payment_id: str, actor: str = "operator.jane") -> str:
        """An operator approves a held payment; returns a consistency token."""
        with self.connection, self.connection.cursor() as cursor:
            cursor.execute(
                "UPDATE payments SET status = 'APPROVED', updated_at = now() WHERE payment_id = %s"
                " AND status = 'PENDING_REVIEW' RETURNING payer_account_id, payee_account_id, amount_minor",
                (payment_id,),
            )
            row = cursor.fetchone()
            assert row is not None, "the payment is not pending review"
            payer, payee, amount = row
            cursor.execute(
                "INSERT INTO payment_events (payment_id, sequence, status, actor, note)"
                " VALUES (%s, 2, 'APPROVED', %s, 'checked')",
                (payment_id, actor),
            )
            cursor.execute(
                "UPDATE accounts SET held_minor = held_minor - %(a)s, ledger_balance_minor ="
                " ledger_balance_minor - %(a)s, total_sent_minor = total_sent_minor + %(a)s,"
                " sent_pending_review = sent_pending_review - 1, sent_approved = sent_approved + 1"
                " WHERE account_id = %(id)s",
                {"a": amount, "id": payer},
            )
            cursor.execute(
                "UPDATE accounts SET ledger_balance_minor = ledger_balance_minor + %(a)s,"
                " total_received_minor = total_received_minor + %(a)s,"
                " received_pending_review = received_pending_review - 1,"
                " received_approved = received_approved + 1 WHERE account_id = %(id)s",
                {"a": amount, "id": payee},
            )
        return self.position()

    def _pay(
        self,
        cursor: Any,
        payer: str,
        payee: str,
        amount_minor: int,
        status: str,
        created_at: datetime | None,
        reference: str,
    ) -> str:
        """One payment as `pay` writes it: both accounts locked first, request_id req-<id>.

        Its time is `created_at`, or else this process's clock (not the database's, as in `submit`).
        """
        cursor.execute("SELECT 1 FROM accounts WHERE account_id IN (%s, %s) FOR UPDATE", (payer, payee))
        payment_id = str(uuid.uuid4())
        self._insert(
            cursor,
            payer,
            payee,
            amount_minor,
            status,
            payment_id=payment_id,
            request_id=f"req-{payment_id}",
            reference=reference,
            created_at=created_at or datetime.now(UTC),
        )
        return payment_id

    def _insert(
        self,
        cursor: Any,
        payer: str,
        payee: str,
        amount_minor: int,
        status: str,
        *,
        payment_id: str,
        request_id: str,
        reference: str,
        decline_reason: str | None = None,
        created_at: datetime | None = None,
    ) -> None:
        """Inserts a payment in the payer's currency with its first event, and books it on both accounts.

        A declined payment without a reason is INSUFFICIENT_FUNDS, a held one is held for its
        amount (as the rules hold every payment); without `created_at`, the payment and its
        event take the database's clock (the columns' default).
        """
        if status == "DECLINED" and decline_reason is None:
            decline_reason = "INSUFFICIENT_FUNDS"
        values = {
            "id": payment_id,
            "request": request_id,
            "payer": payer,
            "payee": payee,
            "amount": amount_minor,
            "reference": reference,
            "status": status,
            "reason": decline_reason,
            "hold": "AMOUNT_AT_OR_ABOVE_REVIEW_THRESHOLD" if status == "PENDING_REVIEW" else None,
            "at": created_at,
        }
        cursor.execute(
            "INSERT INTO payments (payment_id, request_id, payer_account_id, payee_account_id, payer_name,"
            " payee_name, currency_code, amount_minor, reference, status, decline_reason, created_at, updated_at,"
            " hold_reason)"
            " SELECT %(id)s, %(request)s, p.account_id, q.account_id, p.owner_name, q.owner_name, p.currency_code,"
            " %(amount)s, %(reference)s, %(status)s, %(reason)s, coalesce(%(at)s, now()), coalesce(%(at)s, now()),"
            " %(hold)s"
            " FROM accounts p, accounts q WHERE p.account_id = %(payer)s AND q.account_id = %(payee)s",
            values,
        )
        cursor.execute(
            "INSERT INTO payment_events (payment_id, sequence, status, decline_reason, actor, created_at)"
            " VALUES (%(id)s, 1, %(status)s, %(reason)s, 'system', coalesce(%(at)s, now()))",
            values,
        )
        self._book(cursor, payer, payee, amount_minor, status, +1)

    @staticmethod
    def _book(cursor: Any, payer: str, payee: str, amount: int, status: str, sign: int) -> None:
        """Adds (sign +1) or takes back (-1) what a payment in `status` does to both accounts."""
        column = status.lower()
        if status == "APPROVED":
            cursor.execute(
                "UPDATE accounts SET ledger_balance_minor = ledger_balance_minor - %s, "
                "total_sent_minor = total_sent_minor + %s, sent_approved = sent_approved + %s, "
                "updated_at = now() WHERE account_id = %s",
                (sign * amount, sign * amount, sign, payer),
            )
            cursor.execute(
                "UPDATE accounts SET ledger_balance_minor = ledger_balance_minor + %s, "
                "total_received_minor = total_received_minor + %s, received_approved = received_approved + %s, "
                "updated_at = now() WHERE account_id = %s",
                (sign * amount, sign * amount, sign, payee),
            )
            return
        held = sign * amount if status == "PENDING_REVIEW" else 0
        cursor.execute(
            f"UPDATE accounts SET held_minor = held_minor + %s, sent_{column} = sent_{column} + %s, "
            "updated_at = now() WHERE account_id = %s",
            (held, sign, payer),
        )
        cursor.execute(
            f"UPDATE accounts SET received_{column} = received_{column} + %s, updated_at = now() "
            "WHERE account_id = %s",
            (sign, payee),
        )


class SourceLoad:
    """A background thread that keeps submitting and reviewing payments until stopped."""

    def __init__(self, database_url: str, accounts: list[str]) -> None:
        self.database_url = database_url
        self.accounts = accounts
        self.written = 0
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="source-load", daemon=True)

    def __enter__(self) -> SourceLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=60)

    def wait_for(self, rows: int, timeout: float = 60.0) -> None:
        """Waits until at least `rows` payments were written in total."""
        wait_until(lambda: self.written >= rows, timeout, f"at least {rows} payments written")

    def _run(self) -> None:
        writer: SourceWriter | None = None
        i = 0
        count = len(self.accounts)
        while not self._stop.is_set():
            try:
                if writer is None:
                    writer = SourceWriter(self.database_url)
                status = ("APPROVED", "PENDING_REVIEW", "DECLINED", "APPROVED")[i % 4]
                payment = writer.submit(
                    self.accounts[i % count],
                    self.accounts[(i + 1 + i // count) % count],
                    1 + i % 97,
                    status=status,
                )
                if status == "PENDING_REVIEW" and i % 8 == 1:
                    writer.review(payment, approve=i % 16 == 1)
                self.written += 1
                i += 1
            except psycopg2.Error:
                # The source restarts in some tests: reconnect and go on.
                self.errors += 1
                if writer is not None:
                    with contextlib.suppress(psycopg2.Error):
                        writer.close()
                writer = None
                self._stop.wait(0.1)
        if writer is not None:
            writer.close()
