"""The local stack, started once for the end-to-end suites with `python -m stack up`, as a user would.

Authentication is on, as `make up` runs it: the suites call with tokens of the stack's
authority (kept under the stack's root), through `python -m stack token` or its library.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stack import tokens
from stack.tokens import LocalCredentials
from tests.support.envfiles import read_env_file


def read_endpoints(root: Path) -> dict[str, str]:
    return read_env_file(root / "endpoints.env")


@pytest.fixture(scope="session", params=["single", "cluster"])
def stack_root(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Path]:
    """The stack as `make up` starts it, once on one Redis and once on a Redis Cluster (STACK_REDIS=cluster)."""
    root = tmp_path_factory.mktemp("stack")
    up = subprocess.run(
        [sys.executable, "-m", "stack", "up", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "STACK_REDIS": request.param},
    )
    try:
        assert up.returncode == 0, f"stack up failed:\n{up.stdout}\n{up.stderr}"
        yield root
    finally:
        subprocess.run([sys.executable, "-m", "stack", "down", "--root", str(root)], timeout=120, check=False)


@pytest.fixture(scope="session")
def endpoints(stack_root: Path) -> dict[str, str]:
    return read_endpoints(stack_root)


@pytest.fixture(scope="session")
def auth_env(stack_root: Path) -> dict[str, str]:
    """What `make up` wrote to auth.env: the JWKS and policy paths, and a token per role."""
    return read_env_file(stack_root / tokens.AUTH_ENV_FILE)


@pytest.fixture(scope="session")
def credentials(stack_root: Path) -> LocalCredentials:
    """Tokens of each role, and of a customer for each account, signed by the stack's authority."""
    return LocalCredentials(tokens.authority(stack_root))
