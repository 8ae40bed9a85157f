"""WatchPayments resumed after a position: exactly the missed changes, then the live ones, or a clear error.

The change stream is written by hand (tests/support/history.py HandWrittenReadModel), as
the replicator writes it, so that each case is staged exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from payments.history.v1 import history_service_pb2 as pb
from payments.readmodel.v1 import read_model_pb2
from payments_common.grpcstatus import bad_request, error_info
from payments_common.tokens import decode_consistency_token, encode_consistency_token
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


@pytest.fixture
async def history(redis_url: str, model: HandWrittenReadModel) -> AsyncIterator[RunningHistory]:
    async with running_history(settings_for(redis_url, consistency_wait_max_seconds=1.0)) as running:
        yield running


__all__ = ["client", "model"]


def watch(history: RunningHistory, account: str, after: str = "") -> Any:
    return history.stub.WatchPayments(
        pb.WatchPaymentsRequest(account_id=account, start_after_consistency_token=after)
    )


async def take(stream: Any, count: int) -> list[tuple[str, int]]:
    """The next `count` messages, as (payment id, position)."""
    taken = []
    async with asyncio.timeout(15):
        for _ in range(count):
            message = await stream.read()
            assert isinstance(message, pb.WatchPaymentsResponse), message
            taken.append((message.payment.payment_id, decode_consistency_token(message.consistency_token)))
    return taken


async def fails(stream: Any, code: grpc.StatusCode, reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        async with asyncio.timeout(15):
            await stream.read()
    assert raised.value.code() == code
    info = error_info(raised.value)
    assert info is not None
    assert info.reason == reason
    return raised.value


def pid(number: int) -> str:
    return payment_view(number, ALICE, BOB).payment_id


async def test_a_resumed_watch_gets_exactly_the_missed_changes_then_the_live_ones(
    history: RunningHistory, model: HandWrittenReadModel
) -> None:
    first = watch(history, ALICE)
    await first.initial_metadata()
    one = await model.publish(payment_view(1, ALICE, BOB))
    assert await take(first, 1) == [(pid(1), one)]
    first.cancel()

    two = await model.publish(payment_view(2, BOB, ALICE))
    await model.publish(payment_view(3, BOB, CAROL))  # not Alice's
    await model.publish()  # the checkpoint moved, nothing changed
    four = await model.publish(payment_view(4, ALICE, CAROL), payment_view(5, CAROL, ALICE))

    resumed = watch(history, ALICE, after=encode_consistency_token(one))
    await resumed.initial_metadata()
    six = await model.publish(payment_view(6, ALICE, BOB))
    assert await take(resumed, 4) == [
        (payment_view(2, BOB, ALICE).payment_id, two),
        (payment_view(4, ALICE, CAROL).payment_id, four),
        (payment_view(5, CAROL, ALICE).payment_id, four),
        (pid(6), six),
    ]
    # Nothing else, twice or otherwise: the next message is the next change.
    seven = await model.publish(payment_view(7, ALICE, BOB))
    assert await take(resumed, 1) == [(pid(7), seven)]
    resumed.cancel()


async def test_resuming_at_the_latest_position_misses_nothing_and_repeats_nothing(
    history: RunningHistory, model: HandWrittenReadModel
) -> None:
    latest = await model.publish(payment_view(1, ALICE, BOB))
    resumed = watch(history, ALICE, after=encode_consistency_token(latest))
    await resumed.initial_metadata()
    two = await model.publish(payment_view(2, ALICE, BOB))
    assert await take(resumed, 1) == [(pid(2), two)]
    resumed.cancel()


async def test_changes_applied_while_a_resume_reads_the_backlog_come_once(
    history: RunningHistory, model: HandWrittenReadModel
) -> None:
    start = model.checkpoint
    backlog = [await model.publish(payment_view(n, ALICE, BOB)) for n in range(1, 41)]
    resumed = watch(history, ALICE, after=encode_consistency_token(start))
    # Batches keep arriving while the server reads the backlog and subscribes.
    live = [await model.publish(payment_view(n, ALICE, BOB)) for n in range(41, 61)]
    got = await take(resumed, 60)
    assert got == [(pid(n), lsn) for n, lsn in zip(range(1, 61), backlog + live, strict=True)]
    resumed.cancel()


async def test_a_position_whose_changes_were_trimmed_is_resume_unavailable(
    history: RunningHistory, model: HandWrittenReadModel
) -> None:
    one = await model.publish(payment_view(1, ALICE, BOB))
    for number in range(2, 6):
        await model.publish(payment_view(number, ALICE, BOB))
    await model.publish(payment_view(6, ALICE, BOB), trim_to=2)
    await fails(
        watch(history, ALICE, after=encode_consistency_token(one)),
        grpc.StatusCode.OUT_OF_RANGE,
        "WATCH_RESUME_UNAVAILABLE",
    )
    assert history.server.watcher.subscriptions == 0


@pytest.mark.parametrize("fault", ["rebuild", "omits_payments", "silent_segment"])
async def test_a_position_before_a_discontinuity_is_resume_unavailable(
    history: RunningHistory, model: HandWrittenReadModel, fault: str
) -> None:
    one = await model.publish(payment_view(1, ALICE, BOB))
    if fault == "rebuild":
        await model.publish(previous=0)
    elif fault == "omits_payments":
        await model.publish(omits_payments=True)
    else:
        await model.set_checkpoint(model.next_lsn())
        await model.publish(payment_view(2, ALICE, BOB))
    await model.publish(payment_view(3, ALICE, BOB))
    await fails(
        watch(history, ALICE, after=encode_consistency_token(one)),
        grpc.StatusCode.OUT_OF_RANGE,
        "WATCH_RESUME_UNAVAILABLE",
    )


async def test_a_position_that_no_batch_ended_at_is_resume_unavailable(
    history: RunningHistory, model: HandWrittenReadModel
) -> None:
    one = await model.publish(payment_view(1, ALICE, BOB))
    await model.publish(payment_view(2, ALICE, BOB))
    await fails(
        watch(history, ALICE, after=encode_consistency_token(one + 1)),
        grpc.StatusCode.OUT_OF_RANGE,
        "WATCH_RESUME_UNAVAILABLE",
    )


async def test_a_position_not_reached_yet_is_waited_for(
    history: RunningHistory, model: HandWrittenReadModel
) -> None:
    ahead = model.checkpoint + 1_000_000
    await fails(
        watch(history, ALICE, after=encode_consistency_token(ahead)),
        grpc.StatusCode.UNAVAILABLE,
        "CONSISTENCY_NOT_REACHED",
    )
    # A position that arrives while the call waits is resumed from.
    coming = model.checkpoint + 100
    # Either order works: the call waits for the position, or finds it reached.
    resumed = watch(history, ALICE, after=encode_consistency_token(coming))
    assert await model.publish(payment_view(1, ALICE, BOB)) == coming
    two = await model.publish(payment_view(2, ALICE, BOB))
    assert await take(resumed, 1) == [(pid(2), two)]
    resumed.cancel()


async def test_a_malformed_resume_position_is_refused(history: RunningHistory) -> None:
    error = await fails(
        watch(history, ALICE, after="c1.not-a-token"),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_CONSISTENCY_TOKEN",
    )
    violations = bad_request(error)
    assert violations is not None
    assert [v.field for v in violations.field_violations] == ["start_after_consistency_token"]


def resume(history: RunningHistory, account: str, resume_token: str, after: str = "") -> Any:
    return history.stub.WatchPayments(
        pb.WatchPaymentsRequest(
            account_id=account, start_after_resume_token=resume_token, start_after_consistency_token=after
        )
    )


async def a_resume_token(
    history: RunningHistory,
    model: HandWrittenReadModel,
    account: str,
    *batch: read_model_pb2.PaymentView,
    reading: int = 1,
) -> str:
    """The resume token of the `reading`-th change a watch of `account` gets from `batch`, published as it watches."""
    stream = watch(history, account)
    await stream.initial_metadata()
    await model.publish(*batch)
    message = [await stream.read() for _ in range(reading)][-1]
    stream.cancel()
    assert message.resume_token
    return str(message.resume_token)


async def test_a_watch_cut_inside_a_batch_resumes_with_exactly_the_rest_of_it(
    history: RunningHistory, model: HandWrittenReadModel
) -> None:
    first = watch(history, ALICE)
    await first.initial_metadata()
    # One batch, three changes of Alice's (and one that is not hers).
    batch = await model.publish(
        payment_view(1, ALICE, BOB),
        payment_view(2, BOB, CAROL),
        payment_view(3, BOB, ALICE),
        payment_view(4, ALICE, CAROL),
    )
    message = await first.read()
    assert message.payment.payment_id == pid(1)
    first.cancel()  # the connection drops after the first of the batch's changes

    resumed = resume(history, ALICE, message.resume_token)
    await resumed.initial_metadata()
    live = await model.publish(payment_view(5, CAROL, ALICE))
    assert await take(resumed, 3) == [(pid(3), batch), (pid(4), batch), (pid(5), live)]
    # Nothing else, twice or otherwise: the next message is the next change.
    six = await model.publish(payment_view(6, ALICE, BOB))
    assert await take(resumed, 1) == [(pid(6), six)]
    resumed.cancel()


async def test_a_resume_token_resumes_across_later_batches_and_is_per_account(
    history: RunningHistory, model: HandWrittenReadModel
) -> None:
    alice, bob = watch(history, ALICE), watch(history, BOB)
    await alice.initial_metadata()
    await bob.initial_metadata()
    # Bob's first change is the batch's second: its position counts Bob's changes only.
    cut = await model.publish(
        payment_view(1, ALICE, CAROL), payment_view(2, ALICE, BOB), payment_view(3, BOB, ALICE)
    )
    seen_by_alice = [await alice.read() for _ in range(2)]
    seen_by_bob = await bob.read()
    assert [m.payment.payment_id for m in seen_by_alice] == [pid(1), pid(2)]
    assert seen_by_bob.payment.payment_id == pid(2)
    alice.cancel()
    bob.cancel()

    await model.publish(payment_view(4, BOB, CAROL))  # Bob's only
    later = await model.publish(payment_view(5, CAROL, ALICE), payment_view(6, ALICE, BOB))

    resumed_alice = resume(history, ALICE, seen_by_alice[-1].resume_token)
    resumed_bob = resume(history, BOB, seen_by_bob.resume_token)
    await resumed_alice.initial_metadata()
    await resumed_bob.initial_metadata()
    assert await take(resumed_alice, 3) == [(pid(3), cut), (pid(5), later), (pid(6), later)]
    assert [m for m, _ in await take(resumed_bob, 3)] == [pid(3), pid(4), pid(6)]
    resumed_alice.cancel()
    resumed_bob.cancel()


async def test_resuming_after_the_last_change_of_a_batch_starts_with_the_next_batch(
    history: RunningHistory, model: HandWrittenReadModel
) -> None:
    last = await a_resume_token(
        history, model, ALICE, payment_view(1, ALICE, BOB), payment_view(2, ALICE, BOB), reading=2
    )
    # Resumed at the head (the subscription begins at the very entry of the token) ...
    resumed = resume(history, ALICE, last)
    await resumed.initial_metadata()
    three = await model.publish(payment_view(3, ALICE, BOB))
    assert await take(resumed, 1) == [(pid(3), three)]
    resumed.cancel()
    # ... and with entries after it.
    four = await model.publish(payment_view(4, ALICE, BOB))
    again = resume(history, ALICE, last)
    assert await take(again, 2) == [(pid(3), three), (pid(4), four)]
    again.cancel()


async def test_a_resume_token_whose_changes_were_trimmed_is_resume_unavailable(
    history: RunningHistory, model: HandWrittenReadModel
) -> None:
    token = await a_resume_token(
        history, model, ALICE, payment_view(1, ALICE, BOB), payment_view(2, ALICE, BOB)
    )
    for number in range(3, 6):
        await model.publish(payment_view(number, ALICE, BOB))
    await model.publish(payment_view(6, ALICE, BOB), trim_to=2)
    await fails(resume(history, ALICE, token), grpc.StatusCode.OUT_OF_RANGE, "WATCH_RESUME_UNAVAILABLE")
    assert history.server.watcher.subscriptions == 0


async def test_a_resume_token_after_a_discontinuity_is_resume_unavailable(
    history: RunningHistory, model: HandWrittenReadModel
) -> None:
    token = await a_resume_token(
        history, model, ALICE, payment_view(1, ALICE, BOB), payment_view(2, ALICE, BOB)
    )
    await model.publish(omits_payments=True)
    await model.publish(payment_view(3, ALICE, BOB))
    await fails(resume(history, ALICE, token), grpc.StatusCode.OUT_OF_RANGE, "WATCH_RESUME_UNAVAILABLE")


async def test_a_resume_token_with_a_consistency_token_is_refused(
    history: RunningHistory, model: HandWrittenReadModel
) -> None:
    token = await a_resume_token(history, model, ALICE, payment_view(1, ALICE, BOB))
    error = await fails(
        resume(history, ALICE, token, after=encode_consistency_token(model.checkpoint)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "INVALID_ARGUMENT",
    )
    violations = bad_request(error)
    assert violations is not None
    assert [v.field for v in violations.field_violations] == ["start_after_resume_token"]


@pytest.mark.parametrize("fault", ["malformed", "altered", "a consistency token", "another account's"])
async def test_a_resume_token_that_is_not_one_of_this_account_is_refused(
    history: RunningHistory, model: HandWrittenReadModel, fault: str
) -> None:
    token = await a_resume_token(history, model, BOB, payment_view(1, ALICE, BOB))
    if fault == "malformed":
        token = "not-a-token"
    elif fault == "altered":
        token = token[:10] + ("A" if token[10] != "A" else "B") + token[11:]
    elif fault == "a consistency token":
        token = encode_consistency_token(model.checkpoint)
    # "another account's": Bob's token, sent to resume Alice's stream.
    error = await fails(
        resume(history, ALICE, token), grpc.StatusCode.INVALID_ARGUMENT, "INVALID_RESUME_TOKEN"
    )
    violations = bad_request(error)
    assert violations is not None
    assert [v.field for v in violations.field_violations] == ["start_after_resume_token"]
