"""The redis-py clients of the read models' Redis, one node or a Redis Cluster, from its URL.

The URL's forms: payments_common/redisurl.py. A cluster's client refreshes the topology
itself when slots move or a replica is promoted.
"""

from __future__ import annotations

from typing import Any

import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import AskError, ClusterDownError, MovedError, RedisClusterException, TryAgainError

from payments_common.redisurl import cluster_target, is_cluster

SyncClient = redis.Redis | RedisCluster
AsyncClient = redis.asyncio.Redis | AsyncRedisCluster

# Refusals with which a cluster's node says that a key, or the node, moved: redis-py reads the
# MOVED, ASK, TRYAGAIN and CLUSTERDOWN replies as these classes and drops their code from the
# message; a script that touched a key its node does not serve fails with "non local key".
_MOVED_ERRORS = (MovedError, AskError, TryAgainError, ClusterDownError)
_MOVED_TEXT = ("MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN")


def topology_moved(error: redis.ResponseError) -> bool:
    """Whether a node's refusal says that the slot table the call was routed by is out of date.

    A slot moved or moving (resharding), a failover under way, or a script's undeclared key
    on a node that no longer serves it: refresh the table and try again. Any other refusal
    is the call's own.
    """
    text = str(error)
    return (
        isinstance(error, _MOVED_ERRORS)
        or text.startswith(_MOVED_TEXT)
        or "non local key" in text
        or "non-local key" in text
    )


def sync_client(url: str, **options: Any) -> SyncClient:
    """A redis-py client of the URL's Redis: `redis.Redis` for one node, `RedisCluster` for a cluster.

    `options` are the client's keyword arguments (timeouts, client_name, ...). A cluster's
    client reads the topology as it is made: when no seed answers, or the nodes that answer
    do not serve every slot, that is a redis.ConnectionError (redis.AuthenticationError when
    a seed refused the credentials), as for one node (redis-py raises RedisClusterException,
    which is no RedisError).
    """
    if not is_cluster(url):
        return redis.Redis.from_url(url, **options)
    target = cluster_target(url)
    try:
        return RedisCluster.from_url(
            target.first_seed_url,
            startup_nodes=[ClusterNode(host, port) for host, port in target.seeds[1:]],  # type: ignore[no-untyped-call]
            **options,
        )
    except RedisClusterException as error:
        # A seed that refused the credentials stays a refusal (it answered), not an outage.
        refused = isinstance(error.__cause__, redis.AuthenticationError)
        kind = redis.AuthenticationError if refused else redis.ConnectionError
        raise kind(f"Redis Cluster: {error}") from error


def async_client(url: str, **options: Any) -> AsyncClient:
    """The asyncio client of the URL's Redis, as `sync_client` chooses it."""
    if not is_cluster(url):
        return redis.asyncio.Redis.from_url(url, **options)
    target = cluster_target(url)
    return AsyncRedisCluster.from_url(
        target.first_seed_url,
        startup_nodes=[AsyncClusterNode(host, port) for host, port in target.seeds[1:]],
        **options,
    )
