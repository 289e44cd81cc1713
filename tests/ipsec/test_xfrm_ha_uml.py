"""A gateway pair under keepalived on the kernel's own IPsec (the xfrm sink), in User-Mode
Linux: tests/ipsec/xfrm_ha_world.py runs the scenarios in one guest (crash, the crashed node
back as standby, a handover back to it, links down); each test judges one of them from the
flows' sequence numbers, the roles and epochs, the standby's kernel and the WAN capture.
"""

from __future__ import annotations

import json
import shutil
import sys
from typing import Any

import pytest

from tests.uml import boot

GUEST_TIMEOUT = 600.0
#: As tests/ipsec/test_ha_strongswan.py: bounds that tell a failover from its absence
#: (the figures are bench/ha.py's and docs/ha.md's), for a guest whose one CPU runs it all.
MAX_CRASH_OUTAGE = 3.0
MAX_HANDOVER_OUTAGE = 2.0


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    reason = boot.missing() or (None if shutil.which("keepalived") else
                                "keepalived is not installed (apt-get install keepalived)")
    if reason is not None:
        pytest.skip(f"no User-Mode Linux pair: {reason}")
    root = tmp_path_factory.mktemp("xfrm-ha-uml")
    run = boot.boot([sys.executable, "-m", "tests.ipsec.xfrm_ha_world", str(root / "world")],
                    root / "guest", timeout=GUEST_TIMEOUT)
    results_file = root / "world" / "results.json"
    if run.returncode != 0 or not results_file.exists():
        pytest.fail(f"the UML guest did not finish:\n{run.explain()}")
    results: dict[str, Any] = json.loads(results_file.read_text())
    if results["error"]:
        pytest.fail(f"the scenarios failed in the guest:\n{results['error']}")
    print(f"UML guest: {run.seconds:.0f} s; files in {root}", file=sys.stderr)
    return results


def lost(ha: dict[str, Any], name: str) -> dict[str, list[float]]:
    s = ha["scenarios"][name]
    out = {}
    for flow, data in ha["flows"].items():
        got = set(data["received"])
        out[flow] = [t for seq, t in enumerate(data["sent_at"])
                     if seq not in got and s["start"] <= t <= s["end"]]
    return out


def outage(ha: dict[str, Any], name: str) -> float:
    rate = 100.0
    return max((ts[-1] - ts[0] + 1 / rate for ts in lost(ha, name).values() if ts),
               default=0.0)


def test_the_standby_killed_and_restarted_costs_the_traffic_nothing(
        ha: dict[str, Any]) -> None:
    assert lost(ha, "standby-killed") == {"a->b": [], "b->a": []}


def test_a_crash_fails_over_on_a_new_epoch(ha: dict[str, Any]) -> None:
    s = ha["scenarios"]["crash"]
    assert s["after"] > s["before"]
    assert 0.1 < outage(ha, "crash") <= MAX_CRASH_OUTAGE, lost(ha, "crash")


def test_the_crashed_node_comes_back_standby_with_no_sa_and_blocking_policies(
        ha: dict[str, Any]) -> None:
    s = ha["scenarios"]["back"]
    assert lost(ha, "back") == {"a->b": [], "b->a": []}
    assert s["active"] == ha["scenarios"]["crash"]["active"]  # nopreempt: no second outage
    assert s["kernel"]["sas"] == 0
    assert s["kernel"]["policies"] > 0
    assert s["kernel"]["blocking"] > 0


def test_a_handover_fails_back_and_the_old_active_keeps_no_sa(ha: dict[str, Any]) -> None:
    s = ha["scenarios"]["handover"]
    assert s["active"] != ha["scenarios"]["crash"]["active"]
    assert s["old_kernel"]["sas"] == 0
    assert s["old_kernel"]["blocking"] > 0
    assert outage(ha, "handover") <= MAX_HANDOVER_OUTAGE, lost(ha, "handover")


def test_links_down_fail_over(ha: dict[str, Any]) -> None:
    s = ha["scenarios"]["link-down"]
    assert s["after"] > s["before"]
    assert s["active"] != ha["scenarios"]["handover"]["active"]
    # A dead box: traffic stops at once and resumes once the other node has keyed.
    assert 0.1 < outage(ha, "link-down") <= MAX_CRASH_OUTAGE, lost(ha, "link-down")


def test_a_split_brain_heals_to_one_active_and_rekeys(ha: dict[str, Any]) -> None:
    s = ha["scenarios"]["split"]
    assert s["both"]
    assert s["after"] > 0


def test_a_takeover_without_kms_keys_without_qkd(ha: dict[str, Any]) -> None:
    link = ha["scenarios"]["kms-down"]["link"]
    assert not link["blocked"]
    assert link["suite"].startswith("pqc+")
    assert "qkd-fallback" in link["alarms"]


def test_nothing_crossed_the_wan_in_clear(ha: dict[str, Any]) -> None:
    wire = ha["wire"]
    assert wire["plaintext"] == 0
    assert wire["leaked"] == 0, wire["leaks"]
    assert wire["esp"] > 0
    assert wire["vrrp"] > 0

