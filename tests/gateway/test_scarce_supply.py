"""Scarce QKD supply end to end: the aerial-70km profile (12.7 bit/s at 13.3 % QBER) shared by
ten links of different weights between two real daemons, over the real KMS simulator.

    site A: qkdgw run, 10 initiator links ──mTLS── site B: qkdgw run, 10 responder links
          │ enc_keys (ETSI 014, mTLS)                       │ dec_keys
          └──── KME-A ═══ qkdgw kms-sim: aerial-70km ═══ KME-B ────┘

Accelerated: the link's clock runs TIME_SCALE times faster than the wall clock (`time_scale`
in kms.yaml): its supply, drift and outages, so that 12.7 bit/s gives about 12 keys of 256
bits per real second, and the gateways rekey every INTERVAL. The ratios the test checks
(supply against demand, share against share) are those of the field link at a one-minute
cadence scaled in time.

Two phases. The pool starts with INITIAL_KEYS and the links draw faster than the link
supplies: the pool drains, and the forecast (`supply.pool_dry_in` of `qkdgw status --json`)
must name when it runs dry within 20 %. Then the pool is at its reserve (0 here) and the
supply is rationed: each link's QKD keys must follow its weight (the tolerance is stated at
`TOLERANCE`); pqc-fallback links go on rekeying without QKD between their keys; qkd+pqc links
only ever rekey with QKD, waiting for their share, and never block (their share brings a key
well within the hard lifetime).
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from gateway.demo.topology import wait_until
from kms.sim.link import LinkModel
from kms.sim.profiles import PROFILES
from tests.gateway.sites import Sites

PROFILE = "aerial-70km"
#: aerial-70km's 12.7 bit/s at this scale: ~3 kbit/s, ~12 keys of 256 bits a second.
TIME_SCALE = 240.0
#: (weight, mode) of each link: every weight with both modes but the largest.
LINKS = ((1, "pqc-fallback"), (1, "qkd+pqc"), (1, "pqc-fallback"), (2, "qkd+pqc"),
         (2, "pqc-fallback"), (2, "qkd+pqc"), (3, "pqc-fallback"), (3, "qkd+pqc"),
         (4, "pqc-fallback"), (4, "qkd+pqc"))
#: Every link asks for a key four times a second: together ~3 times the supply, so the pool
#: drains, and then each is hungrier than its share (the largest: 4/23 of ~12 keys/s).
INTERVAL = 0.25
INITIAL_KEYS = 400
#: The forecast checked is the one the status gives once the pool is down to this fraction:
#: the last ten polls (5 s here) are then all of steady draining, none of the start.
FORECAST_AT = 0.6
#: Keys counted over this long while rationed: ~240 in all, ~10 for a weight-1 link.
RATIONED_SECONDS = 20.0
#: A link's QKD keys while rationed may differ from its weight's part of all of them by this
#: fraction, or by MIN_SLACK keys if more: the credit is whole keys (±1 per link), earned at
#: the supply the last status poll (every 0.5 s) reported.
TOLERANCE = 0.25
MIN_SLACK = 3
#: Each weight's links together (two, with both modes), more keys, so a tighter bound.
CLASS_TOLERANCE = 0.15
#: The test's whole run, from the first epoch: the drain, the rationed phase, margins.
DEADLINE = 75.0


def quiet_seed() -> int:
    """A seed whose link has no random outage in the test's first minute: the forecast is of
    the current consumption and supply, and an outage mid-drain would change the supply the
    forecast was made with. (Outages are tested in tests/kms/test_profiles.py.)"""
    p = PROFILES[PROFILE]
    for seed in range(1000):
        m = LinkModel(key_rate=p.key_rate, nominal_qber=p.qber, capacity_bits=1, start=0.0,
                      stored_bits=0.0, qber_limit=p.qber_limit, drift=p.qber_drift,
                      random_outages=p.random_outages, seed=seed, name="qkd-ab",
                      time_scale=TIME_SCALE)
        if not any(m.in_outage(t / 10) for t in range(10 * 90)):
            return seed
    raise AssertionError("no seed without an outage in 90 s")


class Hub(Sites):
    """The simulator and the two daemons, configured as the module docstring says."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, policy={})
        d = self.layout
        kms = yaml.safe_load(d.kms_config.read_text())
        link = kms["links"][0]
        for field in ("key_rate", "qber"):
            link.pop(field)
        link.update(profile=PROFILE, time_scale=TIME_SCALE, seed=quiet_seed(),
                    initial_key_count=INITIAL_KEYS)
        d.kms_config.write_text(yaml.safe_dump(kms))
        for site in self.sites:
            path = d.site_config(site)
            config = yaml.safe_load(path.read_text())
            config["policy"] = {"interval": INTERVAL, "hard_lifetime": 10.0, "grace": 0.2,
                                "reserve_keys": 0}
            template = config["links"][0]
            config["links"] = [
                {**template, "name": f"l{i}", "sinks": [],
                 "policy": {"mode": mode, "qkd_share": weight}}
                for i, (weight, mode) in enumerate(LINKS)]
            path.write_text(yaml.safe_dump(config))

    def pool(self) -> int:
        assert self.sim is not None
        return int(self.sim.state()["links"]["qkd-ab"]["stored_key_count"])

    def rekeys_by_suite(self) -> dict[tuple[str, bool], float]:
        """(link, with QKD) -> epochs completed, from site A's /metrics."""
        url = f"http://127.0.0.1:{self.layout.metrics_port('a')}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            text = r.read().decode()
        out: dict[tuple[str, bool], float] = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                if s.name == "qkdgw_rekeys_total":
                    key = (s.labels["link"], s.labels["suite"].startswith("qkd+"))
                    out[key] = out.get(key, 0.0) + s.value
        return out

    def logs(self) -> str:
        root = self.layout.root
        return "\n".join(f"{name}: {(root / name).read_text()[-3000:]}"
                         for name in ("site-a.log", "site-b.log", "sim.log"))


@pytest.fixture
def hub(tmp_path: Path) -> Iterator[Hub]:
    h = Hub(tmp_path)
    try:
        h.start()
        yield h
    finally:
        h.stop()


def test_a_scarce_link_shared_by_weight_with_forecast_and_fallback(hub: Hub) -> None:
    start = time.monotonic()
    names = [f"l{i}" for i in range(len(LINKS))]
    wait_until("every link keyed", lambda: all(
        link["epoch"] > 0 for link in hub.links("a").values()), timeout=30,
        ignore=(OSError, aiohttp.ClientError), detail=hub.logs)
    assert all(link["kms"]["ok"] for link in hub.links("a").values())  # 13.3 % QBER is not down

    # -- the drain and its forecast ------------------------------------------------------------
    forecast: tuple[float, float] | None = None  # (when, seconds to dry) as the status said
    dry_at: float | None = None
    while dry_at is None:
        assert time.monotonic() - start < DEADLINE, hub.logs()
        now = time.monotonic()
        if hub.pool() == 0:  # (the reserve: 0 here)
            dry_at = now
            break
        pool = hub.pool()
        ahead = hub.links("a")["l0"]["supply"]["pool_dry_in"]
        if forecast is None and ahead is not None and pool <= FORECAST_AT * INITIAL_KEYS:
            forecast = (now, ahead)  # the trend of several seconds of steady draining
        time.sleep(0.1)
    assert forecast is not None, "the pool ran dry before any forecast"
    predicted, happened = forecast[1], dry_at - forecast[0]
    print(f"forecast {predicted:.1f} s ahead, the pool ran dry {happened:.1f} s later")
    assert abs(predicted - happened) <= 0.2 * happened

    # -- rationed: the supply by weight ---------------------------------------------------------
    wait_until("every link sees the pool at its reserve", lambda: all(
        link["supply"]["rationed"] for link in hub.links("a").values()), timeout=10)
    time.sleep(2.0)  # the keys held ahead from the drain are used up
    before, suites_before = hub.links("a"), hub.rekeys_by_suite()
    time.sleep(RATIONED_SECONDS)
    after, suites_after = hub.links("a"), hub.rekeys_by_suite()
    keys = {n: after[n]["supply"]["qkd_keys"] - before[n]["supply"]["qkd_keys"] for n in names}
    total, weights = sum(keys.values()), sum(w for w, _ in LINKS)
    print(f"QKD keys while rationed: {keys} ({total} in {RATIONED_SECONDS:g} s)")
    assert total > 150  # ~12 keys/s for 20 s: the supply went to the links
    for name, (weight, _) in zip(names, LINKS, strict=True):
        expected = total * weight / weights
        assert abs(keys[name] - expected) <= max(MIN_SLACK, TOLERANCE * expected), \
            (name, weight, keys[name], expected)
        assert after[name]["supply"]["share"] == pytest.approx(weight / weights, abs=1e-3)
    for weight in sorted({w for w, _ in LINKS}):
        mine = [n for n, (w, _) in zip(names, LINKS, strict=True) if w == weight]
        got, expected = sum(keys[n] for n in mine), total * weight * len(mine) / weights
        assert abs(got - expected) <= CLASS_TOLERANCE * expected, (weight, got, expected)

    # -- each mode as its policy says ------------------------------------------------------------
    for name, (_, mode) in zip(names, LINKS, strict=True):
        pqc = suites_after.get((name, False), 0) - suites_before.get((name, False), 0)
        qkd = suites_after.get((name, True), 0) - suites_before.get((name, True), 0)
        link = after[name]
        assert not link["blocked"], name
        if mode == "pqc-fallback":
            # on schedule (less each exchange's time), with QKD as its share allows
            assert qkd + pqc >= 0.7 * RATIONED_SECONDS / INTERVAL, (name, qkd, pqc)
            assert pqc > 0, name
            assert qkd > 0, name
        else:
            assert pqc == 0, (name, pqc)  # qkd+pqc: QKD in every epoch, waiting for it
            assert qkd > 0, name
            assert link["supply"]["qkd_cadence"] > INTERVAL  # paced to its share
    assert all(link["supply"]["rationed"] for link in after.values())  # still at the reserve
