"""Prometheus metrics of the command side's business, beside the shared RPC metrics."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

DECISIONS = Counter(
    "approval_payment_decisions_total",
    "Payment decisions committed, by status and decline reason (empty unless declined) and by who decided.",
    ["status", "reason", "decider"],
)
REPLAYS = Counter(
    "approval_idempotent_replays_total",
    "Mutations answered with the stored first response of their request_id, by method.",
    ["method"],
)
RETRIES = Counter(
    "approval_transaction_retries_total",
    "Units of work run again after a serialization failure, deadlock or concurrent request_id.",
)
SUBMISSIONS_IN_ONE_CALL = Counter(
    "approval_submissions_in_one_call_total",
    "Payments submitted in one call to the database, by outcome: committed; replay (answered with the "
    "stored response); refused (an account missing, a credit the payee cannot hold, a daily usage counted "
    "for a later day, or the key committed "
    "meanwhile: decided again under the locks); conflict (a deadlock or serialization failure: decided "
    "again under the locks); timeout (no answer within the command timeout, a lock wait included: "
    "UNAVAILABLE); unavailable (the connection failed: decided again under the locks, on another).",
    ["outcome"],
)
POOL_CHECKED_OUT = Gauge(
    "approval_db_pool_checked_out",
    "Database connections out of the pool: in use by a call, or on their way back.",
)
