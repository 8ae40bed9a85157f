"""The read models' Redis named by one URL: one node, or a Redis Cluster by its seeds.

One node: `redis://[user:password@]host:port/db`, `rediss://...` (TLS) or `unix:///path?db=N`,
as redis-py reads them.

A Redis Cluster: `redis+cluster://[user:password@]host:port[,host:port...]` (or
`rediss+cluster://` for TLS), any query options redis-py's URLs take. The hosts are seed
nodes: any one that answers gives the cluster's whole topology. A cluster has database 0
only, so the path, if any, is `/` or `/0`.

Parsing only: no Redis client is imported here (the approval service reads settings too,
and has no Redis client at all). The clients: payments_common/redisconn.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit

SINGLE_SCHEMES: Final = ("redis://", "rediss://", "unix://")
CLUSTER_SCHEMES: Final = ("redis+cluster://", "rediss+cluster://")
SCHEMES: Final = SINGLE_SCHEMES + CLUSTER_SCHEMES


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
