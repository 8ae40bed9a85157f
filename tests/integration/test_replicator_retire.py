"""`replicator retire`: a read-model version removed, its slot first, while the version beside it carries on."""

from __future__ import annotations

import pytest
from redis.cluster import RedisCluster

from payments_common.redisconn import sync_client
from stack.replication import run_reconcile
from tests.support.replicator import StartReplicator, keys_of, replicator, retire, slot_exists, slot_for
from tests.support.source import SourceWriter

__all__ = ["replicator"]


def unlink_calls(redis_url: str) -> int:
    """UNLINK calls so far, on every master of a cluster."""
    client = sync_client(redis_url)
    try:
        if isinstance(client, RedisCluster):
            per_node = client.info("commandstats", target_nodes=RedisCluster.PRIMARIES)
        else:
            per_node = {"the node": client.info("commandstats")}
    finally:
        client.close()
    return sum(int(stats.get("cmdstat_unlink", {}).get("calls", 0)) for stats in per_node.values())


def test_a_version_is_retired_beside_the_one_that_replaces_it(
    migrated_dsn: str, any_redis_url: str, replicator: StartReplicator
) -> None:
    base = slot_for(migrated_dsn)
    old_slot, new_slot = f"{base}_v1", f"{base}_v2"
    with SourceWriter(migrated_dsn) as source:
        accounts = [source.open_account(f"owner {n}") for n in range(4)]
        for n in range(30):
            source.pay(accounts[n % 4], accounts[(n + 1) % 4], 100 + n)
    old = replicator(migrated_dsn, any_redis_url, slot=old_slot, key_namespace="rm:v1")
    new = replicator(migrated_dsn, any_redis_url, slot=new_slot, key_namespace="rm:v2")
    old.wait_caught_up()
    new.wait_caught_up()
    running_keys, new_keys = keys_of(any_redis_url, "rm:v1"), keys_of(any_redis_url, "rm:v2")
    assert running_keys > 30
    assert new_keys == running_keys  # the same read models, and a lock each

    # While its replicator runs, the version is in use: nothing is removed.
    refused = retire(migrated_dsn, any_redis_url, "--namespace", "rm:v1", "--slot", old_slot)
    assert refused.returncode == 3, refused
    assert "holds the lock of rm:v1" in refused.stderr
    assert slot_exists(migrated_dsn, old_slot)
    assert keys_of(any_redis_url, "rm:v1") == running_keys

    old.stop()
    old_keys = keys_of(any_redis_url, "rm:v1")  # a replicator that stops lets its lock go
    dry = retire(migrated_dsn, any_redis_url, "--namespace", "rm:v1", "--slot", old_slot, "--dry-run")
    assert dry.returncode == 0, dry
    assert f"would delete {old_keys:,} keys" in dry.stdout
    assert slot_exists(migrated_dsn, old_slot)
    assert keys_of(any_redis_url, "rm:v1") == old_keys

    # A namespace that holds both in its keys' names is another version: it has none of them.
    outer = retire(migrated_dsn, any_redis_url, "--namespace", "rm", "--slot", f"{base}_none", "--dry-run")
    assert outer.returncode == 0, outer
    assert "would delete 0 keys" in outer.stdout

    calls_before = unlink_calls(any_redis_url)
    done = retire(migrated_dsn, any_redis_url, "--namespace", "rm:v1", "--slot", old_slot, "--batch", "7")
    assert done.returncode == 0, done
    assert f"slot {old_slot} dropped" in done.stdout
    assert f"deleted {old_keys:,} keys" in done.stdout
    assert "keys deleted" in done.stderr  # progress
    # Bounded work per call: at most 7 keys per UNLINK.
    assert unlink_calls(any_redis_url) - calls_before >= -(-old_keys // 7)
    assert not slot_exists(migrated_dsn, old_slot)
    assert keys_of(any_redis_url, "rm:v1") == 0

    # The version beside it is untouched and carries on.
    assert keys_of(any_redis_url, "rm:v2") == new_keys
    with SourceWriter(migrated_dsn) as source:
        source.pay(accounts[0], accounts[2], 999)
    new.wait_caught_up()
    checked = run_reconcile(migrated_dsn, any_redis_url, slot=new_slot, namespace="rm:v2")
    assert checked.returncode == 0, checked.stdout + checked.stderr

    # Again: nothing left to do, and it says so.
    again = retire(migrated_dsn, any_redis_url, "--namespace", "rm:v1", "--slot", old_slot)
    assert again.returncode == 0, again
    assert f"slot {old_slot} not found; deleted 0 keys" in again.stdout


@pytest.mark.parametrize("namespace", ["rm:*", "rm:v[12]", "rm:", ":v1", "rm v1"])
def test_a_namespace_that_would_match_other_keys_is_refused(
    migrated_dsn: str, redis_url: str, namespace: str
) -> None:
    refused = retire(migrated_dsn, redis_url, "--namespace", namespace, "--slot", "any_slot")
    assert refused.returncode == 2
    assert "--namespace" in refused.stderr
