"""How a node's refusal is read by the cluster's apply stage and reads: which ones say that the slots or the masters moved.

The replies are parsed as redis-py parses them off the wire (`parse_error`, which both its
Python and its hiredis readers use): it turns MOVED, ASK, TRYAGAIN and CLUSTERDOWN into
their own exception classes and drops the code from the message.
"""

from __future__ import annotations

import pytest
import redis
from redis._parsers.base import BaseParser

from payments_common.redisconn import topology_moved

# What a script's refusal looks like when it touched a key of another node.
NON_LOCAL = (
    "ERR Error running script (call to f_0123): @user_script:12: Script attempted to access a non local key"
    " in a cluster node script: f_0123, on @user_script:12."
)


def _parsed(reply: str) -> redis.ResponseError:
    error: redis.ResponseError = BaseParser.parse_error(reply)  # type: ignore[no-untyped-call]
    return error


@pytest.mark.parametrize(
    "reply",
    [
        "MOVED 3999 127.0.0.1:7001",
        "ASK 3999 127.0.0.1:7001",
        "TRYAGAIN Multiple keys request during rehashing of slot",
        "CLUSTERDOWN The cluster is down",
        NON_LOCAL,
    ],
    ids=["MOVED", "ASK", "TRYAGAIN", "CLUSTERDOWN", "non local key"],
)
def test_a_refusal_that_says_the_topology_changed_is_read_as_such(reply: str) -> None:
    assert topology_moved(_parsed(reply))


@pytest.mark.parametrize(
    "reply",
    [
        "LOCKLOST another session of the slot owns this node",
        "NOSCRIPT No matching script. Please use EVAL.",
        "ERR Error running script (call to f_0123): @user_script:3: CHECKPOINTMOVED the checkpoint is at 42",
        "OOM command not allowed when used memory > 'maxmemory'.",
    ],
    ids=["LOCKLOST", "NOSCRIPT", "CHECKPOINTMOVED", "OOM"],
)
def test_any_other_refusal_is_not(reply: str) -> None:
    assert not topology_moved(_parsed(reply))
