"""The rekey core's states, its errors, and the shape of its transition table (h11's
`_state.py` in spirit). The table itself, `TRANSITIONS`, sits in gateway/core/machine.py next to
the handlers it names; docs/protocol.md draws it (`python -m gateway.core.diagram`).

A row names a state (or any state), an event type, the handler, and where the handler may
move the machine. With checking on (`LinkMachine(check_transitions=True)`: the property
tests, the daemon's debug mode), a handler that moves the machine along no edge of its row
raises `TransitionError`: the table and the code cannot disagree unseen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

from gateway.core.events import Action, Event


class State(StrEnum):
    IDLE = "idle"  # no exchange in progress
    FETCHING = "fetching"  # QKD keys requested: enc_keys (I) or dec_keys (R)
    OFFERED = "offered"  # I: Offer sent, waiting for Accept
    INSTALLING = "installing"  # the epoch's inbound key is being installed
    ACTIVATING = "activating"  # the epoch's outbound key is being switched to
    COMMITTED = "committed"  # I: outbound switched, Commit sent, waiting for Ack
    ACCEPTED = "accepted"  # R: Accept sent, waiting for Commit


class CoreError(Exception):
    pass


class IllegalEvent(CoreError):
    """The driver sent an event that makes no sense in the current state."""


class PeerMessageRejected(CoreError):
    """A peer message refused; `reason` is a short code for logs and metrics."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        super().__init__(f"{reason}: {detail}")


class TransitionError(CoreError):
    """A handler moved the machine along no edge of its row: a bug, in the table or the
    handler. Raised only when transitions are checked."""


T = TypeVar("T")


def need(value: T | None, what: str) -> T:
    """VALUE, which the machine's state guarantees (e.g. the Offer of an exchange in state
    OFFERED); if it is missing that is a bug: a CoreError, which fails the link closed."""
    if value is None:
        raise CoreError(f"{what} missing where the state guarantees it")
    return value


E = TypeVar("E", bound=Event)
#: A handler: (machine, event, now) -> actions. The machine is typed where the handler is
#: defined; the table below the handlers cannot name its class without a cycle.
Handler = Callable[[Any, E, float], list[Action]]


@dataclass(frozen=True)
class Transition(Generic[E]):
    state: State | None  # None: any state
    event: type[E]
    handler: Handler[E]
    to: tuple[State, ...]  # for a row of one state: where it may lead
    note: str
    #: For an any-state row: the state changes it may make, (from, to).
    moves: tuple[tuple[State, State], ...] = ()

    @property
    def edges(self) -> list[tuple[State, State]]:
        if self.state is None:
            return list(self.moves)
        return [(self.state, b) for b in self.to if b is not self.state]

    def allows(self, before: State, after: State) -> bool:
        return before is after or (before, after) in self.edges

    def check(self, before: State, after: State) -> None:
        if not self.allows(before, after):
            raise TransitionError(
                f"{self.handler.__name__} moved {before} -> {after} on"
                f" {self.event.__name__}, which its row does not allow"
                f" ({', '.join(f'{a}->{b}' for a, b in self.edges) or 'no move'})")


def row(state: State | None, event: type[E], handler: Handler[E], to: tuple[State, ...],
        note: str, moves: tuple[tuple[State, State], ...] = ()) -> Transition[E]:
    return Transition(state, event, handler, to, note, moves)
