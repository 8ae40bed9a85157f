"""The slot's lock: one writer per slot, kept alive by time from a thread of its own.

The lock is a Redis key holding the owner's token with a TTL. Every write of the
replicator is fenced by it: the apply script, the removal of keys and of the checkpoint
check the token in the same atomic call. A `LockKeeper` renews the TTL every third of it,
whatever the main loop is doing (a long projection, a slow script call, a large
transaction), so that an instance that works never loses its lock. It stops renewing when
the main loop has made no progress for `stall_seconds`, so that a wedged instance lets
another take over.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass

import redis

from payments_common.keys import KeySchema, slot_owner
from payments_common.redisconn import SyncClient, sync_client
from replicator import metrics

log = logging.getLogger(__name__)

RENEW_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

RELEASE_LOCK = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class LockOwner:
    """Who holds a slot's lock, as Redis has it: the owner's token and the milliseconds it has left."""

    token: str | None
    ttl_ms: int | None


def read_owner(client: SyncClient, key: str) -> LockOwner:
    """The lock's owner and remaining TTL, read in one round trip (None, None: nobody holds it)."""
    with client.pipeline(transaction=True) as pipe:
        pipe.get(key)
        pipe.pttl(key)
        value, ttl = pipe.execute()
    if not isinstance(value, bytes):
        return LockOwner(None, None)
    # PTTL is -1 for a key without a TTL (not ours) and -2 once it is gone.
    return LockOwner(value.decode(), int(ttl) if int(ttl) >= 0 else None)


class LockLost(RuntimeError):
    """This instance no longer owns the slot's lock; it must stop writing."""


def instance_token() -> str:
    """Names one replicator instance in the lock: host, process and a random suffix."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class SlotLock:
    """The Redis lock that makes one instance the only writer for a slot."""

    def __init__(self, client: SyncClient, key: str, ttl_seconds: float, token: str | None = None) -> None:
        self.client = client
        self.key = key
        self.ttl_seconds = ttl_seconds
        self.token = token or instance_token()

    @property
    def _ttl_ms(self) -> int:
        # Redis takes the TTL in milliseconds (PX, PEXPIRE).
        return int(self.ttl_seconds * 1000)

    def try_acquire(self) -> bool:
        if self.client.set(self.key, self.token, nx=True, px=self._ttl_ms):
            return True
        return self.renew()

    def renew(self) -> bool:
        return bool(self.client.eval(RENEW_LOCK, 1, self.key, self.token, self._ttl_ms))

    def fence(self) -> None:
        """Raises LockLost unless this instance holds the lock now (and extends it)."""
        if not self.renew():
            raise LockLost(f"the lock {self.key} is not held by this instance")

    def release(self) -> None:
        self.client.eval(RELEASE_LOCK, 1, self.key, self.token)

    def owner(self) -> str | None:
        return read_owner(self.client, self.key).token


class LockKeeper:
    """Renews a held lock every third of its TTL from a daemon thread, on a connection of its own.

    The main loop calls `check()` as it works: that proves progress and raises LockLost
    once the keeper has seen the lock taken by another instance, or could not renew it
    within its TTL (Redis unreachable: the lock may have expired).
    """

    def __init__(
        self, redis_url: str, key: str, ttl_seconds: float, token: str, stall_seconds: float
    ) -> None:
        self.key = key
        self.ttl_seconds = ttl_seconds
        self.stall_seconds = stall_seconds
        self._client = sync_client(
            redis_url,
            socket_timeout=max(0.5, self.ttl_seconds / 3),
            socket_connect_timeout=max(0.5, self.ttl_seconds / 3),
        )
        self._lock = SlotLock(self._client, key, ttl_seconds, token)
        self._stop = threading.Event()
        self._lost: str | None = None
        now = time.monotonic()
        self._renewed_at = now
        self._progress_at = now
        self._thread = threading.Thread(target=self._run, name="lock-keeper", daemon=True)

    def start(self) -> LockKeeper:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.ttl_seconds)
        self._client.close()

    def check(self) -> None:
        """Records the main loop's progress; raises LockLost if the lock is no longer ours."""
        self._progress_at = time.monotonic()
        if self._lost is not None:
            raise LockLost(self._lost)

    def _run(self) -> None:
        interval = self.ttl_seconds / 3
        while not self._stop.wait(interval):
            now = time.monotonic()
            stalled = now - self._progress_at
            if stalled > self.stall_seconds:
                self._lost = (
                    f"the main loop made no progress for {stalled:.0f}s; the lock {self.key} is let go"
                )
                log.error("%s", self._lost)
                metrics.LOCK_HELD.set(0)
                return
            try:
                held = self._lock.renew()
            except redis.RedisError as error:
                if now - self._renewed_at >= self.ttl_seconds:
                    self._lost = f"could not renew the lock {self.key} within its TTL: {error}"
                    log.warning("%s", self._lost)
                    metrics.LOCK_HELD.set(0)
                    return
                continue
            if not held:
                self._lost = f"the lock {self.key} was taken by {self._owner()}"
                log.warning("%s", self._lost)
                metrics.LOCK_HELD.set(0)
                return
            self._renewed_at = now

    def _owner(self) -> str:
        try:
            return self._lock.owner() or "nobody (it expired)"
        except redis.RedisError:
            return "an unknown owner"


class VersionConflict(RuntimeError):
    """The slot feeds another version, or the version is fed by another slot: a setting is wrong."""


def claim_version(client: SyncClient, schema: KeySchema, slot: str) -> None:
    """Records that `slot` feeds the version of `schema`, and that it is the version's only slot.

    A version fed by two slots, or a slot feeding two versions, would make their replicators
    rebuild each other without end: whichever claim is there first stands, and the other
    replicator is refused (VersionConflict) before it writes anything. `replicator retire`
    removes both claims.
    """
    claims = (
        (schema.owner(), slot, "version {ns} is fed by slot {other}, not by this replicator's slot {slot}"),
        (slot_owner(slot), schema.namespace, "slot {slot} feeds version {other}, not this replicator's {ns}"),
    )

    def check() -> None:
        for key, value, conflict in claims:
            stored = client.get(key)
            other = stored.decode() if isinstance(stored, bytes) else None
            if other is not None and other != value:
                raise VersionConflict(
                    conflict.format(ns=schema.namespace, slot=slot, other=other)
                    + ": give each version its own namespace and slot (docs/operations.md)"
                )

    check()  # refused before anything is written
    for key, value, _ in claims:
        client.set(key, value, nx=True)
    check()  # another replicator's claim came in between
