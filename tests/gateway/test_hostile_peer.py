"""Hostile peers against real gateways: crafted and random messages through the real
peer channel (mTLS, pinned certificates), and what must hold afterwards: no link task dies,
nothing spins or hangs, nothing forges a log line, and a link is blocked at its hard
lifetime whatever the peer sent.

    KME-A ═══ qkdgw kms-sim ═══ KME-B
      │                           │
    qkdgw run (A) ◀──wss──▶ qkdgw run (B)   until the first epochs; then B is killed and
                  ◀──wss──▶ HostilePeer      a hostile peer with B's certificate takes over

The hypothesis barrage runs EXAMPLES examples (HYPOTHESIS_PROFILE=soak: a tenth of the
profile's examples, for long runs).
"""

from __future__ import annotations

import base64
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.core.messages import MAX_EPOCH, AbortReason, Offer
from kdf import kem_by_name
from tests.gateway.hostile import HostilePeer, busy, check_log
from tests.gateway.sites import Sites

pytestmark = pytest.mark.slow

HARD_LIFETIME = 8.0
EXAMPLES = max(40, settings().max_examples // 10)
B64_32 = base64.b64encode(b"\x00" * 32).decode()


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


class World:
    """A (under test) and B honest until the first epochs; then B killed and HOSTILE (with
    B's certificate, on B's port) in its place."""

    def __init__(self, root: Path) -> None:
        self.sites = Sites(root, {"interval": 1.0, "hard_lifetime": HARD_LIFETIME,
                                  "grace": 0.5, "attempt_timeout": 3.0,
                                  "retransmit_max": 1.0}).start()
        d = self.sites.layout
        self.sites.wait_until("the first epochs", lambda: self.sites.converged()
                              and self.sites.link("a")["epoch"] >= 2)
        self.sites.stop_site("b", signal.SIGKILL)
        self.activated = time.time()  # A's key is at most this fresh
        self.hostile = HostilePeer(d.pki, "gw-b", ("127.0.0.1", d.gateway_port("b")),
                                   ("127.0.0.1", d.gateway_port("a")), "gw-a").start()

    @property
    def pid(self) -> int:
        return self.sites.procs["a"].pid

    def alive(self) -> dict[str, Any]:
        assert self.sites.procs["a"].poll() is None, self.sites.log("a")[-3000:]
        return self.sites.link("a")  # the admin socket answers

    def close(self) -> None:
        self.hostile.close()
        self.sites.stop()

    def check_log(self) -> None:
        check_log(self.sites.log("a"))


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    w = World(tmp_path)
    try:
        yield w
    finally:
        w.close()


def _abort(offer: Offer, current: int) -> bytes:
    return json.dumps({"v": 1, "type": "abort", "link": "ab", "epoch": offer.epoch,
                       "out": 0, "nonce_i": _b64(offer.nonce), "reason": "stale-epoch",
                       "current": current}).encode()


def test_an_abort_naming_huge_epochs_stops_nothing_and_the_key_still_expires(
        world: World) -> None:
    """The first finding: `current: 2**63-1` used to kill A's link task silently and leave
    its last key in place past the hard lifetime."""
    offer = world.hostile.last_offer()
    refused = world.hostile.send(_abort(offer, 2**63 - 1))
    assert refused is not None
    assert refused.startswith("current: Input should be less than")
    assert world.hostile.send(_abort(offer, MAX_EPOCH)) is None  # well-formed: accepted
    world.sites.wait_until("A says it cannot go on", lambda: "exhausted" in
                           world.alive()["alarms"].get("exchange-failed", ""))
    world.sites.wait_until("A blocked at its hard lifetime", lambda: world.alive()["blocked"],
                           timeout=HARD_LIFETIME + 10)
    assert time.time() >= world.activated + HARD_LIFETIME - 1.5  # not before its time
    status = world.alive()
    assert "hard-lifetime" in status["alarms"]
    assert "link-failed" not in status["alarms"]
    world.check_log()


def test_a_peer_cannot_forge_a_log_line(world: World) -> None:
    nonce = _b64(b"\x01" * 32)
    evil = {"v": 1, "type": "ack", "link": "ab", "epoch": 1, "nonce_i": nonce,
            "nonce_r": nonce, "EVIL\nX: forged log line\r\n2026-01-01 00:00:00 INFO x": 1}
    answer = world.hostile.send(json.dumps(evil).encode())
    assert answer is not None
    assert "X: forged log line" in answer
    assert "\n" not in answer
    assert "\r" not in answer
    world.alive()
    log = world.sites.log("a")
    assert "X: forged log line" in log  # logged, on the line of the refusal
    world.check_log()  # every line is one the gateway wrote


def test_an_offer_naming_the_last_epoch_to_the_responder(tmp_path: Path) -> None:
    """A hostile initiator pushes the responder's epoch numbers to the bound: the honest
    initiator is then told so (stale-epoch), both say they cannot go on, and both block at
    the hard lifetime instead of failing or keeping the key."""
    sites = Sites(tmp_path, {"interval": 1.0, "hard_lifetime": HARD_LIFETIME, "grace": 0.5,
                             "mode": "pqc-fallback"}).start()
    d = sites.layout
    hostile = HostilePeer(d.pki, "gw-a", ("127.0.0.1", 0), ("127.0.0.1", d.gateway_port("b")),
                          "gw-b").start()
    try:
        sites.wait_until("the first epochs", lambda: sites.converged()
                         and sites.link("a")["epoch"] >= 2)
        ek = kem_by_name("ML-KEM-768").generate().encapsulation_key
        offer = {"v": 1, "type": "offer", "link": "ab", "out": 0,
                 "suite": "pqc+ML-KEM-768+X25519/CatKDF-SHA-384", "key_ids": [],
                 "kme_i": "kme-a", "kme_r": "kme-b", "ek": _b64(ek),
                 "pk": _b64(b"\x09" + b"\x00" * 31), "nonce": _b64(os.urandom(32)),
                 "spi": 4096}
        refused = hostile.send(json.dumps({**offer, "epoch": 2**63 - 1}).encode())
        assert refused is not None
        assert refused.startswith("epoch: Input should be less")
        assert hostile.send(json.dumps({**offer, "epoch": MAX_EPOCH}).encode()) is None
        sites.wait_until("A is told and says it cannot go on", lambda: "exhausted" in
                         sites.link("a")["alarms"].get("exchange-failed", ""))
        sites.wait_until("both blocked at the hard lifetime", lambda: sites.link("a")["blocked"]
                         and sites.link("b")["blocked"], timeout=HARD_LIFETIME + 10)
        for site in ("a", "b"):
            assert sites.procs[site].poll() is None
            assert "link-failed" not in sites.link(site)["alarms"]
            assert "Traceback" not in sites.log(site)
    finally:
        hostile.close()
        sites.stop()


# -- the barrage ---------------------------------------------------------------------------

EPOCHS = st.one_of(st.sampled_from([0, 1, 2, MAX_EPOCH - 1, MAX_EPOCH, MAX_EPOCH + 1,
                                    2**63 - 1, 2**64, -1]),
                   st.integers(-(2**70), 2**70), st.floats(allow_nan=True),
                   st.text(max_size=5), st.none())
TEXT = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=40)


def _bytes(sizes: list[int]) -> st.SearchStrategy[Any]:
    return st.one_of(*(st.binary(min_size=n, max_size=n).map(_b64) for n in sizes),
                     TEXT, st.integers())


def _reply(offer: Offer | None) -> st.SearchStrategy[dict[str, Any]]:
    """A message of any type, mostly about the last Offer, with hostile fields."""
    epoch = st.one_of(st.just(offer.epoch), EPOCHS) if offer else EPOCHS
    nonce_i = st.one_of(st.just(_b64(offer.nonce)), _bytes([32, 31, 0])) if offer \
        else _bytes([32])
    fields = {
        "v": st.one_of(st.just(1), st.integers(0, 3), TEXT),
        "type": st.sampled_from(["accept", "abort", "commit", "ack", "rekey-request",
                                 "offer", "bogus"]),
        "link": st.one_of(st.just("ab"), TEXT),
        "epoch": epoch, "out": st.one_of(epoch, EPOCHS), "nonce_i": nonce_i,
        "nonce_r": _bytes([32]), "nonce": _bytes([32, 33]), "ct": _bytes([1088, 1568, 0, 5]),
        "pk": _bytes([32, 31]), "ek": _bytes([1184, 12]), "spi": st.one_of(
            st.integers(0, 2**33), st.just(256)),
        "confirm": _bytes([48, 47]), "reason": st.one_of(
            st.sampled_from([r.value for r in AbortReason] + ["restart", "operator",
                                                             "soft-limit"]), TEXT),
        "current": EPOCHS, "suite": st.one_of(st.just(
            "qkd+ML-KEM-768+X25519/CatKDF-SHA-384"), TEXT),
        "key_ids": st.lists(st.one_of(st.uuids().map(str), TEXT), max_size=5),
        "next_key_ids": st.lists(st.uuids().map(str), max_size=5),
        "kme_i": st.one_of(st.just("kme-a"), TEXT), "kme_r": st.one_of(st.just("kme-b"), TEXT),
        "audit": st.one_of(st.none(), st.fixed_dictionaries({
            "site": TEXT, "seq": EPOCHS, "hash": st.one_of(st.just("0" * 64), TEXT)})),
    }
    return st.fixed_dictionaries({}, optional=fields)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(TEXT, inner, max_size=4), max_leaves=20)


def _frame(offer: Offer | None) -> st.SearchStrategy[bytes]:
    return st.one_of(
        _reply(offer).map(lambda m: json.dumps(m).encode()),
        _reply(offer).map(lambda m: json.dumps(m).encode()[:-1] + b',"v":1}'),  # v twice
        JSON.map(lambda v: json.dumps(v).encode()),
        st.binary(max_size=200),
        st.integers(1, 3000).map(lambda n: b"[" * n + b"]" * n),
        st.sampled_from([b"NaN", b'{"epoch": Infinity}', b"1" * 5000, b"\xff\xfe",
                         b'{"type":"ack","link":"\\ud800"}']),
    )


def test_a_hostile_peer_finds_nothing_that_kills_spins_hangs_or_leaks(world: World) -> None:
    sent = 0

    @settings(max_examples=EXAMPLES, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(data=st.data())
    def barrage(data: st.DataObject) -> None:
        nonlocal sent
        offers = [m for m in list(world.hostile.received) if isinstance(m, Offer)]
        frames = data.draw(st.lists(_frame(offers[-1] if offers else None), min_size=1,
                                    max_size=4))
        for raw in frames:
            # Tagged with the link, or not at all, or with another link or any bytes.
            tag = data.draw(st.one_of(st.none(), st.sampled_from([b"", b"zz\n", b"\n"]),
                                      st.binary(max_size=300)))
            world.hostile.send(raw, text=data.draw(st.booleans()), tag=tag)
            sent += 1
        world.alive()

    barrage()
    assert sent >= EXAMPLES
    # Nothing spins: A idles (a retransmission now and then).
    share = busy(world.pid)
    assert share < 0.5, f"A uses {share:.0%} of a core while idle"
    # Whatever was sent, A's last key ends at its hard lifetime.
    world.sites.wait_until("A blocked", lambda: world.alive()["blocked"],
                           timeout=max(0.0, world.activated + HARD_LIFETIME - time.time()) + 10)
    assert "hard-lifetime" in world.alive()["alarms"]
    world.check_log()
