"""How long the replicator waits before it starts a session again, by what ended the last one."""

from __future__ import annotations

import psycopg2
import redis

from replicator.clustersink import NotDurable, TopologyChanged
from replicator.runner import FAST_RESTARTS, MAX_BACKOFF_SECONDS, MIN_BACKOFF_SECONDS, restart_delay


def _waits(errors: list[BaseException], session_seconds: float = 1.0) -> list[float]:
    """The waits before each next session, the moves counted as the replicator's loop counts them."""
    waits, backoff, moves = [], MIN_BACKOFF_SECONDS, 0
    for error in errors:
        moves = 0 if session_seconds > 30 else moves
        wait, backoff = restart_delay(backoff, error, session_seconds, moves)
        moves += isinstance(error, TopologyChanged)
        waits.append(wait)
    return waits


def test_outages_back_off_exponentially_up_to_the_cap() -> None:
    outage = redis.ConnectionError("Connection refused")
    assert _waits([outage] * 7) == [0.5, 1.0, 2.0, 4.0, 8.0, MAX_BACKOFF_SECONDS, MAX_BACKOFF_SECONDS]
    assert _waits([psycopg2.OperationalError("gone")] * 3) == [0.5, 1.0, 2.0]


def test_a_session_that_lasted_starts_the_backoff_over() -> None:
    assert restart_delay(MAX_BACKOFF_SECONDS, redis.ConnectionError("reset"), 31.0) == (0.5, 1.0)
    assert restart_delay(4.0, redis.ConnectionError("reset"), 29.0) == (4.0, 8.0)


def test_a_moved_topology_restarts_after_the_shortest_wait_a_few_times_in_a_row() -> None:
    # A reshard moves its slots one by one: each move may end a session.
    moved = TopologyChanged("MOVED 3999 127.0.0.1:7001")
    assert _waits([moved] * FAST_RESTARTS) == [MIN_BACKOFF_SECONDS] * FAST_RESTARTS
    # After an outage had grown the backoff, which the next outage goes on from.
    assert restart_delay(8.0, moved, 0.2) == (MIN_BACKOFF_SECONDS, 8.0)


def test_a_cluster_that_stays_down_backs_off_as_an_outage() -> None:
    down = TopologyChanged("CLUSTERDOWN The cluster is down")
    assert _waits([down] * (FAST_RESTARTS + 4)) == [MIN_BACKOFF_SECONDS] * FAST_RESTARTS + [
        0.5,
        1.0,
        2.0,
        4.0,
    ]
    # Alternating with connection errors does not keep it fast: the outages' backoff grows,
    # and the fast restarts are used up.
    outage = redis.ConnectionError("Connection refused")
    assert _waits([outage, down] * 7) == [0.5, 0.5, 1, 0.5, 2, 0.5, 4, 0.5, 8, 0.5, 10, 10, 10, 10]
    # They come back once a session lasted.
    assert _waits([down] * 7, session_seconds=31)[-1] == MIN_BACKOFF_SECONDS


def test_replicas_that_do_not_acknowledge_are_an_outage() -> None:
    assert _waits([NotDurable("no replica acknowledged")] * 4) == [0.5, 1.0, 2.0, 4.0]
