"""Scarce QKD supply in the core: the pool's reserve, rationing by share, credit, the
forecast, and what each mode does without a QKD key (gateway/core/kmsview.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

from gateway.core.events import KmsStatusObserved
from gateway.core.kmsview import CREDIT_CAP, KmsView
from gateway.core.policy import Mode, Policy
from gateway.core.table import IllegalEvent
from tests.gateway.world import FAST, Side, World


def status(stored: int, *, key_rate: float = 256.0, share: float = 1.0, sharing: int = 1,
           qber: float = 0.02, me: str = "kme-a", peer: str = "kme-b") -> KmsStatusObserved:
    return KmsStatusObserved(stored_key_count=stored, key_size=256, kme_id=me,
                             peer_kme_id=peer, qber=qber, key_rate=key_rate, link_up=True,
                             share=share, sharing=sharing)


def observe(view: KmsView, event: KmsStatusObserved, now: float, reserve: int = 10) -> None:
    assert view.observe(event, now, 0, Policy().qber_threshold, reserve) is None


def test_the_pool_above_its_reserve_pays_for_everyone() -> None:
    v = KmsView()
    observe(v, status(11, key_rate=0.0, share=0.1, sharing=10), 0.0)
    assert not v.rationed
    for _ in range(50):
        assert v.may_draw(0.0)
        v.drew(0.0)


def test_at_the_reserve_each_link_draws_its_share() -> None:
    v = KmsView()
    observe(v, status(10, key_rate=256.0, share=0.25, sharing=4), 0.0)  # 1 key/s, 1/4 mine
    assert v.rationed
    assert v.allotment() == pytest.approx(0.25)
    assert not v.may_draw(0.0)  # credit starts from nothing: the pool is at its reserve
    assert v.may_draw(0.0, keyless=True)  # ... which is kept for a link without a key
    v.drew(0.0, keyless=True)
    assert v.until_credit(0.0) == pytest.approx(4.0)  # and that key was not paid for
    assert not v.may_draw(3.9)
    assert v.may_draw(4.0)
    v.drew(4.0)
    assert v.until_credit(4.0) == pytest.approx(4.0)
    # unused share is saved up to CREDIT_CAP keys, no more
    assert v.until_credit(1000.0) == 0.0
    for _ in range(int(CREDIT_CAP)):
        assert v.may_draw(1000.0)
        v.drew(1000.0)
    assert not v.may_draw(1000.0)


def test_credit_follows_the_supply_of_each_poll() -> None:
    v = KmsView()
    observe(v, status(0, key_rate=256.0, share=0.5), 0.0)
    observe(v, status(0, key_rate=0.0, share=0.5), 1.0)  # 0.5 key earned, then an outage
    assert v.until_credit(100.0) == float("inf")
    observe(v, status(0, key_rate=256.0, share=0.5), 100.0)
    assert v.until_credit(100.0) == pytest.approx(1.0)  # the other half at 0.5 key/s


def test_rationing_ends_a_key_per_sharing_link_above_the_reserve() -> None:
    v = KmsView()
    observe(v, status(10, sharing=4), 0.0)
    assert v.rationed
    observe(v, status(13, sharing=4), 1.0)
    assert v.rationed  # one key arriving must not start a free-for-all
    observe(v, status(14, sharing=4), 2.0)
    assert not v.rationed


def test_bad_shares_are_refused() -> None:
    for share, sharing in ((float("nan"), 1), (1.5, 1), (-0.1, 1), (0.5, 0)):
        with pytest.raises(IllegalEvent, match="share"):
            KmsView().observe(status(5, share=share, sharing=sharing), 0.0, 0, 0.2, 10)


def test_forecast_of_a_draining_pool() -> None:
    v = KmsView()
    for t in range(0, 31, 2):  # 5 keys/s consumed, 1 key/s supplied: down 4 keys/s
        observe(v, status(1000 - 4 * t), float(t))
    assert v.dry_in(30.0, 10) == pytest.approx((880 - 10) / 4)
    observe(v, status(10), 31.0)
    assert v.dry_in(31.0, 10) == 0.0
    steady = KmsView()
    for t in range(0, 31, 2):
        observe(steady, status(500), float(t))
    assert steady.dry_in(30.0, 10) is None  # not shrinking: never dry
    young = KmsView()
    observe(young, status(900), 0.0)
    observe(young, status(880), 2.0)
    assert young.dry_in(2.0, 10) is None  # two seconds of trend say too little


def rationed(w: World, share: float, keys_per_s: float) -> None:
    """Both sides see an empty pool that makes KEYS_PER_S, the initiator SHARE of it."""
    for side, (me, peer), mine in ((w.i, ("kme-a", "kme-b"), share),
                                   (w.r, ("kme-b", "kme-a"), 1.0)):
        side.feed(status(0, key_rate=256 * keys_per_s, share=mine, me=me, peer=peer))


def qkd_epochs(side: Side) -> tuple[int, int]:
    """Epochs this side offered: (with a QKD key, without)."""
    offered = [r for r in side.records if r.kind == "offered"]
    qkd = sum(1 for r in offered if r.detail.startswith("qkd+"))
    return qkd, len(offered) - qkd


def test_a_qkd_pqc_link_waits_for_its_share_and_keeps_its_key() -> None:
    w = World(seed=31)
    rationed(w, share=0.25, keys_per_s=0.1)  # one key per 40 s for this link, interval 10
    w.run_for(400)
    qkd, pqc = qkd_epochs(w.i)
    assert pqc == 0  # qkd+pqc: never an epoch without QKD
    assert 10 <= qkd <= 12  # the first at once (from the reserve: it had none), then 1/40 s
    assert "qkd-supply-low" in w.i.alarms
    assert not w.i.plane.blocked  # 40 s < the 60 s hard lifetime
    assert w.converged()
    assert not w.violations


def test_a_share_too_small_for_the_hard_lifetime_blocks_and_alarms() -> None:
    w = World(seed=32)
    rationed(w, share=0.1, keys_per_s=0.1)  # one key per 100 s, hard lifetime 60 s
    w.run_for(90)
    assert w.i.plane.blocked
    assert {"qkd-supply-low", "hard-lifetime"} <= w.i.alarms
    w.run_for(20)  # its share has earned a key (at 100 s): a new epoch, traffic again
    assert not w.i.plane.blocked
    assert qkd_epochs(w.i) == (2, 0)
    assert not w.violations


def test_a_fallback_link_rekeys_on_schedule_without_qkd_between_its_shares() -> None:
    policy = replace(FAST, mode=Mode.PQC_FALLBACK)
    w = World(seed=33, policy_i=policy, policy_r=policy)
    rationed(w, share=0.25, keys_per_s=0.1)
    w.run_for(400)
    qkd, pqc = qkd_epochs(w.i)
    assert 10 <= qkd <= 12  # its share: one QKD key per 40 s
    assert qkd + pqc >= 38  # every 10 s ± jitter, on schedule
    assert {"qkd-supply-low"} <= w.i.alarms
    assert w.converged()
    assert not w.violations


def test_a_field_link_at_13_percent_qber_is_not_down() -> None:
    w = World(seed=34)
    for side, (me, peer) in ((w.i, ("kme-a", "kme-b")), (w.r, ("kme-b", "kme-a"))):
        side.feed(status(1000, qber=0.148, me=me, peer=peer))  # aerial-70km at its drift's top
    w.run_for(30)
    assert w.i.machine.kms.ok
    assert "kms-unavailable" not in w.i.alarms
    assert qkd_epochs(w.i)[0] >= 3


def test_the_supply_as_the_status_shows_it() -> None:
    w = World(seed=35)
    rationed(w, share=0.25, keys_per_s=0.1)
    w.run_for(1)
    mine, peers = w.i.machine.supply(w.now), w.r.machine.supply(w.now)
    assert mine.share == 0.25
    assert mine.rationed
    assert mine.qkd_cadence == pytest.approx(40.0)
    assert mine.pool_dry_in == 0.0
    assert mine.qkd_keys == 1
    assert peers.share is None  # the initiator draws the keys
    assert peers.qkd_cadence is None
