"""The daemon's turns (gateway/pacing.py): how many run at once, per group, in which order,
and that a cancelled waiter or holder never loses a turn."""

from __future__ import annotations

import asyncio

import pytest

from gateway.pacing import Pacer


async def _waiters(pacer: Pacer, asks: list[tuple[str, float]]) -> list[asyncio.Task[None]]:
    """A task per (group, deadline) waiting for its turn, in this order; returned once each
    has asked."""
    tasks = [asyncio.create_task(pacer.acquire(g, d)) for g, d in asks]
    await asyncio.sleep(0)
    return tasks


def _granted(tasks: list[asyncio.Task[None]]) -> list[int]:
    return [i for i, t in enumerate(tasks) if t.done() and not t.cancelled()]


async def test_at_most_the_limit_and_earliest_deadline_first() -> None:
    pacer = Pacer(2)
    tasks = await _waiters(pacer, [("a", 50.0), ("a", 40.0), ("a", 10.0), ("a", 30.0),
                                   ("a", 20.0)])
    # The first two asked while turns were free; the rest wait, earliest deadline first.
    assert _granted(tasks) == [0, 1]
    assert (pacer.in_flight, pacer.waiting) == (2, 3)
    order: list[int] = []
    for _ in range(3):
        pacer.release("a")
        await asyncio.sleep(0)
        order += [i for i in _granted(tasks) if i not in (0, 1, *order)]
        assert pacer.in_flight == 2
    assert order == [2, 4, 3]  # deadlines 10, 20, 30
    assert pacer.waiting == 0


async def test_one_group_cannot_take_every_turn() -> None:
    pacer = Pacer(4, per_group=2)
    tasks = await _waiters(pacer, [("dead", 1.0)] * 4 + [("live", 9.0)] * 2)
    assert _granted(tasks) == [0, 1, 4, 5]  # the later deadlines of another group go first
    pacer.release("live")
    await asyncio.sleep(0)
    assert _granted(tasks) == [0, 1, 4, 5]  # "dead" is at its limit: the turn stays free
    assert pacer.in_flight == 3


async def test_a_group_that_timed_out_gets_one_turn_until_it_succeeds() -> None:
    pacer = Pacer(8, per_group=4)
    pacer.failed("p")
    assert pacer.throttled() == ["p"]
    tasks = await _waiters(pacer, [("p", float(i)) for i in range(6)])
    assert _granted(tasks) == [0]
    pacer.succeeded("p")  # window 2
    await asyncio.sleep(0)
    assert _granted(tasks) == [0, 1]
    pacer.succeeded("p")  # window 4: full again
    await asyncio.sleep(0)
    assert _granted(tasks) == [0, 1, 2, 3]
    assert pacer.throttled() == []


async def test_cancelled_waiters_and_holders_give_their_turns_back() -> None:
    pacer = Pacer(1)
    tasks = await _waiters(pacer, [("a", 1.0), ("a", 2.0), ("a", 3.0)])
    tasks[1].cancel()  # waiting: leaves the queue
    await asyncio.sleep(0)
    assert (pacer.in_flight, pacer.waiting) == (1, 1)
    pacer.release("a")  # task 2 is granted ...
    tasks[2].cancel()  # ... and cancelled before it ran: the turn comes back
    await asyncio.gather(*tasks[1:], return_exceptions=True)
    assert (pacer.in_flight, pacer.waiting) == (0, 0)
    async with pacer.turn("a", 0.0):
        assert pacer.in_flight == 1
    assert pacer.in_flight == 0


def test_nonsense_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one turn"):
        Pacer(0)
    with pytest.raises(RuntimeError, match="no turn"):
        Pacer(1).release("a")


async def test_a_paused_pacer_gathers_every_ask_then_serves_the_earliest() -> None:
    """At start the daemon holds turns until every link has asked: the first turns go to the
    earliest deadlines, not to the links that asked first."""
    pacer = Pacer(2, paused=True)
    tasks = await _waiters(pacer, [("a", 30.0), ("a", 20.0), ("a", 10.0)])
    assert _granted(tasks) == []
    pacer.resume()
    await asyncio.sleep(0)
    assert _granted(tasks) == [1, 2]
    for task in tasks:
        task.cancel()


async def test_new_limits_apply_from_the_next_turn() -> None:
    pacer = Pacer(4, per_group=4)
    pacer.failed("slow")  # held to one turn: a reload does not lift that
    tasks = await _waiters(pacer, [("slow", 0.0)] * 2 + [("p", float(i)) for i in range(6)])
    assert _granted(tasks) == [0, 2, 3, 4]
    pacer.resize(2, per_group=2)  # lowered: nothing taken back, nothing new until below
    for _ in range(2):
        pacer.release("p")
        await asyncio.sleep(0)
    assert _granted(tasks) == [0, 2, 3, 4]
    assert pacer.in_flight == 2
    pacer.resize(6, per_group=3)  # raised: handed out at once, up to the group's new limit
    await asyncio.sleep(0)
    assert _granted(tasks) == [0, 2, 3, 4, 5, 6]  # p: 1 still held + 2 new
    assert pacer.in_flight == 4
    assert pacer.throttled() == ["slow"]
    with pytest.raises(ValueError, match="at least one turn"):
        pacer.resize(0)
