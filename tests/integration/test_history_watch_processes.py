"""A watch resumed through another `python -m history_svc serve` process after the first was killed."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from redis.asyncio import Redis

from payments.history.v1 import history_service_pb2 as pb
from payments.history.v1 import history_service_pb2_grpc
from payments_common.grpcstatus import error_info
from payments_common.keys import DEFAULT_SLOT_NAME
from payments_common.tokens import decode_consistency_token, encode_consistency_token
from stack.servers import PostgresServer, free_port
from tests.support.auth import aio_channel
from tests.support.history import (
    ALICE,
    BOB,
    HandWrittenReadModel,
    HistoryProcess,
    client,
    history_processes,
    model,
    payment_view,
    replicated_source,
)


def _process(redis_url: str, work_dir: Path, slot: str = DEFAULT_SLOT_NAME) -> HistoryProcess:
    return HistoryProcess(
        redis_url,
        free_port(),
        work_dir / f"history-{uuid.uuid4().hex[:8]}.log",
        extra_env={"HISTORY_SLOT_NAME": slot},
    )


__all__ = ["client", "model"]


async def _take(stream: Any, count: int) -> list[pb.WatchPaymentsResponse]:
    taken = []
    async with asyncio.timeout(30):
        for _ in range(count):
            message = await stream.read()
            assert isinstance(message, pb.WatchPaymentsResponse), message
            taken.append(message)
    return taken


@dataclass
class Failover:
    """Two history processes and a watch open on the first: kill it, then resume through the second."""

    first: HistoryProcess
    stream: Any
    second: history_service_pb2_grpc.HistoryServiceAsyncStub


@contextlib.asynccontextmanager
async def watching_through_the_first_of_two(
    make: Callable[[int], HistoryProcess], account: str
) -> AsyncIterator[Failover]:
    with history_processes(make, 2) as (first, second):
        async with (
            aio_channel(first.address) as first_channel,
            aio_channel(second.address) as second_channel,
        ):
            stream = history_service_pb2_grpc.HistoryServiceStub(first_channel).WatchPayments(
                pb.WatchPaymentsRequest(account_id=account)
            )
            await stream.initial_metadata()
            yield Failover(first, stream, history_service_pb2_grpc.HistoryServiceStub(second_channel))


async def test_a_watch_resumed_through_another_process_gets_exactly_what_it_missed(
    redis_url: str, model: HandWrittenReadModel, tmp_path: Path
) -> None:
    async with watching_through_the_first_of_two(lambda _: _process(redis_url, tmp_path), ALICE) as failover:
        for number in (1, 2):
            await model.publish(payment_view(number, ALICE, BOB))
        seen = await _take(failover.stream, 2)
        last = seen[-1].consistency_token

        failover.first.kill()
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _take(failover.stream, 1)
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        missed = [
            await model.publish(payment_view(3, BOB, ALICE)),
            await model.publish(payment_view(4, ALICE, BOB), payment_view(5, BOB, ALICE)),
        ]

        resumed = failover.second.WatchPayments(
            pb.WatchPaymentsRequest(account_id=ALICE, start_after_consistency_token=last)
        )
        await resumed.initial_metadata()
        live = await model.publish(payment_view(6, ALICE, BOB))
        got = await _take(resumed, 4)
        assert [(m.payment.payment_id, decode_consistency_token(m.consistency_token)) for m in got] == [
            (payment_view(3, ALICE, BOB).payment_id, missed[0]),
            (payment_view(4, ALICE, BOB).payment_id, missed[1]),
            (payment_view(5, ALICE, BOB).payment_id, missed[1]),
            (payment_view(6, ALICE, BOB).payment_id, live),
        ]
        resumed.cancel()


async def test_a_watch_cut_inside_a_batch_resumed_through_another_process_gets_the_rest_of_it(
    redis_url: str, model: HandWrittenReadModel, tmp_path: Path
) -> None:
    async with watching_through_the_first_of_two(lambda _: _process(redis_url, tmp_path), ALICE) as failover:
        cut = await model.publish(*(payment_view(number, ALICE, BOB) for number in (1, 2, 3)))
        (seen,) = await _take(failover.stream, 1)
        assert seen.payment.payment_id == payment_view(1, ALICE, BOB).payment_id

        failover.first.kill()  # SIGKILL after the first of the batch's three changes
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await _take(failover.stream, 3)  # what was already sent may still be read, then the cut
        assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
        missed = await model.publish(payment_view(4, BOB, ALICE))

        resumed = failover.second.WatchPayments(
            pb.WatchPaymentsRequest(account_id=ALICE, start_after_resume_token=seen.resume_token)
        )
        await resumed.initial_metadata()
        live = await model.publish(payment_view(5, ALICE, BOB))
        got = await _take(resumed, 4)
        assert [(m.payment.payment_id, decode_consistency_token(m.consistency_token)) for m in got] == [
            (payment_view(2, ALICE, BOB).payment_id, cut),
            (payment_view(3, ALICE, BOB).payment_id, cut),
            (payment_view(4, ALICE, BOB).payment_id, missed),
            (payment_view(5, ALICE, BOB).payment_id, live),
        ]
        resumed.cancel()


async def test_a_resume_after_the_entries_were_trimmed_fails_with_resume_unavailable(
    redis_url: str, client: Redis, tmp_path: Path
) -> None:
    model = HandWrittenReadModel(client)
    for account in (ALICE, BOB):
        await model.open_account(account)
    seen = await model.publish(payment_view(1, ALICE, BOB))
    for number in range(2, 10):
        await model.publish(payment_view(number, ALICE, BOB))
    await model.publish(payment_view(10, ALICE, BOB), trim_to=3)
    with history_processes(lambda _: _process(redis_url, tmp_path), 1) as (process,):
        async with aio_channel(process.address) as channel:
            resumed = history_service_pb2_grpc.HistoryServiceStub(channel).WatchPayments(
                pb.WatchPaymentsRequest(
                    account_id=ALICE, start_after_consistency_token=encode_consistency_token(seen)
                )
            )
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                await _take(resumed, 1)
    assert raised.value.code() == grpc.StatusCode.OUT_OF_RANGE
    info = error_info(raised.value)
    assert info is not None
    assert info.reason == "WATCH_RESUME_UNAVAILABLE"


async def test_a_watch_resumed_with_the_real_replicator_gets_exactly_what_it_missed(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """End to end: needs the replicator that fills ChangeBatch.previous_checkpoint_lsn."""
    with replicated_source(postgres_server, tmp_path) as source:
        writer = source.writer
        payer, payee, other = (
            writer.open_account("Una"),
            writer.open_account("Vic"),
            writer.open_account("Wes"),
        )
        source.wait_replicated()

        def make(_: int) -> HistoryProcess:
            return _process(source.redis_url, tmp_path, source.slot_name)

        async with watching_through_the_first_of_two(make, payer) as failover:
            before = []
            for amount in (1, 2):
                payment_id, token = await asyncio.to_thread(writer.pay, payer, payee, amount)
                await asyncio.to_thread(source.wait_replicated, token)
                before.append(payment_id)
            seen = await _take(failover.stream, 2)
            assert [m.payment.payment_id for m in seen] == before

            failover.first.kill()
            missed = []
            for amount in (3, 4, 5):
                payment_id, token = await asyncio.to_thread(writer.pay, payer, payee, amount)
                missed.append(payment_id)
                await asyncio.to_thread(writer.pay, other, payee, amount)  # not the payer's
            await asyncio.to_thread(source.wait_replicated)

            resumed = failover.second.WatchPayments(
                pb.WatchPaymentsRequest(
                    account_id=payer, start_after_consistency_token=seen[-1].consistency_token
                )
            )
            await resumed.initial_metadata()
            live, _ = await asyncio.to_thread(writer.pay, payee, payer, 6)
            got = await _take(resumed, 4)
            assert [m.payment.payment_id for m in got] == [*missed, live]
            positions = [decode_consistency_token(m.consistency_token) for m in got]
            assert positions == sorted(positions)
            resumed.cancel()
