"""A small world for the rekey core: two gateways, a network, a KMS, data planes and a clock.

    initiator ──(network: drop, duplicate, reorder, delay)── responder
        │                                                        │
    KMS (enc_keys) ════════════ pool of QKD keys ══════════ KMS (dec_keys by ID)
        │                                                        │
    data plane model                                     data plane model

Everything the machines ask for is carried out here, possibly late or not at all, as the
faults say. The data plane models record what a kernel or TLS stack would hold: installed
inbound keys, the active outbound key, whether traffic is blocked. The invariants
(tests/gateway/invariants.py, shared with the explorer) are checked against those, not
against the machines' own view.
"""

from __future__ import annotations

import hashlib
import random
import secrets
import uuid
from dataclasses import dataclass, field
from typing import Any

from common.sink import Role
from gateway.core.events import (
    Action,
    ActivateFailed,
    ActivateOutbound,
    Block,
    BlockFailed,
    ClearAlarm,
    Event,
    FetchQkdKeys,
    FetchQkdKeysById,
    InstallFailed,
    InstallInbound,
    KmsStatusObserved,
    LinkUnknownAtPeer,
    Persist,
    QkdFetchFailed,
    QkdKeysFetched,
    RaiseAlarm,
    Record,
    RequestStart,
    RetireFailed,
    RetireInbound,
    RetireOutbound,
    Send,
    SinkActivated,
    SinkInstalled,
    StartGranted,
    Tick,
    received,
)
from gateway.core.machine import LinkIdentity, LinkMachine, PeerMessageRejected, State
from gateway.core.messages import Message, Offer, decode, encode
from gateway.core.policy import Mode, Policy
from gateway.core.snapshot import Snapshot
from kms.models import QkdKey
from tests.gateway import invariants
from tests.gateway.invariants import DataPlane, Ledger

CERT_I = hashlib.sha256(b"gw-a certificate").digest()
CERT_R = hashlib.sha256(b"gw-b certificate").digest()

FAST = Policy(interval=10.0, jitter=0.1, hard_lifetime=60.0, grace=1.0, retransmit=0.5,
              retransmit_max=2.0, attempt_timeout=6.0, retry_backoff=1.0,
              retry_backoff_max=8.0)


class Kms:
    """One pool of QKD keys shared by the two KMEs; delivered once, by ID, to the slave."""

    def __init__(self) -> None:
        self.available = True
        self.reserved: dict[str, bytes] = {}
        self.issued: set[str] = set()

    def enc_keys(self, number: int, size: int) -> tuple[QkdKey, ...]:
        if not self.available:
            raise RuntimeError("KME unavailable")
        keys = tuple(QkdKey(str(uuid.uuid4()), secrets.token_bytes(size // 8))
                     for _ in range(number))
        for k in keys:
            self.reserved[k.key_id] = k.material
            self.issued.add(k.key_id)
        return keys

    def dec_keys(self, ids: tuple[str, ...]) -> tuple[QkdKey, ...]:
        if not self.available:
            raise RuntimeError("KME unavailable")
        if any(i not in self.reserved for i in ids):
            raise RuntimeError("one or more keys specified are not found on KME")
        return tuple(QkdKey(i, self.reserved.pop(i)) for i in ids)


def identity(role: Role) -> LinkIdentity:
    """The link "ab" between gw-a (initiator, SAE sae-a) and gw-b (responder, sae-b)."""
    initiator = role is Role.INITIATOR
    return LinkIdentity(
        link="ab", role=role,
        gateway="gw-a" if initiator else "gw-b", cert_sha256=CERT_I if initiator else CERT_R,
        sae_id="sae-a" if initiator else "sae-b", peer_gateway="gw-b" if initiator else "gw-a",
        peer_sae_id="sae-b" if initiator else "sae-a")


@dataclass(order=True)
class Pending:
    at: float
    seq: int
    side: str = field(compare=False)
    what: Any = field(compare=False)
    #: The process (machine) that asked, for KMS and sink answers: they die with it.
    generation: int | None = field(default=None, compare=False)


class Side:
    def __init__(self, world: World, role: Role, policy: Policy) -> None:
        self.world = world
        self.role = role
        self.policy = policy
        self.name = "I" if role is Role.INITIATOR else "R"
        self.plane = DataPlane(self.name)
        self.snapshot: Snapshot | None = None
        self.alarms: set[str] = set()
        self.records: list[Record] = []
        self.rejected: list[str] = []
        self.last_status: KmsStatusObserved | None = None
        self.generation = 0
        #: The daemon calls its sinks one at a time, in order: answers never overtake.
        self.sink_free_at = 0.0
        self.machine = self._new_machine()

    def _new_machine(self) -> LinkMachine:
        rng = random.Random(self.world.rng.random())  # noqa: S311 (seeded: the world replays)
        return LinkMachine(identity(self.role), self.policy, now=self.world.now,
                           snapshot=self.snapshot,
                           rng=rng.randbytes,
                           check_transitions=True,  # every move held to its table row
                           admission=self.world.admission is not None)

    @property
    def peer(self) -> Side:
        return self.world.r if self is self.world.i else self.world.i

    def restart(self) -> None:
        """The daemon restarts: the machine comes back from its last snapshot; the data plane
        (kernel SAs, PSK files) is untouched; the daemon polls its KME's status first."""
        self.generation += 1  # answers to the old process's requests go nowhere
        if self.snapshot is None and self.role is Role.INITIATOR:
            self.world.ledger.state_lost()
        self.machine = self._new_machine()
        self.world.execute(self, self.machine.start(self.world.now))
        if self.last_status is not None:
            self.feed(self.last_status)

    def feed(self, event: Event) -> None:
        m = self.machine
        before = m.state
        row = m.table.get((before, type(event))) or m.table.get((None, type(event)))
        try:
            actions = m.handle(event, self.world.now)
        except PeerMessageRejected as e:
            self.rejected.append(e.reason)
            return
        if row is not None and m.state is not before:
            self.world.moves.add((before, m.state, row.event, row.state))
        self.world.execute(self, actions)


class World:
    def __init__(self, seed: int = 0, policy_i: Policy = FAST, policy_r: Policy = FAST,
                 admission: float | None = None) -> None:
        """ADMISSION: the machines ask for a turn before starting an exchange (the daemon's
        pacing), granted after up to this many seconds; None: they start at once."""
        self.rng = random.Random(seed)  # noqa: S311 (a seeded simulation, replayable)
        self.admission = admission
        self.now = 1000.0
        self.kms = Kms()
        self.queue: list[Pending] = []
        self._seq = 0
        # faults
        self.loss = 0.0
        self.duplicate = 0.0
        self.max_delay = 0.01
        self.kms_delay = 0.0
        self.sink_delay = 0.0
        #: Sink calls that fail: "install", "activate", "retire", "block".
        self.sink_fails: frozenset[str] = frozenset()
        #: Sides ("I", "R") whose gateway does not have the link (yet): they send nothing
        #: for it, and the channel answers what is sent to them with LinkUnknownAtPeer.
        self.without_link: set[str] = set()
        # history for the invariants
        self.ledger = Ledger()
        self.violations: list[str] = []
        #: State changes seen: (from, to, event, the row's state or None for any-state rows).
        self.moves: set[tuple[State, State, type[Event], State | None]] = set()
        self.i = Side(self, Role.INITIATOR, policy_i)
        self.r = Side(self, Role.RESPONDER, policy_r)
        for side in (self.i, self.r):
            self.execute(side, side.machine.start(self.now))

    # -- carrying out actions ----------------------------------------------------------------

    def later(self, delay: float, side: Side, what: Any, *, local: bool = False) -> None:
        """Deliver WHAT to SIDE after DELAY; LOCAL answers (KMS, sinks) only to the same
        process that asked."""
        self._seq += 1
        self.queue.append(Pending(self.now + delay, self._seq, side.name, what,
                                  side.generation if local else None))

    def _sink(self, side: Side, what: Any) -> None:
        """A sink call's answer, after the calls before it (the daemon awaits each)."""
        at = max(self.now + self.sink_delay, side.sink_free_at)
        side.sink_free_at = at
        self.later(at - self.now, side, what, local=True)

    def execute(self, side: Side, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Send):
                self._send(side, a.message)
            elif isinstance(a, FetchQkdKeys | FetchQkdKeysById):
                self.later(self.kms_delay, side, a, local=True)
            elif isinstance(a, InstallInbound):  # done when the sink is
                self._sink(side, a)
            elif isinstance(a, ActivateOutbound):
                side.plane.ask(a.material.epoch, self.now)
                self._sink(side, a)
            elif isinstance(a, RetireInbound | RetireOutbound):
                out = isinstance(a, RetireOutbound)
                if "retire" in self.sink_fails:  # the key stays in the data plane
                    self._sink(side, RetireFailed(a.ref, out, "refused"))
                elif out:
                    self.violations += side.plane.retire_outbound(a.ref.epoch, self.now)
                else:
                    self.violations += invariants.retire_inbound(
                        side.plane, side.peer.plane, a.ref.epoch, self.now, side.policy.grace)
            elif isinstance(a, Block):
                if "block" in self.sink_fails:  # the data plane goes on as it was
                    side.plane.refuse_block()
                    self._sink(side, BlockFailed("refused"))
                else:
                    side.plane.block(self.now)
            elif isinstance(a, RequestStart):  # other links may have their turns first
                self.later(self.rng.uniform(0, self.admission or 0.0), side, StartGranted(),
                           local=True)
            elif isinstance(a, Persist):
                side.snapshot = side.machine.snapshot()
            elif isinstance(a, RaiseAlarm):
                side.alarms.add(a.alarm.value)
            elif isinstance(a, ClearAlarm):
                side.alarms.discard(a.alarm.value)
            elif isinstance(a, Record):
                side.records.append(a)

    def _note_keys(self, side: Side, epoch: int, key: bytes, key_ids: tuple[str, ...],
                   inbound: bool) -> None:
        # I's outbound key and R's inbound key are the same key (I→R), and vice versa; the
        # ledger keeps the I→R key: I outbound or R inbound.
        i_to_r = (side is self.i) != inbound
        self.violations += self.ledger.note_keys(epoch, key_ids, key if i_to_r else None)

    @property
    def epoch_keys(self) -> dict[int, bytes]:
        return self.ledger.keys

    def _send(self, side: Side, message: Message) -> None:
        if side.name in self.without_link:
            return
        if side.peer.name in self.without_link:
            self.later(self.rng.uniform(0, self.max_delay), side,
                       LinkUnknownAtPeer(f"peer has no link {message.link}"))
            return
        if isinstance(message, Offer):
            self.violations += self.ledger.offer(message.epoch, message.nonce)
        raw = encode(message)
        if self.rng.random() < self.loss:
            return
        copies = 2 if self.rng.random() < self.duplicate else 1
        for _ in range(copies):
            self.later(self.rng.uniform(0, self.max_delay), side.peer, raw)

    # -- time ------------------------------------------------------------------------------

    def _next(self) -> tuple[float, Any] | None:
        deadlines = [(d, s) for s in (self.i, self.r)
                     if (d := s.machine.next_deadline()) is not None]
        next_timer = min(deadlines, key=lambda x: x[0]) if deadlines else None
        next_item = min(self.queue) if self.queue else None
        if next_item is not None and (next_timer is None or next_item.at <= next_timer[0]):
            return next_item.at, next_item
        return next_timer

    def step(self, until: float = float("inf")) -> bool:
        """Run the next thing due before UNTIL: a delivery, a KMS or sink answer, a timer."""
        nxt = self._next()
        if nxt is None or nxt[0] > until:
            return False
        at, what = nxt
        self.now = max(self.now, at)
        if isinstance(what, Pending):
            self.queue.remove(what)
            side = self.i if what.side == "I" else self.r
            if what.generation is None or what.generation == side.generation:
                self._deliver(side, what.what)
        else:
            what.feed(Tick())
        self.check()
        return True

    def run_for(self, seconds: float) -> None:
        end = self.now + seconds
        while self.step(until=end):
            pass
        self.now = max(self.now, end)

    def step_until(self, side: Side, state: State, within: float) -> None:
        """Step until SIDE's machine is in STATE; fail if nothing is left to run within
        WITHIN seconds of simulated time (each step)."""
        while side.machine.state is not state:
            assert self.step(until=self.now + within), f"{side.name} never reached {state}"

    def settle(self, limit: float) -> bool:
        """Run until both sides send on the same epoch (an exchange in flight lands), at most
        LIMIT seconds."""
        end = self.now + limit
        while not self.converged() and self.step(until=end):
            pass
        return self.converged()

    def _deliver(self, side: Side, what: Any) -> None:
        if isinstance(what, bytes):
            side.feed(received(decode(what), CERT_I if side is self.r else CERT_R))
        elif isinstance(what, FetchQkdKeys):
            try:
                keys = self.kms.enc_keys(what.number, what.size)
            except RuntimeError as e:
                side.feed(QkdFetchFailed(what.request, str(e)))
            else:
                side.feed(QkdKeysFetched(what.request, keys))
        elif isinstance(what, FetchQkdKeysById):
            try:
                keys = self.kms.dec_keys(what.key_ids)
            except RuntimeError as e:
                side.feed(QkdFetchFailed(what.request, str(e)))
            else:
                side.feed(QkdKeysFetched(what.request, keys))
        elif isinstance(what, InstallInbound):
            m = what.material
            if "install" in self.sink_fails:
                side.feed(InstallFailed(m.epoch, "the data plane refused the key"))
                return
            side.plane.install(m.epoch, m.inbound_esp)
            self._note_keys(side, m.epoch, m.inbound_esp, m.key_ids, inbound=True)
            side.feed(SinkInstalled(m.epoch))
        elif isinstance(what, ActivateOutbound):
            m = what.material
            if "activate" in self.sink_fails:  # it still sends on what it had
                side.feed(ActivateFailed(m.epoch, "the data plane refused the switch"))
                return
            self.violations += side.plane.activate(m.epoch, m.outbound_esp, self.now)
            self._note_keys(side, m.epoch, m.outbound_esp, m.key_ids, inbound=False)
            side.feed(SinkActivated(m.epoch))
        else:
            side.feed(what)

    def kms_status(self, *, ok: bool = True, qber: float = 0.02) -> None:
        for side, (me, peer) in ((self.i, ("kme-a", "kme-b")), (self.r, ("kme-b", "kme-a"))):
            side.last_status = KmsStatusObserved(
                stored_key_count=1000, key_size=256, kme_id=me, peer_kme_id=peer, qber=qber,
                key_rate=50_000.0, link_up=ok)
            side.feed(side.last_status)

    # -- invariants -------------------------------------------------------------------------

    def check(self) -> None:
        self.violations += invariants.check(self.i.plane, self.r.plane, self.now,
                                            self.i.policy, self.r.policy,
                                            self._switching(self.i), self._switching(self.r))

    def _switching(self, side: Side) -> bool:
        """SIDE's sink is still switching to a newer key."""
        return any(p.side == side.name and p.generation == side.generation
                   and isinstance(p.what, ActivateOutbound)
                   and p.what.material.epoch != side.plane.outbound for p in self.queue)

    def converged(self) -> bool:
        i, r = self.i.plane, self.r.plane
        return (i.outbound is not None and i.outbound == r.outbound and not i.blocked
                and not r.blocked)


def policy(**kw: Any) -> Policy:
    from dataclasses import replace

    return replace(FAST, **kw)


__all__ = ["FAST", "Mode", "World", "policy"]
