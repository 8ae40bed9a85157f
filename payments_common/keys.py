"""The Redis key schema of the read models: every key that the replicator writes and history reads.

Keys are versioned (`rm:v1:...`) so that a new read-model version can be built beside
the old one. Every key of one payment shares the hash tag `{<payment_id>}` and every
key of one account shares `{<account_id>}`, so that the per-entity scripts touch a
single Redis Cluster slot; nothing relies on a transaction across two entities. The review
queue is one key, with its versions in the same slot (`{review_queue}`).

Layout (for payment P, account A, replication slot S):

    rm:v1:payment:{P}                  HASH  lsn -> WAL position of the last write (decimal)
                                             view -> PaymentView bytes (timeline empty);
                                             absent after a delete (a tombstone: "not found")
                                             tl:<sequence> -> WAL position of that timeline entry's last write
    rm:v1:payment:{P}:timeline         HASH  <sequence> -> TimelineEntry bytes
    rm:v1:account:{A}                  HASH  lsn, view -> AccountView bytes
    rm:v1:account:{A}:idx:<dir>:<st>   ZSET  all scores 0; member "<create µs, 16 digits>:<P>",
                                             so lexicographic order is time order
                                             dir in sent|received|all, st in any|approved|...
    rm:v1:account:{A}:idxver           HASH  <P> -> WAL position of the last index write of P
    rm:v1:{review_queue}               ZSET  the payments held for review (PENDING_REVIEW), of every
                                             account: members as the account indexes', oldest first
    rm:v1:{review_queue}:idxver        HASH  <P> -> WAL position of the last queue write of P
    rm:v1:meta                         HASH  features -> what the namespace was built with, comma-
                                             separated (e.g. "review_queue"), written at bootstrap
    rm:v1:checkpoint:{S}               HASH  lsn -> end position of the last applied transaction
                                             commit_time_us -> its commit time
                                             source_time_us -> the source's clock when it was
                                             at lsn (a commit's time, or a keepalive's)
    rm:v1:changes                      STREAM  batch -> ChangeBatch bytes, one entry per applied batch
                                             (rm:v1:changes:{S} on a Redis Cluster, beside the lock)
    rm:v1:lock:{S}                     STRING  the replicator instance that owns slot S (with a TTL)
    rm:v1:lock:{S}:epoch               STRING  on a cluster: counts the sessions that held the lock
    rm:v1:lock:{N}:node                HASH    on a cluster: epoch -> the session allowed to write node N
    rm:v1:lock:{S}:fences              SET     on a cluster: the tags of every node fence ever claimed
    rm:v1:checkpoint:{N}:node          HASH    on a cluster: node N's checkpoint, fields as the slot's,
                                             and node -> the node (host:port) that wrote it
    rm:v1:owner                        STRING  S: the one slot that feeds this version
    slot-owner:{S}                     STRING  rm:v1: the one version that slot S feeds (outside any version)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from typing import Final

from redis.crc import key_slot

from payments.type.v1 import payment_pb2

# The defaults of every process that reads or writes the read models (the replicator, the
# history service, the tools): the replication slot, the publication it streams, and the
# key namespace of the read-model version. A deployment may name others.
DEFAULT_SLOT_NAME: Final = "payments_read_model"
DEFAULT_PUBLICATION: Final = "payments_read_model"
DEFAULT_NAMESPACE: Final = "rm:v1"

# A namespace: parts of these characters joined by ':' (no glob character: a version's keys
# are found by SCAN patterns). No part may be a kind of key, so that no namespace's keys
# look like another's (`rm:account` under `rm` would).
_NAMESPACE: Final = re.compile(r"[A-Za-z0-9_-]+(:[A-Za-z0-9_-]+)*")
KEY_KINDS: Final = frozenset({"payment", "account", "checkpoint", "lock", "changes", "owner", "meta"})


def namespace_problem(namespace: str) -> str | None:
    """Why `namespace` cannot name a read-model version, or None when it can."""
    if not _NAMESPACE.fullmatch(namespace):
        return f"must be parts of A-Z, a-z, 0-9, _ and - joined by ':', got {namespace!r}"
    reserved = sorted(set(namespace.split(":")) & KEY_KINDS)
    if reserved:
        return f"must not have a part named like a kind of key ({', '.join(reserved)}), got {namespace!r}"
    return None


def slot_problem(slot: str) -> str | None:
    """Why `slot` cannot name a replication slot (PostgreSQL's rule: 1-63 of a-z, 0-9, _), or None."""
    if not re.fullmatch(r"[a-z0-9_]{1,63}", slot):
        return f"must be 1-63 of a-z, 0-9 and _, got {slot!r}"
    return None


def reader_name(namespace: str) -> str:
    """The Redis client name of the history service's connections to version `namespace`
    (`CLIENT LIST` shows who still reads a version)."""
    return f"history:{namespace}"


def slot_owner(slot: str) -> str:
    """The key that names the one version slot `slot` feeds (it belongs to no version)."""
    return f"slot-owner:{{{slot}}}"


DIRECTIONS: Final = ("sent", "received", "all")

# The index suffix of each status; "any" holds every status.
STATUS_NAMES: Final[dict[int, str]] = {
    payment_pb2.PAYMENT_STATUS_UNSPECIFIED: "any",
    payment_pb2.PAYMENT_STATUS_APPROVED: "approved",
    payment_pb2.PAYMENT_STATUS_DECLINED: "declined",
    payment_pb2.PAYMENT_STATUS_PENDING_REVIEW: "pending_review",
}

# Fields of the entity hashes.
LSN_FIELD: Final = "lsn"
VIEW_FIELD: Final = "view"
CHECKPOINT_LSN_FIELD: Final = "lsn"
CHECKPOINT_COMMIT_TIME_FIELD: Final = "commit_time_us"
# The source's clock at the checkpoint: every transaction that committed earlier is applied
# (up to the moment a commit takes to be flushed). Lag in seconds is measured from it.
CHECKPOINT_SOURCE_TIME_FIELD: Final = "source_time_us"
STREAM_BATCH_FIELD: Final = "batch"
# A payment hash's field `tl:<sequence>` holds the position of that timeline entry's last write.
TIMELINE_POSITION_PREFIX: Final = "tl:"
META_FEATURES_FIELD: Final = "features"

# The features of a read-model version that readers may depend on. A namespace has one when a
# replicator that builds it bootstrapped the namespace: a feature added to the code later is
# maintained from then on, but lacks what came before, so readers check the namespace's
# `meta` hash rather than assume it.
FEATURE_REVIEW_QUEUE: Final = "review_queue"
# What a bootstrap of this version builds, and writes to `meta`.
FEATURES: Final = (FEATURE_REVIEW_QUEUE,)

# Index members start with the creation time in microseconds, zero-padded to this width.
TIME_DIGITS: Final = 16


def index_member(create_time_us: int, payment_id: str) -> str:
    """The index member of a payment: sorts by creation time, then by id."""
    return f"{create_time_us:0{TIME_DIGITS}d}:{payment_id}"


def timeline_position_field(sequence: int | str) -> str:
    """The payment hash's field that holds the position of timeline entry `sequence`."""
    return f"{TIMELINE_POSITION_PREFIX}{sequence}"


def parse_index_member(member: str) -> tuple[int, str]:
    """The creation time and payment id of an index member."""
    stamp, _, payment_id = member.partition(":")
    return int(stamp), payment_id


def format_features(features: tuple[str, ...] | frozenset[str]) -> str:
    """The `features` field of the `meta` hash: the names, sorted, comma-separated."""
    return ",".join(sorted(features))


def parse_features(value: bytes | str | None) -> frozenset[str]:
    """The features that a `meta` hash's `features` field names (none when it is absent)."""
    text = value.decode() if isinstance(value, bytes) else value or ""
    return frozenset(name for name in text.split(",") if name)


# The field of a cluster node's fence hash that names the session allowed to write the node.
FENCE_EPOCH_FIELD: Final = "epoch"
# The field of a cluster node's checkpoint hash that names the node that wrote it (host:port):
# a checkpoint that a reshard carried to another node (with its slot) is not that node's.
CHECKPOINT_NODE_FIELD: Final = "node"


@cache
def node_tag(slot: int) -> str:
    """The hash tag of a Redis Cluster node's own keys (its fence and checkpoint): `n<k>`, the
    first such name that hashes to `slot`, the lowest slot the node serves.

    The replicator and the readers derive a node's tag from the same topology, so they agree
    on where the node's checkpoint is without asking anyone.
    """
    if not 0 <= slot < 16384:
        raise ValueError(f"a cluster slot is 0-16383, got {slot}")
    k = 0
    while key_slot(f"n{k}".encode()) != slot:
        k += 1
    return f"n{k}"


def node_tags(owners: Iterable[tuple[int, str]]) -> dict[str, str]:
    """Each master's tag (`node_tag` of the lowest slot it serves), from (slot, master's name)
    pairs: every slot of a slot table, or the first slot of each of its ranges."""
    lowest: dict[str, int] = {}
    for slot, name in owners:
        if slot < lowest.get(name, 16384):
            lowest[name] = slot
    return {name: node_tag(slot) for name, slot in lowest.items()}


@dataclass(frozen=True)
class KeySchema:
    """Builds the keys of one read-model version; `namespace` is e.g. "rm:v1".

    `control_tag` is set on a Redis Cluster to the replication slot's name: the change
    stream then carries the slot's hash tag, so that it lives on the node of the lock and
    the checkpoint, and one fenced script call moves the checkpoint and appends to it.
    """

    namespace: str = DEFAULT_NAMESPACE
    control_tag: str | None = None

    @classmethod
    def for_redis(cls, namespace: str, slot: str, cluster: bool) -> KeySchema:
        """The schema of `namespace` as it is laid out on one node (`cluster` false) or on a cluster."""
        return cls(namespace, slot if cluster else None)

    def payment(self, payment_id: str) -> str:
        return f"{self.namespace}:payment:{{{payment_id}}}"

    def payment_timeline(self, payment_id: str) -> str:
        return f"{self.namespace}:payment:{{{payment_id}}}:timeline"

    def account(self, account_id: str) -> str:
        return f"{self.namespace}:account:{{{account_id}}}"

    def account_index(self, account_id: str, direction: str, status: int) -> str:
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}")
        return f"{self.namespace}:account:{{{account_id}}}:idx:{direction}:{STATUS_NAMES[status]}"

    def account_index_versions(self, account_id: str) -> str:
        return f"{self.namespace}:account:{{{account_id}}}:idxver"

    def review_queue(self) -> str:
        return f"{self.namespace}:{{review_queue}}"

    def review_queue_versions(self) -> str:
        return f"{self.namespace}:{{review_queue}}:idxver"

    def meta(self) -> str:
        return f"{self.namespace}:meta"

    def checkpoint(self, slot: str) -> str:
        return f"{self.namespace}:checkpoint:{{{slot}}}"

    def changes(self) -> str:
        if self.control_tag is not None:
            return f"{self.namespace}:changes:{{{self.control_tag}}}"
        return f"{self.namespace}:changes"

    def epoch(self, slot: str) -> str:
        """On a cluster: the counter of the sessions that held slot `slot`'s lock."""
        return f"{self.lock(slot)}:epoch"

    def fence_tags(self, slot: str) -> str:
        """On a cluster: the tags of every node fence the sessions of slot `slot` have claimed.

        Fences move with their slots when slots move, but only a node that lost its data
        loses one: a tag listed here and found on no node says that a node came back empty.
        """
        return f"{self.lock(slot)}:fences"

    def node_fence_pattern(self) -> str:
        """Every node fence of the version (SCAN pattern)."""
        return f"{self.lock_prefix()}{{*}}:node"

    def node_fence(self, tag: str) -> str:
        """On a cluster: the hash naming the one session allowed to write the node of `tag`."""
        return f"{self.lock_prefix()}{{{tag}}}:node"

    def node_checkpoint(self, tag: str) -> str:
        """On a cluster: the checkpoint of the node of `tag` (every change up to it is on that node)."""
        return f"{self.namespace}:checkpoint:{{{tag}}}:node"

    def owner(self) -> str:
        """The version's record of the one slot that feeds it."""
        return f"{self.namespace}:owner"

    def lock(self, slot: str) -> str:
        return f"{self.lock_prefix()}{{{slot}}}"

    def lock_prefix(self) -> str:
        """What every lock key starts with."""
        return f"{self.namespace}:lock:"

    # SCAN patterns (Redis glob syntax) of each kind of key, for the whole-namespace work:
    # a truncate, a rebuild, a reconcile.

    def namespace_pattern(self) -> str:
        """Every key under the namespace: this version's, and any of a namespace nested in it
        (`rm` holds `rm:v1`'s keys too). To find only this version's, use `version_patterns`."""
        return f"{self.namespace}:*"

    def version_patterns(self) -> tuple[str, ...]:
        """The patterns that together match every key of this version and no key of a
        namespace nested in it: one per kind of key (below the namespace, the kind comes first)."""
        ns = self.namespace
        return (
            f"{ns}:payment:*",
            f"{ns}:account:*",
            f"{ns}:checkpoint:*",
            f"{ns}:lock:*",
            self.changes(),
            self.owner(),
            # The review queue and its versions: no namespace has a brace, so none nested matches.
            f"{ns}:{{review_queue}}*",
            self.meta(),
        )

    def payments_pattern(self) -> str:
        """Every key of every payment: the hashes and the timelines."""
        return f"{self.namespace}:payment:*"

    def payment_hashes_pattern(self) -> str:
        return f"{self.namespace}:payment:{{*}}"

    def payment_timelines_pattern(self) -> str:
        return f"{self.namespace}:payment:*:timeline"

    def accounts_pattern(self) -> str:
        """Every key of every account: the hashes, the indexes and the index versions."""
        return f"{self.namespace}:account:*"

    def account_hashes_pattern(self) -> str:
        return f"{self.namespace}:account:{{*}}"

    def account_indexes_pattern(self) -> str:
        return f"{self.namespace}:account:*:idx:*"

    def account_index_versions_pattern(self) -> str:
        return f"{self.namespace}:account:*:idxver"


DEFAULT_SCHEMA: Final = KeySchema()
