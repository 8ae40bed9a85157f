"""`make up` on one Redis or on a Redis Cluster (STACK_REDIS=cluster): endpoints.env says which, and `make down` stops every node."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import redis

from payments_common.redisurl import is_cluster
from tests.e2e.conftest import read_endpoints
from tests.support.waiting import wait_until


def _node(address: str) -> redis.Redis:
    host, _, port = address.rpartition(":")
    return redis.Redis(host=host, port=int(port), socket_connect_timeout=1)


def test_endpoints_name_the_topology_and_every_node(endpoints: dict[str, str]) -> None:
    nodes = endpoints["REDIS_NODES"].split(",")
    if endpoints["REDIS_TOPOLOGY"] == "cluster":
        assert is_cluster(endpoints["REDIS_URL"])
        assert len(nodes) == 6
        roles = []
        for address in nodes:
            client = _node(address)
            info = client.execute_command("CLUSTER", "INFO").decode()  # type: ignore[no-untyped-call]
            assert "cluster_state:ok" in info
            roles.append(client.info("replication")["role"])
            client.close()
        assert sorted(roles) == ["master"] * 3 + ["slave"] * 3
    else:
        assert endpoints["REDIS_TOPOLOGY"] == "single"
        assert not is_cluster(endpoints["REDIS_URL"])
        assert len(nodes) == 1
        assert _node(nodes[0]).ping()


def _refuses(address: str) -> bool:
    try:
        _node(address).ping()
    except redis.ConnectionError:
        return True
    return False


def test_down_stops_every_node_of_a_cluster(tmp_path: Path) -> None:
    env = {**os.environ, "STACK_REDIS": "cluster"}
    up = subprocess.run(
        [sys.executable, "-m", "stack", "up", "--root", str(tmp_path), "--history", "1"],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    try:
        assert up.returncode == 0, f"stack up failed:\n{up.stdout}\n{up.stderr}"
        nodes = read_endpoints(tmp_path)["REDIS_NODES"].split(",")
        assert len(nodes) == 6
    finally:
        subprocess.run(
            [sys.executable, "-m", "stack", "down", "--root", str(tmp_path)], timeout=120, check=False
        )
    wait_until(lambda: all(_refuses(address) for address in nodes), within_s=30, what="every node to stop")


def test_an_unknown_topology_is_refused(tmp_path: Path) -> None:
    up = subprocess.run(
        [sys.executable, "-m", "stack", "up", "--root", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "STACK_REDIS": "sentinel"},
    )
    assert up.returncode != 0
    assert "STACK_REDIS must be single or cluster, got 'sentinel'" in up.stdout + up.stderr
