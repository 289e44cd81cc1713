"""The rekey state machine of one link, without I/O (modelled on h11's `_connection.py`).

    machine = LinkMachine(identity, policy, now=t)
    actions = machine.start(t)
    actions = machine.handle(event, t)        # events in, actions out
    wake_at = machine.next_deadline()          # call handle(Tick(), ...) then

It never sleeps, reads a clock or touches a socket. Transitions are the data in
`TRANSITIONS` (docs/protocol.md draws them). An event the driver should not send in the
current state raises `IllegalEvent`; a peer message that must be refused raises
`PeerMessageRejected` with a reason. Both leave the machine exactly as it was: handlers check
everything before they change anything.

Make-before-break, as invariants the property tests check:
- a side activates an epoch's outbound key only once the peer has installed that epoch's
  inbound key (the initiator after a verified Accept, the responder after a verified Commit);
- an inbound key is retired only after the peer has moved its outbound past that epoch (or
  abandoned it, which an Offer for a later epoch implies), and a grace period later;
- with no valid outbound key (none yet, or past the hard lifetime) the link is blocked.
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from common.sink import EpochMaterial, EpochRef, Role
from gateway.core.events import (
    AbortReceived,
    AcceptReceived,
    AckReceived,
    Action,
    ActivateOutbound,
    Alarm,
    Block,
    ClearAlarm,
    CommitReceived,
    Event,
    FetchQkdKeys,
    FetchQkdKeysById,
    InstallInbound,
    KmsStatusObserved,
    KmsUnreachable,
    OfferReceived,
    Persist,
    QkdFetchFailed,
    QkdKeysFetched,
    RaiseAlarm,
    Record,
    RekeyRequested,
    RekeyRequestReceived,
    RetireInbound,
    RetireOutbound,
    Send,
    SinkFailed,
    SinkInstalled,
    Tick,
)
from gateway.core.messages import (
    MAX_EPOCH,
    Abort,
    AbortReason,
    Accept,
    Ack,
    Commit,
    Offer,
    RekeyReason,
    RekeyRequest,
)
from gateway.core.policy import Mode, Policy
from gateway.core.snapshot import USED_KEY_IDS_PERSISTED, OutboundRef, PendingRef, Snapshot
from kdf import (
    InvalidKeyError,
    Kem,
    KemPrivateKey,
    Party,
    Purpose,
    Transcript,
    X25519PrivateKey,
    derive_epoch,
    kem_by_name,
)
from kms.models import QkdKey

#: Key IDs remembered to refuse their reuse. A QKD key is used once; this many covers days of
#: rekeys at a one-minute cadence, and the KME refuses reuse as well.
USED_KEY_IDS_REMEMBERED = 4096
#: Consecutive failed exchanges before the peer-unreachable alarm.
FAILURES_BEFORE_ALARM = 3
#: How far back the QKD supply is estimated from the pool's trend, seconds.
SUPPLY_WINDOW = 300.0


class State(StrEnum):
    IDLE = "idle"  # no exchange in progress
    FETCHING = "fetching"  # QKD keys requested: enc_keys (I) or dec_keys (R)
    OFFERED = "offered"  # I: Offer sent, waiting for Accept
    INSTALLING = "installing"  # the epoch's inbound key is being installed
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


def suite_name(qkd: bool, kem: str) -> str:
    return f"{'qkd' if qkd else 'pqc'}+{kem}+X25519/CatKDF-SHA-384"


@dataclass
class Inbound:
    ref: EpochRef
    retire_at: float | None = None


@dataclass
class Outbound:
    ref: EpochRef
    suite: str
    activated_at: float


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


@dataclass
class KmsView:
    ok: bool = True  # from the status polls: reachable, link up, QBER below threshold
    reason: str = ""
    failed_until: float = 0.0  # a fetch failed: no QKD until then (then try again)
    stored: int | None = None
    key_rate: float | None = None
    kme_id: str = ""
    peer_kme_id: str = ""
    refused_until: float = 0.0  # the peer's KMS failed: PQC-only until then (fallback mode)
    samples: deque[tuple[float, int, int]] = field(default_factory=deque)


@dataclass(frozen=True)
class Transition:
    state: State | None  # None: any state
    event: type[Event]
    handler: str
    to: tuple[State, ...]  # for a row of one state: where it may lead
    note: str
    #: For an any-state row: the state changes it may make, (from, to).
    moves: tuple[tuple[State, State], ...] = ()

    @property
    def edges(self) -> list[tuple[State, State]]:
        if self.state is None:
            return list(self.moves)
        return [(self.state, b) for b in self.to if b is not self.state]


def _t(state: State | None, event: type[Event], handler: str, to: tuple[State, ...],
       note: str, moves: tuple[tuple[State, State], ...] = ()) -> Transition:
    return Transition(state, event, handler, to, note, moves)


S = State
#: Every (state, event) the machine accepts, the handler, and where it may lead. The same
#: table serves both roles; handlers refuse what the role does not do.
TRANSITIONS: tuple[Transition, ...] = (
    _t(S.IDLE, RekeyRequested, "_rekey_now", (S.FETCHING, S.OFFERED),
       "start an exchange (I) or ask the initiator for one (R)"),
    _t(None, RekeyRequested, "_rekey_later", (), "an exchange is already in progress"),
    _t(S.FETCHING, QkdKeysFetched, "_keys_fetched", (S.OFFERED, S.INSTALLING, S.IDLE),
       "I: send Offer; R: encapsulate, derive, install inbound"),
    _t(None, QkdKeysFetched, "_keys_arrived", (),
       "keys fetched ahead for the next epoch; those of an abandoned exchange: discarded"),
    _t(S.FETCHING, QkdFetchFailed, "_fetch_failed", (S.OFFERED, S.IDLE),
       "I: PQC-only Offer (fallback) or retry later; R: Abort"),
    _t(None, QkdFetchFailed, "_prefetch_failed", (),
       "fetching ahead failed (the next exchange fetches again); or an abandoned fetch"),
    _t(None, OfferReceived, "_offer", (), "R: check, then fetch the keys by ID (unless held"
       " ahead) and derive; a newer offer supersedes the exchange in progress; a duplicate"
       " gets the same Accept",
       tuple((a, b) for a in (S.IDLE, S.FETCHING, S.INSTALLING, S.ACCEPTED)
             for b in (S.FETCHING, S.INSTALLING) if a is not b)),
    _t(S.OFFERED, AcceptReceived, "_accept", (S.INSTALLING, S.IDLE),
       "I: decapsulate, derive, verify confirm_R, install inbound"),
    _t(None, AcceptReceived, "_late_accept", (), "I: a duplicate gets the same Commit again"),
    _t(S.INSTALLING, SinkInstalled, "_installed", (S.COMMITTED, S.ACCEPTED),
       "I: activate outbound, send Commit; R: send Accept"),
    _t(None, SinkInstalled, "_late_install", (), "inbound of an abandoned exchange: tracked"),
    _t(S.INSTALLING, SinkFailed, "_install_failed", (S.IDLE,), "abandon the exchange"),
    _t(None, SinkFailed, "_late_install_failed", (), "clean up a failed late install"),
    _t(S.ACCEPTED, CommitReceived, "_commit", (S.IDLE,),
       "R: verify confirm_I, activate outbound, send Ack"),
    _t(None, CommitReceived, "_late_commit", (), "R: a duplicate gets the same Ack again"),
    _t(S.COMMITTED, AckReceived, "_ack", (S.IDLE,), "I: the peer has switched; epoch done"),
    _t(None, AckReceived, "_ignore", (), "late or duplicate Ack"),
    _t(None, AbortReceived, "_abort_received", (), "the peer gave up this exchange; I may"
       " start again at once (stale epoch numbers, or PQC-only after the peer's KMS failed)",
       ((S.OFFERED, S.IDLE), (S.OFFERED, S.FETCHING), (S.FETCHING, S.IDLE),
        (S.INSTALLING, S.IDLE), (S.ACCEPTED, S.IDLE))),
    _t(None, RekeyRequestReceived, "_rekey_requested", (), "I: start an exchange if none is"
       " in progress; after the responder restarted, resend the Offer at once, or start"
       " over if the responder's copy of the key or its Ack is lost",
       ((S.IDLE, S.FETCHING), (S.IDLE, S.OFFERED), (S.OFFERED, S.FETCHING),
        (S.COMMITTED, S.FETCHING), (S.COMMITTED, S.OFFERED))),
    _t(None, KmsStatusObserved, "_kms_status", (), "track KMS health and key supply"),
    _t(None, KmsUnreachable, "_kms_unreachable", (), "the KMS cannot be reached"),
    _t(None, Tick, "_tick", (), "timers: a scheduled rekey starts (I); an exchange past"
       " attempt_timeout is given up; retransmissions; old keys retired; the hard lifetime",
       ((S.IDLE, S.FETCHING), (S.IDLE, S.OFFERED),
        *((a, S.IDLE) for a in (S.FETCHING, S.OFFERED, S.INSTALLING, S.ACCEPTED,
                                S.COMMITTED)))),

)


class LinkMachine:
    def __init__(
        self,
        identity: LinkIdentity,
        policy: Policy,
        *,
        now: float,
        snapshot: Snapshot | None = None,
        rng: Callable[[int], bytes] = os.urandom,
        kem: Kem | None = None,
    ) -> None:
        self.identity = identity
        self.policy = policy
        self.kem = kem or kem_by_name(identity.kem)
        self._rng = rng
        self.state = State.IDLE
        self.max_epoch = 0  # the highest epoch number used or seen, never reused
        self.outbound: Outbound | None = None
        self.blocked = True  # no key: fail closed
        self.inbound: dict[int, Inbound] = {}
        self.old_outbound: dict[int, Inbound] = {}  # replaced outbound keys, retired after grace
        self.peer_out = 0
        self.used_key_ids: OrderedDict[str, None] = OrderedDict()
        self.kms = KmsView()
        self.attempt: Attempt | None = None
        self.alarms: dict[Alarm, str] = {}
        self.next_rekey_at: float | None = None
        self.next_nudge_at: float | None = None
        self.failures = 0
        self.backoff = policy.retry_backoff
        self.consumed = 0  # QKD keys fetched by this link, for the supply estimate
        self.rekeys = 0
        self._request = 0
        # One key ahead: the initiator's keys for the next epoch, or the responder's copies of
        # them, fetched by the IDs announced in the last Commit.
        self.ahead: tuple[QkdKey, ...] = ()
        self.ahead_request: int | None = None
        self.ahead_ids: tuple[str, ...] = ()  # what the request in flight fetches
        self.ahead_for = 0  # I: the epoch whose Commit announces the keys fetched ahead
        self._last_ack: Ack | None = None
        self._restored = snapshot is not None
        self._persisted: tuple[Any, ...] | None = None
        self._table = {(t.state, t.event): t for t in TRANSITIONS}
        if snapshot is not None:
            self._restore(snapshot)
            self._persisted = self._state_key()

    # -- the driver's interface ------------------------------------------------------------

    @property
    def role(self) -> Role:
        return self.identity.role

    def start(self, now: float, *, plane_blocked: bool = False) -> list[Action]:
        """First actions: block until a key exists, and get an epoch going.

        PLANE_BLOCKED: the driver has blocked the data plane (a link restarted after a
        failure): the snapshot's outbound key is no longer in use and is retired."""
        out: list[Action] = []
        if plane_blocked and self.outbound is not None:
            o, self.outbound, self.blocked = self.outbound, None, True
            out.append(RetireOutbound(o.ref))
        if self.outbound is None:
            out.append(Block("no key yet"))
        if self.role is Role.INITIATOR:
            self.next_rekey_at = now  # a fresh key now: keys are never kept across restarts
        else:
            out.append(Send(RekeyRequest(link=self.identity.link, epoch=self.max_epoch,
                                         out=self._out(), reason=RekeyReason.RESTART)))
            self.next_nudge_at = now + self.policy.retransmit_max
        return out + self._persist()

    def handle(self, event: Event, now: float) -> list[Action]:
        t = self._table.get((self.state, type(event))) or self._table.get((None, type(event)))
        if t is None:
            raise IllegalEvent(f"{type(event).__name__} in state {self.state}")
        handler: Callable[[Any, float], list[Action]] = getattr(self, t.handler)
        return handler(event, now) + self._persist()

    def next_deadline(self) -> float | None:
        times = [self.next_rekey_at, self.next_nudge_at]
        if self.attempt is not None:
            times += [self.attempt.started + self.policy.attempt_timeout, self.attempt.next_send]
        times += [i.retire_at for i in self.inbound.values()]
        times += [o.retire_at for o in self.old_outbound.values()]
        if self.outbound is not None:
            times.append(self.outbound.activated_at + self.policy.hard_lifetime)
        due = [t for t in times if t is not None]
        return min(due) if due else None

    @property
    def current_epoch(self) -> int:
        return self.outbound.ref.epoch if self.outbound else 0

    def snapshot(self) -> Snapshot:
        """State that survives a restart. No key material: keys are never stored."""
        o = self.outbound
        return Snapshot(
            link=self.identity.link, role=self.role.value, max_epoch=self.max_epoch,
            peer_out=self.peer_out,
            outbound=None if o is None else OutboundRef(
                epoch=o.ref.epoch, spi_in=o.ref.spi_in, spi_out=o.ref.spi_out, suite=o.suite,
                activated_at=o.activated_at),
            inbound=[_pending(i) for i in self.inbound.values()],
            old_outbound=[_pending(o) for o in self.old_outbound.values()],
            used_key_ids=list(self.used_key_ids)[-USED_KEY_IDS_PERSISTED:])

    # -- initiator: starting an exchange ---------------------------------------------------

    def _rekey_now(self, event: RekeyRequested, now: float) -> list[Action]:
        if self.role is Role.RESPONDER:
            return self._nudge(now, RekeyReason.OPERATOR if event.reason == "operator"
                               else RekeyReason.SOFT_LIMIT)
        return self._start_exchange(now, event.reason)

    def _rekey_later(self, event: RekeyRequested, now: float) -> list[Action]:
        return [Record("rekey-deferred", self.max_epoch, detail=f"{event.reason}: an exchange"
                       f" is already in progress ({self.state})")]

    def _rekey_requested(self, event: RekeyRequestReceived, now: float) -> list[Action]:
        if self.role is Role.RESPONDER:
            raise PeerMessageRejected("role-conflict", "a rekey request reached the responder")
        m = event.message
        self._check_link(m.link)
        self._note_peer_out(m.out, now)
        if m.reason is RekeyReason.RESTART:
            return self._peer_restarted(m, now)
        if self.state is not State.IDLE:
            return []
        return self._start_exchange(now, f"peer asked: {m.reason}")

    def _peer_restarted(self, m: RekeyRequest, now: float) -> list[Action]:
        """The responder restarted: what it held of an exchange in progress is gone, and so
        are its copies of keys fetched ahead (the KME hands a key out once). Go on at once,
        rather than at the next backed-off retransmission or after a failed exchange."""
        why = "the responder restarted"
        # It may have fetched the keys announced in a Commit only if it had seen that
        # epoch (its request names the highest epoch it knows).
        out = self._drop_ahead(f"{why} (its copy is gone)") \
            if self.ahead and m.epoch >= self.ahead_for else []
        a = self.attempt
        if self.state is State.OFFERED and a is not None and a.offer is not None:
            if a.announced_in is None or m.epoch < a.announced_in:
                # It can still fetch these keys: resend (a duplicate is harmless).
                a.next_send, a.send_interval = now + self.policy.retransmit, \
                    self.policy.retransmit
                return out + [Send(a.offer)]
            return out + self._give_up(now, f"{why}: its copy of the QKD key is gone") + \
                self._start_exchange(now, why)
        if self.state is State.COMMITTED and a is not None and m.epoch >= a.epoch:
            # It had this epoch's Offer; its Ack can no longer come.
            self.attempt, self.state = None, State.IDLE
            return out + [Record("unconfirmed", a.epoch, a.key_ids,
                                 detail=f"{why} before its Ack")] + \
                self._start_exchange(now, why)
        if self.state is State.IDLE:
            return out + self._start_exchange(now, f"peer asked: {m.reason}")
        return out

    def _start_exchange(self, now: float, reason: str) -> list[Action]:
        self.next_rekey_at = None
        if self.max_epoch >= MAX_EPOCH:
            # Only a peer can have pushed the numbers this far (a stale-epoch Abort or an
            # Offer names any epoch up to the bound). Keep the current key; the hard
            # lifetime blocks the link if nobody resets the state files.
            self.attempt, self.state = None, State.IDLE
            self.next_rekey_at = now + self._next_backoff()
            return self._alarm(Alarm.EXCHANGE_FAILED, f"epoch numbers exhausted ({MAX_EPOCH});"
                               " reset both sites' state for this link")
        if self.ahead and self._qkd_usable(now):
            keys, self.ahead = self.ahead, ()
            self.attempt = Attempt(epoch=0, started=now, announced_in=self.ahead_for)
            return [Record("rekey-started", self.max_epoch + 1, detail=f"{reason}, QKD key"
                           " fetched ahead")] + self._send_offer(now, keys)
        out = self._drop_ahead("the KMS is not usable") if self.ahead else []
        if self._qkd_usable(now):
            self._request += 1
            self.attempt = Attempt(epoch=0, started=now, request=self._request)
            self.state = State.FETCHING
            return out + [Record("rekey-started", self.max_epoch + 1, detail=reason),
                          FetchQkdKeys(self._request, 1, self.policy.qkd_key_bits)]
        if self.policy.mode is Mode.PQC_FALLBACK:
            self.attempt = Attempt(epoch=0, started=now)
            return out + [Record("rekey-started", self.max_epoch + 1, detail=reason)] + \
                self._send_offer(now, ())
        return out + self._kms_down_retry(now)

    def _kms_down_retry(self, now: float) -> list[Action]:
        """qkd+pqc without QKD keys: keep the current key, try again later."""
        self.attempt = None
        self.state = State.IDLE
        self.next_rekey_at = now + self._next_backoff()
        return self._alarm(Alarm.KMS_UNAVAILABLE, self.kms.reason or "no QKD keys")

    def _keys_fetched(self, event: QkdKeysFetched, now: float) -> list[Action]:
        a = self.attempt
        if a is None or event.request != a.request:
            return self._stale_keys(event, now)
        bad = [k.key_id for k in event.keys if k.size_bits != self.policy.qkd_key_bits]
        if bad or not event.keys:
            raise IllegalEvent(f"QKD keys of the wrong size or none: {bad}")
        self.consumed += len(event.keys)
        record: list[Action] = [Record("fetched", a.epoch or self.max_epoch + 1,
                                       key_ids=tuple(k.key_id for k in event.keys))]
        if self.kms.ok:
            record += self._clear(Alarm.KMS_UNAVAILABLE)
        if self.role is Role.INITIATOR:
            return record + self._send_offer(now, event.keys)
        return record + self._respond(now, event.keys)

    def _keys_arrived(self, event: QkdKeysFetched, now: float) -> list[Action]:
        ids = tuple(k.key_id for k in event.keys)
        if event.request == self.ahead_request:
            self.ahead_request, self.ahead_ids = None, ()
            self.consumed += len(event.keys)
            self.ahead = event.keys
            out: list[Action] = [Record("fetched", self.max_epoch + 1, key_ids=ids,
                                        detail="ahead, for the next epoch")]
            a = self.attempt
            if self.state is State.COMMITTED and a is not None and a.commit is not None \
                    and not a.commit.next_key_ids:
                # The Commit left before these keys came: send it again with their IDs
                # (a duplicate Commit is answered like any other; the hint rides along).
                a.commit = a.commit.model_copy(update={"next_key_ids": ids})
                out.append(Send(a.commit))
            return out
        return self._stale_keys(event, now)

    def _stale_keys(self, event: QkdKeysFetched, now: float) -> list[Action]:
        ids = tuple(k.key_id for k in event.keys)
        self._remember_key_ids(ids)
        return [Record("discarded", 0, key_ids=ids, detail="fetched for an abandoned exchange")]

    def _prefetch_failed(self, event: QkdFetchFailed, now: float) -> list[Action]:
        if event.request != self.ahead_request:
            return []
        self.ahead_request, self.ahead_ids = None, ()
        return [Record("discarded", self.max_epoch + 1, detail="fetching ahead failed:"
                       f" {event.reason}")]

    def _fetch_ahead(self, now: float, key_ids: tuple[str, ...] = ()) -> list[Action]:
        """Start fetching the next epoch's QKD key: the initiator new ones (enc_keys), the
        responder those the initiator announced (dec_keys)."""
        if not self.policy.prefetch or self.ahead or self.ahead_request is not None \
                or not self._qkd_usable(now):
            return []
        self._request += 1
        self.ahead_request = self._request
        if self.role is Role.INITIATOR:
            self.ahead_for = self.max_epoch
            return [FetchQkdKeys(self._request, 1, self.policy.qkd_key_bits)]
        self.ahead_ids = key_ids
        return [FetchQkdKeysById(self._request, key_ids, self.policy.qkd_key_bits)]

    def _drop_ahead(self, why: str) -> list[Action]:
        keys, self.ahead = self.ahead, ()
        if not keys:
            return []
        ids = tuple(k.key_id for k in keys)
        self._remember_key_ids(ids)
        return [Record("discarded", 0, key_ids=ids, detail=f"key fetched ahead: {why}")]

    def _fetch_failed(self, event: QkdFetchFailed, now: float) -> list[Action]:
        a = self.attempt
        if a is None or event.request != a.request:
            return []
        self.kms.failed_until = now + self._next_backoff()
        self.kms.reason = event.reason
        alarm = self._alarm(Alarm.KMS_UNAVAILABLE, event.reason)
        if self.role is Role.RESPONDER:
            offer = a.offer
            assert offer is not None
            return alarm + self._give_up(now, "dec_keys failed: " + event.reason) + [
                Send(self._abort_msg(offer, AbortReason.KMS_UNAVAILABLE))]
        if self.policy.mode is Mode.PQC_FALLBACK:
            return alarm + self._send_offer(now, ())
        return alarm + self._kms_down_retry(now)

    def _send_offer(self, now: float, keys: tuple[QkdKey, ...]) -> list[Action]:
        assert self.attempt is not None
        a = self.attempt
        a.epoch = self._next_epoch()
        a.qkd_keys, a.key_ids = keys, tuple(k.key_id for k in keys)
        self._remember_key_ids(a.key_ids)
        a.dk = self.kem.from_seed(self._rng(64))
        a.x25519 = X25519PrivateKey.from_private_bytes(self._rng(32))
        a.offer = Offer(
            link=self.identity.link, epoch=a.epoch, out=self._out(),
            suite=suite_name(bool(keys), self.kem.name), key_ids=a.key_ids,
            kme_i=self.kms.kme_id, kme_r=self.kms.peer_kme_id, ek=a.dk.encapsulation_key,
            pk=a.x25519.public_key, nonce=self._rng(32), spi=self._new_spi())
        a.next_send, a.send_interval = now + self.policy.retransmit, self.policy.retransmit
        self.state = State.OFFERED
        return [Record("offered", a.epoch, a.key_ids, detail=a.offer.suite), Send(a.offer)] \
            + self._fetch_ahead(now)

    # -- responder: answering an offer -----------------------------------------------------

    def _offer(self, event: OfferReceived, now: float) -> list[Action]:
        o = event.message
        if self.role is Role.INITIATOR:
            raise PeerMessageRejected("role-conflict", "an Offer reached the initiator (both"
                                      " ends configured as initiator?)")
        self._check_link(o.link)
        a = self.attempt
        if a is not None and a.offer is not None and (o.epoch, o.nonce) == (a.epoch,
                                                                        a.offer.nonce):
            # A retransmission: answer it again, or let the exchange in progress finish.
            return [Send(a.accept)] if a.accept is not None else []
        if o.epoch <= self.max_epoch:
            return [Send(self._abort_msg(o, AbortReason.STALE_EPOCH)),
                    Record("rejected", o.epoch, o.key_ids, detail=f"stale epoch (ours is"
                           f" {self.max_epoch})")]
        qkd = bool(o.key_ids)
        reason = self._offer_problem(o, qkd, event.peer_cert_sha256)
        if reason is not None:
            code, detail = reason
            return [Send(self._abort_msg(o, code)), Record("rejected", o.epoch, o.key_ids,
                                                       detail=detail)]
        # Accepted for processing: from here on, state changes.
        out: list[Action] = []
        if a is not None:
            out += self._give_up(now, f"superseded by the offer for epoch {o.epoch}")
        self.max_epoch = o.epoch
        self._note_peer_out(o.out, now)
        for epoch, inbound in self.inbound.items():
            if epoch < o.epoch and epoch != o.out and inbound.retire_at is None:
                inbound.retire_at = now + self.policy.grace  # abandoned by the initiator
        self._remember_key_ids(o.key_ids)
        self.attempt = Attempt(epoch=o.epoch, started=now, offer=o, key_ids=o.key_ids,
                               peer_cert=event.peer_cert_sha256)
        if not qkd:
            return out + self._drop_ahead("the offer has no QKD key") + self._respond(now, ())
        if self.ahead and tuple(k.key_id for k in self.ahead) == o.key_ids:
            keys, self.ahead = self.ahead, ()
            return out + self._respond(now, keys)
        if self.ahead_request is not None and self.ahead_ids == o.key_ids:
            # Fetching these very keys already: wait for that answer, never ask twice.
            self.attempt.request, self.ahead_request, self.ahead_ids = self.ahead_request, \
                None, ()
            self.state = State.FETCHING
            return out
        out += self._drop_ahead(f"the offer for epoch {o.epoch} uses other keys")
        self._request += 1
        self.attempt.request = self._request
        self.state = State.FETCHING
        return out + [FetchQkdKeysById(self._request, o.key_ids, self.policy.qkd_key_bits)]

    def _offer_problem(self, o: Offer, qkd: bool, peer_cert: bytes
                       ) -> tuple[AbortReason, str] | None:
        if o.suite != suite_name(qkd, self.kem.name):
            return AbortReason.SUITE_UNSUPPORTED, f"suite {o.suite!r} is not ours" \
                f" ({suite_name(qkd, self.kem.name)!r})"
        if not qkd and self.policy.mode is Mode.QKD_PQC:
            return AbortReason.QKD_REQUIRED, "a PQC-only offer, and this link requires QKD"
        reused = [k for k in o.key_ids if k in self.used_key_ids]
        if reused:
            return AbortReason.KEY_ID_REUSED, f"QKD key ID(s) used before: {', '.join(reused)}"
        mine = (self.kms.kme_id, self.kms.peer_kme_id)
        if qkd and all(mine) and (o.kme_r, o.kme_i) != mine:
            return AbortReason.IDENTITY_MISMATCH, f"KME IDs {o.kme_i}/{o.kme_r} are not the" \
                f" ones our KME reports ({mine[1]}/{mine[0]})"
        if len(peer_cert) != 32:
            return AbortReason.IDENTITY_MISMATCH, "no peer certificate digest"
        try:
            self.kem.check_encapsulation_key(o.ek)
        except InvalidKeyError as e:
            return AbortReason.SUITE_UNSUPPORTED, str(e)
        if len(o.pk) != 32:
            return AbortReason.SUITE_UNSUPPORTED, "X25519 public key must be 32 bytes"
        return None

    def _respond(self, now: float, keys: tuple[QkdKey, ...]) -> list[Action]:
        a = self.attempt
        assert a is not None and a.offer is not None
        o = a.offer
        if tuple(k.key_id for k in keys) != o.key_ids:
            raise IllegalEvent("the KMS returned other key IDs than asked for")
        x = X25519PrivateKey.from_private_bytes(self._rng(32))
        try:
            k2 = x.exchange(o.pk)
        except InvalidKeyError as e:
            return self._give_up(now, str(e)) + [
                Send(self._abort_msg(o, AbortReason.SUITE_UNSUPPORTED))]
        sent = self.kem.encapsulate(o.ek)
        nonce_r, spi = self._rng(32), self._new_spi()
        t = self._transcript(o, initiator_cert=a.peer_cert,
                             responder_cert=self.identity.cert_sha256, ct=sent.ciphertext,
                             pk_r=x.public_key, nonce_r=nonce_r, spi_r=spi)
        epoch_keys = derive_epoch(qkd_keys=[k.material for k in keys],
                                  mlkem_secret=sent.shared_secret, x25519_secret=k2, transcript=t)
        a.transcript = t
        a.accept = Accept(link=o.link, epoch=o.epoch, out=self._out(), nonce_i=o.nonce,
                          ct=sent.ciphertext, pk=x.public_key, nonce=nonce_r, spi=spi,
                          confirm=epoch_keys.confirm_tag(Purpose.CONFIRM_R, t))
        a.material = EpochMaterial(o.link, o.epoch, Role.RESPONDER, o.suite, o.key_ids,
                                   spi_in=spi, spi_out=o.spi, keys=epoch_keys)
        return self._install(a.material)

    def _commit(self, event: CommitReceived, now: float) -> list[Action]:
        c = event.message
        a = self.attempt
        if self.role is Role.INITIATOR:
            raise PeerMessageRejected("role-conflict", "a Commit reached the initiator")
        assert a is not None and a.offer is not None and a.accept is not None
        if (c.epoch, c.nonce_i, c.nonce_r) != (a.epoch, a.offer.nonce, a.accept.nonce):
            return self._late_commit(event, now)
        assert a.material is not None and a.transcript is not None
        if not a.material.keys.confirm_ok(Purpose.CONFIRM_I, a.transcript, c.confirm):
            raise PeerMessageRejected("confirm-failed", f"epoch {c.epoch}: the initiator's key"
                                      " confirmation does not verify")
        out = self._activate(a.material, now)
        self._last_ack = Ack(link=c.link, epoch=c.epoch, out=self._out(), nonce_i=c.nonce_i,
                             nonce_r=c.nonce_r)
        self._note_peer_out(c.epoch, now)  # the initiator sends on this epoch now
        self._succeeded(now)
        out += [Send(self._last_ack), Record("rekeyed", c.epoch, a.key_ids,
                                             a.material.fingerprint, latency=now - a.started,
                                             started=a.started)]
        return out + self._take_hint(c, now)

    def _late_commit(self, event: CommitReceived, now: float) -> list[Action]:
        c, ack = event.message, self._last_ack
        if ack is not None and (c.epoch, c.nonce_i, c.nonce_r) == (ack.epoch, ack.nonce_i,
                                                                  ack.nonce_r):
            return [Send(ack)] + self._take_hint(c, now)  # our Ack was lost, or a hint came
        return []

    def _take_hint(self, c: Commit, now: float) -> list[Action]:
        """Fetch the next epoch's QKD keys the initiator announced (if not done already)."""
        ids = c.next_key_ids
        if not ids or any(k in self.used_key_ids for k in ids) or ids == self.ahead_ids \
                or ids == tuple(k.key_id for k in self.ahead):
            return []
        return self._drop_ahead("superseded") + self._fetch_ahead(now, ids)

    # -- initiator: finishing ---------------------------------------------------------------

    def _accept(self, event: AcceptReceived, now: float) -> list[Action]:
        m = event.message
        a = self.attempt
        assert a is not None and a.offer is not None and a.dk is not None and a.x25519 is not None
        if (m.epoch, m.nonce_i) != (a.epoch, a.offer.nonce):
            return []  # an answer to an earlier attempt
        self._check_link(m.link)
        if len(event.peer_cert_sha256) != 32:
            raise PeerMessageRejected("identity-mismatch", "no peer certificate digest")
        try:
            k1 = a.dk.decapsulate(m.ct)
            k2 = a.x25519.exchange(m.pk)
        except InvalidKeyError as e:
            raise PeerMessageRejected("malformed", str(e)) from None
        t = self._transcript(a.offer, initiator_cert=self.identity.cert_sha256,
                             responder_cert=event.peer_cert_sha256, ct=m.ct, pk_r=m.pk,
                             nonce_r=m.nonce, spi_r=m.spi)
        keys = derive_epoch(qkd_keys=[k.material for k in a.qkd_keys], mlkem_secret=k1,
                            x25519_secret=k2, transcript=t)
        if not keys.confirm_ok(Purpose.CONFIRM_R, t, m.confirm):
            return self._give_up(now, "the responder's key confirmation does not verify",
                                 failed=True) + [
                Send(self._abort_msg(a.offer, AbortReason.CONFIRM_FAILED)),
                *self._alarm(Alarm.EXCHANGE_FAILED, f"epoch {m.epoch}: key confirmation"
                             " failed (different keys: check both sites' configuration)")]
        self._note_peer_out(m.out, now)
        a.transcript = t
        a.material = EpochMaterial(m.link, m.epoch, Role.INITIATOR, a.offer.suite, a.key_ids,
                                   spi_in=a.offer.spi, spi_out=m.spi, keys=keys)
        a.commit = Commit(link=m.link, epoch=m.epoch, out=m.epoch, nonce_i=m.nonce_i,
                          nonce_r=m.nonce, confirm=keys.confirm_tag(Purpose.CONFIRM_I, t),
                          next_key_ids=tuple(k.key_id for k in self.ahead))
        return self._install(a.material)

    def _late_accept(self, event: AcceptReceived, now: float) -> list[Action]:
        if self.role is Role.RESPONDER:
            raise PeerMessageRejected("role-conflict", "an Accept reached the responder")
        a = self.attempt
        m = event.message
        if (self.state is State.COMMITTED and a is not None and a.commit is not None
                and (m.epoch, m.nonce_i, m.nonce) == (a.epoch, a.commit.nonce_i,
                                                      a.commit.nonce_r)):
            return [Send(a.commit)]  # our Commit was lost; the Accept was retransmitted
        return []

    def _installed(self, event: SinkInstalled, now: float) -> list[Action]:
        a = self.attempt
        assert a is not None and a.material is not None
        if event.epoch != a.epoch:
            return self._late_install(event, now)
        if self.role is Role.RESPONDER:
            assert a.accept is not None
            self.state = State.ACCEPTED
            return [Record("installed", a.epoch, a.key_ids, a.material.fingerprint),
                    Send(a.accept)]
        assert a.commit is not None
        out = [Record("installed", a.epoch, a.key_ids, a.material.fingerprint),
               *self._activate(a.material, now), Send(a.commit)]
        self.state = State.COMMITTED
        a.next_send, a.send_interval = now + self.policy.retransmit, self.policy.retransmit
        return out

    def _ack(self, event: AckReceived, now: float) -> list[Action]:
        m = event.message
        a = self.attempt
        assert a is not None and a.commit is not None and a.material is not None
        if (m.epoch, m.nonce_i, m.nonce_r) != (a.epoch, a.commit.nonce_i, a.commit.nonce_r):
            return []
        self._note_peer_out(m.epoch, now)  # the responder sends on this epoch now
        self._succeeded(now)
        return [Record("rekeyed", m.epoch, a.key_ids, a.material.fingerprint,
                       latency=now - a.started, started=a.started)]

    def _abort_msg(self, offer: Offer, reason: AbortReason) -> Abort:
        return Abort(link=offer.link, epoch=offer.epoch, out=self._out(), nonce_i=offer.nonce,
                     reason=reason, current=self.max_epoch)

    def _abort_received(self, event: AbortReceived, now: float) -> list[Action]:
        m = event.message
        a = self.attempt
        self._check_link(m.link)
        if self.role is Role.RESPONDER:
            if a is not None and a.offer is not None and m.nonce_i == a.offer.nonce \
                    and self.state is not State.IDLE:
                return self._give_up(now, f"the initiator aborted: {m.reason}")
            return []
        if a is None or a.offer is None or (m.epoch, m.nonce_i) != (a.epoch, a.offer.nonce) \
                or self.state is not State.OFFERED:
            return []
        self.max_epoch = max(self.max_epoch, m.current)
        detail = f"the responder aborted epoch {m.epoch}: {m.reason}"
        if m.reason is AbortReason.STALE_EPOCH:
            out = self._give_up(now, detail)
            return out + self._start_exchange(now, "resynchronised epoch numbers")
        if m.reason is AbortReason.KMS_UNAVAILABLE and self.policy.mode is Mode.PQC_FALLBACK:
            self.kms.refused_until = now + self.policy.retry_backoff_max
            out = self._give_up(now, detail)
            return out + self._start_exchange(now, "the peer's KMS failed: PQC-only")
        return self._give_up(now, detail, failed=True) + self._alarm(Alarm.EXCHANGE_FAILED,
                                                                     detail)

    # -- shared steps -----------------------------------------------------------------------

    def _install(self, material: EpochMaterial) -> list[Action]:
        ref = EpochRef(material.link, material.epoch, material.spi_in, material.spi_out)
        self.inbound[material.epoch] = Inbound(ref)
        self.state = State.INSTALLING
        return [Record("derived", material.epoch, material.key_ids, material.fingerprint,
                       detail=material.suite), InstallInbound(material)]

    def _activate(self, material: EpochMaterial, now: float) -> list[Action]:
        ref = EpochRef(material.link, material.epoch, material.spi_in, material.spi_out)
        if self.outbound is not None:
            old = self.outbound.ref
            self.old_outbound[old.epoch] = Inbound(old, now + self.policy.grace)
        self.outbound = Outbound(ref, material.suite, now)
        out: list[Action] = [ActivateOutbound(material),
                             Record("activated", material.epoch, material.key_ids,
                                    material.fingerprint)]
        if self.blocked:
            self.blocked = False
            out += self._clear(Alarm.HARD_LIFETIME)
        if material.suite.startswith("pqc+"):
            out += self._alarm(Alarm.QKD_FALLBACK, f"epoch {material.epoch} has no QKD key")
        else:
            out += self._clear(Alarm.QKD_FALLBACK)
        return out

    def _succeeded(self, now: float) -> None:
        self.attempt = None
        self.state = State.IDLE
        self.failures = 0
        self.backoff = self.policy.retry_backoff
        self.rekeys += 1
        if self.role is Role.INITIATOR:
            self._schedule_rekey(now)
        for alarm in (Alarm.PEER_UNREACHABLE, Alarm.EXCHANGE_FAILED, Alarm.SINK_FAILED):
            self.alarms.pop(alarm, None)

    def _give_up(self, now: float, why: str, *, failed: bool = False) -> list[Action]:
        """Abandon the exchange in progress. Installed inbound keys stay tracked: they are
        retired by the usual rule, never while the peer might still use them."""
        a = self.attempt
        self.attempt = None
        self.state = State.IDLE
        out: list[Action] = []
        if a is not None and a.epoch:
            out.append(Record("discarded", a.epoch, a.key_ids, detail=why))
        if self.role is Role.INITIATOR and self.next_rekey_at is None:
            self.next_rekey_at = now + self._next_backoff()
        if failed:
            self.failures += 1
        return out

    def _install_failed(self, event: SinkFailed, now: float) -> list[Action]:
        a = self.attempt
        assert a is not None
        if event.epoch != a.epoch:
            return self._late_install_failed(event, now)
        out = self._late_install_failed(event, now)
        if self.role is Role.RESPONDER and a.offer is not None:
            out.append(Send(self._abort_msg(a.offer, AbortReason.SINK_FAILED)))
        return out + self._give_up(now, f"sink failed: {event.reason}", failed=True) + \
            self._alarm(Alarm.SINK_FAILED, event.reason)

    def _late_install(self, event: SinkInstalled, now: float) -> list[Action]:
        """An install that finished after its exchange was abandoned (the key stays tracked
        and is retired by the usual rule) or after the epoch was already retired."""
        if event.epoch > self.max_epoch:
            raise IllegalEvent(f"SinkInstalled for epoch {event.epoch}, never installed")
        return []

    def _late_install_failed(self, event: SinkFailed, now: float) -> list[Action]:
        if event.epoch > self.max_epoch:
            raise IllegalEvent(f"SinkFailed for epoch {event.epoch}, never installed")
        inbound = self.inbound.pop(event.epoch, None)
        return [] if inbound is None else [RetireInbound(inbound.ref)]  # clean up

    def _ignore(self, event: Event, now: float) -> list[Action]:
        return []

    # -- KMS view ---------------------------------------------------------------------------

    def _kms_status(self, event: KmsStatusObserved, now: float) -> list[Action]:
        for name, value in (("qber", event.qber), ("key_rate", event.key_rate),
                            ("stored_key_count", event.stored_key_count)):
            if value is not None and not (math.isfinite(value) and 0 <= value <= 1e15):
                # The driver bounds what a KME says; this is the core's own guard: a NaN
                # would pass the QBER gate and make every deadline NaN.
                raise IllegalEvent(f"KMS status with {name} {value!r}")
        k = self.kms
        was_ok = k.ok
        k.stored, k.key_rate = event.stored_key_count, event.key_rate
        k.kme_id, k.peer_kme_id = event.kme_id, event.peer_kme_id
        k.samples.append((now, event.stored_key_count, self.consumed))
        while k.samples and k.samples[0][0] < now - SUPPLY_WINDOW:
            k.samples.popleft()
        problem = None
        if event.link_up is False:
            problem = "the QKD link is down"
        elif event.qber is not None and event.qber > self.policy.qber_threshold:
            problem = f"QBER {event.qber:.3f} above the {self.policy.qber_threshold} threshold"
        k.ok, k.reason = problem is None, problem or ""
        if problem is not None:
            return self._drop_ahead(problem) + self._alarm(Alarm.KMS_UNAVAILABLE, problem)
        out = self._clear(Alarm.KMS_UNAVAILABLE)
        if not was_ok and self.role is Role.INITIATOR and self.state is State.IDLE \
                and self.outbound is not None and self.outbound.suite.startswith("pqc+") \
                and self.policy.mode is Mode.PQC_FALLBACK:
            self.next_rekey_at = now  # back to QKD at the first chance
        return out

    def _kms_unreachable(self, event: KmsUnreachable, now: float) -> list[Action]:
        self.kms.ok, self.kms.reason = False, event.reason
        return self._alarm(Alarm.KMS_UNAVAILABLE, event.reason)

    def _qkd_usable(self, now: float) -> bool:
        """QKD keys can be asked for: the KMS status is known (the KME identities go into the
        transcript) and good, and no recent failure says otherwise."""
        k = self.kms
        if not (k.kme_id and k.peer_kme_id):
            k.reason = k.reason or "no KMS status yet"
            return False
        return k.ok and now >= k.failed_until and now >= k.refused_until

    def supply_keys_per_s(self) -> float | None:
        """The link's QKD key supply: the KME's reported key rate, or the pool's trend."""
        k = self.kms
        if k.key_rate is not None:
            return k.key_rate / self.policy.qkd_key_bits
        if len(k.samples) >= 2 and k.samples[-1][0] - k.samples[0][0] >= 10.0:
            (t0, s0, c0), (t1, s1, c1) = k.samples[0], k.samples[-1]
            return max(0.0, ((s1 + c1) - (s0 + c0)) / (t1 - t0))
        return None

    # -- timers ------------------------------------------------------------------------------

    def _tick(self, event: Tick, now: float) -> list[Action]:
        out: list[Action] = []
        for epoch in sorted(self.inbound):
            inbound = self.inbound[epoch]
            if inbound.retire_at is not None and now >= inbound.retire_at:
                del self.inbound[epoch]
                out += [RetireInbound(inbound.ref), Record("retired", epoch, detail="inbound")]
        for epoch in sorted(self.old_outbound):
            old = self.old_outbound[epoch]
            if old.retire_at is not None and now >= old.retire_at:
                del self.old_outbound[epoch]
                out += [RetireOutbound(old.ref), Record("retired", epoch, detail="outbound")]
        o = self.outbound
        if o is not None and now >= o.activated_at + self.policy.hard_lifetime:
            self.outbound = None
            self.blocked = True
            out += [Block(f"epoch {o.ref.epoch} reached its hard lifetime"),
                    RetireOutbound(o.ref),
                    *self._alarm(Alarm.HARD_LIFETIME, f"no fresh key for link"
                                 f" {self.identity.link}: traffic blocked")]
        a = self.attempt
        if a is not None and now >= a.started + self.policy.attempt_timeout:
            if self.state is State.COMMITTED:
                # Our outbound already moved; only the Ack is missing. Keep everything and
                # try a new epoch soon, which tells the peer where we are.
                self.attempt, self.state = None, State.IDLE
                self.next_rekey_at = now + self._next_backoff()
                out.append(Record("unconfirmed", a.epoch, a.key_ids,
                                  detail="no Ack from the responder"))
            else:
                out += self._give_up(now, f"no answer within {self.policy.attempt_timeout} s"
                                     f" ({self.state})", failed=True)
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
                out += self._start_exchange(now, "scheduled")
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
        o = self.outbound
        return o is None or now >= o.activated_at + 0.75 * self.policy.hard_lifetime

    def _nudge(self, now: float, reason: RekeyReason) -> list[Action]:
        self.next_nudge_at = now + self.policy.retransmit_max
        return [Send(RekeyRequest(link=self.identity.link, epoch=self.max_epoch,
                                  out=self._out(), reason=reason))]

    def _schedule_rekey(self, now: float) -> None:
        unit = int.from_bytes(self._rng(4), "big") / 2**32
        interval, limited = self.policy.next_interval(
            supply_keys_per_s=self.supply_keys_per_s(), stored_keys=self.kms.stored, unit=unit)
        self.next_rekey_at = now + interval
        if limited:
            self.alarms[Alarm.QKD_SUPPLY_LOW] = f"next rekey in {interval:.0f} s, paced to the" \
                " QKD key supply"
        else:
            self.alarms.pop(Alarm.QKD_SUPPLY_LOW, None)

    def _next_backoff(self) -> float:
        delay = self.backoff
        self.backoff = min(self.backoff * 2, self.policy.retry_backoff_max)
        return delay

    # -- helpers ------------------------------------------------------------------------------

    def _out(self) -> int:
        return self.outbound.ref.epoch if self.outbound else 0

    def _next_epoch(self) -> int:
        self.max_epoch += 1
        return self.max_epoch

    def _note_peer_out(self, epoch: int, now: float) -> None:
        if epoch <= self.peer_out:
            return
        self.peer_out = epoch
        for e, inbound in self.inbound.items():
            if e < epoch and inbound.retire_at is None:
                inbound.retire_at = now + self.policy.grace

    def _new_spi(self) -> int:
        taken = {i.ref.spi_in for i in self.inbound.values()}
        while True:
            spi = int.from_bytes(self._rng(4), "big")
            if spi >= 0x100 and spi not in taken:
                return spi

    def _remember_key_ids(self, ids: tuple[str, ...]) -> None:
        for key_id in ids:
            self.used_key_ids[key_id] = None
        while len(self.used_key_ids) > USED_KEY_IDS_REMEMBERED:
            self.used_key_ids.popitem(last=False)

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

    def _state_key(self) -> tuple[Any, ...]:
        """Changes whenever the snapshot would: cheaper to compare than the snapshot."""
        o = self.outbound
        return (self.max_epoch, self.peer_out, o.ref.epoch if o else None,
                o.activated_at if o else None,
                tuple((e, i.retire_at) for e, i in self.inbound.items()),
                tuple((e, i.retire_at) for e, i in self.old_outbound.items()),
                next(reversed(self.used_key_ids), None))

    def _persist(self) -> list[Action]:
        key = self._state_key()
        if key == self._persisted:
            return []
        self._persisted = key
        return [Persist()]

    def _restore(self, snap: Snapshot) -> None:
        if snap.link != self.identity.link or snap.role != self.role.value:
            raise CoreError(f"state of another link or role: {snap.link!r} {snap.role!r}")
        link = self.identity.link
        self.max_epoch, self.peer_out = snap.max_epoch, snap.peer_out
        if snap.outbound is not None:
            o = snap.outbound
            self.outbound = Outbound(EpochRef(link, o.epoch, o.spi_in, o.spi_out), o.suite,
                                     o.activated_at)
            self.blocked = False
        for i in snap.inbound:
            self.inbound[i.epoch] = _inbound(link, i)
        for i in snap.old_outbound:
            self.old_outbound[i.epoch] = _inbound(link, i)
        self._remember_key_ids(tuple(snap.used_key_ids))


def _pending(i: Inbound) -> PendingRef:
    return PendingRef(epoch=i.ref.epoch, spi_in=i.ref.spi_in, spi_out=i.ref.spi_out,
                      retire_at=i.retire_at)


def _inbound(link: str, p: PendingRef) -> Inbound:
    return Inbound(EpochRef(link, p.epoch, p.spi_in, p.spi_out), p.retire_at)
