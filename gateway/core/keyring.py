"""The key ring of one link: which epochs' keys are in the data plane, and when each may go.
The make-before-break rules live here:

- an inbound key is retired only once the peer has moved its outbound past that epoch (or
  abandoned the epoch, which an Offer for a later one implies), and a grace period later;
- an outbound key that a newer one replaced is retired a grace period after the data plane
  finished switching (a sink may take longer than the grace);
- past the hard lifetime with no fresh key, the current outbound key goes: the link is
  blocked (fail closed), never on a stale key.

It returns the actions that carry this out; the machine adds alarms and records.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.sink import EpochRef, Role
from gateway.core.events import Action, Record, RecordKind, RetireInbound, RetireOutbound
from gateway.core.messages import Suite
from gateway.core.policy import Policy
from gateway.core.snapshot import MAX_PENDING, OutboundRef, PendingRef, Snapshot
from gateway.core.table import CoreError


@dataclass
class InstalledKey:
    """An epoch's key in the data plane, retired at `retire_at` (None: when the peer's
    moves say so)."""

    ref: EpochRef
    retire_at: float | None = None


@dataclass
class CurrentKey:
    """The key this side sends on (or is switching to, until `switched`)."""

    ref: EpochRef
    suite: Suite
    activated_at: float
    switched: bool = False

class KeyRing:
    def __init__(self, link: str, policy: Policy) -> None:
        self.link = link
        self.policy = policy
        self.inbound: dict[int, InstalledKey] = {}
        self.outbound: CurrentKey | None = None
        self.replaced: dict[int, InstalledKey] = {}  # earlier outbound keys, until retired
        self.peer_out = 0  # the epoch the peer sends on, as far as it told us

    @property
    def blocked(self) -> bool:
        """No key to send on: none yet, or past its hard lifetime (fail closed)."""
        return self.outbound is None

    @property
    def out_epoch(self) -> int:
        return self.outbound.ref.epoch if self.outbound else 0

    def spis_in(self) -> set[int]:
        return {k.ref.spi_in for k in self.inbound.values()}

    def install(self, ref: EpochRef) -> None:
        self.inbound[ref.epoch] = InstalledKey(ref)

    def activate(self, ref: EpochRef, suite: Suite, now: float) -> None:
        """The data plane starts switching to REF; the key it replaces stays until
        `switched` (then a grace period more)."""
        if self.outbound is not None:
            old = self.outbound.ref
            self.replaced[old.epoch] = InstalledKey(old)
        self.outbound = CurrentKey(ref, suite, now)

    def switched(self, now: float) -> None:
        """The data plane sends on the current key: what it replaced goes after the grace."""
        if self.outbound is not None:
            self.outbound.switched = True
        for key in self.replaced.values():
            if key.retire_at is None:
                key.retire_at = now + self.policy.grace

    def note_peer_out(self, epoch: int, now: float) -> None:
        """The peer sends on EPOCH now: inbound keys of earlier epochs go after the grace."""
        if epoch <= self.peer_out:
            return
        self.peer_out = epoch
        for e, key in self.inbound.items():
            if e < epoch and key.retire_at is None:
                key.retire_at = now + self.policy.grace

    def abandoned_below(self, epoch: int, keep: int, now: float) -> None:
        """An Offer for EPOCH: the initiator gave up the epochs below it that it does not
        send on (KEEP)."""
        for e, key in self.inbound.items():
            if e < epoch and e != keep and key.retire_at is None:
                key.retire_at = now + self.policy.grace

    def forget(self, epoch: int) -> list[Action]:
        """An inbound key whose install failed: clean it up at once."""
        key = self.inbound.pop(epoch, None)
        return [] if key is None else [RetireInbound(key.ref)]

    def retire_due(self, now: float) -> list[Action]:
        out: list[Action] = []
        for epoch in sorted(self.inbound):
            key = self.inbound[epoch]
            if key.retire_at is not None and now >= key.retire_at:
                del self.inbound[epoch]
                out += [RetireInbound(key.ref), Record(RecordKind.RETIRED, epoch, detail="inbound")]
        for epoch in sorted(self.replaced):
            key = self.replaced[epoch]
            if key.retire_at is not None and now >= key.retire_at:
                del self.replaced[epoch]
                out += [RetireOutbound(key.ref),
                        Record(RecordKind.RETIRED, epoch, detail="outbound")]
        return out

    def expired(self, now: float) -> CurrentKey | None:
        """The current outbound key if it passed its hard lifetime: it is gone now."""
        o = self.outbound
        if o is None or now < o.activated_at + self.policy.hard_lifetime:
            return None
        self.outbound = None
        return o

    def unplug(self, now: float) -> list[Action]:
        """The data plane is blocked (a link restarted after a failure, a switch that
        failed): the current outbound key is no longer in use, nor are those it replaced."""
        for key in self.replaced.values():
            if key.retire_at is None:
                key.retire_at = now
        o, self.outbound = self.outbound, None
        return [] if o is None else [RetireOutbound(o.ref)]

    def deadlines(self) -> list[float]:
        times = [k.retire_at for k in (*self.inbound.values(), *self.replaced.values())
                 if k.retire_at is not None]
        if self.outbound is not None:
            times.append(self.outbound.activated_at + self.policy.hard_lifetime)
        return times

    def state_key(self) -> tuple[object, ...]:
        o = self.outbound
        return (self.peer_out, o.ref.epoch if o else None, o.activated_at if o else None,
                o.switched if o else None,
                tuple((e, k.retire_at) for e, k in self.inbound.items()),
                tuple((e, k.retire_at) for e, k in self.replaced.items()))

    # -- snapshot ----------------------------------------------------------------------------

    def save(self, link: str, role: Role, max_epoch: int, used_key_ids: list[str]
             ) -> Snapshot:
        """The state file: these keys, with what the machine adds."""
        o = self.outbound
        return Snapshot(
            link=link, role=role.value, max_epoch=max_epoch, peer_out=self.peer_out,
            outbound=None if o is None else OutboundRef(
                epoch=o.ref.epoch, spi_in=o.ref.spi_in, spi_out=o.ref.spi_out,
                suite=o.suite.name, activated_at=o.activated_at, switched=o.switched),
            inbound=_newest(self.inbound), old_outbound=_newest(self.replaced),
            used_key_ids=used_key_ids)

    def restore(self, snap: Snapshot) -> None:
        """Keys from a state file (a switch the restart cut short: see `switching`)."""
        self.peer_out = snap.peer_out
        if snap.outbound is not None:
            o = snap.outbound
            suite = Suite.parse(o.suite)
            if suite is None:
                raise CoreError(f"state names an unknown suite {o.suite!r}")
            self.outbound = CurrentKey(EpochRef(self.link, o.epoch, o.spi_in, o.spi_out),
                                       suite, o.activated_at, o.switched)
        for p in snap.inbound:
            self.inbound[p.epoch] = _installed(self.link, p)
        for p in snap.old_outbound:
            self.replaced[p.epoch] = _installed(self.link, p)

    @property
    def switching(self) -> bool:
        """A switch of the outbound key is not known to have finished."""
        return self.outbound is not None and not self.outbound.switched


def _newest(ring: dict[int, InstalledKey]) -> list[PendingRef]:
    """What a state file lists of RING: the newest MAX_PENDING epochs. A sink that refuses
    to retire keys for long (and every install, each leaving a key to clean up) leaves more;
    after a restart the oldest are left to the data plane's own lifetimes."""
    return [_pending(ring[e]) for e in sorted(ring)[-MAX_PENDING:]]


def _pending(k: InstalledKey) -> PendingRef:
    return PendingRef(epoch=k.ref.epoch, spi_in=k.ref.spi_in, spi_out=k.ref.spi_out,
                      retire_at=k.retire_at)


def _installed(link: str, p: PendingRef) -> InstalledKey:
    return InstalledKey(EpochRef(link, p.epoch, p.spi_in, p.spi_out), p.retire_at)
