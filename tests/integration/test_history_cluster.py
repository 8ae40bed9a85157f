"""What a Redis Cluster adds to the history reads: masters that hold their parts of a batch at different times, and failover.

The first tests write the read models by hand on the cluster (as the replicator lays them
out: each master's own checkpoint moves with its part of a batch, the slot's checkpoint and
the change stream once every master has it), so that a master can be staged behind another;
the failover test runs the real replicator and kills a master.
"""

from __future__ import annotations

import asyncio
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
from stack.servers import PostgresServer
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


@pytest.mark.slow
async def test_reads_answer_correctly_or_unavailable_while_the_payments_master_fails_over(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    with replicated_source(postgres_server, tmp_path, "cluster") as source:
        writer = source.writer
        alice, bob = writer.open_account("Alice"), writer.open_account("Bob")
        paid = [writer.pay(alice, bob, 100 + n)[0] for n in range(5)]
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
            }
            expected = {
                name: await method(request, timeout=10) for name, (method, request) in requests.items()
            }
            listed = expected["ListPayments"]
            assert [view.payment_id for view in listed.payments] == paid[::-1]

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
                    if reply != expected[name]:
                        wrong.append(f"{name}: a wrong answer {reply}")

                await asyncio.gather(*(one(name) for name in requests))

            assert source.cluster
            cluster = source.redis
            dead = await asyncio.to_thread(kill_master_of, cluster, SCHEMA.payment(paid[0]))  # type: ignore[arg-type]
            # Reads go on through the failover until the replica is promoted, and after it.
            rounds = 0
            while not await asyncio.to_thread(promoted, cluster, SCHEMA.payment(paid[0]), dead):  # type: ignore[arg-type]
                await read_all()
                rounds += 1
                assert not wrong, wrong
            assert rounds, "the replica was promoted before any read reached the dead master"
            await eventually(
                read_all_answered(read_all, outcomes), 30, "every read answered after the promotion"
            )
            assert not wrong, wrong


def read_all_answered(
    read_all: Callable[[], Awaitable[None]], outcomes: dict[str, list[str]]
) -> Callable[[], Awaitable[bool]]:
    """A check for `eventually`: one more round of reads, and whether each method's last one answered."""

    async def check() -> bool:
        await read_all()
        return all(results and results[-1] == "OK" for results in outcomes.values())

    return check
