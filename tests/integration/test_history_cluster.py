"""What a Redis Cluster adds to the history reads: masters that hold their parts of a batch at different times, and failover.

The first tests write the read models by hand on the cluster (as the replicator lays them
out: each master's own checkpoint moves with its part of a batch, the slot's checkpoint and
the change stream once every master has it), so that a master can be staged behind another;
the failover test runs the real replicator and kills a master.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from payments.history.v1 import history_service_pb2 as pb
from payments.readmodel.v1 import read_model_pb2
from payments.type.v1 import payment_pb2
from payments_common.grpcstatus import error_info
from payments_common.keys import (
    DEFAULT_SLOT_NAME,
    LSN_FIELD,
    VIEW_FIELD,
    KeySchema,
    index_member,
)
from payments_common.redisconn import AsyncClient, async_client
from payments_common.tokens import encode_consistency_token
from stack.servers import PostgresServer, RedisCluster
from tests.support.history import (
    ALICE,
    BOB,
    HandWrittenReadModel,
    RunningHistory,
    payment_view,
    replicated_source,
    running_history,
    settings_for,
)
from tests.support.history_cluster import (
    kill_master_of,
    master_port_of,
    move_node_checkpoint,
    node_checkpoint_key_of,
    node_checkpoint_of,
    node_checkpoints,
    promoted,
)
from tests.support.waiting import eventually

SCHEMA = KeySchema.for_redis("rm:v1", DEFAULT_SLOT_NAME, cluster=True)
# The position of the batch that the tests stage: past everything the model published before.
AHEAD = 900_000


@pytest.fixture
async def cluster_client(cluster_url: str) -> AsyncIterator[AsyncClient]:
    client = async_client(cluster_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def model(cluster_url: str, cluster_client: AsyncClient) -> HandWrittenReadModel:
    """ALICE and BOB opened and published, every master's checkpoint at the slot's."""
    model = HandWrittenReadModel(cluster_client, keys=SCHEMA)  # type: ignore[arg-type]
    for account in (ALICE, BOB):
        await model.open_account(account)
    await model.publish()
    for key, node in node_checkpoints(cluster_url, SCHEMA).items():
        await move_node_checkpoint(cluster_client, key, node, model.checkpoint)
    return model


@pytest.fixture
async def history(cluster_url: str, model: HandWrittenReadModel) -> AsyncIterator[RunningHistory]:
    # A short cap: a read that waited for the slot's checkpoint would fail, not answer.
    async with running_history(settings_for(cluster_url, consistency_wait_max_seconds=0.5)) as running:
        await eventually(
            lambda: running.server.watcher.checkpoint == model.checkpoint, 10, "the watcher synced"
        )
        yield running


def _payment_elsewhere(cluster_url: str, account: str) -> read_model_pb2.PaymentView:
    """A payment of `account` to BOB whose keys live on another master than the account's."""
    account_checkpoint = node_checkpoint_key_of(cluster_url, SCHEMA, SCHEMA.account(account))
    for number in range(1, 1000):
        view = payment_view(number, account, BOB)
        if node_checkpoint_key_of(cluster_url, SCHEMA, SCHEMA.payment(view.payment_id)) != account_checkpoint:
            return view
    raise AssertionError("every payment fell on the account's master")


async def _write_payment(client: AsyncClient, view: read_model_pb2.PaymentView, lsn: int) -> None:
    """The payment's master's part of a batch: its view (the account's index is the account's master's part)."""
    await client.hset(
        SCHEMA.payment(view.payment_id), mapping={LSN_FIELD: lsn, VIEW_FIELD: view.SerializeToString()}
    )


async def _write_index(client: AsyncClient, account: str, view: read_model_pb2.PaymentView) -> None:
    member = index_member(1_700_000_000_000_000, view.payment_id)
    for direction in ("sent", "all"):
        for status in (0, payment_pb2.PAYMENT_STATUS_APPROVED):
            await client.zadd(SCHEMA.account_index(account, direction, status), {member: 0})


async def _move_master(client: AsyncClient, cluster_url: str, key: str, lsn: int) -> None:
    """Moves the own checkpoint of the master of `key`, as its part of the batch at `lsn` does."""
    await move_node_checkpoint(client, *node_checkpoint_of(cluster_url, SCHEMA, key), lsn)


async def _refused(call: object, reason: str) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await call  # type: ignore[misc]
    assert raised.value.code() == grpc.StatusCode.UNAVAILABLE
    info = error_info(raised.value)
    assert info is not None
    assert info.reason == reason
    return raised.value


async def test_a_read_with_a_token_answers_once_its_master_has_it_whatever_the_others_hold(
    cluster_url: str, cluster_client: AsyncClient, history: RunningHistory
) -> None:
    view = _payment_elsewhere(cluster_url, ALICE)
    token = encode_consistency_token(AHEAD)
    # The payment's master has applied its part of the batch at AHEAD; the account's master,
    # and so the slot's checkpoint, have not.
    await _write_payment(cluster_client, view, AHEAD)
    await _move_master(cluster_client, cluster_url, SCHEMA.payment(view.payment_id), AHEAD)
    got = await history.stub.GetPayment(
        pb.GetPaymentRequest(payment_id=view.payment_id, min_consistency_token=token), timeout=10
    )
    assert got.payment == view
    assert history.server.watcher.checkpoint < AHEAD
    # The account's master is behind: its read waits, and is refused within the wait.
    error = await _refused(
        history.stub.GetAccount(
            pb.GetAccountRequest(account_id=ALICE, min_consistency_token=token), timeout=10
        ),
        "CONSISTENCY_NOT_REACHED",
    )
    assert error_info(error).metadata["min_lsn"]  # type: ignore[union-attr]


async def test_a_master_still_behind_once_the_slots_checkpoint_passed_the_token_is_consistency_not_reached(
    cluster_url: str, cluster_client: AsyncClient, model: HandWrittenReadModel, history: RunningHistory
) -> None:
    # The slot's checkpoint moves past the token with a master left behind: what a master whose
    # lowest slot moved (its checkpoint under another name) looks like to a reader.
    behind = model.checkpoint
    position = await model.publish()
    for key, node in node_checkpoints(cluster_url, SCHEMA).items():
        if key != node_checkpoint_key_of(cluster_url, SCHEMA, SCHEMA.account(ALICE)):
            await move_node_checkpoint(cluster_client, key, node, position)
    await eventually(lambda: history.server.watcher.checkpoint == position, 10, "the watcher at the batch")
    token = encode_consistency_token(position)
    await _refused(
        history.stub.GetAccount(
            pb.GetAccountRequest(account_id=ALICE, min_consistency_token=token), timeout=10
        ),
        "CONSISTENCY_NOT_REACHED",
    )
    await _move_master(cluster_client, cluster_url, SCHEMA.account(ALICE), position)
    got = await history.stub.GetAccount(
        pb.GetAccountRequest(account_id=ALICE, min_consistency_token=token), timeout=10
    )
    assert got.account.account_id == ALICE
    assert behind < position


async def test_without_a_token_a_reader_sees_one_masters_part_of_a_batch_before_anothers(
    cluster_url: str, cluster_client: AsyncClient, history: RunningHistory
) -> None:
    view = _payment_elsewhere(cluster_url, ALICE)
    # The account's master has applied its part (the index entry, the account's counts);
    # the payment's master has not.
    await _write_index(cluster_client, ALICE, view)
    counted = read_model_pb2.AccountView(account_id=ALICE, owner_name="someone")
    counted.counts.sent_approved = 1
    await cluster_client.hset(
        SCHEMA.account(ALICE), mapping={LSN_FIELD: AHEAD, VIEW_FIELD: counted.SerializeToString()}
    )
    await _move_master(cluster_client, cluster_url, SCHEMA.account(ALICE), AHEAD)
    account = await history.stub.GetAccount(pb.GetAccountRequest(account_id=ALICE), timeout=10)
    assert account.account.counts.sent_approved == 1
    with pytest.raises(grpc.aio.AioRpcError) as missing:
        await history.stub.GetPayment(pb.GetPaymentRequest(payment_id=view.payment_id), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    # The page leaves out the payment whose view its master does not hold yet.
    listed = await history.stub.ListPayments(
        pb.ListPaymentsRequest(account_id=ALICE, direction=pb.PAYMENT_DIRECTION_ALL), timeout=10
    )
    assert list(listed.payments) == []
    # With the batch's token, the page is refused rather than short.
    token = encode_consistency_token(AHEAD)
    await _refused(
        history.stub.ListPayments(
            pb.ListPaymentsRequest(
                account_id=ALICE, direction=pb.PAYMENT_DIRECTION_ALL, min_consistency_token=token
            ),
            timeout=10,
        ),
        "CONSISTENCY_NOT_REACHED",
    )
    # The payment's master applies its part: the page has it, with the token and without.
    await _write_payment(cluster_client, view, AHEAD)
    await _move_master(cluster_client, cluster_url, SCHEMA.payment(view.payment_id), AHEAD)
    for request_token in (token, ""):
        listed = await history.stub.ListPayments(
            pb.ListPaymentsRequest(
                account_id=ALICE, direction=pb.PAYMENT_DIRECTION_ALL, min_consistency_token=request_token
            ),
            timeout=10,
        )
        assert list(listed.payments) == [view]


# -- Failover ---------------------------------------------------------------------------------


async def test_a_dead_master_leaves_history_serving_the_other_masters_keys(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """The master that holds the slot's owner key hung, then killed: readiness stays SERVING, and
    until its replica takes over the other masters' keys are read; after, its keys are read too.

    Every history process sees the same cluster: NOT_SERVING would take them all out of their
    Service, and fail every read instead of the dead master's share.
    """
    with replicated_source(postgres_server, tmp_path, "cluster") as source:
        assert isinstance(source.redis, RedisCluster)
        cluster = source.redis
        schema = KeySchema.for_redis("rm:v1", source.slot_name, cluster=True)
        accounts = [source.writer.open_account(f"Owner {n}") for n in range(30)]
        await asyncio.to_thread(source.wait_replicated)
        settings = settings_for(source.redis_url, slot_name=source.slot_name)
        async with running_history(settings) as history:
            readiness = history.server.readiness
            assert await readiness.check_once()
            # Hung (SIGSTOP) for less than the node timeout: it answers nothing, and nothing
            # fails over unless the pause outlasts the node timeout.
            hung = master_port_of(cluster, schema.owner())
            cluster.pause(hung)
            try:
                assert await readiness.check_once()
            finally:
                cluster.resume(hung)
            await asyncio.to_thread(cluster.wait_ok)
            doomed = master_port_of(cluster, schema.owner())
            ports = {account: master_port_of(cluster, schema.account(account)) for account in accounts}
            elsewhere = next(account for account, port in ports.items() if port != doomed)
            there = next(account for account, port in ports.items() if port == doomed)
            assert await asyncio.to_thread(kill_master_of, cluster, schema.owner()) == doomed
            # At once, long before the node timeout lets its replica take over.
            assert await readiness.check_once()
            reply = await history.stub.GetAccount(pb.GetAccountRequest(account_id=elsewhere), timeout=10)
            assert reply.account.account_id == elsewhere
            await eventually(
                lambda: asyncio.to_thread(promoted, cluster, schema.owner(), doomed),
                60,
                "the owner key's replica promoted",
            )
            # No read in between to refresh the process's slot table: the probe does its own.
            assert await readiness.check_once()
            # The killed node back, as the replica of the one that took over: on a slot table
            # read before the failover it is the owner key's master, and answers MOVED.
            await asyncio.to_thread(cluster.start_node, doomed)
            assert await readiness.check_once()
            assert await readiness.check_once()
            reply = await history.stub.GetAccount(pb.GetAccountRequest(account_id=there), timeout=10)
            assert reply.account.account_id == there
            await history.stub.GetAccount(pb.GetAccountRequest(account_id=elsewhere), timeout=10)
            assert await readiness.check_once()


@pytest.mark.slow
async def test_reads_answer_correctly_or_unavailable_while_the_payments_master_fails_over(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    with replicated_source(postgres_server, tmp_path, "cluster") as source:
        writer = source.writer
        alice, bob = writer.open_account("Alice"), writer.open_account("Bob")
        paid = [writer.pay(alice, bob, 100 + n)[0] for n in range(5)]
        held = [writer.pay(bob, alice, 200 + n, status="PENDING_REVIEW")[0] for n in range(3)]
        await asyncio.to_thread(source.wait_replicated)
        settings = settings_for(source.redis_url, slot_name=source.slot_name)
        async with running_history(settings) as history:
            stub = history.stub
            requests: dict[str, tuple[Any, Any]] = {
                "GetPayment": (stub.GetPayment, pb.GetPaymentRequest(payment_id=paid[0])),
                "ListPayments": (
                    stub.ListPayments,
                    pb.ListPaymentsRequest(account_id=alice, direction=pb.PAYMENT_DIRECTION_ALL),
                ),
                "GetAccount": (stub.GetAccount, pb.GetAccountRequest(account_id=alice)),
                "ListHeldPayments": (stub.ListHeldPayments, pb.ListHeldPaymentsRequest(page_size=10)),
            }

            def answer(reply: Any) -> Any:
                # The queue's consistency token is the checkpoint its masters had: it moves on.
                return list(reply.payments) if isinstance(reply, pb.ListHeldPaymentsResponse) else reply

            expected = {
                name: answer(await method(request, timeout=10))
                for name, (method, request) in requests.items()
            }
            # Newest first: the held payments (received) came after the paid ones (sent).
            assert [view.payment_id for view in expected["ListPayments"].payments] == [
                *held[::-1],
                *paid[::-1],
            ]
            assert sorted(view.payment_id for view in expected["ListHeldPayments"]) == sorted(held)

            outcomes: dict[str, list[str]] = {name: [] for name in requests}
            wrong: list[str] = []

            async def read_all() -> None:
                async def one(name: str) -> None:
                    method, request = requests[name]
                    try:
                        reply = await method(request, timeout=8)
                    except grpc.aio.AioRpcError as error:
                        outcomes[name].append(error.code().name)
                        if error.code() != grpc.StatusCode.UNAVAILABLE:
                            wrong.append(f"{name}: {error.code().name} {error.details()}")
                        return
                    outcomes[name].append("OK")
                    if answer(reply) != expected[name]:
                        wrong.append(f"{name}: a wrong answer {reply}")

                await asyncio.gather(*(one(name) for name in requests))

            assert isinstance(source.redis, RedisCluster)
            cluster = source.redis
            dead = await asyncio.to_thread(kill_master_of, cluster, SCHEMA.payment(paid[0]))
            # Reads go on through the failover until the replica is promoted, and after it.
            rounds = 0
            while not await asyncio.to_thread(promoted, cluster, SCHEMA.payment(paid[0]), dead):
                await read_all()
                rounds += 1
                assert not wrong, wrong
            assert rounds, "the replica was promoted before any read reached the dead master"
            await eventually(
                read_all_answered(read_all, outcomes), 30, "every read answered after the promotion"
            )
            assert not wrong, wrong

            # A payment written after the failover is read with its token: once the replicator
            # carries on, never an answer without it. The promoted master has no replica until
            # the killed node comes back as one, and the replicator confirms nothing till then.
            await asyncio.to_thread(cluster.start_node, dead)
            later, token = await asyncio.to_thread(writer.pay, alice, bob, 300)

            async def read_with_token() -> bool:
                try:
                    reply = await stub.GetPayment(
                        pb.GetPaymentRequest(payment_id=later, min_consistency_token=token), timeout=8
                    )
                except grpc.aio.AioRpcError as error:
                    refused = error.code()
                else:
                    assert reply.payment.payment_id == later
                    return True
                assert refused == grpc.StatusCode.UNAVAILABLE, refused
                return False

            await eventually(
                read_with_token, 60, "the payment written after the failover, read with its token"
            )


def _status(error: grpc.aio.AioRpcError) -> tuple[str, str]:
    info = error_info(error)
    return error.code().name, info.reason if info else ""


def read_all_answered(
    read_all: Callable[[], Awaitable[None]], outcomes: dict[str, list[str]]
) -> Callable[[], Awaitable[bool]]:
    """A check for `eventually`: one more round of reads, and whether each method's last one answered."""

    async def check() -> bool:
        await read_all()
        return all(results and results[-1] == "OK" for results in outcomes.values())

    return check


@pytest.mark.slow
async def test_a_watch_across_a_failover_of_the_change_streams_master_misses_nothing_and_repeats_nothing(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    """The master of the change stream is killed under a steady stream of payments to a watched account.

    The watch either goes on with every payment once, in order, or ends with ABORTED
    WATCH_CONTINUITY_LOST after a prefix without a gap; a resume from its last token then
    gives exactly the rest, or OUT_OF_RANGE WATCH_RESUME_UNAVAILABLE. Never a change twice,
    never one left out.
    """
    with replicated_source(postgres_server, tmp_path, "cluster") as source:
        writer = source.writer
        alice, bob = writer.open_account("Alice"), writer.open_account("Bob")
        await asyncio.to_thread(source.wait_replicated)
        assert isinstance(source.redis, RedisCluster)
        cluster = source.redis
        changes_key = KeySchema.for_redis("rm:v1", source.slot_name, cluster=True).changes()
        # A buffer that holds the replicator's catch-up after the failover: this test is of
        # continuity, not of a client slower than the catch-up (WATCH_TOO_SLOW).
        settings = settings_for(source.redis_url, slot_name=source.slot_name, watch_queue_size=100_000)
        async with running_history(settings) as history:
            watch = history.stub.WatchPayments(pb.WatchPaymentsRequest(account_id=alice))
            await watch.initial_metadata()
            received: list[pb.WatchPaymentsResponse] = []
            ended: list[grpc.aio.AioRpcError] = []

            async def read() -> None:
                try:
                    async for message in watch:
                        received.append(message)
                except grpc.aio.AioRpcError as error:
                    ended.append(error)

            reader = asyncio.create_task(read())
            paid: list[str] = []
            stop = threading.Event()

            def pay_steadily() -> None:
                # The load's pace (about 200 payments/s at most), not a synchronisation.
                while not stop.wait(0.005):
                    paid.append(writer.pay(alice, bob, 1 + len(paid))[0])

            paying = asyncio.create_task(asyncio.to_thread(pay_steadily))
            try:
                await eventually(lambda: len(received) >= 10, 30, "the watch under way")
                dead = await asyncio.to_thread(kill_master_of, cluster, changes_key)
                await eventually(
                    lambda: asyncio.to_thread(promoted, cluster, changes_key, dead),
                    60,
                    "the change stream's replica promoted",
                )
                # Back as the promoted master's replica: until then the replicator confirms
                # nothing (REPLICATOR_REDIS_WAIT_REPLICAS=1) and moves no checkpoint.
                await asyncio.to_thread(cluster.start_node, dead)
                after = len(paid)
                await eventually(lambda: len(paid) >= after + 50, 60, "payments after the promotion")
            finally:
                stop.set()
                await paying
            await asyncio.to_thread(source.wait_replicated)
            await eventually(
                lambda: ended or len(received) >= len(paid), 60, "every payment delivered, or the watch ended"
            )
            if not ended:
                # One payment more once the others are in: the next message must be it, so that
                # a payment delivered again after the last one would show.
                paid.append((await asyncio.to_thread(writer.pay, alice, bob, 1 + len(paid)))[0])
                await eventually(
                    lambda: ended or len(received) >= len(paid), 60, "the last payment delivered"
                )
            delivered = [message.payment.payment_id for message in received]
            assert len(set(delivered)) == len(delivered), "a payment came twice"
            # The watch was open before the first payment: what it delivered is a prefix of them.
            assert delivered == paid[: len(delivered)]
            if not ended:
                assert delivered == paid
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
                return
            assert _status(ended[0]) == ("ABORTED", "WATCH_CONTINUITY_LOST"), ended[0]
            resumed = history.stub.WatchPayments(
                pb.WatchPaymentsRequest(account_id=alice, start_after_resume_token=received[-1].resume_token)
            )
            rest: list[str] = []
            refused: grpc.aio.AioRpcError | None = None
            try:
                async with asyncio.timeout(30):
                    while len(delivered) + len(rest) < len(paid):
                        message = await resumed.read()
                        assert isinstance(message, pb.WatchPaymentsResponse), message
                        rest.append(message.payment.payment_id)
            except grpc.aio.AioRpcError as error:
                refused = error
            if refused is not None:
                assert _status(refused) == ("OUT_OF_RANGE", "WATCH_RESUME_UNAVAILABLE"), refused
                assert not rest
                return
            assert rest == paid[len(delivered) :]
            # As above: after the rest, the next message is the next payment, not one again.
            last = (await asyncio.to_thread(writer.pay, alice, bob, 1 + len(paid)))[0]
            async with asyncio.timeout(30):
                message = await resumed.read()
            assert isinstance(message, pb.WatchPaymentsResponse), message
            assert message.payment.payment_id == last
            resumed.cancel()
