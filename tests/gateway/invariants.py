"""The safety invariants of a link's two rekey cores, stated once.

Two worlds run two real `LinkMachine`s: the property tests' World (world.py: timed, random
faults) and the explorer (explore.py: every interleaving up to a bound). Both carry out the
cores' data-plane actions on a `DataPlane` per side with the methods here, keep a `Ledger`
of what the rules must remember, and call `check` after every step. The rules
(docs/protocol.md, "One epoch"), judged on what the data planes hold, not on the cores'
own view:

1. whoever sends on epoch e finds e installed at the peer, with the same key;
2. a side that is not blocked has a valid outbound key: one of its epochs' keys, and past
   that key's hard lifetime without a fresh key the side is blocked;
3. the two sides' keys for the same epoch are equal, and epochs never share a key;
4. a QKD key ID belongs to one epoch at most;
5. epoch numbers only grow: each data plane switches to ever newer epochs, and the
   initiator never offers a number again once it has offered a later one (an abandoned
   number is never reused; a retransmission repeats the same Offer);
6. an inbound key is retired only once the peer's data plane stopped sending on it, and
   a grace period later (for packets in flight);
7. the transition table holds: the worlds run the machines with `check_transitions`, so a
   move outside its row raises TransitionError.

Two things look like breaches and are not: a Block the sink refused, or is still carrying
out, leaves traffic on the old key (the peer may retire it: traffic is lost, not sent in
clear; after a refusal the core alarms and blocks again), and a key whose switch to a newer
one, or whose block, the sink is still carrying out is not held to its hard lifetime (the
core asked in time).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from gateway.core.policy import Policy


@dataclass
class DataPlane:
    """What a sink holds for one side of the link (kernel SAs, TLS PSKs), and when it
    stopped or was asked to send on each epoch: what the rules need to judge it."""

    name: str  # "I" or "R"
    inbound: dict[int, bytes] = field(default_factory=dict)  # epoch -> inbound ESP key
    outbound: int | None = None
    outbound_key: bytes = b""
    blocked: bool = True
    #: A Block the sink refused: traffic goes on as before until the machine blocks again.
    block_refused: bool = False
    #: A Block the core asked for and the sink has not carried out yet.
    blocking: bool = False
    sent_on: list[int] = field(default_factory=list)  # epochs activated, in order
    #: epoch -> when the core asked this plane to send on it (its hard lifetime runs from
    #: then, as the core's does)
    asked: dict[int, float] = field(default_factory=dict)
    #: epoch -> when this plane stopped sending on it (rule 6 counts the grace from then)
    left: dict[int, float] = field(default_factory=dict)

    def copy(self) -> DataPlane:
        """For a world that keeps states apart (the explorer): a plane to change."""
        return replace(self, inbound=dict(self.inbound), sent_on=list(self.sent_on),
                       asked=dict(self.asked), left=dict(self.left))

    @property
    def sending(self) -> int | None:
        """The epoch whose key the data plane sends on, if it sends at all."""
        return None if self.blocked else self.outbound

    @property
    def stopping(self) -> bool:
        """The core asked this plane to stop sending (a Block), and it has not yet."""
        return self.block_refused or self.blocking

    def ask(self, epoch: int, now: float) -> None:
        """The core asked the sink to send on EPOCH (ActivateOutbound)."""
        self.asked.setdefault(epoch, now)

    def install(self, epoch: int, key: bytes) -> None:
        self.inbound[epoch] = key

    def activate(self, epoch: int, key: bytes, now: float) -> list[str]:
        """The sink switched to EPOCH's key; rule 5: only ever to a newer epoch."""
        bad = [] if not self.sent_on or epoch > self.sent_on[-1] else \
            [f"{self.name} activated epoch {epoch} after {self.sent_on[-1]}"]
        self._leave(now)
        self.outbound, self.outbound_key = epoch, key
        self.blocked = self.block_refused = False
        self.sent_on.append(epoch)
        return bad

    def ask_block(self, now: float) -> None:
        """The core asked the sink to block (for a sink that takes its time): what it sends
        from now on is lost, not owed a grace."""
        self._leave(now)
        self.blocking = True

    def block(self, now: float) -> None:
        self._leave(now)
        self.blocked, self.outbound = True, None
        self.block_refused = self.blocking = False

    def refuse_block(self) -> None:
        """The sink refused to block: the data plane goes on as it was."""
        self.block_refused, self.blocking = True, False

    def retire_outbound(self, epoch: int, now: float) -> list[str]:
        """The key this side sent on for EPOCH leaves the data plane."""
        if self.sending != epoch:
            return []
        if self.block_refused:  # removing the key stops the traffic
            self.block(now)
            return []
        return [f"{self.name} retired the key it sends on"]

    def _leave(self, now: float) -> None:
        # Once a block was asked for, traffic is lost, not sent in clear: no grace is owed
        # to it.
        if self.sending is not None and not self.stopping:
            self.left[self.sending] = now

    def pruned(self, now: float, grace: float) -> DataPlane:
        """The same plane without what no rule can ask any more (the explorer's states
        then compare equal): when it left an epoch more than GRACE ago, when it was asked
        to send on an epoch it no longer sends on, or never will (rule 5)."""
        newest = self.sent_on[-1] if self.sent_on else 0
        left = {e: t for e, t in self.left.items() if now < t + grace}
        asked = {e: t for e, t in self.asked.items() if e > newest or e == self.sending}
        if left == self.left and asked == self.asked:
            return self
        return replace(self.copy(), left=left, asked=asked)


def retire_inbound(plane: DataPlane, peer: DataPlane, epoch: int, now: float, grace: float
                   ) -> list[str]:
    """PLANE's inbound key for EPOCH leaves the data plane; rule 6."""
    bad = []
    if peer.sending == epoch and not peer.stopping:
        bad.append(f"{plane.name} retired its inbound key of epoch {epoch}, which"
                   f" {peer.name} still sends on")
    elif epoch in peer.left and now < peer.left[epoch] + grace:
        bad.append(f"{plane.name} retired its inbound key of epoch {epoch}"
                   f" {now - peer.left[epoch]:g} s after {peer.name} stopped sending on it"
                   f" (grace {grace:g} s)")
    plane.inbound.pop(epoch, None)
    return bad


@dataclass
class Ledger:
    """What the rules remember across steps and restarts."""

    #: epoch -> its initiator-to-responder key, as first installed or activated (rule 3)
    keys: dict[int, bytes] = field(default_factory=dict)
    #: epoch -> its QKD key IDs (rule 4)
    key_ids: dict[int, tuple[str, ...]] = field(default_factory=dict)
    #: The initiator's newest Offer (epoch, nonce), since it last lost its state (rule 5).
    offered: tuple[int, bytes] = (0, b"")

    def copy(self) -> Ledger:
        return replace(self, keys=dict(self.keys), key_ids=dict(self.key_ids))

    def note_keys(self, epoch: int, key_ids: tuple[str, ...], key: bytes | None) -> list[str]:
        """A data plane took EPOCH's keys for the QKD keys KEY_IDS; KEY: the
        initiator-to-responder one (I's outbound, R's inbound), else None; rules 3 and 4."""
        bad = []
        if key is not None:
            known = self.keys.setdefault(epoch, key)
            if known != key:
                bad.append(f"epoch {epoch}: the two sides hold different keys")
            elif list(self.keys.values()).count(key) > 1:
                bad.append("two epochs share a key")
        ids = self.key_ids.setdefault(epoch, key_ids)
        if ids != key_ids:
            bad.append(f"epoch {epoch}: key IDs differ between the sides")
        elif any(k in other for e, other in self.key_ids.items() if e != epoch
                 for k in key_ids):
            bad.append("a QKD key ID was used in two epochs")
        return bad

    def offer(self, epoch: int, nonce: bytes) -> list[str]:
        """The initiator sends an Offer; rule 5."""
        last, last_nonce = self.offered
        if epoch > last:
            self.offered = (epoch, nonce)
            return []
        if (epoch, nonce) == (last, last_nonce):
            return []  # a retransmission
        return [f"I made a new Offer for epoch {epoch}, having offered up to epoch {last}"]

    def state_lost(self) -> None:
        """The initiator restarted without its state file: it counts from 0 again, and the
        responder's stale-epoch Abort lifts it above its old numbers."""
        self.offered = (0, b"")


def check(i: DataPlane, r: DataPlane, now: float, policy_i: Policy, policy_r: Policy,
          busy_i: bool = False, busy_r: bool = False) -> list[str]:
    """Rules 1 and 2 in the state after a step. BUSY: the side's sink is still switching
    to a newer key or blocking."""
    bad = []
    for plane, peer, policy, busy in ((i, r, policy_i, busy_i), (r, i, policy_r, busy_r)):
        if not plane.blocked and plane.outbound is None:
            bad.append(f"{plane.name}: traffic neither keyed nor blocked")
        e = plane.sending
        if e is None or plane.stopping:
            continue
        peer_in = peer.inbound.get(e)
        if peer_in is None:
            bad.append(f"{plane.name} sends on epoch {e}, which {peer.name} has not"
                       " installed")
        elif peer_in != plane.outbound_key:
            bad.append(f"epoch {e}: {plane.name}'s outbound key is not {peer.name}'s"
                       " inbound key")
        since = plane.asked.get(e)
        if since is not None and now > since + policy.hard_lifetime and not busy:
            bad.append(f"{plane.name} still sends on epoch {e}, {now - since:g} s after it"
                       f" switched to it (hard lifetime {policy.hard_lifetime:g} s)")
    return bad
