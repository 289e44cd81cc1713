"""The rekey core of one link: its state, the driver's interface, and the steps both roles
share (installing and activating an epoch's keys, giving up an exchange, timers, alarms,
persistence). The protocol's handlers are in initiator.py and responder.py; machine.py puts
them together with the transition table.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from common.sink import EpochMaterial, EpochRef, Role
from gateway.core.events import (
    Action,
    ActivateOutbound,
    Alarm,
    Block,
    Cause,
    ClearAlarm,
    Event,
    InstallInbound,
    LinkUnknownAtPeer,
    PeerMessage,
    Persist,
    RaiseAlarm,
    Record,
    RecordKind,
    RequestStart,
    RetireOutbound,
    Send,
    StartGranted,
    Tick,
)
from gateway.core.keyring import CurrentKey, KeyRing
from gateway.core.kmsview import KmsView, Supply
from gateway.core.messages import (
    Abort,
    AbortReason,
    Accept,
    Commit,
    Offer,
    RekeyReason,
    RekeyRequest,
    Suite,
)
from gateway.core.policy import Policy
from gateway.core.qkdkeys import KeysAhead, UsedKeyIds
from gateway.core.snapshot import Snapshot
from gateway.core.table import (
    CoreError,
    IllegalEvent,
    PeerMessageRejected,
    State,
    Transition,
    need,
)
from kdf import (
    Kem,
    KemPrivateKey,
    Party,
    Transcript,
    X25519PrivateKey,
    kem_by_name,
)
from kms.models import QkdKey

#: Consecutive failed exchanges before the peer-unreachable alarm.
FAILURES_BEFORE_ALARM = 3


@dataclass(frozen=True)
class LinkIdentity:
    link: str
    role: Role
    gateway: str  # this gateway's peer-channel certificate commonName
    cert_sha256: bytes  # SHA-256 of that certificate (DER)
    sae_id: str
    peer_gateway: str
    peer_sae_id: str
    kem: str = "ML-KEM-768"


@dataclass
class Attempt:
    """The exchange in progress."""

    epoch: int
    started: float
    request: int | None = None
    #: Its QKD keys were fetched ahead, and announced in the Commit of this epoch.
    announced_in: int | None = None
    qkd_keys: tuple[QkdKey, ...] = ()
    key_ids: tuple[str, ...] = ()
    # initiator
    dk: KemPrivateKey | None = field(default=None, repr=False)
    x25519: X25519PrivateKey | None = field(default=None, repr=False)
    offer: Offer | None = None
    # responder
    peer_cert: bytes = b""
    accept: Accept | None = None
    # both
    transcript: Transcript | None = None
    material: EpochMaterial | None = None
    commit: Commit | None = None
    next_send: float | None = None
    send_interval: float = 0.0
    #: I: the peer said it has no such link. The Offer is retransmitted but never given up
    #: on a timer: no epoch number (nor QKD key) is spent until the peer can take it.
    held: bool = False
    #: When the peer was heard again after a hold: attempt_timeout counts from then.
    resumed: float | None = None

    def give_up_at(self, timeout: float) -> float | None:
        """When the exchange is given up without an answer (None while held)."""
        if self.held:
            return None
        return (self.started if self.resumed is None else self.resumed) + timeout


class LinkCore(ABC):
    #: (state or None for any, event type) -> its row of the transition table (machine.py).
    table: ClassVar[dict[tuple[State | None, type[Event]], Transition[Any]]] = {}

    def __init__(
        self,
        identity: LinkIdentity,
        policy: Policy,
        *,
        now: float,
        snapshot: Snapshot | None = None,
        rng: Callable[[int], bytes] = os.urandom,
        kem: Kem | None = None,
        check_transitions: bool = False,
        admission: bool = False,
    ) -> None:
        """ADMISSION: the initiator asks the driver for a turn (RequestStart) before it
        starts an exchange of its own accord, and starts on StartGranted (the daemon paces
        restart storms this way); without it, it starts at once."""
        self.identity = identity
        self.policy = policy
        self.kem = kem or kem_by_name(identity.kem)
        self.check_transitions = check_transitions
        self.admission = admission
        #: Why the initiator waits for its turn (RequestStart sent, no StartGranted yet).
        self.queued: str | None = None
        self._rng = rng
        self.state = State.IDLE
        self.max_epoch = 0  # the highest epoch number used or seen, never reused
        self.keys = KeyRing(identity.link, policy)
        self.used = UsedKeyIds()
        self.next_keys = KeysAhead()
        self.kms = KmsView(key_bits=policy.qkd_key_bits)
        self.attempt: Attempt | None = None
        self.alarms: dict[Alarm, str] = {}
        self.next_rekey_at: float | None = None
        self.next_nudge_at: float | None = None
        self.reblock_at: float | None = None  # a block failed: try again then
        self.failures = 0
        self.backoff = policy.retry_backoff
        self.consumed = 0  # QKD keys fetched by this link, for the supply estimate
        self.rekeys = 0
        self._request = 0
        self._restored = snapshot is not None
        self._persisted: tuple[Any, ...] | None = None
        if snapshot is not None:
            self._restore(snapshot)
            self._persisted = self._state_key()

    # -- the driver's interface ------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self.identity.role

    @property
    def outbound(self) -> CurrentKey | None:
        return self.keys.outbound

    @property
    def blocked(self) -> bool:
        return self.keys.blocked

    @property
    def ahead(self) -> tuple[QkdKey, ...]:
        """The QKD keys held for the next epoch."""
        return self.next_keys.keys

    @property
    def current_epoch(self) -> int:
        return self.keys.out_epoch

    def start(self, now: float, *, plane_blocked: bool = False) -> list[Action]:
        """First actions: block until a key exists, and get an epoch going.

        PLANE_BLOCKED: the driver has blocked the data plane (a link restarted after a
        failure): the snapshot's outbound key is no longer in use and is retired. So it is
        if the data plane was still switching keys when the state was saved: what it sends
        on is unknown, so it is blocked until the next epoch (fail closed)."""
        switching = self.keys.switching
        retire = self.keys.unplug(now) if plane_blocked or switching else []
        out: list[Action] = []
        if self.keys.blocked:  # blocked before any key leaves the data plane
            out.append(Block("restarted while switching keys: what the data plane sends on"
                             " is unknown" if switching else "no key yet"))
        out += retire
        if self.role is Role.INITIATOR:
            self.next_rekey_at = now  # a fresh key now: keys are never kept across restarts
        else:
            out.append(Send(RekeyRequest(link=self.identity.link, epoch=self.max_epoch,
                                         out=self.keys.out_epoch, reason=RekeyReason.RESTART)))
            self.next_nudge_at = now + self.policy.retransmit_max
        return out + self._persist()

    def reconfigure(self, policy: Policy, now: float) -> list[Action]:
        """Take a new policy (`qkdgw reload`) without disturbing the current key: it, the
        exchange in progress and the time already set for the next rekey stay; each new value
        applies from the next decision that reads it (the interval from the next scheduling,
        the hard lifetime from the next check of the current key). QKD keys of the old
        `qkd_key_bits` can no longer be used: those held ahead are discarded, and an exchange
        still waiting for its keys is given up (the next one fetches at the new size)."""
        resized = policy.qkd_key_bits != self.policy.qkd_key_bits
        self.policy = policy
        self.keys.policy = policy
        if not resized:
            return []
        why = f"qkd_key_bits changed to {policy.qkd_key_bits}"
        self.next_keys.given_up()  # a fetch in flight: its keys come stale, and are discarded
        out = self.next_keys.drop(self.used, why)
        if self.state is State.FETCHING:
            out += self._give_up(now, why, Cause.DROPPED)
        return out + self._persist()

    def handle(self, event: Event, now: float) -> list[Action]:
        t = self.table.get((self.state, type(event))) or self.table.get((None, type(event)))
        if t is None:
            raise IllegalEvent(f"{type(event).__name__} in state {self.state}")
        before = self.state
        out = t.handler(self, event, now)
        if self.check_transitions:
            t.check(before, self.state)
        if isinstance(event, PeerMessage):
            out += self._peer_has_link(now)
        return out + self._persist()

    def next_deadline(self) -> float | None:
        # While waiting for its turn the rekey is due already: the turn starts it.
        times = [None if self.queued else self.next_rekey_at, self.next_nudge_at,
                 self.reblock_at, *self.keys.deadlines()]
        if self.attempt is not None:
            times.append(self.attempt.next_send)
            if self.state is not State.ACTIVATING:  # (see _tick)
                times.append(self.attempt.give_up_at(self.policy.attempt_timeout))
        due = [t for t in times if t is not None]
        return min(due) if due else None

    def snapshot(self) -> Snapshot:
        """State that survives a restart. No key material: keys are never stored."""
        return self.keys.save(self.identity.link, self.role, self.max_epoch,
                              self.used.recent())

    # -- steps both roles take --------------------------------------------------------------

    @abstractmethod
    def _start_exchange(self, now: float, reason: str) -> list[Action]:
        """I: begin an epoch (a timer or a request says so)."""

    def _begin(self, now: float, reason: str) -> list[Action]:
        """I, idle: start an exchange of its own accord (its schedule, the operator, the
        peer's request); with admission, ask the driver for a turn first."""
        if not self.admission:
            return self._start_exchange(now, reason)
        if self.queued is not None:
            return []  # already waiting: the turn starts it
        self.queued, self.next_rekey_at = reason, None
        o = self.keys.outbound
        return [RequestStart(now if o is None else o.activated_at + self.policy.hard_lifetime)]

    def _granted(self, event: StartGranted, now: float) -> list[Action]:
        """The driver's turn came: start the exchange waited for (if still idle and
        waiting; otherwise the driver takes its turn back, seeing the link idle)."""
        if self.queued is None or self.state is not State.IDLE:
            return []
        reason, self.queued = self.queued, None
        return self._start_exchange(now, reason)

    def _abort_msg(self, offer: Offer, reason: AbortReason) -> Abort:
        return Abort(link=offer.link, epoch=offer.epoch, out=self.keys.out_epoch,
                     nonce_i=offer.nonce, reason=reason, current=self.max_epoch)

    def _install(self, material: EpochMaterial) -> list[Action]:
        self.keys.install(EpochRef(material.link, material.epoch, material.spi_in,
                                   material.spi_out))
        self.state = State.INSTALLING
        return [Record(RecordKind.DERIVED, material.epoch, material.key_ids, material.fingerprint,
                       detail=material.suite), InstallInbound(material)]

    def _activate(self, material: EpochMaterial, suite: Suite, now: float) -> list[Action]:
        """Switch this side's outbound key to the epoch's: the sinks answer SinkActivated
        (the exchange goes on) or ActivateFailed (the link is blocked)."""
        self.keys.activate(EpochRef(material.link, material.epoch, material.spi_in,
                                    material.spi_out), suite, now)
        self.state = State.ACTIVATING
        return [ActivateOutbound(material)]

    def _switched(self, material: EpochMaterial, now: float) -> list[Action]:
        """The data plane sends on the epoch's key now."""
        self.keys.switched(now)
        o = need(self.keys.outbound, "the key just activated")
        out: list[Action] = [Record(RecordKind.ACTIVATED, material.epoch, material.key_ids,
                                    material.fingerprint), *self._clear(Alarm.HARD_LIFETIME)]
        if o.suite.qkd:
            return out + self._clear(Alarm.QKD_FALLBACK)
        return out + self._alarm(Alarm.QKD_FALLBACK, f"epoch {material.epoch} has no QKD key")

    def _succeeded(self, now: float) -> list[Action]:
        self.attempt = None
        self.state = State.IDLE
        self.failures = 0
        self.backoff = self.policy.retry_backoff
        self.rekeys += 1
        out: list[Action] = []
        if self.role is Role.INITIATOR:
            out += self._schedule_rekey(now)
        for alarm in (Alarm.PEER_UNREACHABLE, Alarm.EXCHANGE_FAILED, Alarm.SINK_FAILED):
            out += self._clear(alarm)
        return out

    def _give_up(self, now: float, why: str, cause: Cause, *, failed: bool = False
                 ) -> list[Action]:
        """Abandon the exchange in progress. Installed inbound keys stay tracked: they are
        retired by the usual rule, never while the peer might still use them."""
        a = self.attempt
        self.attempt = None
        self.state = State.IDLE
        out: list[Action] = []
        if a is not None and a.epoch:
            out.append(Record(RecordKind.DISCARDED, a.epoch, a.key_ids, detail=why,
                              cause=cause))
        if self.role is Role.INITIATOR and self.next_rekey_at is None:
            self.next_rekey_at = now + self._next_backoff()
        if failed:
            self.failures += 1
        return out

    def _ignore(self, event: Event, now: float) -> list[Action]:
        return []

    # -- a link the peer does not have -------------------------------------------------------

    def _link_unknown(self, event: LinkUnknownAtPeer, now: float) -> list[Action]:
        """The peer has no such link (yet): alarm; an Offer waits for it rather than time
        out, which would spend an epoch number on every attempt the peer cannot receive."""
        a = self.attempt
        if self.role is Role.INITIATOR and self.state is State.OFFERED and a is not None:
            a.held = True
        return self._alarm(Alarm.PEER_LINK_UNKNOWN, event.detail)

    def _peer_has_link(self, now: float) -> list[Action]:
        """Any message of the peer for this link shows it has the link now."""
        a = self.attempt
        if a is not None and a.held:
            a.held, a.resumed = False, now
        return self._clear(Alarm.PEER_LINK_UNKNOWN)

    # -- timers ------------------------------------------------------------------------------

    def _tick(self, event: Tick, now: float) -> list[Action]:
        out = self.keys.retire_due(now)
        if self.reblock_at is not None and now >= self.reblock_at:
            self.reblock_at = None
            if self.keys.blocked:  # (a fresh key since makes it moot)
                out.append(Block("trying again: the last block failed"))
        o = self.keys.expired(now)
        if o is not None:
            out += [Block(f"epoch {o.ref.epoch} reached its hard lifetime"),
                    RetireOutbound(o.ref),
                    *self._alarm(Alarm.HARD_LIFETIME, f"no fresh key for link"
                                 f" {self.identity.link}: traffic blocked")]
        a = self.attempt
        give_up_at = None if a is None else a.give_up_at(self.policy.attempt_timeout)
        # While the data plane switches keys its answer decides, not a timer: given up now,
        # the next message's `out` would name a key the data plane may not send on yet, and
        # the peer would retire the one it still sends on.
        if a is not None and give_up_at is not None and now >= give_up_at \
                and self.state is not State.ACTIVATING:
            if self.state is State.COMMITTED:
                # Our outbound already moved; only the Ack is missing. Keep everything and
                # try a new epoch soon, which tells the peer where we are.
                self.attempt, self.state = None, State.IDLE
                self.next_rekey_at = now + self._next_backoff()
                out.append(Record(RecordKind.UNCONFIRMED, a.epoch, a.key_ids,
                                  detail="no Ack from the responder"))
            else:
                out += self._give_up(now, f"no answer within {self.policy.attempt_timeout} s"
                                     f" ({self.state})", Cause.TIMEOUT, failed=True)
            if self.failures >= FAILURES_BEFORE_ALARM:
                out += self._alarm(Alarm.PEER_UNREACHABLE, f"{self.failures} exchanges in a"
                                   f" row failed with {self.identity.peer_gateway}")
        elif a is not None and a.next_send is not None and now >= a.next_send:
            message = a.commit if self.state is State.COMMITTED else a.offer
            if message is not None:
                out.append(Send(message))
            a.send_interval = min(a.send_interval * 2, self.policy.retransmit_max)
            a.next_send = now + a.send_interval
        if self.role is Role.INITIATOR:
            if self.state is State.IDLE and self.next_rekey_at is not None \
                    and now >= self.next_rekey_at:
                out += self._begin(now, "scheduled")
        elif self.next_nudge_at is not None and now >= self.next_nudge_at:
            self.next_nudge_at = None
            if self.state is State.IDLE and self._needs_nudge(now):
                out += self._nudge(now, RekeyReason.RESTART if self._restored
                                   else RekeyReason.SOFT_LIMIT)
        if self.role is Role.RESPONDER and self.next_nudge_at is None:
            self.next_nudge_at = now + self.policy.retransmit_max
        return out

    def _needs_nudge(self, now: float) -> bool:
        """The responder asks for an epoch when it has none, or its key nears expiry."""
        o = self.keys.outbound
        return o is None or now >= o.activated_at + 0.75 * self.policy.hard_lifetime

    def _nudge(self, now: float, reason: RekeyReason) -> list[Action]:
        self.next_nudge_at = now + self.policy.retransmit_max
        return [Send(RekeyRequest(link=self.identity.link, epoch=self.max_epoch,
                                  out=self.keys.out_epoch, reason=reason))]

    def supply(self, now: float) -> Supply:
        """The link's part of its KME pair's QKD supply, for the status and metrics."""
        k = self.kms
        mine = self.role is Role.INITIATOR  # the initiator draws the keys (enc_keys)
        return Supply(share=k.share if mine else None, rationed=k.rationed,
                      qkd_cadence=k.cadence(self.policy.interval) if mine else None,
                      pool_dry_in=k.dry_in(now, self.policy.reserve_keys),
                      qkd_keys=self.consumed)

    def _schedule_rekey(self, now: float) -> list[Action]:
        unit = int.from_bytes(self._rng(4), "big") / 2**32
        interval, limited = self.policy.next_interval(
            share_wait=self.kms.until_credit(now) if self.kms.rationed else None, unit=unit)
        self.next_rekey_at = now + interval
        if limited:
            return self._alarm(Alarm.QKD_SUPPLY_LOW, f"next rekey in {interval:.0f} s, paced"
                               " to this link's share of the QKD key supply")
        return [] if self.kms.rationed else self._clear(Alarm.QKD_SUPPLY_LOW)

    def _share_short(self, then: str) -> list[Action]:
        """The alarm of a link whose share has not earned a QKD key when it needs one."""
        return self._alarm(Alarm.QKD_SUPPLY_LOW, f"the KME pool is at its reserve and this"
                           f" link's {self.kms.share:.0%} share of the supply has no QKD key"
                           f" yet: {then}")

    def _next_backoff(self) -> float:
        delay = self.backoff
        self.backoff = min(self.backoff * 2, self.policy.retry_backoff_max)
        return delay

    # -- helpers ------------------------------------------------------------------------------

    def _new_spi(self) -> int:
        taken = self.keys.spis_in()
        while True:
            spi = int.from_bytes(self._rng(4), "big")
            if spi >= 0x100 and spi not in taken:
                return spi

    def _check_link(self, link: str) -> None:
        if link != self.identity.link:
            raise PeerMessageRejected("wrong-link", f"message for link {link!r} on link"
                                      f" {self.identity.link!r}")

    def _transcript(self, o: Offer, *, initiator_cert: bytes, responder_cert: bytes, ct: bytes,
                    pk_r: bytes, nonce_r: bytes, spi_r: int) -> Transcript:
        me = self.identity
        i_name, i_sae, r_name, r_sae = (
            (me.gateway, me.sae_id, me.peer_gateway, me.peer_sae_id)
            if me.role is Role.INITIATOR else
            (me.peer_gateway, me.peer_sae_id, me.gateway, me.sae_id))
        return Transcript(
            suite=o.suite, link=o.link, epoch=o.epoch,
            initiator=Party(i_name, initiator_cert, i_sae, o.kme_i),
            responder=Party(r_name, responder_cert, r_sae, o.kme_r),
            key_ids=o.key_ids, nonce_i=o.nonce, nonce_r=nonce_r, spi_i=o.spi, spi_r=spi_r,
            ek_mlkem=o.ek, pk_x25519_i=o.pk, ct_mlkem=ct, pk_x25519_r=pk_r)

    def _alarm(self, alarm: Alarm, detail: str) -> list[Action]:
        if self.alarms.get(alarm) == detail:
            return []
        self.alarms[alarm] = detail
        return [RaiseAlarm(alarm, detail)]

    def _clear(self, alarm: Alarm) -> list[Action]:
        return [ClearAlarm(alarm)] if self.alarms.pop(alarm, None) is not None else []

    # -- persistence ---------------------------------------------------------------------------

    def _state_key(self) -> tuple[Any, ...]:
        """Changes whenever the snapshot would: cheaper to compare than the snapshot."""
        return (self.max_epoch, *self.keys.state_key(), self.used.last())

    def _persist(self) -> list[Action]:
        key = self._state_key()
        if key == self._persisted:
            return []
        self._persisted = key
        return [Persist()]

    def _restore(self, snap: Snapshot) -> None:
        if snap.link != self.identity.link or snap.role != self.role.value:
            raise CoreError(f"state of another link or role: {snap.link!r} {snap.role!r}")
        self.max_epoch = snap.max_epoch
        self.keys.restore(snap)
        self.used.add(snap.used_key_ids)
