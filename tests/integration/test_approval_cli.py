"""The approval service's command line: settings errors, migrations, serving and a graceful SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request

import psycopg2

from approval_svc.migrate import upgrade
from stack.local import wait_serving
from stack.servers import free_port
from tests.support import ROOT
from tests.support.auth import server_env


def _env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPROVAL_")}
    env.update({f"APPROVAL_{k}": v for k, v in settings.items()})
    return env


def _serving_env(**settings: str) -> dict[str, str]:
    """What `serve` needs besides: authentication by the tests' token authority."""
    return {**_env(**settings), **server_env("APPROVAL_")}


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "approval_svc", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_missing_setting_stops_start_up_with_one_line() -> None:
    result = _run("serve", env=_serving_env())
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "APPROVAL_DATABASE_URL" in lines[0]


def test_migrate_creates_the_schema(database_dsn: str) -> None:
    result = _run("migrate", env=_env(DATABASE_URL=database_dsn))
    assert result.returncode == 0, result.stdout + result.stderr
    connection = psycopg2.connect(database_dsn)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_publication_tables WHERE pubname = 'payments_read_model'")
            assert cursor.fetchone() == (3,)
    finally:
        connection.close()
    again = _run("migrate", env=_env(DATABASE_URL=database_dsn))
    assert again.returncode == 0


def test_serve_answers_health_and_metrics_and_stops_on_sigterm(database_dsn: str) -> None:
    upgrade(database_dsn)
    port, metrics_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "approval_svc", "serve"],
        env=_serving_env(
            DATABASE_URL=database_dsn,
            HOST="127.0.0.1",
            PORT=str(port),
            METRICS_PORT=str(metrics_port),
            GRACE_SECONDS="2",
        ),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        try:
            wait_serving(f"127.0.0.1:{port}", 60, alive=lambda: process.poll() is None)
        except ChildProcessError:
            raise AssertionError(process.stderr.read() if process.stderr else "") from None
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as page:
            assert b"grpc_server_handling_seconds" in page.read()
        process.send_signal(signal.SIGTERM)
        stdout, _ = process.communicate(timeout=30)
        assert process.returncode == 0
        logs = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
        assert any(entry["message"] == "approval service stopped" for entry in logs)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
