"""Paging stays stable while payments arrive: every page walk sees each older payment exactly once.

The same holds for the review queue, oldest first, while payments are held and decided. Both
on one Redis node and on a Redis Cluster.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from payments.history.v1 import history_service_pb2 as pb
from stack.servers import PostgresServer
from tests.support.history import TOPOLOGIES, replicated_source, running_history, settings_for


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("direction", [pb.PAYMENT_DIRECTION_ALL, pb.PAYMENT_DIRECTION_SENT])
async def test_walking_pages_during_concurrent_writes_has_no_duplicates_and_no_gaps(
    postgres_server: PostgresServer, tmp_path: Path, direction: int, topology: str
) -> None:
    with replicated_source(postgres_server, tmp_path, topology) as source:
        writer = source.writer
        mia, ned = (
            writer.open_account("Mia", balance_minor=10**9),
            writer.open_account("Ned", balance_minor=10**9),
        )
        start = datetime.now(UTC) - timedelta(hours=1)
        for n in range(60):
            writer.pay(mia, ned, 1 + n, created_at=start + timedelta(seconds=n))
            if n % 3 == 0:
                writer.pay(ned, mia, 1 + n, created_at=start + timedelta(seconds=n, milliseconds=500))
        source.wait_replicated()
        settings = settings_for(source.redis_url, slot_name=source.slot_name)
        async with running_history(settings) as history:
            request = pb.ListPaymentsRequest(account_id=mia, direction=direction, page_size=1000)  # type: ignore[arg-type]
            existing = [view.payment_id for view in (await history.stub.ListPayments(request)).payments]
            assert len(existing) == (60 + 20 if direction == pb.PAYMENT_DIRECTION_ALL else 60)

            seen: list[str] = []
            added: list[str] = []
            request.page_size = 7
            while True:
                page = await history.stub.ListPayments(request, timeout=10)
                seen += [view.payment_id for view in page.payments]
                if not page.next_page_token:
                    break
                request.page_token = page.next_page_token
                # Between two pages: new payments both ways, and one dated inside the range
                # already walked, all replicated before the next page is read.
                added.append((await asyncio.to_thread(writer.pay, mia, ned, 7))[0])
                added.append((await asyncio.to_thread(writer.pay, ned, mia, 9))[0])
                added.append((await asyncio.to_thread(writer.pay, mia, ned, 3, "APPROVED", start))[0])
                await asyncio.to_thread(source.wait_replicated)

            assert len(seen) == len(set(seen)), "a payment appeared twice"
            assert set(existing) <= set(seen), "a payment that existed when the walk began was skipped"
            assert set(seen) - set(existing) <= set(added)
            # Seen in newest-first order, the order of the first listing.
            assert [payment_id for payment_id in seen if payment_id in set(existing)] == existing


@pytest.mark.parametrize("topology", TOPOLOGIES)
async def test_walking_the_review_queue_while_payments_are_held_and_decided_has_no_duplicates_and_no_gaps(
    postgres_server: PostgresServer, tmp_path: Path, topology: str
) -> None:
    with replicated_source(postgres_server, tmp_path, topology) as source:
        writer = source.writer
        mia, ned = (
            writer.open_account("Mia", balance_minor=10**9),
            writer.open_account("Ned", balance_minor=10**9),
        )
        start = datetime.now(UTC) - timedelta(hours=1)
        for n in range(40):
            writer.pay(mia, ned, 1 + n, "PENDING_REVIEW", created_at=start + timedelta(seconds=n))
        source.wait_replicated()
        settings = settings_for(source.redis_url, slot_name=source.slot_name)
        async with running_history(settings) as history:
            request = pb.ListHeldPaymentsRequest(page_size=1000)
            existing = [view.payment_id for view in (await history.stub.ListHeldPayments(request)).payments]
            assert len(existing) == 40

            seen: list[str] = []
            added: list[str] = []
            decided: list[str] = []
            request.page_size = 7
            while True:
                page = await history.stub.ListHeldPayments(request, timeout=10)
                seen += [view.payment_id for view in page.payments]
                if not page.next_page_token:
                    break
                request.page_token = page.next_page_token
                # Between two pages: a new payment held, one dated inside the range already
                # walked, and the newest payment not read yet approved; all replicated first.
                added.append((await asyncio.to_thread(writer.pay, ned, mia, 7, "PENDING_REVIEW"))[0])
                added.append((await asyncio.to_thread(writer.pay, mia, ned, 3, "PENDING_REVIEW", start))[0])
                unread = [p for p in existing if p not in seen and p not in decided]
                if unread:
                    decided.append(unread[-1])
                    await asyncio.to_thread(writer.approve_held, unread[-1])
                await asyncio.to_thread(source.wait_replicated)

            assert len(seen) == len(set(seen)), "a payment appeared twice"
            held_throughout = [p for p in existing if p not in decided]
            assert set(held_throughout) <= set(seen), "a payment held for the whole walk was skipped"
            assert not set(decided) & set(seen), "a payment decided before its page was shown"
            assert set(seen) - set(existing) <= set(added)
            # Oldest first: those held for the whole walk in the order of the first listing.
            assert [p for p in seen if p in set(existing)] == held_throughout
