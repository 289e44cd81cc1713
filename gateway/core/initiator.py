"""The initiator's side of the protocol: it starts each epoch (QKD keys by enc_keys, an
Offer), checks the responder's Accept, switches its outbound key and sends the Commit, and
finishes on the Ack (docs/protocol.md).
"""

from __future__ import annotations

from common.sink import EpochMaterial, Role
from gateway.core.events import (
    AbortReceived,
    AcceptReceived,
    AckReceived,
    Action,
    Alarm,
    Cause,
    FetchQkdKeys,
    QkdFetchFailed,
    QkdKeysFetched,
    Record,
    RecordKind,
    RekeyRequestReceived,
    Send,
)
from gateway.core.link import Attempt
from gateway.core.messages import (
    MAX_EPOCH,
    AbortReason,
    Commit,
    Offer,
    RekeyReason,
    RekeyRequest,
    Suite,
    version_for,
)
from gateway.core.policy import Mode
from gateway.core.qkd import QkdHandlers
from gateway.core.table import PeerMessageRejected, State, need
from kdf import InvalidKeyError, Purpose, X25519PrivateKey, derive_epoch
from kms.models import QkdKey


class InitiatorHandlers(QkdHandlers):
    # -- starting an exchange ----------------------------------------------------------------

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
        if self.ahead and self.kms.usable(now):
            announced_in = self.next_keys.announced_in
            keys = self.next_keys.take()
            self.attempt = Attempt(epoch=0, started=now, announced_in=announced_in)
            return [Record(RecordKind.REKEY_STARTED, self.max_epoch + 1, detail=f"{reason}, QKD key"
                           " fetched ahead")] + self._send_offer(now, keys)
        out = self._drop_ahead("the KMS is not usable")
        # A link that has had no key since it started may take its first from the reserve;
        # one whose share let its key expire waits for the share (fail closed, alarmed).
        first = self.keys.blocked and self.rekeys == 0
        if self.kms.usable(now) and self.kms.may_draw(now, keyless=first):
            self.kms.drew(now, keyless=first)
            self._request += 1
            self.attempt = Attempt(epoch=0, started=now, request=self._request)
            self.state = State.FETCHING
            return out + [Record(RecordKind.REKEY_STARTED, self.max_epoch + 1, detail=reason),
                          FetchQkdKeys(self._request, 1, self.policy.qkd_key_bits)]
        if self.kms.usable(now):  # rationed, and its share has not earned a key yet
            if self.policy.mode is Mode.PQC_FALLBACK:
                out += self._share_short("epochs go on without QKD until it has")
            else:
                return out + self._wait_for_share(now)
        if self.policy.mode is Mode.PQC_FALLBACK:
            self.attempt = Attempt(epoch=0, started=now)
            return out + [Record(RecordKind.REKEY_STARTED, self.max_epoch + 1, detail=reason)] + \
                self._send_offer(now, ())
        return out + self._kms_down_retry(now)

    def _wait_for_share(self, now: float) -> list[Action]:
        """qkd+pqc, rationed, and the link's share has not earned a key: keep the current
        key (until its hard lifetime) and ask again once the share has one."""
        self.attempt = None
        self.state = State.IDLE
        self.next_rekey_at = now + min(self.kms.until_credit(now), self.policy.retry_backoff_max)
        return self._share_short("the current key stays until its hard lifetime")

    def _kms_down_retry(self, now: float) -> list[Action]:
        """qkd+pqc without QKD keys: keep the current key, try again later."""
        self.attempt = None
        self.state = State.IDLE
        self.next_rekey_at = now + self._next_backoff()
        return self._alarm(Alarm.KMS_UNAVAILABLE, self.kms.reason or "no QKD keys")

    def _offer_keys(self, event: QkdKeysFetched, now: float) -> list[Action]:
        """enc_keys answered: offer the epoch with these keys."""
        return self._send_offer(now, event.keys)

    def _enc_keys_failed(self, event: QkdFetchFailed, now: float, alarm: list[Action]
                         ) -> list[Action]:
        if self.policy.mode is Mode.PQC_FALLBACK:
            return alarm + self._send_offer(now, ())
        return alarm + self._kms_down_retry(now)

    def _send_offer(self, now: float, keys: tuple[QkdKey, ...]) -> list[Action]:
        a = need(self.attempt, "the exchange")
        self.max_epoch += 1
        a.epoch = self.max_epoch
        a.qkd_keys, a.key_ids = keys, tuple(k.key_id for k in keys)
        self.used.add(a.key_ids)
        a.dk = self.kem.from_seed(self._rng(64))
        a.x25519 = X25519PrivateKey.from_private_bytes(self._rng(32))
        a.offer = Offer(
            v=version_for(a.key_ids), link=self.identity.link, epoch=a.epoch,
            out=self.keys.out_epoch,
            suite=Suite(bool(keys), self.kem.name).name, key_ids=a.key_ids,
            kme_i=self.kms.kme_id, kme_r=self.kms.peer_kme_id, ek=a.dk.encapsulation_key,
            pk=a.x25519.public_key, nonce=self._rng(32), spi=self._new_spi())
        a.next_send, a.send_interval = now + self.policy.retransmit, self.policy.retransmit
        self.state = State.OFFERED
        out: list[Action] = [Record(RecordKind.OFFERED, a.epoch, a.key_ids,
                                    detail=a.offer.suite), Send(a.offer)]
        return out + self._fetch_ahead(now)

    # -- the responder asks --------------------------------------------------------------------

    def _rekey_requested(self, event: RekeyRequestReceived, now: float) -> list[Action]:
        if self.role is Role.RESPONDER:
            raise PeerMessageRejected("role-conflict", "a rekey request reached the responder")
        m = event.message
        self._check_link(m.link)
        self.keys.note_peer_out(m.out, now)
        if m.reason is RekeyReason.RESTART:
            return self._peer_restarted(m, now)
        if self.state is not State.IDLE:
            return []
        return self._begin(now, f"peer asked: {m.reason}")

    def _peer_restarted(self, m: RekeyRequest, now: float) -> list[Action]:
        """The responder restarted: what it held of an exchange in progress is gone, and so
        are its copies of keys fetched ahead (the KME hands a key out once). Go on at once,
        rather than at the next backed-off retransmission or after a failed exchange."""
        why = "the responder restarted"
        # It may have fetched the keys announced in a Commit only if it had seen that
        # epoch (its request names the highest epoch it knows).
        out = self._drop_ahead(f"{why} (its copy is gone)") \
            if m.epoch >= self.next_keys.announced_in else []
        a = self.attempt
        if self.state is State.OFFERED and a is not None and a.offer is not None:
            if a.announced_in is None or m.epoch < a.announced_in:
                # It can still fetch these keys: resend (a duplicate is harmless).
                a.next_send, a.send_interval = now + self.policy.retransmit, \
                    self.policy.retransmit
                return out + [Send(a.offer)]
            return out + self._give_up(now, f"{why}: its copy of the QKD key is gone",
                                       Cause.PEER_RESTART) + \
                self._start_exchange(now, why)
        if self.state is State.COMMITTED and a is not None and m.epoch >= a.epoch:
            # It had this epoch's Offer; its Ack can no longer come.
            self.attempt, self.state = None, State.IDLE
            return out + [Record(RecordKind.UNCONFIRMED, a.epoch, a.key_ids,
                                 detail=f"{why} before its Ack")] + \
                self._start_exchange(now, why)
        if self.state is State.IDLE:
            return out + self._begin(now, f"peer asked: {m.reason}")
        return out

    # -- finishing -----------------------------------------------------------------------------

    def _accept(self, event: AcceptReceived, now: float) -> list[Action]:
        m = event.message
        a = need(self.attempt, "the exchange")
        offer, dk, x25519 = need(a.offer, "its Offer"), need(a.dk, "its KEM key"), \
            need(a.x25519, "its X25519 key")
        if (m.epoch, m.nonce_i) != (a.epoch, offer.nonce):
            return []  # an answer to an earlier attempt
        self._check_link(m.link)
        if len(event.peer_cert_sha256) != 32:
            raise PeerMessageRejected("identity-mismatch", "no peer certificate digest")
        try:
            k1 = dk.decapsulate(m.ct)
            k2 = x25519.exchange(m.pk)
        except InvalidKeyError as e:
            raise PeerMessageRejected("malformed", str(e)) from None
        t = self._transcript(offer, initiator_cert=self.identity.cert_sha256,
                             responder_cert=event.peer_cert_sha256, ct=m.ct, pk_r=m.pk,
                             nonce_r=m.nonce, spi_r=m.spi)
        keys = derive_epoch(qkd_keys=[k.material for k in a.qkd_keys], mlkem_secret=k1,
                            x25519_secret=k2, transcript=t)
        if not keys.confirm_ok(Purpose.CONFIRM_R, t, m.confirm):
            return self._give_up(now, "the responder's key confirmation does not verify",
                                 Cause.CONFIRM, failed=True) + [
                Send(self._abort_msg(offer, AbortReason.CONFIRM_FAILED)),
                *self._alarm(Alarm.EXCHANGE_FAILED, f"epoch {m.epoch}: key confirmation"
                             " failed (different keys: check both sites' configuration)")]
        self.keys.note_peer_out(m.out, now)
        a.transcript = t
        a.material = EpochMaterial(m.link, m.epoch, Role.INITIATOR, offer.suite, a.key_ids,
                                   spi_in=offer.spi, spi_out=m.spi, keys=keys)
        a.commit = Commit(v=version_for(self.next_keys.key_ids), link=m.link, epoch=m.epoch,
                          out=m.epoch, nonce_i=m.nonce_i, nonce_r=m.nonce,
                          confirm=keys.confirm_tag(Purpose.CONFIRM_I, t),
                          next_key_ids=self.next_keys.key_ids)
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

    def _switch(self, a: Attempt, now: float) -> list[Action]:
        """Our inbound key is in: the responder's already was (its Accept), so switch our
        outbound."""
        material = need(a.material, "its keys")
        return [Record(RecordKind.INSTALLED, a.epoch, a.key_ids, material.fingerprint),
                *self._activate(material, Suite(bool(a.key_ids), self.kem.name), now)]

    def _switched_first(self, a: Attempt, now: float) -> list[Action]:
        """We send on the new key: tell the responder, which switches on the Commit."""
        commit = need(a.commit, "its Commit")
        self.state = State.COMMITTED
        a.next_send, a.send_interval = now + self.policy.retransmit, self.policy.retransmit
        return [*self._switched(need(a.material, "its keys"), now), Send(commit)]

    def _ack(self, event: AckReceived, now: float) -> list[Action]:
        m = event.message
        a = need(self.attempt, "the exchange")
        commit, material = need(a.commit, "its Commit"), need(a.material, "its keys")
        if (m.epoch, m.nonce_i, m.nonce_r) != (a.epoch, commit.nonce_i, commit.nonce_r):
            return []
        self.keys.note_peer_out(m.epoch, now)  # the responder sends on this epoch now
        return self._succeeded(now) + [
            Record(RecordKind.REKEYED, m.epoch, a.key_ids, material.fingerprint,
                   latency=now - a.started, started=a.started)]

    def _aborted_by_responder(self, event: AbortReceived, now: float) -> list[Action]:
        m = event.message
        a = self.attempt
        if a is None or a.offer is None or (m.epoch, m.nonce_i) != (a.epoch, a.offer.nonce) \
                or self.state is not State.OFFERED:
            return []
        self.max_epoch = max(self.max_epoch, m.current)
        detail = f"the responder aborted epoch {m.epoch}: {m.reason}"
        if m.reason is AbortReason.STALE_EPOCH:
            out = self._give_up(now, detail, Cause.PEER_ABORT)
            return out + self._start_exchange(now, "resynchronised epoch numbers")
        if m.reason is AbortReason.KMS_UNAVAILABLE and self.policy.mode is Mode.PQC_FALLBACK:
            self.kms.refused_until = now + self.policy.retry_backoff_max
            out = self._give_up(now, detail, Cause.PEER_ABORT)
            return out + self._start_exchange(now, "the peer's KMS failed: PQC-only")
        return self._give_up(now, detail, Cause.PEER_ABORT, failed=True) + \
            self._alarm(Alarm.EXCHANGE_FAILED, detail)
