"""One Redis setting names one node or a cluster's seeds (payments_common/redisconn.py)."""

from __future__ import annotations

import pytest
from redis.cluster import RedisCluster

from payments_common.redisconn import sync_client
from payments_common.redisurl import cluster_target, is_cluster, url_problem


def test_a_cluster_url_lists_its_seeds_and_keeps_credentials_and_options() -> None:
    target = cluster_target(
        "rediss+cluster://reader:s%40cret@10.0.0.1:7000,10.0.0.2:7001/0?ssl_cert_reqs=none"
    )
    assert target.seeds == (("10.0.0.1", 7000), ("10.0.0.2", 7001))
    assert target.first_seed_url == "rediss://reader:s%40cret@10.0.0.1:7000/0?ssl_cert_reqs=none"
    assert cluster_target("redis+cluster://[::1]:7000").seeds == (("::1", 7000),)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://redis:6379", "must start with"),
        ("redis+cluster://redis", "host:port"),
        ("redis+cluster://a:7000,b", "host:port"),
        ("redis+cluster://a:70000", "host:port"),
        ("redis+cluster://a:7000/3", "database 0 only"),
    ],
)
def test_a_url_that_names_no_redis_is_refused_with_its_reason(url: str, problem: str) -> None:
    assert problem in (url_problem(url) or "")


@pytest.mark.parametrize(
    "url",
    [
        "redis://redis:6379/0",
        "rediss://u:p@redis:6380",
        "unix:///run/redis.sock?db=2",
        "redis+cluster://a:1/",
    ],
)
def test_every_documented_form_is_accepted(url: str) -> None:
    assert url_problem(url) is None


def test_a_cluster_url_makes_a_cluster_client_and_any_other_a_single_node_client() -> None:
    assert is_cluster("redis+cluster://a:7000")
    assert not is_cluster("redis://a:7000")
    # A single node's client connects at its first command (a cluster's at construction).
    assert not isinstance(sync_client("redis://127.0.0.1:1/0"), RedisCluster)
