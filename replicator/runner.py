"""The replication loop: the stages wired into one line, with the lock, bootstrap, batching and restarts."""

from __future__ import annotations

import contextlib
import logging
import select
import threading
import time
from collections.abc import Callable

import psycopg2
import redis
from redis.exceptions import RedisClusterException

from payments_common import tracing
from payments_common.keys import FEATURES, KeySchema
from payments_common.lsn import format_lsn
from payments_common.redisconn import SyncClient, sync_client
from payments_common.tracing import WAL_MESSAGE_PREFIX
from replicator import metrics
from replicator.ack import Acknowledgements
from replicator.bootstrap import PROGRESS_INTERVAL_SECONDS, Stopped, bootstrap, rebuild_needed
from replicator.changes import TABLES, Checkpoint, RowBatch, Transaction
from replicator.clustersink import TopologyChanged, sink_for
from replicator.config import Settings
from replicator.decoder import Begin, Commit, Decoder, LogicalMessage, Relation, Truncate
from replicator.lock import LockKeeper, LockLost, SlotLock, VersionConflict, claim_version, instance_token
from replicator.projector import Projector
from replicator.sink import CheckpointMoved, Sink
from replicator.source import Source
from replicator.traces import Applying, TracedCommit, gather_payment_ids, traced_commit
from replicator.writer import Writer

log = logging.getLogger(__name__)

# While idle, ask the walsender for its position this often, and move the checkpoint to it
# at most this often, so that consistency tokens resolve without flooding Redis.
PING_INTERVAL_SECONDS = 0.1
IDLE_ADVANCE_INTERVAL_SECONDS = 0.02
LAG_QUERY_INTERVAL_SECONDS = 2.0
# While caught up, renew the source time that the checkpoint covers when it is this old, so
# that an idle source's read models do not look older and older: readers tell a quiet source
# from a stopped replicator by it (history_read_model_age_seconds, the alert ReadModelsStale).
# At most one query and one checkpoint write per interval.
HEARTBEAT_INTERVAL_SECONDS = 5.0
# Under a steady stream the socket rarely drains; apply at least this often anyway.
BATCH_MAX_AGE_SECONDS = 0.2
# How long an idle loop waits for data before it renews the lock and pings again.
IDLE_WAIT_SECONDS = 0.05
MIN_BACKOFF_SECONDS = 0.5
MAX_BACKOFF_SECONDS = 10.0
# Sessions ended by a topology change that restart without backing off, since one lasted.
FAST_RESTARTS = 5
# The lock keeper lets the lock go when the main loop made no progress for this long (a
# wedged instance must not block a standby forever); every step is far shorter.
STALL_LIMIT_SECONDS = 120.0


def restart_delay(
    backoff: float, error: BaseException, session_seconds: float, moves: int = 0
) -> tuple[float, float]:
    """How long to wait before the next session after `error` ended one, and the backoff after that.

    Outages back off exponentially, from MIN_BACKOFF_SECONDS to MAX_BACKOFF_SECONDS, and start
    over after a session that lasted 30 s. A Redis Cluster whose slots or masters moved ends
    sessions too, and a reshard moves its slots one by one: the next session starts after the
    shortest wait, for up to FAST_RESTARTS sessions ended so since one lasted (`moves` counts
    those before this one); after that, as for an outage, so that a cluster that stays down
    is not asked again and again.
    """
    if session_seconds > 30:
        backoff = MIN_BACKOFF_SECONDS
    if isinstance(error, TopologyChanged) and moves < FAST_RESTARTS:
        return MIN_BACKOFF_SECONDS, backoff
    return backoff, min(backoff * 2, MAX_BACKOFF_SECONDS)


class Replicator:
    """Runs until `stop()`; every error of PostgreSQL or Redis leads to a clean restart."""

    def __init__(self, settings: Settings, on_ready: Callable[[bool], None] | None = None) -> None:
        self.settings = settings
        self.schema = KeySchema.for_redis(settings.namespace, settings.slot_name, settings.cluster)
        self.projector = Projector(self.schema)
        self._stop = threading.Event()
        self._on_ready = on_ready or (lambda ready: None)
        # One token for the life of the process, so that a reconnect finds its own lock.
        self.token = instance_token()
        # Features found missing from the namespace, said once per process, not per session.
        self._missing_told: frozenset[str] = frozenset()

    def stop(self) -> None:
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def run_forever(self) -> int:
        """Streams until stopped; returns 0, or 1 after an unexpected error (a bug or unknown data)."""
        backoff = MIN_BACKOFF_SECONDS
        moves = 0
        while not self.stopping:
            started = time.monotonic()
            try:
                self.run_once()
            except Stopped:
                break
            except VersionConflict as error:
                # Restarting cannot fix a setting: exit so that it is seen (and fixed).
                log.error("%s", error)
                return 2
            # A cluster's client says that it cannot serve a slot (a failover under way) with
            # RedisClusterException, which is no RedisError: an outage like the others.
            except (
                psycopg2.Error,
                redis.RedisError,
                RedisClusterException,
                LockLost,
                CheckpointMoved,
                OSError,
            ) as error:
                metrics.RECONNECTS.inc()
                lasted = time.monotonic() - started
                moves = 0 if lasted > 30 else moves
                wait, backoff = restart_delay(backoff, error, lasted, moves)
                moves += isinstance(error, TopologyChanged)
                log.warning(
                    "replication stopped: %s: %s; restarting in %.1fs", type(error).__name__, error, wait
                )
                self._stop.wait(wait)
            except Exception:
                # Retrying cannot fix a bug or a row this version cannot read: exit so that it is seen.
                log.exception("replication failed with an unexpected error; exiting")
                return 1
            finally:
                self._on_ready(False)
                metrics.STREAMING.set(0)
        log.info("replicator stopped")
        return 0

    # -- one session ------------------------------------------------------------------------

    def run_once(self) -> None:
        client = sync_client(
            self.settings.redis_url,
            socket_timeout=self.settings.redis_timeout_seconds,
            socket_connect_timeout=5.0,
            socket_keepalive=True,
        )
        lock_key = self.schema.lock(self.settings.slot_name)
        lock = SlotLock(client, lock_key, self.settings.lock_ttl_seconds, self.token)
        source = Source(self.settings.database_url, self.settings.slot_name, self.settings.publication)
        keeper: LockKeeper | None = None
        try:
            # Before the lock: a replicator refused here writes nothing at all.
            claim_version(client, self.schema, self.settings.slot_name)
            self._acquire(lock)
            metrics.LOCK_HELD.set(1)
            keeper = LockKeeper(
                self.settings.redis_url,
                lock_key,
                self.settings.lock_ttl_seconds,
                self.token,
                STALL_LIMIT_SECONDS,
            ).start()
            sink = self._sink(client, lock, keeper)
            sink.load_scripts()
            sink.begin()
            writer = Writer(self.projector, sink)
            source.connect()
            checkpoint = sink.read_checkpoint()
            rebuild = rebuild_needed(self.settings.slot_name, source.slot_state(), checkpoint)
            if rebuild is not None:
                checkpoint = bootstrap(
                    self.settings.slot_name,
                    source,
                    writer,
                    self.projector,
                    lock,
                    keeper,
                    rebuild,
                    lambda: self.stopping,
                )
            else:
                self._tell_missing_features(sink)
            assert checkpoint is not None
            # Ending another instance's walsender is a side effect too: only while the lock is ours.
            keeper.check()
            source.start_replication(fence=lock.fence)
            log.info(
                "streaming slot %s from checkpoint %s", self.settings.slot_name, format_lsn(checkpoint.lsn)
            )
            metrics.STREAMING.set(1)
            self._on_ready(True)
            _Stream(self, source, writer, keeper, checkpoint).run()
        finally:
            # Whatever ended the session, this instance writes nothing until it acquires the lock again.
            metrics.LOCK_HELD.set(0)
            if keeper is not None:
                keeper.stop()
            source.close()
            if self.stopping:
                with contextlib.suppress(redis.RedisError):
                    lock.release()
            client.close()

    def _sink(self, client: SyncClient, lock: SlotLock, keeper: LockKeeper) -> Sink:
        """The apply stage of the Redis that the settings name: one node's, or a cluster's."""
        return sink_for(client, self.schema, self.settings, lock, on_progress=keeper.check)

    def _tell_missing_features(self, sink: Sink) -> None:
        """Logs once that the namespace was built without features of this version.

        Streaming goes on and maintains them from now on, but what came before them is
        missing, so readers refuse them on this namespace (docs/replicator.md).
        """
        missing = frozenset(FEATURES) - sink.read_features() - self._missing_told
        if not missing:
            return
        self._missing_told |= missing
        log.warning(
            "the read models of namespace %s were built without %s (by an earlier version): they are "
            "maintained from now on but lack what came before, and readers refuse them on this namespace; "
            "build a read-model version with them beside this one and switch (docs/replicator.md)",
            self.schema.namespace,
            ", ".join(sorted(missing)),
            extra={"missing_features": sorted(missing)},
        )

    def _acquire(self, lock: SlotLock) -> None:
        announced = False
        while not lock.try_acquire():
            if not announced:
                log.info(
                    "slot %s is owned by %s; waiting for the lock", self.settings.slot_name, lock.owner()
                )
                announced = True
            if self._stop.wait(max(0.2, self.settings.lock_ttl_seconds / 5)):
                raise Stopped
        log.info("acquired the lock of slot %s as %s", self.settings.slot_name, lock.token)


class _Stream:
    """One streaming session: reads messages without blocking, applies whole transactions in batches.

    The line: messages are decoded into `Transaction`s, whose changes gather in a
    `RowBatch` until it is due; the batch is projected and handed to the `Writer`, and
    once Redis holds its checkpoint, `Acknowledgements` decides when `Source.acknowledge`
    may tell PostgreSQL (never the driver on its own).

    A transaction larger than `transaction_chunk_changes` is applied in chunks as it
    arrives, without the checkpoint; its last chunk moves the checkpoint.
    """

    def __init__(
        self, owner: Replicator, source: Source, writer: Writer, keeper: LockKeeper, checkpoint: Checkpoint
    ) -> None:
        self.owner = owner
        self.source = source
        self.stream = source.stream
        self.writer = writer
        self.keeper = keeper
        self.checkpoint = checkpoint
        self.decoder = Decoder()
        self.projector = owner.projector
        self.batch_max = owner.settings.batch_max_changes
        self.chunk_max = owner.settings.transaction_chunk_changes
        self.transaction: Transaction | None = None
        self.pending = RowBatch()
        self.pending_checkpoint: Checkpoint | None = None
        self.pending_changes = 0
        self.pending_transactions = 0
        self.pending_omits = False
        self.pending_traced: list[TracedCommit] = []
        # Each transaction of the pending batch, for the delays of each: its commit time and
        # the walsender's send time of its commit message (Unix µs, the source's clock), and
        # when this process read that message (Unix s, this host's clock).
        self.pending_commits: list[tuple[int, int, float]] = []
        # Redis has the checkpoint, but perhaps not on disk yet: confirm it after the delay too.
        self.acks = Acknowledgements(owner.settings.ack_delay_seconds)
        self.acks.applied(checkpoint.lsn)
        now = time.monotonic()
        self.last_ping = self.last_advance = self.last_lag_query = self.last_heartbeat = now
        self.batch_started = now

    def run(self) -> None:
        fileno = self.stream.fileno()
        received = 0
        while True:
            if self.owner.stopping:
                self.flush()
                self.settle()
                raise Stopped
            message = self.stream.read_message()
            if message is not None:
                self.handle(message.payload)
                received += 1
                if self.transaction is None and self.pending_changes >= self.batch_max:
                    self.flush()
                if received % 256 == 0:
                    # A long backlog never drains the socket: bound a batch's age, confirm what is due.
                    self.keeper.check()
                    if (
                        self.transaction is None
                        and time.monotonic() - self.batch_started >= BATCH_MAX_AGE_SECONDS
                    ):
                        self.flush()
                    self.confirm_due()
                continue
            # The socket is drained: the moment to apply what has arrived, and to wait for it.
            if self.pending_checkpoint is not None:
                self.flush()
            self.settle()
            select.select([fileno], [], [], self.periodic())

    def handle(self, payload: bytes) -> None:
        # Row changes, one message each, skip the message objects.
        change = self.decoder.row_change(payload)
        if change is not None:
            transaction = self.transaction
            if transaction is None or transaction.skip:
                return
            kind, relation, row = change
            table = relation.qualified_name
            if table in TABLES:
                transaction.changes.append((table, kind, row))
                if len(transaction.changes) >= self.chunk_max:
                    self.apply_chunk(transaction)
            return
        message = self.decoder.decode(payload)
        if isinstance(message, Begin):
            # A commit that starts below the checkpoint ends at or below it: already applied.
            self.transaction = Transaction(message, skip=message.final_lsn < self.checkpoint.lsn)
        elif isinstance(message, Truncate):
            if self.transaction is not None and not self.transaction.skip:
                tables = tuple(r.qualified_name for r in message.relations)
                self.transaction.changes.append((tables, None, None))
        elif isinstance(message, Commit):
            transaction, self.transaction = self.transaction, None
            if transaction is None or transaction.skip or message.end_lsn <= self.checkpoint.lsn:
                return
            traced = None
            if transaction.trace is not None:
                traced = traced_commit(
                    transaction,
                    message.end_lsn,
                    message.commit_time_us,
                    transaction.chunked + len(transaction.changes),
                )
            if transaction.chunks:
                self.finish_chunked(transaction, Checkpoint(message.end_lsn, message.commit_time_us), traced)
                return
            if traced is not None:
                self.pending_traced.append(traced)
            transaction.collect(self.pending)
            self.pending_changes += len(transaction.changes)
            self.pending_transactions += 1
            if self.pending_checkpoint is None:
                self.batch_started = time.monotonic()
            self.pending_checkpoint = Checkpoint(message.end_lsn, message.commit_time_us)
            self.pending_commits.append((message.commit_time_us, self.stream.wal_end_time_us, time.time()))
        elif isinstance(message, LogicalMessage):
            # The command side's trace context, inside the transaction it traced.
            if (
                message.prefix == WAL_MESSAGE_PREFIX
                and self.transaction is not None
                and not self.transaction.skip
            ):
                self.transaction.trace = message.content
        elif isinstance(message, Relation):
            log.debug("relation %s.%s: %s", message.namespace, message.name, message.column_names)

    def apply_chunk(self, transaction: Transaction) -> None:
        """Applies what a large transaction has sent so far, without moving the checkpoint.

        A replay after a crash applies the same chunks again at the same positions; the
        checkpoint moves only with the last chunk, so the transaction is whole in Redis
        for every reader that waits for a position at or past its commit.
        """
        self.flush()  # the whole transactions that came before it, with their checkpoint
        # One script call per `batch_max` changes: Redis is never blocked for long.
        for start in range(0, len(transaction.changes), self.batch_max):
            batch = RowBatch()
            transaction.collect(batch, start, start + self.batch_max)
            self.keeper.check()
            started = time.perf_counter()
            self.writer.write(self.projector.project_batch(batch), None)
            self.acks.alive()
            metrics.APPLY_SECONDS.observe(time.perf_counter() - started)
            metrics.BATCH_CHANGES.observe(batch.changes)
        metrics.CHANGES.inc(len(transaction.changes))
        if tracing.active():
            gather_payment_ids(transaction)  # its trace context, if any, comes at its end
        transaction.chunked += len(transaction.changes)
        transaction.chunks += 1
        transaction.changes = []
        self.keeper.check()
        now = time.monotonic()
        if now - transaction.reported >= PROGRESS_INTERVAL_SECONDS:
            log.info(
                "applying transaction %s (commit at %s): %d row changes so far in %d chunks, %.0fs",
                transaction.begin.xid,
                format_lsn(transaction.begin.final_lsn),
                transaction.chunked,
                transaction.chunks,
                now - transaction.started,
                extra={"changes_applied": transaction.chunked},
            )
            transaction.reported = now
        self.confirm_due()

    def finish_chunked(
        self, transaction: Transaction, checkpoint: Checkpoint, traced: TracedCommit | None = None
    ) -> None:
        """Applies the rest of a transaction applied in chunks, then moves the checkpoint past it."""
        sent, received = self.stream.wal_end_time_us, time.time()
        self.apply_chunk(transaction)
        self.pending_checkpoint = checkpoint
        if traced is not None:
            self.pending_traced.append(traced)
        if checkpoint.commit_time_us is not None:
            self.pending_commits.append((checkpoint.commit_time_us, sent, received))
        self.pending_transactions = 1
        # The change stream did not list its payments.
        self.pending_omits = True
        self.flush()
        log.info(
            "applied transaction %s of %d row changes in %d chunks in %.1fs; checkpoint %s",
            transaction.begin.xid,
            transaction.chunked,
            transaction.chunks,
            time.monotonic() - transaction.started,
            format_lsn(checkpoint.lsn),
        )

    def flush(self) -> None:
        """Sends the pending batch to Redis; what depends on Redis having it runs once it has (`applied`).

        The batch's reply is read before the next batch is sent, so decoding and projecting
        the next one overlaps Redis's run of this one's script.
        """
        checkpoint = self.pending_checkpoint
        if checkpoint is None:
            return
        self.keeper.check()
        started = time.perf_counter()
        applying = Applying(self.pending_traced)
        changes, transactions = self.pending_changes, self.pending_transactions
        commits = self.pending_commits

        def applied() -> None:
            applying.applied(changes, transactions)
            metrics.APPLY_SECONDS.observe(time.perf_counter() - started)
            metrics.CHANGES.inc(changes)
            metrics.TRANSACTIONS.inc(transactions)
            metrics.BATCH_CHANGES.observe(changes)
            now = time.time()
            for commit_time_us, sent_us, received in commits:
                committed = commit_time_us / 1e6
                metrics.COMMIT_TO_SEND_SECONDS.observe(max(0.0, (sent_us - commit_time_us) / 1e6))
                metrics.COMMIT_TO_RECEIVE_SECONDS.observe(max(0.0, received - committed))
                metrics.COMMIT_TO_APPLY_SECONDS.observe(max(0.0, now - committed))
            if checkpoint.commit_time_us is not None:
                metrics.LAG_SECONDS.set(max(0.0, now - checkpoint.commit_time_us / 1e6))
            metrics.CHECKPOINT_LSN.set(checkpoint.lsn)
            # Redis has acknowledged: the slot may forget everything up to here once it is durable.
            self.acks.applied(checkpoint.lsn)

        self.writer.write(
            self.projector.project_batch(self.pending),
            checkpoint,
            self.pending_omits,
            applying.announced(),
            on_applied=applied,
        )
        # What the stream sends from now on is read past up to here.
        self.checkpoint = checkpoint
        self.pending = RowBatch()
        self.pending_checkpoint = None
        self.pending_changes = self.pending_transactions = 0
        self.pending_omits = False
        self.pending_traced = []
        self.pending_commits = []
        self.sample_lag(time.monotonic())
        self.confirm_due()

    def settle(self) -> None:
        """Waits until Redis has applied the batch in flight, then confirms what is due."""
        self.writer.sink.settle()
        self.confirm_due()

    def sample_lag(self, now: float) -> None:
        """Sets the lag in bytes behind the source's WAL position, at most every LAG_QUERY_INTERVAL_SECONDS."""
        if now - self.last_lag_query >= LAG_QUERY_INTERVAL_SECONDS:
            metrics.LAG_BYTES.set(max(0, self.source.server_wal_lsn() - self.checkpoint.lsn))
            self.last_lag_query = now

    def confirm_due(self) -> None:
        if self.acks.waiting and self.pending_checkpoint is None and self.transaction is None:
            # Idle, with a position held long enough: is Redis still alive to have fsynced it?
            self.writer.sink.ping()
            self.acks.alive()
        lsn = self.acks.due()
        if lsn is not None:
            self.source.acknowledge(lsn)
            metrics.CONFIRMED_LSN.set(lsn)

    def periodic(self) -> float:
        """Checks the lock, moves an idle checkpoint, confirms, pings; returns how long to wait for data."""
        now = time.monotonic()
        self.keeper.check()
        self.confirm_due()
        wait = IDLE_WAIT_SECONDS
        if self.transaction is not None or self.pending_checkpoint is not None:
            return wait
        # Idle: the walsender's position covers every change it has sent, so the
        # checkpoint can move there even when no published table changed.
        server_position = self.source.past_page_header(self.stream.wal_end)
        if server_position > self.checkpoint.lsn and now - self.last_advance >= IDLE_ADVANCE_INTERVAL_SECONDS:
            # The walsender's send time of that position: lag in seconds is measured from it.
            sent_at = self.stream.wal_end_time_us or None
            self.writer.write([], Checkpoint(server_position, None, sent_at))
            self.checkpoint = Checkpoint(server_position, self.checkpoint.commit_time_us, sent_at)
            metrics.CHECKPOINT_LSN.set(server_position)
            metrics.LAG_SECONDS.set(0)
            self.acks.applied(server_position)
            self.last_advance = now
        elif server_position > self.checkpoint.lsn:
            # Rate-limited: come back as soon as the interval is over, not at the next idle wake-up.
            wait = IDLE_ADVANCE_INTERVAL_SECONDS - (now - self.last_advance)
        else:
            # Every change the walsender sent is applied.
            self.heartbeat(now)
            if now - self.last_ping >= PING_INTERVAL_SECONDS:
                self.stream.ping()
                self.last_ping = now
        self.sample_lag(now)
        if self.acks.next_due_in() > 0:
            wait = min(wait, self.acks.next_due_in())
        return max(wait, 0.0)

    def heartbeat(self, now: float) -> None:
        """Writes the checkpoint again with a newer source time, when caught up with the source itself.

        Runs when every change the walsender sent is applied and the time the checkpoint
        covers is HEARTBEAT_INTERVAL_SECONDS old by the walsender's latest message (pings ask
        for one every PING_INTERVAL_SECONDS), at most once per interval. A keepalive's send
        time alone proves nothing: the walsender may not have read the WAL written before it.
        So the source's clock is read, then its WAL insert position: if the checkpoint is at
        or past that position, every transaction that committed before that time is applied.
        """
        covered = self.checkpoint.covered_until_us
        latest = self.stream.wal_end_time_us
        if now - self.last_heartbeat < HEARTBEAT_INTERVAL_SECONDS or not latest:
            return
        if covered is not None and latest - covered < HEARTBEAT_INTERVAL_SECONDS * 1_000_000:
            return
        self.last_heartbeat = now
        clock_us, position = self.source.clock_then_insert_position()
        if self.source.past_page_header(position) > self.checkpoint.lsn or (
            covered is not None and clock_us <= covered
        ):
            return  # WAL the walsender has not sent yet: its advance or its commit renews the time
        self.writer.write([], Checkpoint(self.checkpoint.lsn, None, clock_us))
        self.checkpoint = Checkpoint(self.checkpoint.lsn, self.checkpoint.commit_time_us, clock_us)
