"""The tests' subprocesses: one way to stop, kill, pause, watch the log of, and wait for any of them.

`ChildProcess` holds what every subprocess offers; `ServiceProcess` is a gRPC service
(`python -m MODULE serve`) on a fixed port, so that a test can kill it and start it
again on the same address. The replicator's process (tests/support/replicator.py)
builds on `ChildProcess` too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import grpc

from stack.local import wait_serving
from stack.servers import dying_with_parent
from tests.support import ROOT
from tests.support.waiting import wait_until


class ChildProcess:
    """A subprocess of a test, its output appended to `log_path`.

    Subclasses set `process` when they start it, and `name` for messages.
    """

    name: str
    log_path: Path
    process: subprocess.Popen[bytes] | None
    # How long `stop` waits for an exit after SIGTERM before it sends SIGKILL.
    stop_timeout_s: ClassVar[float] = 20.0

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def stop(self, timeout: float | None = None) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=self.stop_timeout_s if timeout is None else timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, and the exit code; fails if it does not exit in time."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout)

    def kill(self) -> None:
        """kill -9: no graceful shutdown, nothing flushed, calls in flight cut."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=10)

    def pause(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_text()
        return "\n".join(text.splitlines()[-lines:]) if text else "(no log)"

    def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        """Waits until the process has logged `text`; fails at once if it exits first."""

        def logged() -> bool:
            if text in self.log_text():
                return True
            if not self.alive:
                raise AssertionError(f"{self.name} exited before it logged {text!r}:\n{self.log_tail()}")
            return False

        wait_until(logged, timeout, f"{self.name} logs {text!r}", detail=self.log_tail)


@dataclass
class ServiceProcess(ChildProcess):
    """One gRPC service subprocess on a fixed port; it dies with the test process."""

    name: str
    module: str
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    starts: int = field(default=0, init=False)

    stop_timeout_s: ClassVar[float] = 15.0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> ServiceProcess:
        # No Python in the forked child: with gRPC threads busy in the test process it can crash there.
        args, preexec = dying_with_parent([sys.executable, "-m", self.module, "serve"])
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                args,
                env={**os.environ, "PYTHONPATH": str(ROOT), **self.env},
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                preexec_fn=preexec,
            )
        self.starts += 1
        return self

    def wait_serving(
        self,
        timeout: float = 30.0,
        credentials: grpc.ChannelCredentials | None = None,
        service: str = "readiness",
    ) -> None:
        """Polls the health service until `service` is SERVING; fails early if the process exited."""
        try:
            wait_serving(self.address, timeout, service, credentials, alive=lambda: self.alive)
        except (TimeoutError, ChildProcessError) as error:
            raise AssertionError(f"{self.name}: {error}:\n{self.log_text()[-3000:]}") from None
