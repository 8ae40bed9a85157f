"""Redis's host dies under load: a persisted Redis resumes from its checkpoint, with no rebuild.

With `appendfsync everysec`, Redis fsyncs its append-only file once a second: when its
host dies, the writes of up to the last second or two are lost, and Redis restarts from
the file without them. A kill -9 of the process alone loses nothing (the kernel still has
the writes), so the test also cuts the file back to its size of a second before the kill,
as a power loss would. The replicator confirms to PostgreSQL only positions that Redis
held, alive, for `REPLICATOR_ACK_DELAY_SECONDS` (2 s): the slot still has everything after
Redis's older checkpoint, and the replicator resumes from it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from replicator.config import Settings
from replicator.reconcile import reconcile
from stack.servers import running_redis
from tests.support.replicator import (
    StartReplicator,
    checkpoint_lsn,
    replicator,
    slot_for,
)
from tests.support.source import SourceLoad, SourceWriter
from tests.support.waiting import wait_until

__all__ = ["replicator"]

pytestmark = pytest.mark.slow

# What the test takes away from the append-only file: the writes of the last second.
LOST_SECONDS = 1.0


class AofSizes:
    """Samples the size of Redis's append-only file, to cut it back as a power loss would."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.samples: list[tuple[float, Path, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> AofSizes:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            # The time first: the size read after it covers every write made before it.
            at = time.monotonic()
            for path in self.folder.glob("appendonlydir/*.incr.aof"):
                self.samples.append((at, path, path.stat().st_size))
            self._stop.wait(0.02)

    def covers(self, since: float) -> bool:
        """Whether the samples of the running Redis go back to `since`."""
        return bool(self.samples) and self.samples[0][0] <= since

    def cut_back(self, killed_at: float) -> int:
        """Truncates the file to its size at `LOST_SECONDS` before the kill; returns the bytes cut.

        Forgets the samples: the restarted Redis rewrites the end of the file.
        """
        path = max(self.samples, key=lambda sample: sample[0])[1]
        sizes = [size for at, p, size in self.samples if p == path and at >= killed_at - LOST_SECONDS]
        assert sizes, "no sample of the append-only file in its last second"
        size = path.stat().st_size
        keep = min(sizes[0], size)
        os.truncate(path, keep)
        self.samples = []
        return size - keep


def _sessions(log: Path) -> int:
    return log.read_text().count("streaming slot")


def _streams_again(log: Path, sessions: int) -> Callable[[], bool]:
    """Whether the replicator has started streaming again since it had `sessions` sessions."""
    return lambda: _sessions(log) > sessions


def _assert_reconciled(database_url: str, redis_url: str) -> None:
    settings = Settings(database_url=database_url, redis_url=redis_url, slot_name=slot_for(database_url))
    report = reconcile(settings, wait_seconds=60)
    assert report.clean, "\n".join(report.lines())


def test_redis_host_lost_under_load_resumes_from_its_append_only_file_without_a_rebuild(
    migrated_dsn: str, replicator: StartReplicator, tmp_path: Path
) -> None:
    folder = tmp_path / "redis"
    with running_redis(
        base_dir=folder, extra_args=["--appendonly", "yes", "--appendfsync", "everysec"]
    ) as server:
        url = server.url(0)
        with SourceWriter(migrated_dsn) as source:
            accounts = [source.open_account(f"Owner {i}") for i in range(6)]
        process = replicator(migrated_dsn, url)
        process.wait_caught_up()
        cut = 0
        with AofSizes(folder) as sizes, SourceLoad(migrated_dsn, accounts) as load:
            for round_ in range(1, 4):
                # Long enough under load for positions to be confirmed, then lose the last second.
                load.wait_for(round_ * 600)
                wait_until(
                    lambda: sizes.covers(time.monotonic() - 2 * LOST_SECONDS), 60, "a second of samples"
                )
                sessions = _sessions(process.log_path)
                killed_at = time.monotonic()
                server.kill()
                cut += sizes.cut_back(killed_at)
                server.start()
                # The replicator noticed, and streams again from what the restarted Redis has.
                wait_until(_streams_again(process.log_path, sessions), 60, "the replicator streams again")
            load.wait_for(4 * 600)
        assert cut > 0, "the simulated power loss took writes away"
        process.wait_caught_up(timeout=120)
        assert checkpoint_lsn(url, process.slot) > 0
        text = process.log_path.read_text()
        assert "REBUILD" not in text, process.log_tail(60)
        assert text.count("bootstrap of slot") == 2, "only the first start bootstraps"
        _assert_reconciled(migrated_dsn, url)
