"""Turns for work that floods a shared party when every link wants it at once.

After a restart every link of a hub needs a new epoch, and each epoch is an exchange with a
peer gateway and requests to the KME. Started all at once, thousands of exchanges share two
cores: each takes longer than `attempt_timeout`, is given up and retried, and the storm
feeds itself while the peers and the KME are flooded. The daemon therefore hands out turns:

- an exchange a link starts of its own accord asks for a turn first (the rekey core's
  `RequestStart`, answered by `StartGranted`) and holds it until the link is idle again;
  at most `limit` at once, and at most `per_group` towards one peer gateway, so that a
  peer that does not answer cannot hold every turn;
- a group whose exchange timed out gets one turn at a time until one succeeds, then twice
  as many after each success up to `per_group` (a dead peer costs one turn, not many);
- KME key requests take a turn of their own pacer for the length of the request;
- waiters are served earliest deadline first: the deadline is when the link's key reaches
  its hard lifetime, so the links closest to blocking go first. At start the daemon holds
  every turn back until each link has asked (or GATHER_LIMIT passed): otherwise the first
  turns would go to whichever links happened to ask first.

Pure asyncio, no I/O; docs/operations.md ("Restart storms") explains the figures.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

#: Exchanges this daemon starts that may be in flight at once. An exchange costs the hub a
#: few ms of CPU (bench/fleet.py: ~5 ms with TLS, KME requests, files and audit on a 2-core
#: VM) and takes one to two round trips on a WAN: 32 keep both cores busy on a LAN, each
#: exchange waiting ~200 ms there for its share of them (far inside `attempt_timeout`,
#: 15 s). Raise it for long round trips (turns per second = limit / RTT).
EXCHANGES_IN_FLIGHT = 32
#: ... of which towards one peer gateway: half, so a peer that stopped answering (each of
#: its exchanges then holds a turn for `attempt_timeout`) leaves the other half to the rest.
EXCHANGES_PER_PEER = 16
#: KME key requests (enc_keys, dec_keys) in flight at once. A KME answers one in about a
#: millisecond on loopback (bench/kms.py): 16 keep it busy without queueing thousands of
#: requests at it after a restart. Status polls are not counted: one per peer SAE per
#: `kms_status_interval`.
KMS_REQUESTS_IN_FLIGHT = 16
#: At start, turns wait at most this long for every link to ask: starting a link's core
#: takes well under a millisecond, so thousands have asked long before; a link that fails
#: at start must not hold the others.
GATHER_LIMIT = 5.0


@dataclass(order=True)
class _Waiter:
    deadline: float
    seq: int
    future: asyncio.Future[None] = field(compare=False)


@dataclass
class _Group:
    waiting: list[_Waiter] = field(default_factory=list)  # a heap
    in_flight: int = 0
    window: int = 1


class Pacer:
    """At most LIMIT turns at once, at most PER_GROUP within one group; earliest deadline
    first."""

    def __init__(self, limit: int, per_group: int | None = None, *, paused: bool = False
                 ) -> None:
        """PAUSED: no turn is handed out before `resume()`."""
        if limit < 1 or (per_group is not None and per_group < 1):
            raise ValueError("a pacer needs at least one turn")
        self.limit = limit
        self.per_group = min(per_group or limit, limit)
        self.paused = paused
        self.in_flight = 0
        self.waiting = 0
        self._groups: dict[str, _Group] = {}
        self._seq = itertools.count()

    def _group(self, name: str) -> _Group:
        group = self._groups.get(name)
        if group is None:
            group = self._groups[name] = _Group(window=self.per_group)
        return group

    async def acquire(self, group: str, deadline: float) -> None:
        """Wait for a turn in GROUP; cancelled, the turn (granted or not) goes back."""
        g = self._group(group)
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(g.waiting, _Waiter(deadline, next(self._seq), future))
        self.waiting += 1
        self._grant()
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(group)  # granted, then cancelled before it was used
            else:
                future.cancel()
                self.waiting -= 1
            raise

    def release(self, group: str) -> None:
        """A turn of GROUP ends."""
        g = self._group(group)
        if g.in_flight < 1:
            raise RuntimeError(f"no turn of {group!r} to release")
        g.in_flight -= 1
        self.in_flight -= 1
        self._grant()

    @asynccontextmanager
    async def turn(self, group: str, deadline: float) -> AsyncIterator[None]:
        await self.acquire(group, deadline)
        try:
            yield
        finally:
            self.release(group)

    def succeeded(self, group: str) -> None:
        """An exchange of GROUP succeeded: it may have twice as many turns (up to PER_GROUP)."""
        g = self._group(group)
        g.window = min(self.per_group, g.window * 2)
        self._grant()

    def failed(self, group: str) -> None:
        """An exchange of GROUP timed out: one turn at a time until one succeeds."""
        self._group(group).window = 1

    def resize(self, limit: int, per_group: int | None = None) -> None:
        """New limits (a reload): turns held beyond them end as they end; none is taken
        back, none is handed out until the count is below them."""
        if limit < 1 or (per_group is not None and per_group < 1):
            raise ValueError("a pacer needs at least one turn")
        was = self.per_group
        self.limit = limit
        self.per_group = min(per_group or limit, limit)
        for g in self._groups.values():  # (a group held back after a failure stays so)
            g.window = self.per_group if g.window >= was else min(g.window, self.per_group)
        self._grant()

    def resume(self) -> None:
        self.paused = False
        self._grant()

    def throttled(self) -> list[str]:
        """Groups held below PER_GROUP after a failure."""
        return sorted(n for n, g in self._groups.items() if g.window < self.per_group)

    def _grant(self) -> None:
        """Hand free turns to the earliest deadlines among groups below their window."""
        while self.in_flight < self.limit and not self.paused:
            best: _Group | None = None
            for g in self._groups.values():
                while g.waiting and g.waiting[0].future.done():  # cancelled while waiting
                    heapq.heappop(g.waiting)
                if g.waiting and g.in_flight < g.window and \
                        (best is None or g.waiting[0] < best.waiting[0]):
                    best = g
            if best is None:
                return
            heapq.heappop(best.waiting).future.set_result(None)
            best.in_flight += 1
            self.in_flight += 1
            self.waiting -= 1
