"""Site A as a gateway pair under real keepalived, the strongSwan data plane (kernel-libipsec),
UDP both ways throughout and a packet socket on the WAN counting what crosses it in clear
(gateway/demo/ha.py draws the topology; docs/ha.md says what each scenario must do).

One world runs the scenarios in order, as an operator's week would: the standby killed and
restarted, the active crashed, the crashed node back as standby, a planned handover back to
it, its links taken down, a split brain and its healing, and a takeover while the KMS is
unreachable (pqc-fallback: a PQC-only epoch; qkd+pqc: blocked, alarmed). Each test checks
one scenario from what the fixture measured: the packets lost in its window (sequence
numbers, both ways), the roles, the epochs, the audit trails, the charons' SAs.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.demo.ha import NODES, StrongswanHaSites
from gateway.demo.live import Flow, ha_missing, outage, start_flows
from gateway.demo.topology import until
from gateway.demo.wire import Kind, Live, Tally
from ipsec.strongswan.vici import Vici
from tests.ipsec.strongswan_world import missing_tools

#: Packets per second each way: enough to see a 10 ms gap, light for a CI host.
RATE = 500.0
#: Bounds that tell a failover from its absence, not the aims (bench/ha.py measures those:
#: 0.35 s for a crash, 0.1 s for a handover here): without a takeover, traffic would wait
#: for retransmissions and attempt timeouts (seconds) or the hard lifetime (30 s).
MAX_CRASH_OUTAGE = 3.0
MAX_HANDOVER_OUTAGE = 2.0
#: A scenario in which nothing should happen to the traffic is watched this long.
QUIET = 2.0
POLICY = {"interval": 2.0, "jitter": 0.0, "grace": 1.0, "hard_lifetime": 30.0,
          "mode": "pqc-fallback", "retransmit": 0.2, "attempt_timeout": 3.0}

pytestmark = pytest.mark.skipif(bool(missing_tools() or ha_missing()),
                                reason=str(missing_tools() or ha_missing()))


class World(StrongswanHaSites):
    tag = "th"
    verbose = False


@dataclass
class Window:
    """One scenario: when it ran (time.monotonic(), the flows' clock), and what it saw."""

    start: float
    end: float = 0.0
    facts: dict[str, Any] = field(default_factory=dict)


@dataclass
class Run:
    world: World
    flows: list[Flow]
    tally: Tally
    windows: dict[str, Window] = field(default_factory=dict)

    def lost(self, name: str) -> dict[str, list[float]]:
        """Per direction, the send times (monotonic, as the flows keep them) of the packets
        lost in scenario NAME's window."""
        w = self.windows[name]
        return {f.name: f.lost_in(w.start, w.end) for f in self.flows}

    def outage(self, name: str) -> float:
        """The longest span from the first to the last packet lost in NAME, either way."""
        w = self.windows[name]
        return outage(self.flows, w.start, w.end)


def _audit(w: World, node: str) -> list[dict[str, Any]]:
    path = w.state(node) / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


async def _charon_sas(w: World, node: str) -> tuple[int, list[str]]:
    """NODE's charon: its IKE SAs and the PPK ids it holds."""
    v = await Vici.connect(w.vici_path(node))
    try:
        events = await v.streamed("list-sas", "list-sa", {"noblock": "yes"})
        shared = (await v.request("get-shared")).get("keys", [])
    finally:
        await v.close()
    return sum(len(e) for e in events), [k for k in shared if k.startswith("qkdgw-")]


async def _epoch(w: World) -> int:
    return int((await w.link("b"))["epoch"])


async def _scenario(run: Run, name: str, act: Callable[[], Awaitable[None]]) -> Window:
    window = run.windows[name] = Window(time.monotonic() - 0.5)
    await act()
    window.end = time.monotonic()
    return window


async def _quiet() -> None:
    await asyncio.sleep(QUIET)


@pytest.fixture(scope="module")
def ha(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    root = tmp_path_factory.mktemp("ha")
    w = World(root, POLICY)
    w.build()
    flows: list[Flow] = []
    try:
        run = asyncio.run(_run(w, flows))
        yield run
    finally:
        for flow in flows:
            flow.stop.set()
            flow.tx.close()
            flow.rx.close()
        w.teardown()


async def _run(w: World, flows: list[Flow]) -> Run:
    """The world up, the traffic on, every scenario in turn; the traffic stopped."""
    live: Live | None = None
    try:
        await w.start()
        tally = Tally.of(w.topology, {Kind.ESP_IN_UDP, Kind.IKE, Kind.TCP, Kind.ICMP,
                                      Kind.VRRP})
        live = Live(w.net, "wan", "wan-a", tally)
        flows += start_flows(w, RATE)
        run = Run(w, flows, tally)
        await asyncio.sleep(1.0)
        await _scenarios(run)
        for flow in flows:
            flow.stop.set()
        await asyncio.sleep(1.0)  # the last packets arrive
        return run
    finally:
        if live is not None:
            live.close()


async def _scenarios(run: Run) -> None:
    w = run.world
    first = await w.active()
    assert first is not None
    other = "a2" if first == "a1" else "a1"

    # The standby killed, then back: nothing happens to the traffic.
    async def standby_killed() -> None:
        w.crash(other)
        await _quiet()
        w.restart(other)
        await until("the restarted node standby", lambda: _role_is(w, other, "standby"))
        await _quiet()
        run.windows["standby-killed"].facts["active"] = await w.active()

    await _scenario(run, "standby-killed", standby_killed)

    # The active crashes: the standby takes over.
    async def crash() -> None:
        before = await _epoch(w)
        w.crash(first)
        await until("the standby took over", lambda: w.converged(before))
        facts = run.windows["crash"].facts
        facts.update(before=before, after=await _epoch(w), active=await w.active())
        await asyncio.sleep(1.0)

    await _scenario(run, "crash", crash)

    # The crashed node back: standby, nothing happens to the traffic, it holds no keys.
    async def back() -> None:
        w.restart(first)
        await until("the crashed node back standby", lambda: _role_is(w, first, "standby"))
        await _quiet()
        facts = run.windows["back"].facts
        facts["active"] = await w.active()
        facts["standby_charon"] = await _charon_sas(w, first)
        facts["standby_status"] = await w.admin(first)

    await _scenario(run, "back", back)

    # Planned switchover back to the first node (fail-back).
    async def handover() -> None:
        before = await _epoch(w)
        await w.handover(other)
        await until("the first node took over", lambda: w.converged(before))
        await asyncio.sleep(1.0)
        facts = run.windows["handover"].facts
        facts.update(active=await w.active(), old_charon=await _charon_sas(w, other))

    await _scenario(run, "handover", handover)

    # The active's links go down: the other takes over; links back, it stays standby.
    async def link_down() -> None:
        before = await _epoch(w)
        w.link_down(first)
        await until("the other node took over", lambda: w.converged(before))
        run.windows["link-down"].facts["active"] = await w.active()
        w.link_up(first)
        await until("the node whose links came back is standby",
                    lambda: _role_is(w, first, "standby"))
        await asyncio.sleep(1.0)
        run.windows["link-down"].facts["after"] = await w.active()

    await _scenario(run, "link-down", link_down)

    # Split brain: the pair's VRRP cut both ways: both active; then healed.
    async def split() -> None:
        w.cut_vrrp()
        await until("both nodes active", lambda: _both_active(w))
        run.windows["split"].facts["both"] = True
        await asyncio.sleep(3.0)
        before = await _epoch(w)
        w.heal_vrrp()
        await until("one node active again", lambda: _one_active(w))
        await until("rekeying again", lambda: w.converged(before))
        await asyncio.sleep(1.0)

    await _scenario(run, "split", split)

    # The KMS unreachable as the standby takes over: pqc-fallback keys without QKD.
    async def kms_down() -> None:
        active = await w.active()
        assert active is not None
        standby = "a2" if active == "a1" else "a1"
        before = await _epoch(w)
        w.kms_fault(30.0)
        await asyncio.sleep(0.5)
        w.crash(active)
        await until("the standby took over without QKD", lambda: w.converged(before))
        facts = run.windows["kms-down"].facts
        facts.update(link=await w.link(standby), node=standby)
        w.restart(active)
        await until("the crashed node back standby", lambda: _role_is(w, active, "standby"))
        # The same again with a qkd+pqc policy (a reload of the standby): blocked, alarmed.
        _set_mode(w, active, "qkd+pqc")
        await until("the standby reloaded", lambda: _reloaded(w, active))
        w.crash(standby)
        await until("the qkd+pqc node active", lambda: _role_is(w, active, "active"))
        await asyncio.sleep(3.0)
        facts["strict"] = await w.link(active)
        w.kms_fault(None)

    await _scenario(run, "kms-down", kms_down)


def _set_mode(w: World, node: str, mode: str) -> None:
    path = w.root / w.config(node)
    config = yaml.safe_load(path.read_text())
    config["policy"]["mode"] = mode
    path.write_text(yaml.safe_dump(config))


async def _reloaded(w: World, node: str) -> bool:
    """`qkdgw reload` (refused, "try again", while the daemon still starts)."""
    return "error" not in await w.admin(node, "POST", "/reload")


async def _role_is(w: World, node: str, role: str) -> bool:
    return await w.role(node) == role


async def _both_active(w: World) -> bool:
    return all([await w.role(n) == "active" for n in NODES])


async def _one_active(w: World) -> bool:
    return sorted([await w.role(n) or "" for n in NODES]) == ["active", "standby"]


# -- the scenarios ---------------------------------------------------------------------------


def test_the_standby_killed_and_restarted_costs_the_traffic_nothing(ha: Run) -> None:
    assert ha.lost("standby-killed") == {"a->b": [], "b->a": []}
    assert ha.windows["standby-killed"].facts["active"] is not None


def test_a_crash_fails_over_on_a_new_epoch(ha: Run) -> None:
    facts = ha.windows["crash"].facts
    assert facts["after"] > facts["before"]
    # The flows saw it (VRRP alone takes 0.3 s to notice a dead node): the measure works.
    assert 0.1 < ha.outage("crash") <= MAX_CRASH_OUTAGE, ha.lost("crash")
    trail = _audit(ha.world, facts["active"])
    assert [r for r in trail if r["event"] == "ha-active"], "the takeover is not in the trail"


def test_the_crashed_node_comes_back_standby_holding_no_keys(ha: Run) -> None:
    facts = ha.windows["back"].facts
    assert ha.lost("back") == {"a->b": [], "b->a": []}
    assert facts["standby_charon"] == (0, [])  # no IKE SA, no PPK
    status = facts["standby_status"]
    assert status["ha"]["role"] == "standby"
    assert all(link["blocked"] and link["epoch"] == 0 for link in status["links"])


def test_a_planned_handover_fails_back(ha: Run) -> None:
    facts = ha.windows["handover"].facts
    assert facts["active"] != ha.windows["crash"].facts["active"]
    assert facts["old_charon"] == (0, [])
    assert ha.outage("handover") <= MAX_HANDOVER_OUTAGE, ha.lost("handover")


def test_links_down_fail_over_and_the_node_stays_standby_when_they_return(ha: Run) -> None:
    facts = ha.windows["link-down"].facts
    assert facts["active"] == facts["after"] != ha.windows["handover"].facts["active"]
    assert ha.outage("link-down") <= MAX_CRASH_OUTAGE, ha.lost("link-down")


def test_a_split_brain_heals_to_one_active_and_rekeys(ha: Run) -> None:
    assert ha.windows["split"].facts["both"]


def test_a_takeover_without_kms_goes_pqc_only_or_stays_blocked_as_the_policy_says(
        ha: Run) -> None:
    facts = ha.windows["kms-down"].facts
    fallback = facts["link"]
    assert fallback["mode"] == "pqc-fallback"
    assert not fallback["blocked"]
    assert "qkd-fallback" in fallback["alarms"]
    assert (fallback["suite"] or "").startswith("pqc+")
    strict = facts["strict"]
    assert strict["mode"] == "qkd+pqc"
    assert strict["blocked"]
    assert "kms-unavailable" in strict["alarms"]


def test_no_key_id_is_used_twice_across_the_pair(ha: Run) -> None:
    trail = _audit(ha.world, "b")
    ids = [k for r in trail if r["event"] == "rekeyed" for k in r.get("key_ids", [])]
    assert ids
    assert len(ids) == len(set(ids))


def test_nothing_crossed_the_wan_in_clear_in_any_scenario(ha: Run) -> None:
    assert ha.tally.plaintext == 0
    assert ha.tally.leaked == 0, ha.tally.leaks
    assert ha.tally.vrrp > 0
    assert sum(ha.tally.esp.values()) > 0


def test_every_audit_trail_verifies(ha: Run) -> None:
    from gateway.audit import verify

    for node in (*NODES, "b"):
        path: Path = ha.world.state(node) / "audit.jsonl"
        assert verify(path).ok, node
