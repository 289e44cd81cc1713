"""The XFRM sink on a real Linux IPsec stack: two sites in User-Mode Linux.

Topology and phases: tests/ipsec/xfrm_world.py. One guest boot runs every phase (about
four minutes); each test here judges one aspect of its results: the ping counts, the
capture of the wire between the sites (gateway/demo/wire.py), the SAs sampled in both
gateways, and what `ip xfrm` (an independent decoder) reads back.
"""

from __future__ import annotations

import itertools
import json
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from gateway.demo.wire import Kind, Tally
from tests.ipsec import xfrm_world as world
from tests.uml import boot

PHASES = ["main", "faults", "soft", "transport", "crash"]
GUEST_TIMEOUT = 900.0


@dataclass
class World:
    results: dict[str, Any]
    out: Path

    def phase(self, name: str) -> dict[str, Any]:
        error = self.results["errors"].get(name)
        if error:
            pytest.fail(f"phase {name} failed in the guest:\n{error}")
        phase: dict[str, Any] = self.results["phases"][name]
        return phase

    def event(self, what: str) -> float:
        t: float = next(t for t, w in self.results["events"] if w == what)
        return t


@pytest.fixture(scope="module")
def uml(tmp_path_factory: pytest.TempPathFactory) -> World:
    reason = boot.missing()
    if reason is not None:
        pytest.skip(f"no User-Mode Linux: {reason}")
    root = tmp_path_factory.mktemp("xfrm-uml")
    world.prepare(root / "world")
    run = boot.boot([sys.executable, "-m", "tests.ipsec.xfrm_world", str(root / "world"),
                     *PHASES], root / "guest", timeout=GUEST_TIMEOUT)
    results_file = root / "world" / "results.json"
    if run.returncode != 0 or not results_file.exists():
        pytest.fail(f"the UML guest did not finish:\n{run.explain()}")
    print(f"UML guest: {run.seconds:.0f} s; files in {root}", file=sys.stderr)
    return World(json.loads(results_file.read_text()), root / "world" / "out")


# -- the wire ------------------------------------------------------------------------------


def read_wire(pcap: Path) -> Tally:
    """What crossed wan-a (gateway/demo/wire.py): ESP between the gateways, each packet's
    time and SPI; TCP (the peer channel, the KMEs' mutual TLS); anything else is a leak."""
    return Tally.of(world.TOPOLOGY, {Kind.ESP, Kind.TCP}, timeline=True).read(pcap)


@pytest.fixture(scope="module")
def main_wire(uml: World) -> Tally:
    return read_wire(uml.out / uml.phase("main")["capture"]["pcap"])


@pytest.fixture(scope="module")
def faults_wire(uml: World) -> Tally:
    return read_wire(uml.out / uml.phase("faults")["capture"]["pcap"])


# -- main: traffic across rekeys ---------------------------------------------------------------


def test_no_packet_lost_at_500_per_second_across_50_rekeys(uml: World) -> None:
    m = uml.phase("main")
    ping4, ping6 = m["ping4"], m["ping6"]
    assert ping4["transmitted"] == m["rate"] * m["seconds"]
    assert ping4["received"] == ping4["transmitted"], "IPv4 packets lost"
    assert ping6["received"] == ping6["transmitted"] == 50 * m["seconds"], "IPv6 lost"
    rate = ping4["transmitted"] / m["elapsed"]
    assert rate >= 500, f"only {rate:.0f} packets/s each way"
    rekeys = m["status"]["a"]["rekeys"] - m["rekeys_before"]
    assert rekeys >= 50
    assert m["status"]["a"]["fingerprint"] == m["status"]["b"]["fingerprint"]


def test_every_packet_between_the_sites_is_esp(uml: World, main_wire: Tally) -> None:
    m = uml.phase("main")
    assert m["capture"]["dropped"] == 0, "the capture missed packets: counts are not exact"
    assert main_wire.leaked == 0, main_wire.leaks
    # Exactly the pings, each once each way: requests out of A, replies out of B.
    sent = m["ping4"]["transmitted"] + m["ping6"]["transmitted"]
    assert main_wire.esp["a>b"] == len(main_wire.timeline["a>b"]) == sent
    assert main_wire.esp["b>a"] == len(main_wire.timeline["b>a"]) == sent
    assert main_wire.control > 0  # the rekeys' peer channel and KMS traffic


def test_spis_change_every_epoch(uml: World, main_wire: Tally) -> None:
    m = uml.phase("main")
    rekeys = m["status"]["a"]["rekeys"] - m["rekeys_before"]
    for direction in ("a>b", "b>a"):
        first: dict[int, float] = {}
        last: dict[int, float] = {}
        for t, spi in main_wire.timeline[direction]:
            first.setdefault(spi, t)
            last[spi] = t
        order = sorted(first, key=first.__getitem__)
        assert len(order) >= 50
        assert len(order) >= rekeys - 2  # every epoch's SA carried traffic
        # One switch per epoch, never back: the old SA's last packet leaves at most a few
        # ms after the new one's first (the IPv4 and the IPv6 policy are repointed one
        # after the other).
        for old, new in itertools.pairwise(order):
            assert last[old] <= first[new] + 0.02, f"{direction}: SPI {old:#x} came back"


def test_sa_counters_rise_and_old_sas_are_gone_after_the_grace_period(uml: World) -> None:
    m = uml.phase("main")
    grace = world.POLICIES["main"]["grace"]
    for site in ("a", "b"):
        samples = [s for s in m["samples"] if s["site"] == site]
        seen: dict[int, list[float]] = {}
        packets: dict[int, list[int]] = defaultdict(list)
        for s in samples:
            for sa in s["sas"]:
                assert sa["alg"] == "rfc4106(gcm(aes))"
                assert sa["mode"] == 1
                if sa["out"]:
                    seen.setdefault(sa["spi"], []).append(s["t"])
                    packets[sa["spi"]].append(sa["packets"])
        order = sorted(seen, key=lambda spi: seen[spi][0])
        assert len(order) >= 50
        for old, new in itertools.pairwise(order):
            assert max(seen[old]) <= min(seen[new]) + grace + 1.5, \
                f"site {site}: SA {old:#x} outlived its successor by more than the grace"
        rising = [spi for spi in order if len(packets[spi]) >= 2
                  and packets[spi][-1] > packets[spi][0]]
        assert len(rising) >= len(order) // 2  # sampled twice while current: counting
        in_use = [len([sa for sa in s["sas"] if sa["out"]]) for s in samples]
        assert max(in_use) <= 2 + int(grace / world.POLICIES["main"]["interval"]) + 1


def _entries(text: str) -> list[str]:
    """`ip xfrm` output, one string per SA or policy (each starts at column 0)."""
    out: list[str] = []
    for line in text.splitlines():
        if line and not line[0].isspace():
            out.append("")
        if out:
            out[-1] += line + "\n"
    return out


def test_ip_xfrm_reads_back_what_the_sink_installed(uml: World) -> None:
    dump = uml.phase("main")["dumps"]["a"]
    sas = _entries(dump["state"])
    assert sas
    for sa in sas:
        assert "proto esp" in sa
        assert "mode tunnel" in sa
        assert "flag af-unspec" in sa
        assert "aead rfc4106(gcm(aes)) <key> 128" in sa
        assert "replay_window 64" in sa
    policies = _entries(dump["policy"])
    for src, dst in ((world.LAN_A, world.LAN_B), (world.LAN6_A, world.LAN6_B)):
        out = [p for p in policies if p.startswith(f"src {src} dst {dst}")]
        assert len(out) == 1
        assert "dir out" in out[0]
        assert f"tmpl src {world.GW_A} dst {world.GW_B}" in out[0]
        assert "proto esp reqid" in out[0]
        assert "mode tunnel" in out[0]
        back = [p for p in policies if p.startswith(f"src {dst} dst {src}")]
        assert sorted(p.split("\n")[1].split()[1] for p in back) == ["fwd", "in"]
        assert all(f"tmpl src {world.GW_B} dst {world.GW_A}" in p for p in back)


def test_stop_deletes_the_sas_and_leaves_blocking_policies(uml: World) -> None:
    m = uml.phase("main")
    assert "site a stopped" in m["stop_output"]
    for site in ("a", "b"):
        after = m["after_stop"][site]
        assert after["state"].strip() == ""
        assert after["policy"].count("action block") == 2
    assert m["stopped_ping"]["transmitted"] == 5
    assert m["stopped_ping"]["received"] == 0


# -- faults --------------------------------------------------------------------------------------


def reply_times(ping: dict[str, Any]) -> list[float]:
    return [t for t, _ in ping["replies"]]


def lost_between(ping: dict[str, Any], start: float, end: float) -> list[int]:
    """Requests never answered among those sent while replies came in [START, END]."""
    seqs = sorted(seq for t, seq in ping["replies"] if start <= t <= end)
    return sorted(set(range(seqs[0], seqs[-1] + 1)) - set(seqs)) if seqs else []


def _esp_between(wire: Tally, direction: str, start: float, end: float) -> int:
    return sum(start <= t < end for t, _ in wire.timeline.get(direction, []))


def test_peer_killed_traffic_flows_until_the_hard_lifetime_then_stops(
        uml: World, faults_wire: Tally) -> None:
    f = uml.phase("faults")
    hard = world.POLICIES["faults"]["hard_lifetime"]
    killed, restarted = f["killed_at"], f["restarted_at"]
    assert faults_wire.leaked == 0, faults_wire.leaks
    assert f["blocked_a"]["blocked"] is True
    # A keeps sending on its current SA (the peer's kernel still answers) ...
    replies = [t for t in reply_times(f["ping"]) if killed < t < restarted]
    assert replies
    assert max(replies) >= killed + 2
    # ... until A's hard lifetime blocks it: nothing leaves A afterwards.
    assert max(replies) <= killed + hard + 1.5
    assert _esp_between(faults_wire, "a>b", killed + hard + 1.5, restarted) == 0
    # B's kernel ends B's SAs on its own (no daemon left): hard lifetime + backstop slack.
    from ipsec.xfrm.sink import BACKSTOP_SLACK
    assert _esp_between(faults_wire, "b>a", killed + 2, killed + 3) > 0
    assert _esp_between(faults_wire, "b>a", killed + hard + BACKSTOP_SLACK + 1.5,
                        restarted) == 0


def test_peer_restarted_resynchronises_and_traffic_resumes(uml: World) -> None:
    f = uml.phase("faults")
    resumed = [t for t in reply_times(f["ping"]) if t > f["restarted_at"]]
    assert resumed
    assert min(resumed) < f["restarted_at"] + 30
    resumed_b = [t for t in reply_times(f["ping_b"]) if t > f["restarted_at"]]
    assert resumed_b
    assert min(resumed_b) < f["restarted_at"] + 30


def test_rekeys_succeed_with_loss_and_delay_on_the_control_path(uml: World) -> None:
    f = uml.phase("faults")
    on, off = uml.event("netem on"), uml.event("netem off")
    assert f["rekeys_netem"] >= 15, f"{f['rekeys_netem']} rekeys in {off - on:.0f} s"
    assert lost_between(f["ping"], on, off) == []  # ESP is not touched: nothing lost
    assert len([t for t in reply_times(f["ping"]) if on <= t <= off]) >= 15 * (off - on)


def test_a_crashed_gateway_restarts_without_dropping_traffic(uml: World) -> None:
    c = uml.phase("crash")
    assert any("adopted 1 outbound and 1 inbound SA(s)" in line for line in c["adopted"])
    assert any("traffic on the adopted SA" in line for line in c["adopted"])
    for ping in c["ping"].values():
        assert lost_between(ping, 0, float("inf")) == []
        # SIGINT ended the ping: its last request may still have been on its way.
        assert ping["received"] >= ping["transmitted"] - 1
        assert len([t for t in reply_times(ping) if t > c["crashed_at"]]) >= 50 * 10


def test_soft_packet_limit_makes_the_link_rekey(uml: World) -> None:
    s = uml.phase("soft")
    sent = s["ping"]["transmitted"]
    assert s["ping"]["received"] == sent
    assert s["rekeys"] >= sent // s["soft_packets"] - 1  # no timed rekey in this phase
    assert s["soft_limit_lines"]["a"] >= 1
    assert s["soft_limit_lines"]["b"] >= 1


def test_transport_mode_protects_the_gateways_own_traffic(uml: World) -> None:
    t = uml.phase("transport")
    assert t["ping"]["transmitted"] == t["ping"]["received"] == 2000
    assert t["rekeys"] >= 15
    wire = read_wire(uml.out / t["capture"]["pcap"])
    assert wire.leaked == 0, wire.leaks  # not one ICMP packet between the gateways in clear
    assert wire.esp["a>b"] == wire.esp["b>a"] == 2000
    assert len({spi for _, spi in wire.timeline["a>b"]}) >= 15
    assert wire.control > 0  # the peer channel, through the bypass policies
    sas = _entries(t["dump"]["state"])
    assert sas
    assert all("mode transport" in sa for sa in sas)


def test_nothing_left_behind(uml: World) -> None:
    assert uml.results["leftover_netns"].strip() == ""  # every namespace deleted
