"""WatchPayments never skips silently: each way the change stream can lose continuity ends the stream.

The change stream and the checkpoint are written by hand (tests/support/history.py
HandWrittenReadModel), as the replicator writes them, so that each fault is staged exactly:
a FLUSHALL and the rebuild after it, entries trimmed while the watcher was disconnected, a
batch that omits payments (a truncate), a segment applied without notification, a
checkpoint that moves backwards.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from payments.history.v1 import history_service_pb2 as pb
from payments_common.grpcstatus import error_info
from payments_common.tokens import encode_consistency_token
from tests.support.history import (
    ALICE,
    BOB,
    CAROL,
    HandWrittenReadModel,
    RunningHistory,
    client,
    model,
    payment_view,
    running_history,
    settings_for,
)
from tests.support.waiting import eventually


@pytest.fixture
async def history(redis_url: str, model: HandWrittenReadModel) -> AsyncIterator[RunningHistory]:
    async with running_history(settings_for(redis_url)) as running:
        yield running


__all__ = ["client", "model"]


async def watch(history: RunningHistory, account: str) -> Any:
    stream = history.stub.WatchPayments(pb.WatchPaymentsRequest(account_id=account))
    await stream.initial_metadata()
    return stream


async def outcome(stream: Any, within_s: float = 15) -> pb.WatchPaymentsResponse | tuple[str, str]:
    """The stream's next message, or (code, reason) when it ends instead."""
    try:
        async with asyncio.timeout(within_s):
            message = await stream.read()
    except grpc.aio.AioRpcError as error:
        info = error_info(error)
        return error.code().name, info.reason if info else ""
    if message is grpc.aio.EOF:  # type: ignore[attr-defined]  # missing from grpc-stubs
        return "OK", ""
    assert isinstance(message, pb.WatchPaymentsResponse)
    return message


LOST = ("ABORTED", "WATCH_CONTINUITY_LOST")


async def assert_alice_is_read_at(history: RunningHistory, position: int) -> None:
    """A read that waits for `position` answers: consistency waits outlive the watch that ended."""
    reply = await history.stub.GetAccount(
        pb.GetAccountRequest(account_id=ALICE, min_consistency_token=encode_consistency_token(position)),
        timeout=10,
    )
    assert reply.account.account_id == ALICE


def paid(number: int) -> str:
    return payment_view(number, ALICE, BOB).payment_id


async def test_a_watch_open_across_a_flushall_and_the_rebuild_ends_with_continuity_lost(
    history: RunningHistory, model: HandWrittenReadModel, client: Redis
) -> None:
    stream = await watch(history, ALICE)
    await model.publish(payment_view(1, ALICE, BOB))
    first = await outcome(stream)
    assert isinstance(first, pb.WatchPaymentsResponse)
    assert first.payment.payment_id == paid(1)

    await client.flushdb()
    # The rebuild copies the rows without notification (payment 2 was made meanwhile),
    # then writes the checkpoint with an entry that moved from none.
    for account in (ALICE, BOB, CAROL):
        await model.open_account(account)
    await model.publish(previous=0)
    after = await model.publish(payment_view(3, ALICE, BOB))

    assert await outcome(stream) == LOST
    # Consistency waits go on across the rebuild.
    await assert_alice_is_read_at(history, after)
    assert history.server.watcher.checkpoint == after
    # A watch opened after the rebuild follows the new stream.
    again = await watch(history, ALICE)
    await model.publish(payment_view(4, ALICE, BOB))
    message = await outcome(again)
    assert isinstance(message, pb.WatchPaymentsResponse)
    assert message.payment.payment_id == paid(4)
    again.cancel()


async def test_a_batch_that_omits_payments_ends_every_watch(
    history: RunningHistory, model: HandWrittenReadModel
) -> None:
    alice, carol = await watch(history, ALICE), await watch(history, CAROL)
    # A truncate, or a huge transaction applied in chunks: whose payments changed is unknown.
    position = await model.publish(omits_payments=True)
    assert await outcome(alice) == LOST
    assert await outcome(carol) == LOST
    await eventually(lambda: history.server.watcher.subscriptions == 0)
    assert history.server.watcher.checkpoint == position


async def test_entries_trimmed_while_the_watcher_was_disconnected_end_the_watch(
    history: RunningHistory, model: HandWrittenReadModel, client: Redis
) -> None:
    stream = await watch(history, ALICE)
    await client.client_kill_filter(_type="normal", skipme=True)
    # Three batches, of which the stream keeps only the last: the watcher reads that one first.
    async with client.pipeline(transaction=True) as pipe:
        for number in (4, 5, 6):
            model.stage(pipe, model.batch(payment_view(number, ALICE, BOB)))
        pipe.xtrim(model.keys.changes(), maxlen=1, approximate=False)
        await pipe.execute()
    assert await outcome(stream) == LOST
    await assert_alice_is_read_at(history, model.checkpoint)


async def test_a_segment_applied_without_notification_breaks_the_chain_and_ends_the_watch(
    history: RunningHistory, model: HandWrittenReadModel, client: Redis
) -> None:
    stream = await watch(history, ALICE)
    async with client.pipeline(transaction=True) as pipe:
        # The checkpoint moves without an entry; the next entry names the position it moved from.
        silent = model.next_lsn()
        pipe.hset(model.keys.checkpoint(model.slot), "lsn", silent)
        model.stage(pipe, model.batch(payment_view(7, ALICE, BOB), previous=silent))
        await pipe.execute()
    assert await outcome(stream) == LOST


async def test_a_checkpoint_that_moves_backwards_ends_the_watch(
    history: RunningHistory, model: HandWrittenReadModel
) -> None:
    stream = await watch(history, ALICE)
    earlier = model.checkpoint
    # Redis restored from an older copy: its checkpoint is lower, and no entry says so.
    await model.set_checkpoint(earlier - 50)
    assert await outcome(stream) == LOST
    await eventually(lambda: history.server.watcher.checkpoint == earlier - 50)
    await assert_alice_is_read_at(history, earlier - 50)


async def test_an_entry_below_the_one_before_it_ends_the_watch(
    history: RunningHistory, model: HandWrittenReadModel, client: Redis
) -> None:
    stream = await watch(history, ALICE)
    batch = model.batch(payment_view(8, ALICE, BOB))
    batch.checkpoint_lsn = batch.previous_checkpoint_lsn - 10
    await client.xadd(model.keys.changes(), {"batch": batch.SerializeToString()})
    assert await outcome(stream) == LOST


async def test_a_reconnect_whose_chain_holds_goes_on_without_a_gap(
    history: RunningHistory, model: HandWrittenReadModel, client: Redis
) -> None:
    stream = await watch(history, ALICE)
    await client.client_kill_filter(_type="normal", skipme=True)
    for number in (9, 10):
        await model.publish(payment_view(number, ALICE, BOB))
    seen = [await outcome(stream), await outcome(stream)]
    assert [m.payment.payment_id for m in seen if isinstance(m, pb.WatchPaymentsResponse)] == [
        paid(9),
        paid(10),
    ]
    stream.cancel()
