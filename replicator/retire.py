"""`replicator retire`: removes a read-model version that nothing serves any more, its slot first, then its keys.

A version is a key namespace (`rm:v1`) and the replication slot that feeds it. Retiring
it takes the version's lock, so that no replicator can start writing it meanwhile (and a
running one makes the command refuse), drops the slot (the WAL it retained is freed at
once), then deletes the namespace's keys in batches: one SCAN step and one UNLINK of at
most `batch` keys per call, so Redis never runs a long command. It can be run again after
an interruption: it goes on from what is left.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Final

import psycopg2
import psycopg2.errors
import redis
from redis.cluster import RedisCluster

from payments_common.keys import KeySchema, reader_name, slot_owner
from payments_common.redisconn import SyncClient, sync_client
from replicator.clustersink import sink_for
from replicator.config import Settings
from replicator.lock import RELEASE_LOCK, LockKeeper, LockLost, SlotLock, instance_token

DEFAULT_BATCH: Final = 500
# Keys per Redis call at most, so that no call of a retirement runs long.
MAX_BATCH: Final = 5000
# How often progress is reported while keys are deleted.
PROGRESS_SECONDS: Final = 2.0
# A retirement that makes no progress for this long lets the version's lock go.
STALL_SECONDS: Final = 60.0


class VersionInUse(RuntimeError):
    """A replicator holds the version's lock, or a walsender its slot: it is not retired."""


class Unreachable(RuntimeError):
    """PostgreSQL or Redis could not be reached."""


class RetireFailed(RuntimeError):
    """PostgreSQL or Redis refused a step (a permission, the lock lost meanwhile)."""


@dataclass(frozen=True)
class Retirement:
    """What a retirement did (or, dry, would do)."""

    namespace: str
    slot_name: str
    slot_found: bool
    retained_wal_bytes: int | None  # what the slot kept when it was found
    keys: int  # deleted (counted, when dry)
    dry_run: bool

    def summary(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        if not self.slot_found:
            slot = f"slot {self.slot_name} not found"
        else:
            retained = (
                f" (it retained {self.retained_wal_bytes:,} bytes of WAL)" if self.retained_wal_bytes else ""
            )
            slot = f"slot {self.slot_name} {'would be dropped' if self.dry_run else 'dropped'}{retained}"
        return f"{self.namespace}: {slot}; {verb} {self.keys:,} keys"


def _slot(dsn: str, slot: str) -> tuple[bool, int | None, int | None]:
    """Whether the slot exists in the source's database, the walsender that uses it, the WAL it retains."""
    with (
        contextlib.closing(psycopg2.connect(dsn, connect_timeout=10)) as connection,
        connection.cursor() as cursor,
    ):
        cursor.execute(
            "SELECT active_pid, pg_wal_lsn_diff(pg_current_wal_lsn(), restart_lsn)::bigint "
            "FROM pg_replication_slots WHERE slot_name = %s AND database = current_database()",
            (slot,),
        )
        row = cursor.fetchone()
    if row is None:
        return False, None, None
    return True, row[0], row[1]


def _drop_slot(dsn: str, slot: str) -> None:
    with contextlib.closing(psycopg2.connect(dsn, connect_timeout=10)) as connection:
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots "
                "WHERE slot_name = %s AND database = current_database() AND NOT active",
                (slot,),
            )
            if cursor.rowcount == 0:
                # Taken meanwhile by a walsender (or dropped by someone else): look again.
                found, pid, _ = _slot(dsn, slot)
                if found:
                    raise VersionInUse(
                        f"slot {slot} is in use by walsender pid {pid}; stop its replicator first"
                    )


def _batches(client: SyncClient, schema: KeySchema, skip: str, size: int) -> Iterator[list[bytes]]:
    """The version's keys but those that start with `skip`, in lists of at most `size`, one SCAN step at a time.

    Only this version's kinds of key: a namespace nested in it (`rm:v1` under `rm`) is left alone.
    """
    chunk: list[bytes] = []
    for pattern in schema.version_patterns():
        for key in client.scan_iter(match=pattern, count=size):
            if key.startswith(skip.encode()):
                continue
            chunk.append(key)
            if len(chunk) >= size:
                yield chunk
                chunk = []
    if chunk:
        yield chunk


def _text(value: object) -> str | None:
    return value.decode() if isinstance(value, bytes) else None


def _check_the_pair(client: SyncClient, schema: KeySchema, slot: str) -> None:
    """Refuses a slot that feeds another version, or a version fed by another slot: a typo would
    retire the wrong one (its keys, or a live slot)."""
    fed_by = _text(client.get(schema.owner()))
    if fed_by is not None and fed_by != slot:
        raise VersionInUse(f"{schema.namespace} is fed by slot {fed_by}, not {slot}; nothing was removed")
    feeds = _text(client.get(slot_owner(slot)))
    if feeds is not None and feeds != schema.namespace:
        raise VersionInUse(f"slot {slot} feeds {feeds}, not {schema.namespace}; nothing was removed")


def _check_unread(client: SyncClient, schema: KeySchema) -> None:
    """Refuses while a history process reads the version (its connections carry the version's name)."""
    name = reader_name(schema.namespace)
    if isinstance(client, RedisCluster):
        # Each master has its own clients: one node's list does not show the others'.
        lists = client.client_list(target_nodes=RedisCluster.PRIMARIES)
        clients = (
            [entry for entries in lists.values() for entry in entries] if isinstance(lists, dict) else lists
        )
    else:
        clients = client.client_list()
    readers = [entry for entry in clients if entry.get("name") == name]
    if readers:
        addresses = sorted({str(entry.get("addr", "?")).rsplit(":", 1)[0] for entry in readers})
        raise VersionInUse(
            f"{len(readers)} connections of history processes read {schema.namespace} "
            f"(from {', '.join(addresses)}); switch them to the new version first"
        )


def _fencing_keys(client: SyncClient, schema: KeySchema, lock: str) -> list[bytes]:
    """The keys under the version's lock prefix but `lock`: on a cluster, the session counter and the node fences."""
    return [
        key for key in client.scan_iter(match=f"{schema.lock_prefix()}*", count=1000) if key != lock.encode()
    ]


def _check_unlocked(client: SyncClient, schema: KeySchema, own: str | None) -> None:
    """Refuses while any replicator holds a lock of the version (of any slot: one started with a wrong slot too)."""
    # A lock is `<prefix>{<slot>}`; a cluster's session counter and node fences have a suffix.
    for key in client.scan_iter(match=f"{schema.lock_prefix()}{{*}}", count=1000):
        name = key.decode()
        if name != own:
            raise VersionInUse(
                f"a replicator holds the lock {name} of {schema.namespace} ({_text(client.get(key))}); "
                "stop it before retiring the version"
            )


def retire(
    settings: Settings,
    namespace: str,
    slot: str,
    *,
    batch: int = DEFAULT_BATCH,
    dry_run: bool = False,
    progress: Callable[[str], None] = lambda line: None,
) -> Retirement:
    """Retires the version (`namespace`, `slot`): VersionInUse while anything runs it, Unreachable without a server."""
    schema = KeySchema.for_redis(namespace, slot, settings.cluster)
    client: SyncClient | None = None
    try:
        # A cluster's client reads the topology as it is made: an error here is Redis's too.
        client = sync_client(settings.redis_url, socket_timeout=settings.redis_timeout_seconds)
        return _retire(settings, client, schema, slot, batch, dry_run, progress)
    except (redis.ConnectionError, redis.TimeoutError) as error:
        raise Unreachable(f"Redis: {error}") from None
    except psycopg2.errors.ObjectInUse:
        raise VersionInUse(
            f"slot {slot} was taken by a walsender meanwhile; stop its replicator first"
        ) from None
    except psycopg2.OperationalError as error:
        raise Unreachable(f"PostgreSQL: {str(error).strip()}") from None
    except (redis.RedisError, psycopg2.Error, LockLost) as error:
        # Refused (permissions, a lock lost while Redis stalled): what was removed stays removed;
        # run it again once the cause is fixed.
        raise RetireFailed(f"{type(error).__name__}: {str(error).strip()}") from None
    finally:
        if client is not None:
            client.close()


def _retire(
    settings: Settings,
    client: SyncClient,
    schema: KeySchema,
    slot: str,
    batch: int,
    dry_run: bool,
    progress: Callable[[str], None],
) -> Retirement:
    lock = SlotLock(client, schema.lock(slot), settings.lock_ttl_seconds, f"retire:{instance_token()}")
    _check_the_pair(client, schema, slot)
    found, pid, retained = _slot(settings.database_url, slot)
    if dry_run:
        # What the real run would refuse, the dry run refuses too.
        _check_unread(client, schema)
        _check_unlocked(client, schema, own=None)
        if pid is not None:
            raise VersionInUse(f"slot {slot} is in use by walsender pid {pid}; stop its replicator first")
        keys = sum(len(chunk) for chunk in _batches(client, schema, schema.lock_prefix(), batch))
        keys += len(_fencing_keys(client, schema, lock.key))
        return Retirement(schema.namespace, slot, found, retained, keys, dry_run=True)
    if not lock.try_acquire():
        raise VersionInUse(
            f"a replicator holds the lock of {schema.namespace} ({lock.owner()}); stop it before retiring the version"
        )
    keeper = LockKeeper(
        settings.redis_url, lock.key, settings.lock_ttl_seconds, lock.token, STALL_SECONDS
    ).start()
    try:
        _check_unread(client, schema)
        _check_unlocked(client, schema, own=lock.key)
        if found:
            if pid is not None:
                raise VersionInUse(f"slot {slot} is in use by walsender pid {pid}; stop its replicator first")
            keeper.check()
            _drop_slot(settings.database_url, slot)
            progress(f"{schema.namespace}: dropped slot {slot}")
        # Counted as found: the session that fences the deletions (on a cluster) writes some of them again.
        fencing = _fencing_keys(client, schema, lock.key)
        sink = sink_for(client, schema, replace(settings, slot_name=slot), lock, on_progress=keeper.check)
        sink.load_scripts()
        sink.begin()
        deleted, reported = 0, 0.0
        for chunk in _batches(client, schema, schema.lock_prefix(), batch):
            keeper.check()
            deleted += sink.unlink(chunk)
            # After the first batch (it has started), then every PROGRESS_SECONDS.
            if time.monotonic() - reported >= PROGRESS_SECONDS:
                progress(f"{schema.namespace}: {deleted:,} keys deleted")
                reported = time.monotonic()
        # Last, what fenced them: each node's fence goes in the call that it fences.
        # One call per node, whatever `batch` (they are few): a node's fence must go in its last call.
        left = _fencing_keys(client, schema, lock.key)
        if left:
            keeper.check()
            sink.unlink(left)
        deleted += len(fencing)
        # The slot is free to feed another version now.
        client.eval(
            RELEASE_LOCK, 1, slot_owner(slot), schema.namespace
        )  # deleted only if it names this version
        return Retirement(schema.namespace, slot, found, retained, deleted, dry_run=False)
    finally:
        keeper.stop()
        with contextlib.suppress(redis.RedisError):
            lock.release()
