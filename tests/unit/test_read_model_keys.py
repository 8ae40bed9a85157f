"""The key schema is the one place that names keys and fields: the scripts and SCAN patterns take theirs from it."""

from __future__ import annotations

import fnmatch
import inspect
import re
from types import ModuleType

import pytest
from redis.crc import key_slot

from history_svc import queries
from payments.type.v1 import payment_pb2
from payments_common import keys
from payments_common.keys import KeySchema
from replicator import clustersink, lock, reconcile, sink

SCHEMA = KeySchema("rm:test")
P = "00000000-0000-4000-8000-000000000001"
A = "00000000-0000-4000-8000-00000000000a"

# Every hash field and field prefix that keys.py names.
FIELD_NAMES = sorted(
    {value for name, value in vars(keys).items() if name.endswith("_FIELD") and isinstance(value, str)}
    | {keys.TIMELINE_POSITION_PREFIX}
)


def test_the_field_names_are_known() -> None:
    assert FIELD_NAMES == [
        "batch",
        "commit_time_us",
        "epoch",
        "features",
        "lsn",
        "node",
        "source_time_us",
        "tl:",
        "view",
    ]


@pytest.mark.parametrize("module", [sink, clustersink, lock, reconcile, queries], ids=lambda m: m.__name__)
def test_no_script_or_query_spells_a_field_name_of_its_own(module: ModuleType) -> None:
    source = inspect.getsource(module)
    for name in FIELD_NAMES:
        # A Lua or Python string literal that is, or starts with, the field's name.
        literal = re.compile(r"""(['"])""" + re.escape(name) + (r"" if name.endswith(":") else r"\1"))
        assert not literal.search(source), f"{module.__name__} spells {name!r}"


def test_every_placeholder_of_the_scripts_is_filled() -> None:
    scripts = [
        sink.APPLY_BATCH,
        sink.FENCED_UNLINK,
        sink.FENCED_HSET,
        queries.PAYMENT_SCRIPT.source,
        queries.PAGE_SCRIPT.source,
    ]
    for script in scripts:
        assert not re.search(r"@[A-Z_]+@", script)
    for field in (
        keys.LSN_FIELD,
        keys.VIEW_FIELD,
        keys.CHECKPOINT_COMMIT_TIME_FIELD,
        keys.CHECKPOINT_SOURCE_TIME_FIELD,
        keys.STREAM_BATCH_FIELD,
        keys.TIMELINE_POSITION_PREFIX,
    ):
        assert f"'{field}'" in sink.APPLY_BATCH


def test_a_timeline_position_field_names_its_sequence() -> None:
    assert keys.timeline_position_field(7) == keys.timeline_position_field("7") == "tl:7"


def _every_kind_of_key() -> dict[str, str]:
    return {
        "payment": SCHEMA.payment(P),
        "timeline": SCHEMA.payment_timeline(P),
        "account": SCHEMA.account(A),
        "index": SCHEMA.account_index(A, "sent", payment_pb2.PAYMENT_STATUS_APPROVED),
        "index versions": SCHEMA.account_index_versions(A),
        "review queue": SCHEMA.review_queue(),
        "review queue versions": SCHEMA.review_queue_versions(),
        "meta": SCHEMA.meta(),
        "checkpoint": SCHEMA.checkpoint("slot"),
        "changes": SCHEMA.changes(),
        "lock": SCHEMA.lock("slot"),
    }


@pytest.mark.parametrize(
    ("pattern", "kinds"),
    [
        (SCHEMA.namespace_pattern(), set(_every_kind_of_key())),
        (SCHEMA.payments_pattern(), {"payment", "timeline"}),
        (SCHEMA.payment_hashes_pattern(), {"payment"}),
        (SCHEMA.payment_timelines_pattern(), {"timeline"}),
        (SCHEMA.accounts_pattern(), {"account", "index", "index versions"}),
        (SCHEMA.account_hashes_pattern(), {"account"}),
        (SCHEMA.account_indexes_pattern(), {"index"}),
        (SCHEMA.account_index_versions_pattern(), {"index versions"}),
    ],
)
def test_each_pattern_matches_exactly_its_kind_of_key(pattern: str, kinds: set[str]) -> None:
    # Redis's glob and fnmatch agree on these patterns: `*` only, and braces are literal.
    matched = {kind for kind, key in _every_kind_of_key().items() if fnmatch.fnmatchcase(key, pattern)}
    assert matched == kinds
    assert not fnmatch.fnmatchcase(KeySchema("rm:other").payment(P), pattern)


def test_the_review_queue_and_its_versions_share_one_cluster_slot() -> None:
    """The apply script's queue write touches both keys: on Redis Cluster they hash to one slot."""
    tags = {
        re.fullmatch(r"[^{]*\{([^}]*)\}.*", key)
        for key in (SCHEMA.review_queue(), SCHEMA.review_queue_versions())
    }
    assert {tag.group(1) for tag in tags if tag is not None} == {"review_queue"}


def test_features_are_written_and_read_as_one_field() -> None:
    assert keys.format_features(("review_queue", "another")) == "another,review_queue"
    assert keys.parse_features(b"another,review_queue") == {"another", "review_queue"}
    assert keys.parse_features(None) == keys.parse_features("") == frozenset()
    assert keys.FEATURE_REVIEW_QUEUE in keys.FEATURES


def test_only_locks_start_with_the_lock_prefix() -> None:
    prefixed = {kind for kind, key in _every_kind_of_key().items() if key.startswith(SCHEMA.lock_prefix())}
    assert prefixed == {"lock"}


def _keys_built_by_every_method(schema: KeySchema) -> dict[str, str]:
    """The key of every key-building method of the schema (so a kind of key added later is covered)."""
    built = {}
    for name, method in inspect.getmembers(schema, inspect.ismethod):
        if name.startswith("_") or name.endswith(("pattern", "patterns", "prefix")) or name == "for_redis":
            continue
        arguments = {
            parameter: "sent" if parameter == "direction" else 0 if parameter == "status" else P
            for parameter in inspect.signature(method).parameters
        }
        built[name] = method(**arguments)
    return built


@pytest.mark.parametrize("cluster", [False, True], ids=["one node", "cluster"])
def test_the_version_patterns_match_every_key_of_the_version_and_none_of_a_nested_one(cluster: bool) -> None:
    """A rebuild and `replicator retire` delete by these patterns: `rm` must not take `rm:v1` with it."""
    outer = KeySchema.for_redis("rm", "slot", cluster)
    nested = KeySchema.for_redis("rm:v1", "slot", cluster)
    for name, key in _keys_built_by_every_method(outer).items():
        assert any(fnmatch.fnmatchcase(key, p) for p in outer.version_patterns()), name
    for name, key in _keys_built_by_every_method(nested).items():
        assert not any(fnmatch.fnmatchcase(key, p) for p in outer.version_patterns()), name
    assert set(_keys_built_by_every_method(outer)) >= {"payment", "account", "checkpoint", "changes", "lock"}


def _slot(key: str) -> int:
    return key_slot(key.encode())


def test_on_a_cluster_the_lock_the_checkpoint_and_the_change_stream_share_the_slots_hash_slot() -> None:
    """One fenced script call moves the checkpoint and appends to the change stream (replicator/clustersink.py)."""
    schema = KeySchema.for_redis("rm:v1", "payments_read_model", cluster=True)
    control = {schema.lock("payments_read_model"), schema.checkpoint("payments_read_model"), schema.changes()}
    control.add(schema.epoch("payments_read_model"))
    assert len({_slot(key) for key in control}) == 1
    assert KeySchema.for_redis("rm:v1", "payments_read_model", cluster=False).changes() == "rm:v1:changes"


@pytest.mark.parametrize("slot", [0, 1, 5461, 10923, 16383])
def test_a_nodes_fence_and_checkpoint_hash_to_the_slot_their_tag_names(slot: int) -> None:
    """Readers find a node's checkpoint from the lowest slot it serves, as the replicator writes it."""
    tag = keys.node_tag(slot)
    assert _slot(SCHEMA.node_fence(tag)) == _slot(SCHEMA.node_checkpoint(tag)) == slot
    assert SCHEMA.node_fence(tag).startswith(SCHEMA.lock_prefix())  # kept by a rebuild's wipe
    assert not SCHEMA.node_checkpoint(tag).startswith(SCHEMA.lock_prefix())  # removed by it


def test_a_slot_outside_the_cluster_has_no_tag() -> None:
    with pytest.raises(ValueError, match="0-16383"):
        keys.node_tag(16384)
