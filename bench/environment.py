"""What a run ran on: the machine, and the versions of Python, the libraries, the servers and the checkout."""

from __future__ import annotations

import contextlib
import importlib.metadata
import math
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import psycopg2
import redis

from payments_common.redisurl import cluster_target, is_cluster

ROOT = Path(__file__).resolve().parent.parent


def machine_info() -> dict[str, Any]:
    """The CPUs, memory, kernel and load of this machine."""
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory_gb = math.nan
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_gb = round(int(line.split()[1]) / 1024 / 1024, 1)
    distro = "?"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    load = os.getloadavg()
    return {
        "cpu_model": model,
        "cpus": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "memory_gb": memory_gb,
        "kernel": platform.release(),
        "os": distro,
        "load_average_at_end": [round(x, 2) for x in load],
    }


def versions(postgres_dsn: str, redis_url: str) -> dict[str, str]:
    """The versions of Python, the libraries, the servers and the checkout that ran."""
    found: dict[str, str] = {"python": platform.python_version()}
    for package in (
        "grpcio",
        "protobuf",
        "asyncpg",
        "redis",
        "hiredis",
        "uvloop",
        "SQLAlchemy",
        "psycopg2-binary",
    ):
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    with (
        contextlib.suppress(Exception),
        contextlib.closing(psycopg2.connect(postgres_dsn)) as c,
        c.cursor() as cursor,
    ):
        cursor.execute("SHOW server_version")
        row = cursor.fetchone()
        found["postgresql"] = str(row[0]) if row else "?"
    with contextlib.suppress(Exception):
        # A cluster's nodes run one build: its first seed's version is every node's.
        one_node = cluster_target(redis_url).first_seed_url if is_cluster(redis_url) else redis_url
        client = redis.Redis.from_url(one_node)
        found["redis_server"] = str(client.info("server")["redis_version"])
        client.close()
    with contextlib.suppress(Exception):
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True
        ).stdout
        found["git_commit"] = commit + ("+uncommitted changes" if dirty.strip() else "")
    return found
