"""The CRUD baseline: HistoryService answered straight from PostgreSQL, as a service without CQRS would.

`python -m bench.crud_history --dsn postgresql://... --port N` serves GetPayment,
ListPayments and GetAccount (not WatchPayments nor ListHeldPayments) of `payments.history.v1.HistoryService` with asyncpg. It
ignores the denormalized `payer_name`/`payee_name` columns and JOINs `accounts` for
the names and `payment_events` for the timeline, as a normalized schema needs: those
are the joins the read model avoids. Each query is one round trip with a prepared
statement on a pooled connection, and lists use the payer and payee indexes, so the
baseline is a fair, well-written CRUD service rather than a straw man. It runs on the
same server stack (`build_server`, interceptors, uvloop) as the real services.
"""

from __future__ import annotations

import argparse
import secrets
import sys
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import uvloop
from google.protobuf import timestamp_pb2

from payments.history.v1 import history_service_pb2 as pb
from payments.history.v1 import history_service_pb2_grpc
from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import money_pb2, payment_pb2
from payments_common.authsettings import AuthSettings
from payments_common.errors import FieldViolation, InvalidArgument, NotFound, Unimplemented
from payments_common.grpcserver import build_server, wait_for_signal
from payments_common.logs import configure_logging
from payments_common.settings import ServerSettings
from payments_common.tokens import PageTokenCodec, TokenError

Context = grpc.aio.ServicerContext[Any, Any]
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["HistoryService"].full_name

_PAYMENT_COLUMNS = """
    p.payment_id::text AS payment_id, p.payer_account_id::text AS payer_account_id,
    payer.owner_name AS payer_name, p.payee_account_id::text AS payee_account_id,
    payee.owner_name AS payee_name, p.currency_code, p.amount_minor, p.reference, p.status,
    p.decline_reason, p.created_at, p.updated_at
"""

GET_PAYMENT = f"""
SELECT {_PAYMENT_COLUMNS},
       e.sequence, e.status AS event_status, e.decline_reason AS event_reason, e.actor, e.note,
       e.created_at AS event_at
FROM payments AS p
JOIN accounts AS payer ON payer.account_id = p.payer_account_id
JOIN accounts AS payee ON payee.account_id = p.payee_account_id
LEFT JOIN payment_events AS e ON e.payment_id = p.payment_id
WHERE p.payment_id = $1
ORDER BY e.sequence
"""

GET_ACCOUNT = """
SELECT account_id::text AS account_id, owner_name, currency_code, status, ledger_balance_minor,
       held_minor, per_payment_limit_minor, daily_limit_minor, total_sent_minor, total_received_minor,
       sent_approved, sent_declined, sent_pending_review, received_approved, received_declined,
       received_pending_review, created_at, updated_at
FROM accounts WHERE account_id = $1
"""

ACCOUNT_EXISTS = "SELECT 1 FROM accounts WHERE account_id = $1"

_DIRECTION_COLUMNS: dict[int, tuple[str, ...]] = {
    pb.PAYMENT_DIRECTION_SENT: ("payer_account_id",),
    pb.PAYMENT_DIRECTION_RECEIVED: ("payee_account_id",),
    pb.PAYMENT_DIRECTION_ALL: ("payer_account_id", "payee_account_id"),
}
_STATUS_TEXT = {
    payment_pb2.PAYMENT_STATUS_APPROVED: "APPROVED",
    payment_pb2.PAYMENT_STATUS_DECLINED: "DECLINED",
    payment_pb2.PAYMENT_STATUS_PENDING_REVIEW: "PENDING_REVIEW",
}
_STATUS = {text: value for value, text in _STATUS_TEXT.items()}
_ACCOUNT_STATUS = {"ACTIVE": payment_pb2.ACCOUNT_STATUS_ACTIVE, "FROZEN": payment_pb2.ACCOUNT_STATUS_FROZEN}


def list_sql(direction: int, status: bool, start: bool, end: bool, cursor: bool) -> str:
    """The list query for a combination of filters; parameters: $1 account, $2 limit, then the filters.

    Each direction is its own index-ordered subquery (the OR of payer and payee would
    defeat the indexes), merged and joined to `accounts` for the names.
    """
    filters: list[str] = []
    position = 3
    if status:
        filters.append(f"status = ${position}")
        position += 1
    if start:
        filters.append(f"created_at >= ${position}")
        position += 1
    if end:
        filters.append(f"created_at < ${position}")
        position += 1
    if cursor:
        filters.append(f"(created_at, payment_id) < (${position}, ${position + 1})")
    extra = "".join(f" AND {f}" for f in filters)
    parts = [
        f"(SELECT * FROM payments WHERE {column} = $1{extra} "
        f"ORDER BY created_at DESC, payment_id DESC LIMIT $2)"
        for column in _DIRECTION_COLUMNS[direction]
    ]
    return f"""
SELECT {_PAYMENT_COLUMNS}
FROM ({" UNION ALL ".join(parts)}) AS p
JOIN accounts AS payer ON payer.account_id = p.payer_account_id
JOIN accounts AS payee ON payee.account_id = p.payee_account_id
ORDER BY p.created_at DESC, p.payment_id DESC
LIMIT $2
"""


def _stamp(value: datetime) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(value)
    return stamp


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _micros(value: datetime) -> int:
    delta = value - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _reason(text: str | None) -> int:
    return 0 if text is None else int(payment_pb2.DeclineReason.Value("DECLINE_REASON_" + text))


def payment_view(row: asyncpg.Record) -> read_model_pb2.PaymentView:
    return read_model_pb2.PaymentView(
        payment_id=row["payment_id"],
        payer_account_id=row["payer_account_id"],
        payer_name=row["payer_name"],
        payee_account_id=row["payee_account_id"],
        payee_name=row["payee_name"],
        amount=money_pb2.Money(currency_code=row["currency_code"], amount_minor=row["amount_minor"]),
        reference=row["reference"],
        status=_STATUS[row["status"]],
        decline_reason=_reason(row["decline_reason"]),  # type: ignore[arg-type]
        create_time=_stamp(row["created_at"]),
        update_time=_stamp(row["updated_at"]),
    )


def account_view(row: asyncpg.Record) -> read_model_pb2.AccountView:
    currency = row["currency_code"]

    def money(minor: int) -> money_pb2.Money:
        return money_pb2.Money(currency_code=currency, amount_minor=minor)

    return read_model_pb2.AccountView(
        account_id=row["account_id"],
        owner_name=row["owner_name"],
        currency_code=currency,
        status=_ACCOUNT_STATUS[row["status"]],
        ledger_balance=money(row["ledger_balance_minor"]),
        available_balance=money(row["ledger_balance_minor"] - row["held_minor"]),
        total_sent=money(row["total_sent_minor"]),
        total_received=money(row["total_received_minor"]),
        counts=read_model_pb2.PaymentCounts(
            sent_approved=row["sent_approved"],
            sent_declined=row["sent_declined"],
            sent_pending_review=row["sent_pending_review"],
            received_approved=row["received_approved"],
            received_declined=row["received_declined"],
            received_pending_review=row["received_pending_review"],
        ),
        per_payment_limit=money(row["per_payment_limit_minor"]),
        daily_limit=money(row["daily_limit_minor"]),
        create_time=_stamp(row["created_at"]),
        update_time=_stamp(row["updated_at"]),
    )


def _uuid(field: str, value: str) -> uuid.UUID:
    try:
        return uuid.UUID(value)
    except ValueError:
        raise InvalidArgument([FieldViolation(field, "must be a UUID")]) from None


class CrudHistoryServicer(history_service_pb2_grpc.HistoryServiceServicer):
    """HistoryService over SQL; WatchPayments is not offered (a CRUD service would poll)."""

    def __init__(self, pool: asyncpg.Pool, page_tokens: PageTokenCodec) -> None:
        self._pool = pool
        self._page_tokens = page_tokens

    async def GetPayment(self, request: pb.GetPaymentRequest, context: Context) -> pb.GetPaymentResponse:
        payment_id = _uuid("payment_id", request.payment_id)
        rows = await self._pool.fetch(GET_PAYMENT, payment_id)
        if not rows:
            raise NotFound("PAYMENT_NOT_FOUND", "no such payment", {"payment_id": str(payment_id)})
        view = payment_view(rows[0])
        for row in rows:
            if row["sequence"] is None:
                continue
            view.timeline.append(
                read_model_pb2.TimelineEntry(
                    sequence=row["sequence"],
                    status=_STATUS[row["event_status"]],
                    decline_reason=_reason(row["event_reason"]),  # type: ignore[arg-type]
                    actor=row["actor"],
                    note=row["note"],
                    event_time=_stamp(row["event_at"]),
                )
            )
        return pb.GetPaymentResponse(payment=view)

    async def GetAccount(self, request: pb.GetAccountRequest, context: Context) -> pb.GetAccountResponse:
        account_id = _uuid("account_id", request.account_id)
        row = await self._pool.fetchrow(GET_ACCOUNT, account_id)
        if row is None:
            raise NotFound("ACCOUNT_NOT_FOUND", "no such account", {"account_id": str(account_id)})
        return pb.GetAccountResponse(account=account_view(row))

    async def ListPayments(
        self, request: pb.ListPaymentsRequest, context: Context
    ) -> pb.ListPaymentsResponse:
        account_id = _uuid("account_id", request.account_id)
        if request.direction not in _DIRECTION_COLUMNS:
            raise InvalidArgument([FieldViolation("direction", "must be SENT, RECEIVED or ALL")])
        if request.page_size < 0:
            raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
        size = min(request.page_size or 50, 500)
        params: list[Any] = [account_id, size + 1]
        if request.status:
            params.append(_STATUS_TEXT[request.status])
        if request.HasField("start_time"):
            params.append(request.start_time.ToDatetime(tzinfo=UTC))
        if request.HasField("end_time"):
            params.append(request.end_time.ToDatetime(tzinfo=UTC))
        binding = (
            "ListPayments",
            str(account_id),
            request.direction,
            request.status,
            request.start_time.SerializeToString(),
            request.end_time.SerializeToString(),
        )
        if request.page_token:
            try:
                stamp, _, last_id = self._page_tokens.decode(binding, request.page_token).partition(":")
                params += [_EPOCH + timedelta(microseconds=int(stamp)), uuid.UUID(last_id)]
            except (TokenError, ValueError):
                raise InvalidArgument(
                    [FieldViolation("page_token", "not a page token of this query")],
                    reason="INVALID_PAGE_TOKEN",
                ) from None
        sql = list_sql(
            request.direction,
            bool(request.status),
            request.HasField("start_time"),
            request.HasField("end_time"),
            bool(request.page_token),
        )
        async with self._pool.acquire() as connection:
            rows = await connection.fetch(sql, *params)
            if not rows and await connection.fetchval(ACCOUNT_EXISTS, account_id) is None:
                raise NotFound("ACCOUNT_NOT_FOUND", "no such account", {"account_id": str(account_id)})
        shown = rows[:size]
        token = ""
        if len(rows) > size:
            last = shown[-1]
            token = self._page_tokens.encode(binding, f"{_micros(last['created_at'])}:{last['payment_id']}")
        return pb.ListPaymentsResponse(payments=[payment_view(row) for row in shown], next_page_token=token)

    async def WatchPayments(
        self, request: pb.WatchPaymentsRequest, context: Context
    ) -> AsyncIterator[pb.WatchPaymentsResponse]:
        raise Unimplemented("UNIMPLEMENTED", "the CRUD baseline does not stream changes")
        yield pb.WatchPaymentsResponse()  # unreachable: makes this an async generator

    async def ListHeldPayments(
        self, request: pb.ListHeldPaymentsRequest, context: Context
    ) -> pb.ListHeldPaymentsResponse:
        raise Unimplemented("UNIMPLEMENTED", "the CRUD baseline does not list the review queue")


async def serve(dsn: str, host: str, port: int, pool_size: int) -> None:
    pool = await asyncpg.create_pool(dsn, min_size=pool_size, max_size=pool_size)
    try:
        servicer = CrudHistoryServicer(pool, PageTokenCodec(secrets.token_bytes(32)))

        async def probe() -> bool:
            return bool(await pool.fetchval("SELECT 1"))

        server, _, readiness = build_server(
            # A baseline of the storage alone: no authentication (turned off explicitly).
            ServerSettings(host=host, port=port, auth=AuthSettings(disabled=True)),
            lambda s: history_service_pb2_grpc.add_HistoryServiceServicer_to_server(servicer, s),
            [SERVICE_NAME],
            probe,
        )
        await server.start()
        await readiness.start()
        await wait_for_signal()
        await readiness.stop()
        await server.stop(1.0)
    finally:
        await pool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.crud_history", description=__doc__)
    parser.add_argument("--dsn", required=True, help="postgresql:// URL of the system of record")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--pool-size", type=int, default=10, help="as the approval service's default")
    args = parser.parse_args(argv)
    configure_logging("bench-crud-history", "WARNING")
    uvloop.run(serve(args.dsn, args.host, args.port, args.pool_size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
