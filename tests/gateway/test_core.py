"""The rekey core, scenario by scenario: modes, limits, hostile input, restarts."""

from __future__ import annotations

import copy
import json
import uuid
from dataclasses import replace

import pytest
from pydantic import ValidationError

from common.sink import EpochRef, Role
from gateway.core.events import (
    Alarm,
    Block,
    FetchQkdKeys,
    KmsStatusObserved,
    RekeyRequested,
    RequestStart,
    RetireOutbound,
    Send,
    SinkInstalled,
    StartGranted,
    Tick,
    received,
)
from gateway.core.keyring import KeyRing
from gateway.core.machine import TRANSITIONS, IllegalEvent, LinkMachine, State
from gateway.core.messages import (
    MAX_EPOCH,
    MAX_MESSAGE_BYTES,
    Abort,
    AbortReason,
    Accept,
    MessageError,
    Offer,
    RekeyReason,
    RekeyRequest,
    decode,
    encode,
    version_for,
)
from gateway.core.policy import Mode, Policy
from gateway.core.snapshot import MAX_PENDING, Snapshot
from tests.gateway.world import CERT_I, CERT_R, FAST, World, identity, policy

# -- happy path and modes ------------------------------------------------------------------


def test_epochs_roll_over_with_identical_keys_and_old_ones_retired() -> None:
    w = World(seed=7)
    w.kms_status()
    w.run_for(105)
    assert not w.violations
    assert w.converged()
    assert w.i.plane.outbound is not None
    assert w.i.plane.outbound >= 9
    assert w.i.plane.sent_on == list(range(1, w.i.plane.outbound + 1))
    assert w.r.plane.outbound is not None
    assert set(w.r.plane.inbound) <= {w.r.plane.outbound, w.r.plane.outbound + 1}
    fingerprints = {r.epoch: r.fingerprint for r in w.i.records if r.kind == "rekeyed"}
    assert fingerprints == {r.epoch: r.fingerprint for r in w.r.records if r.kind == "rekeyed"}
    assert len(set(fingerprints.values())) == len(fingerprints)
    used = [k for r in w.i.records if r.kind == "offered" for k in r.key_ids]
    ahead = {k.key_id for k in w.i.machine.ahead}  # one key fetched ahead for the next epoch
    assert len(used) == len(set(used))
    assert set(used) | ahead == w.kms.issued
    assert ahead == {k.key_id for k in w.r.machine.ahead}
    assert len(ahead) == 1


def test_qkd_pqc_without_kms_keeps_the_key_then_blocks_at_hard_lifetime() -> None:
    w = World(seed=1)
    w.kms_status()
    w.run_for(5)
    epoch = w.i.plane.outbound
    assert epoch == 1
    w.kms.available = False
    w.kms_status(ok=False)
    w.run_for(FAST.hard_lifetime - 10)
    assert w.i.plane.outbound == epoch
    assert not w.i.plane.blocked  # still on the last key
    assert "kms-unavailable" in w.i.alarms
    w.run_for(15)
    assert w.i.plane.blocked
    assert w.r.plane.blocked  # fail closed, never on a stale key
    assert "hard-lifetime" in w.i.alarms
    assert not w.violations
    w.kms.available = True
    w.kms_status()
    assert w.settle(FAST.retry_backoff_max + 2 * FAST.attempt_timeout)
    assert "hard-lifetime" not in w.i.alarms
    assert "kms-unavailable" not in w.i.alarms


def test_pqc_fallback_rekeys_without_qkd_and_returns_to_qkd() -> None:
    p = policy(mode=Mode.PQC_FALLBACK)
    w = World(seed=2, policy_i=p, policy_r=p)
    w.kms_status()
    w.run_for(5)
    w.kms.available = False
    w.kms_status(ok=False)
    w.run_for(35)
    offered = [r for r in w.i.records if r.kind == "offered"]
    assert offered[-1].detail.startswith("pqc+")
    assert offered[-1].key_ids == ()
    assert w.converged()
    assert "qkd-fallback" in w.i.alarms
    assert "qkd-fallback" in w.r.alarms
    pqc_epoch = w.i.plane.outbound
    w.kms.available = True
    w.kms_status()
    w.run_for(2)  # the first chance: at once, not at the next interval
    assert w.i.plane.outbound is not None
    assert pqc_epoch is not None
    assert w.i.plane.outbound > pqc_epoch
    assert w.converged()
    assert [r for r in w.i.records if r.kind == "offered"][-1].detail.startswith("qkd+")
    assert "qkd-fallback" not in w.i.alarms
    assert not w.violations


def test_responder_requiring_qkd_refuses_pqc_only_offers() -> None:
    w = World(seed=3, policy_i=policy(mode=Mode.PQC_FALLBACK), policy_r=FAST)
    w.kms.available = False
    w.kms_status(ok=False)
    w.run_for(20)
    assert w.i.plane.outbound is None
    assert w.i.plane.blocked
    assert w.r.plane.blocked
    assert any(r.kind == "rejected" and "requires QKD" in r.detail for r in w.r.records)
    assert "exchange-failed" in w.i.alarms


def test_qber_above_threshold_counts_as_kms_unavailable() -> None:
    w = World(seed=4)
    w.kms_status()
    w.run_for(5)
    w.kms_status(qber=0.3)
    assert w.i.alarms == {"kms-unavailable"}
    w.run_for(30)
    assert not any(r.kind == "fetched" and r.epoch > 2 for r in w.i.records)
    w.kms_status(qber=0.03)
    assert "kms-unavailable" not in w.i.alarms


def test_operator_and_soft_limit_rekeys() -> None:
    w = World(seed=5)
    w.kms_status()
    w.run_for(2)
    assert w.i.plane.outbound == 1
    w.r.feed(RekeyRequested("operator"))  # the responder asks the initiator
    w.run_for(1)
    assert w.i.plane.outbound == 2
    assert w.converged()
    w.i.feed(RekeyRequested("soft-limit"))
    w.run_for(1)
    assert w.i.plane.outbound == 3
    assert w.converged()


def test_with_admission_the_initiator_starts_only_on_its_turn() -> None:
    """The daemon paces exchanges: the initiator asks for a turn (RequestStart, with when its
    key reaches the hard lifetime) and starts on StartGranted; meanwhile nothing starts it,
    and the timer does not spin."""
    m = LinkMachine(identity(Role.INITIATOR), FAST, now=0.0, admission=True,
                    check_transitions=True)
    m.start(0.0)
    m.handle(KmsStatusObserved(1000, 256, "kme-a", "kme-b"), 0.0)
    assert m.handle(Tick(), 0.0) == [RequestStart(0.0)]  # no key yet: due now
    assert (m.state, m.queued, m.next_deadline()) == (State.IDLE, "scheduled", None)
    assert m.handle(RekeyRequested("operator"), 1.0) == []  # already waiting
    assert m.handle(Tick(), 5.0) == []
    out = m.handle(StartGranted(), 6.0)
    assert [type(a) for a in out if isinstance(a, FetchQkdKeys)] == [FetchQkdKeys]
    assert (m.state, m.queued) == (State.FETCHING, None)
    assert m.handle(StartGranted(), 6.0) == []  # a turn nobody waits for changes nothing
    assert m.state is State.FETCHING

    w = World(seed=40, admission=0.5)  # the world grants turns within half a second
    w.kms_status()
    w.run_for(3)
    assert w.converged()
    o = w.i.machine.outbound
    assert o is not None
    asked = w.i.machine.handle(RekeyRequested("operator"), w.now)
    assert asked == [RequestStart(o.activated_at + FAST.hard_lifetime)]
    w.i.feed(StartGranted())
    w.run_for(2)
    assert w.converged()
    assert w.i.plane.outbound == 2
    assert not w.violations


def test_restart_resumes_epochs_without_reusing_numbers() -> None:
    w = World(seed=6)
    w.kms_status()
    w.run_for(25)
    epoch = w.i.plane.outbound
    assert epoch is not None
    for side in (w.i, w.r, w.i):
        side.restart()
        w.run_for(3)
        assert w.converged()
        assert w.i.plane.outbound is not None
        assert w.i.plane.outbound > epoch
        epoch = w.i.plane.outbound
    assert not w.violations


def test_initiator_that_lost_its_state_resynchronises() -> None:
    w = World(seed=8)
    w.kms_status()
    w.run_for(25)
    w.i.snapshot = None  # its state file is gone
    w.i.restart()
    w.run_for(3)
    assert w.converged()
    assert not w.violations
    assert any(r.detail.endswith("stale-epoch") for r in w.i.records if r.kind == "discarded")


def test_snapshots_hold_no_key_material() -> None:
    w = World(seed=9)
    w.kms_status()
    w.run_for(25)
    assert w.i.snapshot is not None
    assert w.r.snapshot is not None
    text = w.i.snapshot.model_dump_json() + w.r.snapshot.model_dump_json()
    for key in list(w.epoch_keys.values()) + list(w.kms.reserved.values()):
        assert key.hex() not in text
    assert w.i.snapshot.outbound is not None
    assert w.i.snapshot.outbound.epoch == w.i.plane.outbound


# -- hostile and malformed input -----------------------------------------------------------


def _offer_and_accept() -> tuple[World, Offer, Accept]:
    w = World(seed=10)
    w.kms_status()
    sent: list[bytes] = []
    original = w._send

    def spy(side: object, message: object) -> None:
        sent.append(encode(message))  # type: ignore[arg-type]
        original(side, message)  # type: ignore[arg-type]

    w._send = spy  # type: ignore[method-assign]
    w.run_for(3)
    msgs = [decode(raw) for raw in sent]
    offer = next(m for m in msgs if isinstance(m, Offer))
    accept = next(m for m in msgs if isinstance(m, Accept))
    return w, offer, accept


@pytest.mark.parametrize(("raw", "problem"), [
    (b"", "not JSON"),
    (b'{"v":1,"type":"offer","link":"ab"', "not JSON"),
    (b"x" * (MAX_MESSAGE_BYTES + 1), "exceeds"),
    (b'{"v":1,"type":"ack","link":"ab","epoch":1,"nonce_i":"","nonce_r":""}', "nonce_i"),
    (b'{"v":1,"type":"ack","link":"ab","epoch":1,"out":0,"nonce_i":"' + b"A" * 43 + b'=",'
     b'"nonce_r":"' + b"A" * 43 + b'=","extra":1}', "extra: Extra inputs"),
    (b'{"v":1,"type":"ack","link":"a/b","epoch":1}', "link"),
    (b'{"v":1,"type":"ack","link":"ab","epoch":-1}', "epoch"),
    (b'{"v":9,"type":"ack"}', r"unsupported protocol version \(this gateway speaks 1 and 2\)"),
])
def test_codec_rejects_malformed_messages(raw: bytes, problem: str) -> None:
    with pytest.raises(MessageError, match=problem):
        decode(raw)


SKIP_ID = "00000000000000070100" + "ab" * 16  # epoch 7, 256 bits, a nonce (kdf/skip.py)


def test_version_2_carries_skip_key_ids_and_version_1_does_not() -> None:
    """ETSI 014 key IDs go as version 1 (what every gateway reads); SKIP key IDs need
    version 2, and a version 1 message holding one is refused by name."""
    _, offer, _ = _offer_and_accept()
    assert offer.v == 1
    assert version_for(offer.key_ids) == 1
    assert b'"v":1' in encode(offer)
    skip = offer.model_copy(update={"v": version_for([SKIP_ID]), "key_ids": (SKIP_ID,)})
    again = decode(encode(skip))
    assert isinstance(again, Offer)
    assert (again.v, again.key_ids) == (2, (SKIP_ID,))
    raw = encode(skip).replace(b'"v":2', b'"v":1')
    with pytest.raises(MessageError, match="version 1 message carries only ETSI GS QKD 014"):
        decode(raw)
    for bad in ("ab" * 7, "ab" * 129, "abc", "zz" * 16, "ab" * 15 + "a-"):
        with pytest.raises(MessageError, match=r"key_ids\.0: a key ID is an ETSI GS QKD 014"):
            decode(encode(skip).replace(SKIP_ID.encode(), bad.encode()))


def test_truncated_real_messages_are_rejected() -> None:
    _, offer, accept = _offer_and_accept()
    for message in (offer, accept):
        raw = encode(message)
        for cut in (1, len(raw) // 3, len(raw) // 2, len(raw) - 1):
            with pytest.raises(MessageError):
                decode(raw[:cut])


def test_wrong_mac_is_refused_and_the_key_does_not_change() -> None:
    w = World(seed=11)
    w.kms_status()
    w.run_for(3)
    current = w.i.plane.outbound
    # Tamper with the responder's next Accept on the wire.
    original = w._send

    def tamper(side: object, message: object) -> None:
        if isinstance(message, Accept):
            bad = bytes([message.confirm[0] ^ 1]) + message.confirm[1:]
            message = message.model_copy(update={"confirm": bad})
        original(side, message)  # type: ignore[arg-type]

    w._send = tamper  # type: ignore[method-assign]
    w.i.feed(RekeyRequested("operator"))
    w.run_for(1)
    assert w.i.plane.outbound == current
    assert not w.violations
    assert any("key confirmation" in r.detail for r in w.i.records if r.kind == "discarded")
    assert "exchange-failed" in w.i.alarms


def test_replayed_and_old_messages_change_nothing() -> None:
    w, offer, accept = _offer_and_accept()
    w.run_for(25)  # several epochs later
    before = (w.i.plane.outbound, dict(w.r.plane.inbound), w.r.machine.max_epoch)
    sent_before = len(w.r.records)
    w.r.feed(received(offer, CERT_I))  # replay of epoch 1's Offer
    w.i.feed(received(accept, CERT_R))  # replay of epoch 1's Accept
    w.run_for(0.1)
    assert (w.i.plane.outbound, dict(w.r.plane.inbound), w.r.machine.max_epoch) == before
    assert any("stale epoch" in r.detail for r in w.r.records[sent_before:])
    # the same Offer under a new epoch number: its QKD key ID is refused
    newer = offer.model_copy(update={"epoch": w.r.machine.max_epoch + 5})
    w.r.feed(received(newer, CERT_I))
    assert any("used before" in r.detail for r in w.r.records if r.kind == "rejected")
    assert w.r.machine.max_epoch == before[2]


def test_wrong_link_and_role_confusion_are_rejected() -> None:
    w, offer, accept = _offer_and_accept()
    w.r.feed(received(offer.model_copy(update={"link": "zz", "epoch": 99}), CERT_I))
    w.i.feed(received(offer, CERT_I))  # an Offer at the initiator
    w.r.feed(received(accept, CERT_R))  # an Accept at the responder
    assert w.r.rejected == ["wrong-link", "role-conflict"]
    assert w.i.rejected == ["role-conflict"]


def test_offer_without_peer_certificate_or_with_bad_keys_is_refused() -> None:
    w, offer, _ = _offer_and_accept()
    n = w.r.machine.max_epoch

    def variant(epoch: int, **change: object) -> Offer:
        return offer.model_copy(update={"epoch": epoch, "key_ids": (str(uuid.uuid4()),),
                                        **change})

    for bad, detail in (
        (received(variant(n + 1), b""), "no peer certificate"),
        (received(variant(n + 2, ek=b"\xff" * 1184), CERT_I), "malformed (FIPS 203"),
        (received(variant(n + 3, ek=b"\x00" * 12), CERT_I), "must be 1184 bytes"),
        (received(variant(n + 4, suite="qkd+RSA"), CERT_I), "is not ours"),
        (received(variant(n + 5, kme_i="kme-x"), CERT_I), "KME IDs kme-x/kme-b"),
        (received(variant(n + 6, pk=b"\x01" * 31), CERT_I), "X25519 public key"),
    ):
        w.r.feed(bad)
        assert detail in w.r.records[-1].detail, w.r.records[-1]
    assert w.r.machine.max_epoch == n  # none of them advanced the epoch


def test_illegal_events_raise_and_leave_the_state_untouched() -> None:
    w = World(seed=12)
    w.kms_status()
    w.run_for(3)
    m = w.i.machine
    before = copy.deepcopy(m.snapshot()), m.state
    with pytest.raises(IllegalEvent, match="SinkInstalled for epoch 99"):
        m.handle(SinkInstalled(99), w.now)
    assert (m.snapshot(), m.state) == before


# -- policy and pacing -----------------------------------------------------------------------


def test_interval_jitter_and_pacing() -> None:
    p = Policy(interval=100, jitter=0.1, hard_lifetime=1000, reserve_keys=10)
    # above the reserve the pool pays for the configured cadence (no wait for a share)
    assert p.next_interval(share_wait=None, unit=0.0) == (90.0, False)
    assert p.next_interval(share_wait=None, unit=0.5) == (100.0, False)
    # at it, an epoch waits until the link's share has earned its QKD key ...
    assert p.next_interval(share_wait=50.0, unit=0.5) == (100.0, False)
    assert p.next_interval(share_wait=200.0, unit=0.5) == (200.0, True)
    # ... asking again at half the hard lifetime at the latest
    assert p.next_interval(share_wait=float("inf"), unit=0.5) == (500.0, True)
    # pqc-fallback keeps its cadence: epochs without a QKD key go on with ML-KEM + X25519
    fallback = replace(p, mode=Mode.PQC_FALLBACK)
    assert fallback.next_interval(share_wait=200.0, unit=0.5) == (100.0, False)
    with pytest.raises(ValueError, match="hard_lifetime"):
        Policy(interval=100, hard_lifetime=50)


def test_machine_paces_rekeys_to_a_scarce_supply() -> None:
    w = World(seed=13)
    for side, (me, peer) in ((w.i, ("kme-a", "kme-b")), (w.r, ("kme-b", "kme-a"))):
        side.feed(KmsStatusObserved(stored_key_count=2, key_size=256, kme_id=me,
                                    peer_kme_id=peer, qber=0.02, key_rate=256 / 25.0,
                                    link_up=True))  # one key per 25 s
    w.run_for(100)
    epochs = w.i.plane.outbound or 0
    assert 4 <= epochs <= 5  # one at start, then one per 25 s instead of one per 10 s
    assert Alarm.QKD_SUPPLY_LOW in w.i.machine.alarms


# -- the transition table ---------------------------------------------------------------------


def test_every_transition_has_a_handler_and_a_note() -> None:
    for t in TRANSITIONS:
        assert getattr(LinkMachine, t.handler.__name__) is t.handler, t  # the one it names
        assert t.note
    pairs = [(t.state, t.event) for t in TRANSITIONS]
    assert len(pairs) == len(set(pairs))
    reachable = {b for t in TRANSITIONS for _, b in t.edges} | {State.IDLE}
    assert reachable == set(State)
    assert all(t.moves for t in TRANSITIONS if t.state is None and t.to)  # none half-stated


def test_blocked_until_the_first_epoch() -> None:
    w = World(seed=14)
    assert w.i.plane.blocked
    assert w.r.plane.blocked
    m = LinkMachine(w.i.machine.identity, FAST, now=0.0)
    assert Block("no key yet") in m.start(0.0)
    assert not any(isinstance(a, Send) for a in m.start(0.0))  # the initiator waits for keys


# -- one key ahead ----------------------------------------------------------------------------


def test_next_exchange_needs_no_kms_round_trip() -> None:
    w = World(seed=15)
    w.kms_status()
    w.run_for(2)
    fetched = len([r for r in w.i.records if r.kind == "fetched"])
    w.kms.available = False  # the KME is gone, but the next key is already here
    w.i.feed(RekeyRequested("operator"))
    w.run_for(1)
    assert w.i.plane.outbound == 2
    assert w.converged()
    assert not w.violations
    assert [r.detail for r in w.i.records if r.kind == "rekey-started"][-1].endswith("ahead")
    assert len([r for r in w.i.records if r.kind == "fetched"]) == fetched  # no new fetch


def test_offer_racing_the_responders_fetch_waits_for_it() -> None:
    w = World(seed=16)
    w.kms_status()
    w.run_for(2)
    w.kms_delay = 0.5  # the responder's fetch-ahead is still under way ...
    w.i.feed(RekeyRequested("operator"))
    w.run_for(0.01)
    w.i.feed(RekeyRequested("operator"))  # ... when the next Offer (using those keys) lands
    w.run_for(3)
    assert w.converged()
    assert not w.violations
    assert not [r for r in w.r.records if r.kind == "rejected"]
    assert "kms-unavailable" not in w.r.alarms  # the keys were asked for once only


def test_a_bad_kms_discards_the_key_fetched_ahead() -> None:
    w = World(seed=17)
    w.kms_status()
    w.run_for(2)
    assert w.i.machine.ahead
    assert w.r.machine.ahead
    w.kms_status(qber=0.3)
    assert not w.i.machine.ahead
    assert not w.r.machine.ahead
    assert [r for r in w.i.records if r.kind == "discarded"][-1].detail.startswith(
        "key fetched ahead: QBER")


def test_the_documented_state_machine_is_the_code() -> None:
    """docs/protocol.md embeds `python -m gateway.core.diagram` output; keep them equal."""
    from pathlib import Path

    from gateway.core.diagram import mermaid, table

    doc = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    block = doc.split("<!-- generated: begin -->\n")[1].split("<!-- generated: end -->")[0]
    assert block == f"```mermaid\n{mermaid()}\n```\n\n{table()}\n", \
        "regenerate: python -m gateway.core.diagram"


# -- numbers from outside stay within bounds ------------------------------------------------


def test_an_abort_naming_the_last_epoch_leaves_the_link_on_its_key_then_blocked() -> None:
    """A peer (or a stale-epoch Abort) can push epoch numbers to MAX_EPOCH: the initiator
    cannot go on, says so, keeps its key until the hard lifetime, then blocks."""
    w = World(seed=20)
    w.kms_status()
    w.run_for(3)
    epoch = w.i.plane.outbound
    original = w._send

    def stale(side: object, message: object) -> None:
        if isinstance(message, Accept):  # R answers the next Offer with the largest epoch
            offer = w.r.machine.attempt.offer  # type: ignore[union-attr]
            assert offer is not None
            message = Abort(link="ab", epoch=offer.epoch, nonce_i=offer.nonce,
                            reason=AbortReason.STALE_EPOCH, current=MAX_EPOCH)
        original(side, message)  # type: ignore[arg-type]

    w._send = stale  # type: ignore[method-assign]
    w.i.feed(RekeyRequested("operator"))
    w.run_for(1)
    m = w.i.machine
    assert m.max_epoch == MAX_EPOCH
    assert "exhausted" in m.alarms[Alarm.EXCHANGE_FAILED]
    assert w.i.plane.outbound == epoch
    assert not w.i.plane.blocked  # still on its key
    w.run_for(FAST.hard_lifetime)
    assert w.i.plane.blocked
    assert "hard-lifetime" in w.i.alarms
    assert not w.violations
    assert m.state is State.IDLE
    assert m.next_deadline() is not None  # alive, retrying


@pytest.mark.parametrize(("raw", "problem"), [
    (b'{"v":1,"v":1,"type":"ack"}', "member 'v' given more than once"),
    (b'{"v":1,"type":"ack","link":"ab","epoch":NaN}', "NaN is not a number"),
    (b'{"v":1,"type":"ack","link":"ab","epoch":Infinity}', "Infinity is not a number"),
    (b"[" * 2000 + b"]" * 2000, "nested more than"),
    (b'{"v":1,"type":"ack","link":"ab","epoch":1,"x":[[[[[[[[[[1]]]]]]]]]]}', "nested more"),
    (b'{"v":1,"type":"ack","link":"ab","epoch":' + b"9" * 5000 + b"}", "not JSON"),
    (b'{"v":1,"type":"ack","link":"ab","epoch":9223372036854775807}', "epoch: Input should"
     " be less than or equal to 281474976710656"),
])
def test_codec_refuses_what_the_schema_alone_would_not(raw: bytes, problem: str) -> None:
    with pytest.raises(MessageError, match=problem):
        decode(raw)


def test_peer_controlled_names_are_escaped_in_errors() -> None:
    nonce = "A" * 43 + "="
    raw = json.dumps({"v": 1, "type": "ack", "link": "ab", "epoch": 1, "nonce_i": nonce,
                      "nonce_r": nonce, "EVIL\nX: forged log line": 1}).encode()
    with pytest.raises(MessageError) as e:
        decode(raw)
    assert "\n" not in str(e.value)
    assert "EVIL" in str(e.value)


@pytest.mark.parametrize("ahead", [False, True])
def test_a_restarted_responder_gets_an_offer_at_once(ahead: bool) -> None:
    """R restarts while I's Offer goes unanswered: I answers R's restart request at once,
    not at its next backed-off retransmission. An Offer with keys fetched ahead is given up
    for fresh keys (R's copies are gone with its process; the KME hands a key out once)."""
    p = policy(prefetch=ahead)
    w = World(seed=21, policy_i=p, policy_r=p)
    w.kms_status()
    w.run_for(3)
    assert bool(w.i.machine.ahead) is ahead
    assert bool(w.r.machine.ahead) is ahead
    w.loss = 1.0  # R is gone: I's Offer goes unanswered, its retransmissions back off
    w.i.feed(RekeyRequested("operator"))
    w.run_for(FAST.retransmit + 2 * FAST.retransmit_max)
    a = w.i.machine.attempt
    assert w.i.machine.state is State.OFFERED
    assert a is not None
    assert (a.announced_in is not None) is ahead
    assert a.send_interval == FAST.retransmit_max
    w.loss = 0.0
    w.r.restart()  # R's first act: a rekey request (restart)
    w.run_for(0.05)  # a few messages each way, far less than the retransmission interval
    assert w.converged()
    assert not w.violations
    assert w.i.plane.outbound == (a.epoch + 1 if ahead else a.epoch)
    assert not [r for r in w.r.records if r.kind == "discarded" and "dec_keys" in r.detail]


def test_state_files_are_checked_like_peer_input() -> None:
    w = World(seed=22)
    w.kms_status()
    w.run_for(3)
    good = w.i.machine.snapshot().model_dump(mode="json")
    assert Snapshot.model_validate(good) == w.i.machine.snapshot()
    for change, problem in (
        ({"max_epoch": 2**63 - 1}, "max_epoch"),
        ({"outbound": {**good["outbound"], "activated_at": float("inf")}}, "activated_at"),
        ({"outbound": {**good["outbound"], "spi_in": 2**40}}, "spi_in"),
        ({"used_key_ids": ["not-a-uuid"]}, "used_key_ids"),
        ({"inbound": [good["outbound"] | {"retire_at": None}] * 0 + [
            {"epoch": 1, "spi_in": 256, "spi_out": 256}] * 65}, "inbound"),
        ({"extra": 1}, "extra"),
    ):
        with pytest.raises(ValidationError, match=problem):
            Snapshot.model_validate({**good, **change})


def test_a_restart_after_a_failure_starts_blocked_and_retires_the_old_key() -> None:
    w = World(seed=23)
    w.kms_status()
    w.run_for(3)
    snapshot = w.i.machine.snapshot()
    assert snapshot.outbound is not None
    m = LinkMachine(w.i.machine.identity, FAST, now=w.now, snapshot=snapshot)
    actions = m.start(w.now, plane_blocked=True)
    assert m.blocked
    assert m.outbound is None
    assert Block("no key yet") in actions
    assert any(isinstance(a, RetireOutbound) and a.ref.epoch == snapshot.outbound.epoch
               for a in actions)


def test_a_kms_status_with_nan_is_refused_and_changes_nothing() -> None:
    w = World(seed=24)
    w.kms_status()
    m = w.i.machine
    before = copy.deepcopy(m.kms)
    for bad in ({"qber": float("nan")}, {"key_rate": float("inf")}, {"key_rate": -1.0}):
        event = KmsStatusObserved(**{"stored_key_count": 5, "key_size": 256, "kme_id": "kme-a",
                                     "peer_kme_id": "kme-b", **bad})  # type: ignore[arg-type]
        with pytest.raises(IllegalEvent, match="KMS status with"):
            m.handle(event, w.now)
    assert m.kms == before
    assert m.next_deadline() == m.next_deadline()  # not NaN


def test_a_repeated_offer_gets_no_accept_before_the_inbound_key_is_in() -> None:
    """The initiator switches on the Accept: answering a retransmitted Offer with it while
    the responder's sink is still installing would have the initiator send on a key the
    responder cannot yet receive (found by the property tests once sinks took time)."""
    w = World(seed=26)
    w.kms_status()
    w.run_for(3)
    w.sink_delay = 1.0
    w.i.feed(RekeyRequested("operator"))
    w.step_until(w.r, State.INSTALLING, 1)
    offer = w.r.machine.attempt.offer  # type: ignore[union-attr]
    assert offer is not None
    m = w.r.machine
    assert not [a for a in m.handle(received(offer, CERT_I), w.now) if isinstance(a, Send)]
    w.step_until(w.r, State.ACCEPTED, 2)  # the key is in, the Accept on its way
    again = [a.message for a in m.handle(received(offer, CERT_I), w.now)
             if isinstance(a, Send)]
    assert again == [m.attempt.accept]  # type: ignore[union-attr]
    w.run_for(2)
    assert w.converged()


def _until_installing(w: World) -> None:
    """Run until the initiator installs its inbound key (a function: the state moves on)."""
    while w.i.machine.state is not State.INSTALLING:
        assert w.step(until=w.now + FAST.attempt_timeout), "I never installed"


def test_a_switch_in_progress_is_not_given_up_on_a_timer() -> None:
    """A data plane slower to switch than an exchange may take: the initiator waits for its
    answer. Given up on the timer, its next Offer would tell the responder (`out`) that it
    sends on the new epoch while its data plane still sends on the old one, and the
    responder would retire the old inbound key under it."""
    w = World(seed=36, policy_i=policy(prefetch=False))
    w.kms_status()
    w.run_for(3)
    old = w.i.plane.outbound
    w.i.feed(RekeyRequested("operator"))
    _until_installing(w)
    w.sink_delay = FAST.attempt_timeout + 2  # the switch takes longer than an exchange may
    w.run_for(FAST.attempt_timeout + 1)
    assert w.i.plane.outbound == old
    assert w.i.machine.state is State.ACTIVATING
    w.sink_delay = 0.0
    w.run_for(FAST.attempt_timeout)
    assert not w.violations
    assert old is not None
    assert w.i.plane.sent_on[1] == old + 1
    assert w.converged()


def test_a_state_file_lists_the_newest_keys_to_retire_when_sinks_refuse_many() -> None:
    """Sinks that refuse for long to retire keys (and to install them: every failed
    exchange leaves a key to clean up) leave more keys to retire than a state file may
    list: it lists the newest, and saving never fails (found by the property tests at 2000
    examples: the daemon's state flush raised)."""
    ring = KeyRing("ab", FAST)
    for e in range(1, MAX_PENDING + 7):
        ring.install(EpochRef("ab", e, 0x100 + e, 0x200 + e))
    snap = ring.save("ab", Role.RESPONDER, MAX_PENDING + 6, [])
    assert [p.epoch for p in snap.inbound] == list(range(7, MAX_PENDING + 7))


def test_a_switch_slower_than_the_keys_lifetime_ends_blocked() -> None:
    """A data plane that takes longer to switch than the new key may live: the key expires
    during the switch (blocked, as always past the hard lifetime); when the switch lands,
    the link is blocked again and the exchange given up, not an error (found by the
    explorer)."""
    w = World(seed=37, policy_i=policy(prefetch=False))
    w.kms_status()
    w.run_for(3)
    old = w.i.plane.outbound
    w.i.feed(RekeyRequested("operator"))
    _until_installing(w)
    w.sink_delay = FAST.hard_lifetime + 2
    w.run_for(FAST.hard_lifetime + 3)
    assert w.i.plane.blocked
    assert w.i.machine.state is not State.ACTIVATING
    assert "sink-failed" in w.i.alarms
    assert not w.violations
    w.sink_delay = 0.0
    assert w.settle(2 * FAST.hard_lifetime)  # (a call made while the sink was slow lands)
    assert old is not None
    assert w.i.plane.outbound is not None
    assert w.i.plane.outbound > old + 1
    assert not w.violations


# -- a link the peer does not have (yet) -----------------------------------------------------


def test_a_link_the_peer_does_not_have_spends_no_epoch_number() -> None:
    """R's gateway has no such link yet (its configuration not reloaded): I's Offer is
    answered `unknown-link`. I raises peer-link-unknown and keeps that one Offer far past
    attempt_timeout, offering no other epoch and fetching no more QKD keys; once R has the
    link (it starts, and asks for an epoch), epoch 1 completes and the alarm clears."""
    w = World(seed=5)
    w.without_link.add("R")
    w.kms_status()
    w.run_for(8 * FAST.attempt_timeout)
    i = w.i.machine
    assert i.state is State.OFFERED
    assert i.max_epoch == 1
    assert [r.epoch for r in w.i.records if r.kind == "offered"] == [1]
    assert not [r for r in w.i.records if r.kind == "discarded"]
    assert w.i.alarms == {Alarm.PEER_LINK_UNKNOWN.value}  # not peer-unreachable
    assert len(w.kms.issued) == 2  # the Offer's key and the next one's, fetched ahead
    w.without_link.clear()
    w.r.snapshot = None  # a new link there: no state file
    w.r.restart()
    assert w.settle(1.0)
    assert w.i.plane.outbound == w.r.plane.outbound == 1
    assert Alarm.PEER_LINK_UNKNOWN.value not in w.i.alarms
    assert not w.violations


def test_after_a_hold_the_exchange_times_out_from_when_the_peer_was_heard() -> None:
    """The hold ends with the first message of the peer for the link; an exchange that then
    gets no further is given up attempt_timeout later, as any other."""
    w = World(seed=6)
    w.without_link.add("R")
    w.kms_status()
    w.run_for(3 * FAST.attempt_timeout)
    a = w.i.machine.attempt
    assert a is not None
    assert a.held
    w.without_link.clear()
    w.loss = 1.0  # R has the link now, but nothing gets through but its restart request
    w.i.feed(received(RekeyRequest(link="ab", epoch=0, out=0, reason=RekeyReason.RESTART),
                      CERT_R))
    assert not a.held
    assert a.give_up_at(FAST.attempt_timeout) == w.now + FAST.attempt_timeout
    w.run_for(FAST.attempt_timeout + 0.1)
    assert [r.epoch for r in w.i.records if r.kind == "discarded"] == [1]


def test_a_responder_whose_peer_lacks_the_link_alarms_until_it_hears_from_it() -> None:
    w = World(seed=8)
    w.without_link.add("I")
    w.kms_status()
    w.run_for(4 * FAST.retransmit_max)
    assert Alarm.PEER_LINK_UNKNOWN.value in w.r.alarms
    assert w.r.machine.max_epoch == 0
    w.without_link.clear()
    w.i.snapshot = None  # a new link there
    w.i.restart()
    assert w.settle(1.0)
    assert w.i.plane.outbound == 1
    assert Alarm.PEER_LINK_UNKNOWN.value not in w.r.alarms
    assert not w.violations
