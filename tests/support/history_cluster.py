"""Private Redis Clusters for the history tests: started on ports of their own, and their masters killed on purpose."""

from __future__ import annotations

from pathlib import Path

import redis
from redis.crc import key_slot

from payments_common.keys import CHECKPOINT_LSN_FIELD, CHECKPOINT_NODE_FIELD, KeySchema, node_tags
from payments_common.redisconn import AsyncClient, sync_client
from payments_common.redisurl import is_cluster
from stack.servers import RedisCluster, ServerError


def start_cluster(base_dir: Path, masters: int = 3, replicas: int = 1) -> RedisCluster:
    """A private cluster under `base_dir`, detached (its nodes can be killed without killing the test)."""
    return RedisCluster(base_dir=base_dir, masters=masters, replicas=replicas, detached=True).start()


def master_port_of(cluster: RedisCluster, key: str) -> int:
    """The port of the master that serves `key`'s slot now, as the running nodes report it."""
    return cluster.master_of_slot(key_slot(key.encode()))


def kill_master_of(cluster: RedisCluster, key: str) -> int:
    """Kills (SIGKILL) the master that serves `key`; returns its port. Its replica takes over after the node timeout."""
    port = master_port_of(cluster, key)
    cluster.node(port).kill()
    return port


def promoted(cluster: RedisCluster, key: str, dead_port: int) -> bool:
    """Whether another node serves `key`'s slot than the killed one, and every running node says the cluster is ok."""
    try:
        if master_port_of(cluster, key) == dead_port:
            return False
        cluster.wait_ok(timeout=0.5)
    except (AssertionError, ServerError):
        return False
    return True


def node_checkpoints(url: str, schema: KeySchema) -> dict[str, str]:
    """Every master's own checkpoint key in `schema`'s namespace (none on one node), as the
    replicator names it, and the master's name (host:port), which the replicator writes in it."""
    if not is_cluster(url):
        return {}
    client = sync_client(url)
    assert isinstance(client, redis.RedisCluster)
    try:
        tags = node_tags((slot, owners[0].name) for slot, owners in client.nodes_manager.slots_cache.items())
    finally:
        client.close()
    return {schema.node_checkpoint(tag): name for name, tag in tags.items()}


def node_checkpoint_keys(url: str, schema: KeySchema) -> list[str]:
    return list(node_checkpoints(url, schema))


async def move_node_checkpoint(client: AsyncClient, key: str, node: str, lsn: int) -> None:
    """Moves a master's own checkpoint as the replicator does: the position, and the master that wrote it."""
    await client.hset(key, mapping={CHECKPOINT_LSN_FIELD: lsn, CHECKPOINT_NODE_FIELD: node})


async def set_checkpoint(client: AsyncClient, url: str, schema: KeySchema, slot: str, lsn: int) -> list[str]:
    """Moves the slot's checkpoint and, on a cluster, every master's own, as an applied batch would; returns the keys."""
    await client.hset(schema.checkpoint(slot), CHECKPOINT_LSN_FIELD, lsn)
    masters = node_checkpoints(url, schema)
    for key, node in masters.items():
        await move_node_checkpoint(client, key, node, lsn)
    return [schema.checkpoint(slot), *masters]


def node_checkpoint_of(url: str, schema: KeySchema, key: str) -> tuple[str, str]:
    """The own checkpoint key of the master that serves `key`, and that master's name."""
    client = sync_client(url)
    assert isinstance(client, redis.RedisCluster)
    try:
        table = client.nodes_manager.slots_cache
        master = table[key_slot(key.encode())][0].name
        tags = node_tags((slot, owners[0].name) for slot, owners in table.items())
    finally:
        client.close()
    return schema.node_checkpoint(tags[master]), master


def node_checkpoint_key_of(url: str, schema: KeySchema, key: str) -> str:
    """The own checkpoint key of the master that serves `key`."""
    return node_checkpoint_of(url, schema, key)[0]
