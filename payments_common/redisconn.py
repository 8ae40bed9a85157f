"""The read models' Redis, one node or a Redis Cluster, named by one URL.

One node: `redis://[user:password@]host:port/db`, `rediss://...` (TLS) or `unix:///path?db=N`,
as redis-py reads them.

A Redis Cluster: `redis+cluster://[user:password@]host:port[,host:port...]` (or
`rediss+cluster://` for TLS), any query options redis-py's URLs take. The hosts are seed
nodes: any one that answers gives the cluster's whole topology, which the client refreshes
itself when slots move or a replica is promoted. A cluster has database 0 only, so the
path, if any, is `/` or `/0`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import redis
import redis.asyncio
from redis.asyncio.cluster import ClusterNode as AsyncClusterNode
from redis.asyncio.cluster import RedisCluster as AsyncRedisCluster
from redis.cluster import ClusterNode, RedisCluster
from redis.exceptions import RedisClusterException

SINGLE_SCHEMES: Final = ("redis://", "rediss://", "unix://")
CLUSTER_SCHEMES: Final = ("redis+cluster://", "rediss+cluster://")
SCHEMES: Final = SINGLE_SCHEMES + CLUSTER_SCHEMES

SyncClient = redis.Redis | RedisCluster
AsyncClient = redis.asyncio.Redis | AsyncRedisCluster


@dataclass(frozen=True)
class ClusterTarget:
    """A cluster URL taken apart: the URL of its first seed, as redis-py reads one node's, and every seed."""

    first_seed_url: str
    seeds: tuple[tuple[str, int], ...]


def is_cluster(url: str) -> bool:
    return url.startswith(CLUSTER_SCHEMES)


def url_problem(url: str) -> str | None:
    """Why `url` names no Redis this code can use, or None when it names one."""
    if not url.startswith(SCHEMES):
        return "must start with " + ", ".join(SCHEMES[:-1]) + f" or {SCHEMES[-1]}"
    if is_cluster(url):
        try:
            cluster_target(url)
        except ValueError as error:
            return str(error)
    return None


def cluster_target(url: str) -> ClusterTarget:
    """The seeds of a `redis+cluster://` URL; ValueError when it names none, or a database other than 0."""
    scheme, _, rest = url.partition("://")
    single = scheme.removesuffix("+cluster")
    netloc_end = len(rest)
    for separator in "/?#":
        found = rest.find(separator)
        if found != -1:
            netloc_end = min(netloc_end, found)
    netloc, tail = rest[:netloc_end], rest[netloc_end:]
    userinfo, at, hosts = netloc.rpartition("@")
    path = urlsplit(f"{single}://x{tail}").path
    if path not in ("", "/", "/0"):
        raise ValueError(f"a cluster has database 0 only, got path {path!r}")
    seeds: list[tuple[str, int]] = []
    for part in hosts.split(","):
        seed_host, colon, seed_port = part.strip().rpartition(":")
        if not colon or not seed_host or not seed_port.isdigit() or not 0 < int(seed_port) < 65536:
            raise ValueError(f"each seed must be host:port, got {part.strip()!r}")
        seeds.append((seed_host.strip("[]"), int(seed_port)))
    host, port = seeds[0]
    credentials = f"{userinfo}{at}"
    return ClusterTarget(f"{single}://{credentials}{host}:{port}{tail}", tuple(seeds))


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
