"""A new read-model version built beside the live one, the history processes switched one by one, the old one retired.

All of it under a steady payment load, with readers that must never see a failed read; each
history process is taken out of their rotation before it restarts, as Kubernetes takes a pod
out of its Service before it stops it. The live version is one built before the review queue existed (its `meta` names no feature),
the new one is built with it: the queue answers once the readers have switched.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psycopg2
import redis

from payments.history.v1 import history_service_pb2 as history_pb
from payments.history.v1 import history_service_pb2_grpc as history_grpc
from payments.type.v1 import payment_pb2
from payments_common.grpcstatus import error_info
from payments_common.keys import META_FEATURES_FIELD, KeySchema
from payments_common.tokens import encode_consistency_token
from stack.replication import run_reconcile
from stack.servers import free_port
from tests.support.auth import aio_channel
from tests.support.faults import FAST_RECONNECT, PaymentLoad, approval_process, history_process, open_accounts
from tests.support.processes import ServiceProcess
from tests.support.replicator import ReplicatorProcess, keys_of, retire, slot_exists, slot_for
from tests.support.waiting import eventually

ACCOUNTS = 6
REVIEW_THRESHOLD = 400
# Generous: the machine is shared, and a read must not fail for being slow.
READ_TIMEOUT_S = 20.0


@dataclass
class CheckedReaders:
    """Readers spread over the history processes in rotation; each answer is checked.

    A payment read with its acknowledgement's consistency token must hold what approval
    answered; a page of the payer's history read with that token must list it; an account
    read again, with the position of the version last seen as its token, must never show an
    older one. Any error is a failed read.
    """

    addresses: list[str]
    load: PaymentLoad
    accounts: list[str]
    reads: int = 0
    failed: list[str] = field(default_factory=list)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    _in_rotation: list[str] = field(default_factory=list)
    _stubs: dict[str, history_grpc.HistoryServiceAsyncStub] = field(default_factory=dict)
    _reading: Counter[str] = field(default_factory=Counter)

    async def run(self, readers: int = 2) -> None:
        async with contextlib.AsyncExitStack() as channels:
            for address in self.addresses:
                channel = await channels.enter_async_context(aio_channel(address, options=FAST_RECONNECT))
                self._stubs[address] = history_grpc.HistoryServiceStub(channel)
            self._in_rotation = list(self.addresses)
            await asyncio.gather(*(self._reader(n) for n in range(readers)))

    @contextlib.asynccontextmanager
    async def out_of_rotation(self, address: str) -> AsyncIterator[None]:
        """As Kubernetes takes a pod out of its Service before it stops it: no read begins on
        the process, and those under way (a read may be two calls) end first."""
        self._in_rotation.remove(address)
        try:
            await eventually(lambda: self._reading[address] == 0, READ_TIMEOUT_S * 3, f"reads on {address}")
            yield
        finally:
            self._in_rotation.append(address)

    async def _reader(self, number: int) -> None:
        rng = random.Random(number)
        seen: dict[str, int] = {}
        while not self.stopping.is_set():
            address = rng.choice(self._in_rotation)
            self._reading[address] += 1
            try:
                await self._read_once(self._stubs[address], rng, seen)
                self.reads += 1
            except grpc.aio.AioRpcError as error:
                self.failed.append(f"{error.code().name}: {error.details()}")
            finally:
                self._reading[address] -= 1
            await asyncio.sleep(0.005)  # a reader's pace, not synchronisation

    async def _read_once(
        self, stub: history_grpc.HistoryServiceAsyncStub, rng: random.Random, seen: dict[str, int]
    ) -> None:
        kind = rng.randrange(3)
        if kind == 0 or not self.load.acks:
            account = rng.choice(self.accounts)
            # As a client session would: no older than what it saw. (While the processes serve two
            # versions, each as far as its replicator has come, a read without it may go back.)
            token = encode_consistency_token(seen[account]) if account in seen else ""
            reply = await stub.GetAccount(
                history_pb.GetAccountRequest(account_id=account, min_consistency_token=token),
                timeout=READ_TIMEOUT_S,
                wait_for_ready=True,
            )
            if reply.account.source_lsn < seen.get(account, 0):
                self.failed.append(f"account {account} went back to {reply.account.source_lsn}")
            seen[account] = max(seen.get(account, 0), reply.account.source_lsn)
            return
        ack = rng.choice(self.load.acks[-50:])
        if kind == 1:
            payment = await stub.GetPayment(
                history_pb.GetPaymentRequest(payment_id=ack.payment_id, min_consistency_token=ack.token),
                timeout=READ_TIMEOUT_S,
                wait_for_ready=True,
            )
            if payment.payment.payment_id != ack.payment_id or payment.payment.status != ack.status:
                self.failed.append(f"payment {ack.payment_id} read as {payment.payment}")
            return
        got = await stub.GetPayment(
            history_pb.GetPaymentRequest(payment_id=ack.payment_id, min_consistency_token=ack.token),
            timeout=READ_TIMEOUT_S,
            wait_for_ready=True,
        )
        page = await stub.ListPayments(
            history_pb.ListPaymentsRequest(
                account_id=got.payment.payer_account_id,
                direction=history_pb.PAYMENT_DIRECTION_SENT,
                page_size=500,
                min_consistency_token=ack.token,
            ),
            timeout=READ_TIMEOUT_S,
            wait_for_ready=True,
        )
        if ack.payment_id not in {view.payment_id for view in page.payments} and not page.next_page_token:
            self.failed.append(f"payment {ack.payment_id} missing from its payer's history")


def _as_built_before_the_review_queue(redis_url: str, namespace: str) -> None:
    """Makes the version look built by a replicator that had no review queue: its `meta` names no feature."""
    client = redis.Redis.from_url(redis_url)
    try:
        client.hdel(KeySchema(namespace).meta(), META_FEATURES_FIELD)
    finally:
        client.close()


async def _held_payments_outcome(address: str) -> str:
    async with aio_channel(address) as channel:
        try:
            await history_grpc.HistoryServiceStub(channel).ListHeldPayments(
                history_pb.ListHeldPaymentsRequest(), timeout=READ_TIMEOUT_S
            )
        except grpc.aio.AioRpcError as error:
            info = error_info(error)
            return info.reason if info else error.code().name
    return "OK"


async def _held_payments(address: str) -> list[str]:
    """Every payment of the review queue, page by page."""
    held: list[str] = []
    async with aio_channel(address) as channel:
        stub = history_grpc.HistoryServiceStub(channel)
        token = ""
        while True:
            page = await stub.ListHeldPayments(
                history_pb.ListHeldPaymentsRequest(page_size=100, page_token=token), timeout=READ_TIMEOUT_S
            )
            held += [view.payment_id for view in page.payments]
            token = page.next_page_token
            if not token:
                return held


def _source_held(dsn: str) -> list[str]:
    """The payments PostgreSQL holds for review, oldest first."""
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT payment_id::text FROM payments WHERE status = 'PENDING_REVIEW' ORDER BY created_at, payment_id"
        )
        rows = [row[0] for row in cursor.fetchall()]
    connection.close()
    return rows


def _source_payments(dsn: str) -> int:
    with psycopg2.connect(dsn) as connection, connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM payments")
        row = cursor.fetchone()
    connection.close()
    assert row is not None
    return int(row[0])


def _history(redis_url: str, port: int, log: Path, namespace: str, slot: str) -> ServiceProcess:
    """A history process serving the version (`namespace`, `slot`); a token read may wait for it up to 10 s.

    Stopped for its restart, it gives the calls in flight 10 s, the service's default grace (not
    the 1 s of the other tests): on a loaded machine a read may take longer than 1 s, and one
    cut off at the end of the grace is CANCELLED, a failed read.
    """
    return history_process(
        redis_url,
        port,
        log,
        slot,
        key_namespace=namespace,
        consistency_wait_max_seconds="10",
        grace_seconds="10",
    )


async def _switch(process: ServiceProcess, namespace: str, slot: str, log: Path) -> ServiceProcess:
    """A rolling restart of one history process onto another version: stop it, start it with the new settings."""
    process.stop(15)
    restarted = _history(process.env["HISTORY_REDIS_URL"], process.port, log, namespace, slot).start()
    await asyncio.to_thread(restarted.wait_serving, 60)
    return restarted


async def test_a_new_version_replaces_the_live_one_under_load_without_a_failed_read(
    migrated_dsn: str, redis_url: str, tmp_path: Path
) -> None:
    base = slot_for(migrated_dsn)
    old_slot, new_slot = f"{base}_v1", f"{base}_v2"
    # Payments of 400 or more (of 1-500) are held for review.
    approval = approval_process(
        migrated_dsn, free_port(), tmp_path / "approval.log", review_threshold_minor=str(REVIEW_THRESHOLD)
    ).start()
    old = ReplicatorProcess(
        migrated_dsn,
        redis_url,
        tmp_path / "replicator-v1.log",
        slot=old_slot,
        extra_env={"REPLICATOR_KEY_NAMESPACE": "rm:v1", "REPLICATOR_LOCK_TTL_SECONDS": "2"},
    ).start()
    histories = [
        _history(redis_url, free_port(), tmp_path / f"history-{n}-v1.log", "rm:v1", old_slot).start()
        for n in range(2)
    ]
    new: ReplicatorProcess | None = None
    try:
        approval.wait_serving(60)
        for history in histories:
            history.wait_serving(60)
        accounts = await open_accounts(approval.address, ACCOUNTS, 10**9)
        await asyncio.to_thread(old.wait_caught_up, 120)
        _as_built_before_the_review_queue(redis_url, "rm:v1")
        assert await _held_payments_outcome(histories[0].address) == "READ_MODEL_WITHOUT_REVIEW_QUEUE"
        load = PaymentLoad(approval.address, accounts, workers=2)
        readers = CheckedReaders([h.address for h in histories], load, accounts)
        tasks = [asyncio.create_task(load.run()), asyncio.create_task(readers.run())]
        try:
            await load.wait_acks(50)
            # v2 is built beside v1 from a snapshot, while v1 keeps serving.
            new = ReplicatorProcess(
                migrated_dsn,
                redis_url,
                tmp_path / "replicator-v2.log",
                slot=new_slot,
                extra_env={"REPLICATOR_KEY_NAMESPACE": "rm:v2", "REPLICATOR_LOCK_TTL_SECONDS": "2"},
            ).start()
            await asyncio.to_thread(new.wait_caught_up, 120)
            # The history processes switch one at a time, as a rolling restart does.
            for n, history in enumerate(list(histories)):
                reads_before = readers.reads
                async with readers.out_of_rotation(history.address):
                    histories[n] = await _switch(history, "rm:v2", new_slot, tmp_path / f"history-{n}-v2.log")
                await load.wait_acks(len(load.acks) + 20)
                await _more_reads(readers, reads_before + 50)
            # v1 serves nobody now: its replicator stops and the version is retired.
            old.stop()
            done = await asyncio.to_thread(
                retire, migrated_dsn, redis_url, "--namespace", "rm:v1", "--slot", old_slot
            )
            assert done.returncode == 0, done.stdout + done.stderr
            reads_before = readers.reads
            await load.wait_acks(len(load.acks) + 20)
            await _more_reads(readers, reads_before + 50)
        finally:
            load.stopping.set()
            readers.stopping.set()
            await asyncio.gather(*tasks)

        assert readers.failed == [], readers.failed[:10]
        assert load.unexpected == [], load.unexpected[:10]
        assert readers.reads > 150
        assert not slot_exists(migrated_dsn, old_slot)
        assert keys_of(redis_url, "rm:v1") == 0
        # v2 holds every payment, exactly as PostgreSQL does.
        assert _source_payments(migrated_dsn) >= len(load.acks)
        checked = await asyncio.to_thread(run_reconcile, migrated_dsn, redis_url, new_slot, 60, "rm:v2")
        assert checked.returncode == 0, checked.stdout + checked.stderr
        # The feature that needed the new version: the queue holds every held payment, oldest first.
        held = await _held_payments(histories[0].address)
        assert held == _source_held(migrated_dsn)
        assert len(held) > 0
        assert payment_pb2.PAYMENT_STATUS_APPROVED in {ack.status for ack in load.acks}
    finally:
        for process in (approval, *histories):
            process.stop(15)
        for replicator in (old, new):
            if replicator is not None:
                replicator.stop()


async def _more_reads(readers: CheckedReaders, count: int, within_s: float = 120.0) -> None:
    """Polls until the readers have made `count` reads in all."""
    deadline = asyncio.get_running_loop().time() + within_s
    while readers.reads < count:
        assert asyncio.get_running_loop().time() < deadline, (
            f"only {readers.reads} reads, {readers.failed[:5]}"
        )
        await asyncio.sleep(0.05)
