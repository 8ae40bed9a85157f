"""Set-up before any window: the accounts that pay each other, the watched payees, and the histories to page through.

Accounts are opened through approval (so that they are in the read model as any
account is); the list accounts' payments are committed straight into PostgreSQL
(`bench.backlog`) and replicated before the phase ends.
"""

from __future__ import annotations

import contextlib
import time
import uuid

import grpc
import psycopg2

from bench import backlog
from bench.runner import Runner
from payments.approval.v1 import approval_service_pb2 as approval
from payments.approval.v1 import approval_service_pb2_grpc as approval_grpc
from stack.clients import with_bearer

# The payments that the history reads pick from.
READ_PAYMENTS = 2000


def run(runner: Runner) -> None:
    plan = runner.plan
    started = time.monotonic()
    total = plan.accounts + plan.watched_accounts + plan.list_accounts
    ids = create_accounts(runner.endpoints["APPROVAL_ADDR"], total, runner.token)
    runner.payers = tuple(ids[: plan.accounts])
    runner.watched = tuple(ids[plan.accounts : plan.accounts + plan.watched_accounts])
    runner.list_accounts = tuple(ids[plan.accounts + plan.watched_accounts :])
    made = backlog.generate(runner.dsn, runner.list_accounts, plan.list_payments)
    runner.wait_checkpoint(made.target_lsn, timeout=180)
    with (
        contextlib.closing(psycopg2.connect(runner.dsn)) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute("SELECT payment_id::text FROM payments ORDER BY random() LIMIT %s", (READ_PAYMENTS,))
        runner.payment_ids = tuple(row[0] for row in cursor.fetchall())
    print(
        f"== seeded {total} accounts and {plan.list_payments} payments in {time.monotonic() - started:.1f}s",
        flush=True,
    )


def create_accounts(approval_addr: str, count: int, token: str) -> list[str]:
    """Opens `count` accounts through approval (as `token`, an accounts admin's), 64 calls at a time, with balances and limits far above any payment."""
    ids: list[str] = []
    with grpc.insecure_channel(approval_addr) as plain:
        stub = approval_grpc.ApprovalServiceStub(with_bearer(plain, token))
        for first in range(0, count, 64):
            futures = [
                stub.CreateAccount.future(
                    approval.CreateAccountRequest(
                        request_id=str(uuid.uuid4()),
                        owner_name=f"Benchmark owner {first + i}",
                        currency_code="EUR",
                        opening_balance_minor=10**12,
                        per_payment_limit_minor=10**9,
                        daily_limit_minor=10**15,
                    ),
                    timeout=30,
                )
                for i in range(min(64, count - first))
            ]
            ids += [future.result().account.account_id for future in futures]
    return ids
