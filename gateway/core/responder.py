"""The responder's side of the protocol: it checks each Offer, fetches the QKD keys by ID
(dec_keys), derives the epoch's keys and installs its inbound key before it Accepts, switches
its outbound key on a verified Commit and Acks; it asks the initiator for an epoch when it
needs one (docs/protocol.md).
"""

from __future__ import annotations

from common.sink import EpochMaterial, Role
from gateway.core.events import (
    AbortReceived,
    Action,
    Cause,
    CommitReceived,
    FetchQkdKeysById,
    OfferReceived,
    QkdFetchFailed,
    QkdKeysFetched,
    Record,
    RecordKind,
    RekeyRequested,
    Send,
)
from gateway.core.link import Attempt
from gateway.core.messages import AbortReason, Accept, Ack, Commit, Offer, RekeyReason, Suite
from gateway.core.policy import Mode
from gateway.core.qkd import QkdHandlers
from gateway.core.table import IllegalEvent, PeerMessageRejected, State, need
from kdf import InvalidKeyError, Purpose, X25519PrivateKey, derive_epoch
from kms.models import QkdKey


class ResponderHandlers(QkdHandlers):
    _last_ack: Ack | None = None  # answered again to a repeated Commit

    def _ask_for_epoch(self, event: RekeyRequested, now: float) -> list[Action]:
        """A local reason to rekey: only the initiator starts epochs, so ask it."""
        return self._nudge(now, RekeyReason.OPERATOR if event.reason == "operator"
                           else RekeyReason.SOFT_LIMIT)

    # -- answering an offer --------------------------------------------------------------------

    def _offer(self, event: OfferReceived, now: float) -> list[Action]:
        o = event.message
        if self.role is Role.INITIATOR:
            raise PeerMessageRejected("role-conflict", "an Offer reached the initiator (both"
                                      " ends configured as initiator?)")
        self._check_link(o.link)
        a = self.attempt
        if a is not None and a.offer is not None and (o.epoch, o.nonce) == (a.epoch,
                                                                        a.offer.nonce):
            # A retransmission: answer it again once our inbound key is in (never before:
            # the initiator switches on our Accept), or let the exchange go on.
            return [Send(a.accept)] if self.state is State.ACCEPTED and a.accept else []
        if o.epoch <= self.max_epoch:
            return [Send(self._abort_msg(o, AbortReason.STALE_EPOCH)),
                    Record(RecordKind.REJECTED, o.epoch, o.key_ids, detail=f"stale epoch (ours is"
                           f" {self.max_epoch})")]
        qkd = bool(o.key_ids)
        reason = self._offer_problem(o, qkd, event.peer_cert_sha256)
        if reason is not None:
            code, detail = reason
            return [Send(self._abort_msg(o, code)), Record(RecordKind.REJECTED, o.epoch, o.key_ids,
                                                       detail=detail)]
        # Accepted for processing: from here on, state changes.
        out: list[Action] = []
        if a is not None:
            out += self._give_up(now, f"superseded by the offer for epoch {o.epoch}",
                                 Cause.SUPERSEDED)
        self.max_epoch = o.epoch
        self.keys.note_peer_out(o.out, now)
        self.keys.abandoned_below(o.epoch, keep=o.out, now=now)
        self.used.add(o.key_ids)
        self.attempt = a = Attempt(epoch=o.epoch, started=now, offer=o, key_ids=o.key_ids,
                                   peer_cert=event.peer_cert_sha256)
        if not qkd:
            return out + self._drop_ahead("the offer has no QKD key") + self._respond(now, ())
        if self.next_keys.key_ids == o.key_ids:
            return out + self._respond(now, self.next_keys.take())
        if self.next_keys.request is not None and self.next_keys.ids == o.key_ids:
            # Fetching these very keys already: wait for that answer, never ask twice.
            a.request = self.next_keys.request
            self.next_keys.given_up()
            self.state = State.FETCHING
            return out
        out += self._drop_ahead(f"the offer for epoch {o.epoch} uses other keys")
        self._request += 1
        a.request = self._request
        self.state = State.FETCHING
        return out + [FetchQkdKeysById(self._request, o.key_ids, self.policy.qkd_key_bits)]

    def _offer_problem(self, o: Offer, qkd: bool, peer_cert: bytes
                       ) -> tuple[AbortReason, str] | None:
        ours = Suite(qkd, self.kem.name).name
        if o.suite != ours:
            return AbortReason.SUITE_UNSUPPORTED, f"suite {o.suite!r} is not ours ({ours!r})"
        if not qkd and self.policy.mode is Mode.QKD_PQC:
            return AbortReason.QKD_REQUIRED, "a PQC-only offer, and this link requires QKD"
        reused = [k for k in o.key_ids if k in self.used]
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

    def _answer_keys(self, event: QkdKeysFetched, now: float) -> list[Action]:
        """dec_keys answered: derive the epoch's keys and install our inbound one."""
        return self._respond(now, event.keys)

    def _dec_keys_failed(self, event: QkdFetchFailed, now: float, alarm: list[Action]
                         ) -> list[Action]:
        offer = need(need(self.attempt, "the exchange").offer, "its Offer")
        return alarm + self._give_up(now, "dec_keys failed: " + event.reason, Cause.KMS) + [
            Send(self._abort_msg(offer, AbortReason.KMS_UNAVAILABLE))]

    def _respond(self, now: float, keys: tuple[QkdKey, ...]) -> list[Action]:
        a = need(self.attempt, "the exchange")
        o = need(a.offer, "its Offer")
        if tuple(k.key_id for k in keys) != o.key_ids:
            raise IllegalEvent("the KMS returned other key IDs than asked for")
        x = X25519PrivateKey.from_private_bytes(self._rng(32))
        try:
            k2 = x.exchange(o.pk)
        except InvalidKeyError as e:
            return self._give_up(now, str(e), Cause.INVALID_KEY) + [
                Send(self._abort_msg(o, AbortReason.SUITE_UNSUPPORTED))]
        sent = self.kem.encapsulate(o.ek)
        nonce_r, spi = self._rng(32), self._new_spi()
        t = self._transcript(o, initiator_cert=a.peer_cert,
                             responder_cert=self.identity.cert_sha256, ct=sent.ciphertext,
                             pk_r=x.public_key, nonce_r=nonce_r, spi_r=spi)
        epoch_keys = derive_epoch(qkd_keys=[k.material for k in keys],
                                  mlkem_secret=sent.shared_secret, x25519_secret=k2, transcript=t)
        a.transcript = t
        a.accept = Accept(link=o.link, epoch=o.epoch, out=self.keys.out_epoch, nonce_i=o.nonce,
                          ct=sent.ciphertext, pk=x.public_key, nonce=nonce_r, spi=spi,
                          confirm=epoch_keys.confirm_tag(Purpose.CONFIRM_R, t))
        a.material = EpochMaterial(o.link, o.epoch, Role.RESPONDER, o.suite, o.key_ids,
                                   spi_in=spi, spi_out=o.spi, keys=epoch_keys)
        return self._install(a.material)

    def _accepted(self, a: Attempt) -> list[Action]:
        """Our inbound key is in: now the initiator may switch to this epoch."""
        material, accept = need(a.material, "its keys"), need(a.accept, "its Accept")
        self.state = State.ACCEPTED
        return [Record(RecordKind.INSTALLED, a.epoch, a.key_ids, material.fingerprint),
                Send(accept)]

    # -- switching -----------------------------------------------------------------------------

    def _commit(self, event: CommitReceived, now: float) -> list[Action]:
        c = event.message
        a = self.attempt
        if self.role is Role.INITIATOR:
            raise PeerMessageRejected("role-conflict", "a Commit reached the initiator")
        a = need(a, "the exchange")
        offer, accept = need(a.offer, "its Offer"), need(a.accept, "its Accept")
        if (c.epoch, c.nonce_i, c.nonce_r) != (a.epoch, offer.nonce, accept.nonce):
            return self._late_commit(event, now)
        material, transcript = need(a.material, "its keys"), need(a.transcript, "its transcript")
        if not material.keys.confirm_ok(Purpose.CONFIRM_I, transcript, c.confirm):
            raise PeerMessageRejected("confirm-failed", f"epoch {c.epoch}: the initiator's key"
                                      " confirmation does not verify")
        a.commit = c
        self.keys.note_peer_out(c.epoch, now)  # the initiator sends on this epoch now
        return self._activate(material, Suite(bool(a.key_ids), self.kem.name), now)

    def _switched_second(self, a: Attempt, now: float) -> list[Action]:
        """We send on the new key, as the initiator does: the epoch is done."""
        c, material = need(a.commit, "its Commit"), need(a.material, "its keys")
        self._last_ack = Ack(link=c.link, epoch=c.epoch, out=self.keys.out_epoch,
                             nonce_i=c.nonce_i, nonce_r=c.nonce_r)
        out = [*self._switched(material, now), *self._succeeded(now), Send(self._last_ack),
               Record(RecordKind.REKEYED, c.epoch, a.key_ids, material.fingerprint,
                      latency=now - a.started, started=a.started)]
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
        if not ids or any(k in self.used for k in ids) or ids == self.next_keys.ids \
                or ids == self.next_keys.key_ids:
            return []
        return self._drop_ahead("superseded") + self._fetch_ahead(now, ids)

    def _aborted_by_initiator(self, event: AbortReceived, now: float) -> list[Action]:
        m = event.message
        a = self.attempt
        if a is not None and a.offer is not None and m.nonce_i == a.offer.nonce \
                and self.state is not State.IDLE:
            return self._give_up(now, f"the initiator aborted: {m.reason}", Cause.PEER_ABORT)
        return []

