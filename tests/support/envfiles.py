"""Reading the files of shell variables that the tooling writes for `.`: the stack's endpoints.env and auth.env, .image/env."""

from __future__ import annotations

import shlex
from pathlib import Path


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of a file written for `.` (shell quoting, # comments)."""
    values = {}
    for line in path.read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.partition("=")
        values[key] = shlex.split(value)[0] if value else ""
    return values
