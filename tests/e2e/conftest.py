"""The local stack, started once for the end-to-end suites with `python -m stack up`, as a user would."""

from __future__ import annotations

import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest


def read_endpoints(root: Path) -> dict[str, str]:
    endpoints = {}
    for line in (root / "endpoints.env").read_text().splitlines():
        key, _, value = line.partition("=")
        endpoints[key] = shlex.split(value)[0] if value else ""
    return endpoints


@pytest.fixture(scope="session")
def stack_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("stack")
    up = subprocess.run(
        [sys.executable, "-m", "stack", "up", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=240,
    )
    try:
        assert up.returncode == 0, f"stack up failed:\n{up.stdout}\n{up.stderr}"
        yield root
    finally:
        subprocess.run([sys.executable, "-m", "stack", "down", "--root", str(root)], timeout=120, check=False)


@pytest.fixture(scope="session")
def endpoints(stack_root: Path) -> dict[str, str]:
    return read_endpoints(stack_root)
