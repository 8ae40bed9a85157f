"""Which positions the replicator confirms to PostgreSQL: only those Redis held, alive, for the delay."""

from __future__ import annotations

from replicator.ack import Acknowledgements


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_position_is_confirmed_once_redis_answered_after_the_delay() -> None:
    clock = Clock()
    acks = Acknowledgements(2.0, clock)
    acks.applied(10)
    clock.now += 1.0
    acks.applied(20)
    assert acks.due() is None
    clock.now += 1.5
    # 2.5 s after 10 was applied, but Redis has not answered since 20 was: 10 is not known durable.
    assert acks.due() is None
    acks.alive()
    assert acks.due() == 10
    assert acks.due() is None
    clock.now += 1.0
    acks.alive()
    assert acks.due() == 20


def test_nothing_is_confirmed_after_redis_stopped_answering() -> None:
    clock = Clock()
    acks = Acknowledgements(2.0, clock)
    acks.applied(10)
    clock.now += 60
    assert acks.waiting
    assert acks.due() is None


def test_positions_only_move_forward() -> None:
    clock = Clock()
    acks = Acknowledgements(0.0, clock)
    acks.applied(30)
    acks.applied(20)
    assert acks.due() == 30
    acks.applied(30)
    assert acks.due() is None
    assert acks.confirmed == 30


def test_no_delay_confirms_what_redis_acknowledged() -> None:
    acks = Acknowledgements(0.0, Clock())
    acks.applied(5)
    assert acks.due() == 5
    assert acks.next_due_in() == 0.0
