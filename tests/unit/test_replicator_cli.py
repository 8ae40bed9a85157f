"""The replicator's command line: `--help` needs none of the clients the commands use."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT

CLIENTS = ("grpc", "redis", "psycopg", "psycopg2", "prometheus_client")

PROBE = f"""
import contextlib, sys
from replicator.__main__ import main
with contextlib.suppress(SystemExit):
    main(["--help"])
print(sorted({{m.split(".")[0] for m in sys.modules}} & set({CLIENTS!r})), file=sys.stderr)
"""


def test_help_loads_no_client() -> None:
    done = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, check=True)
    assert "usage: replicator" in done.stdout
    assert done.stderr.strip() == "[]"
