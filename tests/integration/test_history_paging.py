"""Paging stays stable while payments arrive: every page walk sees each older payment exactly once."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from payments.history.v1 import history_service_pb2 as pb
from stack.servers import PostgresServer
from tests.support.history import replicated_source, running_history, settings_for


@pytest.mark.parametrize("direction", [pb.PAYMENT_DIRECTION_ALL, pb.PAYMENT_DIRECTION_SENT])
async def test_walking_pages_during_concurrent_writes_has_no_duplicates_and_no_gaps(
    postgres_server: PostgresServer, tmp_path: Path, direction: int
) -> None:
    with replicated_source(postgres_server, tmp_path) as source:
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
