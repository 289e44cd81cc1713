"""The rekey state machine of one link, without I/O (modelled on h11's `_connection.py`).

    machine = LinkMachine(identity, policy, now=t)
    actions = machine.start(t)
    actions = machine.handle(event, t)        # events in, actions out
    wake_at = machine.next_deadline()          # call handle(Tick(), ...) then

It never sleeps, reads a clock or touches a socket. Which handler an event reaches, and where
it may move the machine, is the data in `TRANSITIONS` below (docs/protocol.md draws it); with
`check_transitions=True` every move is held to its row. An event the driver should not send
in the current state raises `IllegalEvent`; a peer message that must be refused raises
`PeerMessageRejected` with a reason. Both leave the machine exactly as it was: handlers check
everything before they change anything.

The machine is made of named parts (gateway/core/):
- table.py: the states, the errors, the shape of a transition;
- link.py: the state of one link, the driver's interface, the steps both roles share;
- initiator.py and responder.py: the protocol's handlers, by role; qkd.py: the QKD key
  fetched ahead and the KMS's status, for both;
- plane.py: the sinks' answers: failures (protocol.md, "When a sink fails") and late ones;
- keyring.py: which keys are in the data plane and when each may go (make-before-break);
- qkdkeys.py: the QKD key fetched ahead for the next epoch, and the key IDs used;
- kmsview.py: what the link knows of its KMS (health, supply, KME identities);
- snapshot.py: what survives a restart, as a checked file format.

Make-before-break, as invariants the property tests check:
- a side activates an epoch's outbound key only once the peer has installed that epoch's
  inbound key (the initiator after a verified Accept, the responder after a verified Commit);
- an inbound key is retired only after the peer has moved its outbound past that epoch (or
  abandoned it, which an Offer for a later epoch implies), and a grace period later;
- with no valid outbound key (none yet, or past the hard lifetime) the link is blocked.
"""

from __future__ import annotations

from typing import Any

from common.sink import Role
from gateway.core.events import (
    AbortReceived,
    AcceptReceived,
    AckReceived,
    Action,
    ActivateFailed,
    Alarm,
    BlockFailed,
    Cause,
    CommitReceived,
    InstallFailed,
    KmsStatusObserved,
    KmsUnreachable,
    LinkUnknownAtPeer,
    OfferReceived,
    QkdFetchFailed,
    QkdKeysFetched,
    Record,
    RecordKind,
    RekeyRequested,
    RekeyRequestReceived,
    RetireFailed,
    SinkActivated,
    SinkInstalled,
    StartGranted,
    Tick,
)
from gateway.core.initiator import InitiatorHandlers
from gateway.core.link import LinkCore, LinkIdentity
from gateway.core.plane import PlaneHandlers
from gateway.core.responder import ResponderHandlers
from gateway.core.table import (
    CoreError,
    IllegalEvent,
    PeerMessageRejected,
    State,
    Transition,
    TransitionError,
    need,
    row,
)

__all__ = ["TRANSITIONS", "CoreError", "IllegalEvent", "LinkIdentity", "LinkMachine",
           "PeerMessageRejected", "State", "TransitionError"]


class LinkMachine(InitiatorHandlers, ResponderHandlers, PlaneHandlers):
    """Both roles' handlers; the link's role picks where one event means different things."""

    def _rekey_now(self, event: RekeyRequested, now: float) -> list[Action]:
        if self.role is Role.RESPONDER:
            return self._ask_for_epoch(event, now)
        return self._begin(now, event.reason)

    def _rekey_later(self, event: RekeyRequested, now: float) -> list[Action]:
        return [Record(RecordKind.REKEY_DEFERRED, self.max_epoch, detail=f"{event.reason}: an"
                       f" exchange is already in progress ({self.state})")]

    def _keys_fetched(self, event: QkdKeysFetched, now: float) -> list[Action]:
        a = self.attempt
        if a is None or event.request != a.request:
            return self._stale_keys(event, now)
        bad = [k.key_id for k in event.keys if k.size_bits != self.policy.qkd_key_bits]
        if bad or not event.keys:
            raise IllegalEvent(f"QKD keys of the wrong size or none: {bad}")
        self.consumed += len(event.keys)
        out: list[Action] = [Record(RecordKind.FETCHED, a.epoch or self.max_epoch + 1,
                                    key_ids=tuple(k.key_id for k in event.keys))]
        if self.kms.ok:
            out += self._clear(Alarm.KMS_UNAVAILABLE)
        if self.role is Role.INITIATOR:
            return out + self._offer_keys(event, now)
        return out + self._answer_keys(event, now)

    def _fetch_failed(self, event: QkdFetchFailed, now: float) -> list[Action]:
        a = self.attempt
        if a is None or event.request != a.request:
            return []
        self.kms.failed_until = now + self._next_backoff()
        self.kms.reason = event.reason
        alarm = self._alarm(Alarm.KMS_UNAVAILABLE, event.reason)
        if self.role is Role.RESPONDER:
            return self._dec_keys_failed(event, now, alarm)
        return self._enc_keys_failed(event, now, alarm)

    def _installed(self, event: SinkInstalled, now: float) -> list[Action]:
        a = need(self.attempt, "the exchange")
        if event.epoch != a.epoch:
            return self._late_install(event, now)
        return self._accepted(a) if self.role is Role.RESPONDER else self._switch(a, now)

    def _activated(self, event: SinkActivated, now: float) -> list[Action]:
        a = need(self.attempt, "the exchange")
        if event.epoch != a.epoch:
            return self._late_activated(event, now)
        o = self.keys.outbound
        if o is None or o.ref.epoch != a.epoch:
            # The key passed its hard lifetime while the data plane switched to it: block
            # (again: the switch may have landed after the block) and give the exchange up.
            why = f"epoch {a.epoch}: the data plane switched after the key's hard lifetime"
            return self._plane_failed(why, now) + self._give_up(now, why, Cause.SINK,
                                                                failed=True)
        if self.role is Role.RESPONDER:
            return self._switched_second(a, now)
        return self._switched_first(a, now)

    def _abort_received(self, event: AbortReceived, now: float) -> list[Action]:
        self._check_link(event.message.link)
        if self.role is Role.RESPONDER:
            return self._aborted_by_initiator(event, now)
        return self._aborted_by_responder(event, now)


S = State
M = LinkMachine
#: Every (state, event) the machine accepts, the handler, and where it may lead. The same
#: table serves both roles; handlers refuse what the role does not do.
TRANSITIONS: tuple[Transition[Any], ...] = (
    row(S.IDLE, RekeyRequested, M._rekey_now, (S.FETCHING, S.OFFERED),
        "start an exchange (I) or ask the initiator for one (R)"),
    row(None, RekeyRequested, M._rekey_later, (), "an exchange is already in progress"),
    row(S.FETCHING, QkdKeysFetched, M._keys_fetched, (S.OFFERED, S.INSTALLING, S.IDLE),
        "I: send Offer; R: encapsulate, derive, install inbound"),
    row(None, QkdKeysFetched, M._keys_arrived, (),
        "keys fetched ahead for the next epoch; those of an abandoned exchange: discarded"),
    row(S.FETCHING, QkdFetchFailed, M._fetch_failed, (S.OFFERED, S.IDLE),
        "I: PQC-only Offer (fallback) or retry later; R: Abort"),
    row(None, QkdFetchFailed, M._prefetch_failed, (),
        "fetching ahead failed (the next exchange fetches again); or an abandoned fetch"),
    row(None, OfferReceived, M._offer, (), "R: check, then fetch the keys by ID (unless held"
        " ahead) and derive; a newer offer supersedes the exchange in progress; a duplicate"
        " gets the same Accept",
        tuple((a, b) for a in (S.IDLE, S.FETCHING, S.INSTALLING, S.ACCEPTED, S.ACTIVATING)
              for b in (S.FETCHING, S.INSTALLING) if a is not b)),
    row(S.OFFERED, AcceptReceived, M._accept, (S.INSTALLING, S.IDLE),
        "I: decapsulate, derive, verify confirm_R, install inbound"),
    row(None, AcceptReceived, M._late_accept, (), "I: a duplicate gets the same Commit again"),
    row(S.INSTALLING, SinkInstalled, M._installed, (S.ACTIVATING, S.ACCEPTED),
        "I: switch outbound; R: send Accept"),
    row(None, SinkInstalled, M._late_install, (), "inbound of an abandoned exchange: tracked"),
    row(S.INSTALLING, InstallFailed, M._install_failed, (S.IDLE,), "abandon the exchange"),
    row(None, InstallFailed, M._late_install_failed, (), "clean up a failed late install"),
    row(S.ACCEPTED, CommitReceived, M._commit, (S.ACTIVATING,),
        "R: verify confirm_I, switch outbound"),
    row(S.ACTIVATING, SinkActivated, M._activated, (S.COMMITTED, S.IDLE),
        "I: send Commit; R: send Ack, epoch done"),
    row(None, SinkActivated, M._late_activated, (),
        "a switch that finished after its exchange was given up"),
    row(S.ACTIVATING, ActivateFailed, M._activation_failed, (S.IDLE,),
        "a sink could not switch: block, alarm, give the exchange up"),
    row(None, ActivateFailed, M._activation_failed, (),
        "late: block if the key it failed on is the current one"),
    row(None, RetireFailed, M._retire_failed, (), "alarm; retire it again after a backoff"),
    row(None, BlockFailed, M._block_failed, (), "alarm; block again after a backoff"),
    row(None, CommitReceived, M._late_commit, (), "R: a duplicate gets the same Ack again"),
    row(S.COMMITTED, AckReceived, M._ack, (S.IDLE,), "I: the peer has switched; epoch done"),
    row(None, AckReceived, M._ignore, (), "late or duplicate Ack"),
    row(None, AbortReceived, M._abort_received, (), "the peer gave up this exchange; I may"
        " start again at once (stale epoch numbers, or PQC-only after the peer's KMS failed)",
        ((S.OFFERED, S.IDLE), (S.OFFERED, S.FETCHING), (S.FETCHING, S.IDLE),
         (S.INSTALLING, S.IDLE), (S.ACCEPTED, S.IDLE), (S.ACTIVATING, S.IDLE))),
    row(None, RekeyRequestReceived, M._rekey_requested, (), "I: start an exchange if none is"
        " in progress; after the responder restarted, resend the Offer at once, or start"
        " over if the responder's copy of the key or its Ack is lost",
        ((S.IDLE, S.FETCHING), (S.IDLE, S.OFFERED), (S.OFFERED, S.FETCHING),
         (S.OFFERED, S.IDLE), (S.COMMITTED, S.FETCHING), (S.COMMITTED, S.OFFERED),
         (S.COMMITTED, S.IDLE))),
    row(None, LinkUnknownAtPeer, M._link_unknown, (), "the peer has no such link: alarm; I"
        " keeps its Offer (retransmitted, not given up on a timer) until the peer is heard"
        " from"),
    row(None, StartGranted, M._granted, (), "I: the driver's turn (pacing): start the"
        " exchange it waited for, if still idle",
        ((S.IDLE, S.FETCHING), (S.IDLE, S.OFFERED))),
    row(None, KmsStatusObserved, M._kms_status, (), "track KMS health and key supply"),
    row(None, KmsUnreachable, M._kms_unreachable, (), "the KMS cannot be reached"),
    row(None, Tick, M._tick, (), "timers: a scheduled rekey starts (I); an exchange past"
        " attempt_timeout is given up (unless the data plane is switching keys: its answer"
        " decides); retransmissions; old keys retired; the hard lifetime",
        ((S.IDLE, S.FETCHING), (S.IDLE, S.OFFERED),
         *((a, S.IDLE) for a in (S.FETCHING, S.OFFERED, S.INSTALLING, S.ACCEPTED,
                                 S.COMMITTED)))),
)
LinkCore.table = {(t.state, t.event): t for t in TRANSITIONS}
