"""What a node of a pair shows once it is standby: no per-link metrics left from when it was
active (an alert must not fire, nor stay quiet, on them), a dashboard that says standby, and a
history that says nobody keyed the link meanwhile.

    site A: qkdgw run (ha node a1; its role told as keepalived would: POST /ha)
          ══ mTLS ══ site B: qkdgw run
    └── KME-A ═══ qkdgw kms-sim ═══ KME-B ──┘
"""

from __future__ import annotations

import urllib.request
from pathlib import Path

import yaml

from tests.gateway.sites import Sites


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 (loopback)
        return str(r.read().decode())


def test_a_node_gone_standby_shows_nothing_stale(tmp_path: Path) -> None:
    sites = Sites(tmp_path, {"interval": 1.0, "hard_lifetime": 30.0, "mode": "pqc-fallback"})
    path = sites.config_path("a")
    config = yaml.safe_load(path.read_text())
    config["ha"] = {"node": "a1"}
    path.write_text(yaml.safe_dump(config))
    metrics = f"http://{config['metrics']['listen']}"
    with sites.start():
        def notify(state: str) -> None:
            sites.admin("a", "/ha", {"args": ["INSTANCE", "VI_1", state, "100"]})  # type: ignore[dict-item]

        notify("MASTER")
        sites.wait_until("node a1 active and keyed", sites.converged)
        assert 'qkdgw_epoch{link="ab"}' in _get(metrics + "/metrics")
        assert 'qkdgw_peer_channel_up{peer="gw-b"} 1.0' in _get(metrics + "/metrics")

        notify("BACKUP")
        sites.wait_until("node a1 standby",
                         lambda: sites.status("a")["ha"]["role"] == "standby")
        text = _get(metrics + "/metrics")
        for series in ('qkdgw_epoch{link="ab"}', 'qkdgw_blocked{link="ab"}',
                       'qkdgw_key_has_qkd{link="ab"}', 'qkdgw_key_age_seconds{link="ab"}',
                       "qkdgw_peer_channel_up{"):
            assert series not in text, series
        assert 'qkdgw_ha_role{role="standby"} 1.0' in text
        page = _get(metrics + "/?part=live")
        assert ">standby</span>" in page
        assert 'data-condition="none"' in page
        spans = yaml.safe_load(_get(metrics + "/api/history?link=ab&seconds=600"))["spans"]
        assert spans[-1]["condition"] == "none", spans
        assert "qkd" in [s["condition"] for s in spans], spans
