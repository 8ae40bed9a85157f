"""Which position the replicator may confirm to PostgreSQL: what Redis has held, alive, for long enough.

Confirming a position lets the slot forget the WAL before it. Redis acknowledges a write
when it is in memory; with `appendfsync everysec` it reaches the disk within about a
second (two in the worst case), so a Redis host that dies loses its last writes and
restarts from an append-only file without them. A position is therefore confirmed only
once Redis has answered a command `delay` seconds or more after it applied that position:
Redis was still alive then, so its fsync has run. The slot keeps everything after Redis's
durable checkpoint, and the replicator resumes from it without a rebuild.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class Acknowledgements:
    """Positions applied to Redis, each released once Redis has answered `delay_seconds` after it."""

    def __init__(self, delay_seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.delay_seconds = delay_seconds
        self._clock = clock
        self._applied: deque[tuple[float, int]] = deque()
        self._last_applied = 0
        self._alive_at = clock()
        self.confirmed = 0

    def applied(self, lsn: int) -> None:
        """Redis has just acknowledged everything up to `lsn` (and so is alive)."""
        now = self._clock()
        self._alive_at = now
        if lsn > self._last_applied:
            self._applied.append((now, lsn))
            self._last_applied = lsn

    def alive(self) -> None:
        """Redis has just answered a command on the connection that applies the writes."""
        self._alive_at = self._clock()

    @property
    def waiting(self) -> bool:
        """Some position waits for Redis to answer again after its delay."""
        return bool(self._applied) and self._clock() - self._applied[0][0] >= self.delay_seconds

    def next_due_in(self) -> float:
        """Seconds until the oldest unconfirmed position has been held for `delay_seconds` (0: now or none)."""
        if not self._applied:
            return 0.0
        return max(0.0, self._applied[0][0] + self.delay_seconds - self._clock())

    def due(self) -> int | None:
        """The newest position that Redis has held alive for `delay_seconds`, if not confirmed yet."""
        horizon = self._alive_at - self.delay_seconds
        released: int | None = None
        while self._applied and self._applied[0][0] <= horizon:
            released = self._applied.popleft()[1]
        if released is None or released <= self.confirmed:
            return None
        self.confirmed = released
        return released
