"""Site A as a gateway pair under keepalived with the kernel XFRM sink, inside User-Mode Linux
(the host kernel has no ESP): the topology of gateway/demo/ha.py (XfrmHaSites), every node's
SAs and policies naming the site's virtual address.

`python -m tests.ipsec.xfrm_ha_world DIR` runs in the guest (tests/uml/boot.py): it builds
the pair, starts UDP both ways between the LANs and a packet socket on the WAN, runs the
scenarios in order and writes DIR/results.json for tests/ipsec/test_xfrm_ha_uml.py:

- standby-killed: the standby's processes SIGKILLed and restarted;
- crash: the active node's gateway and keepalived SIGKILLed (its kernel keeps forwarding on
  the old SAs until the address moves: a process crash, not a dead box);
- back: the crashed node restarted: it comes back standby, its kernel holding no SA and its
  policies blocking;
- handover: `POST /ha/handover` on the active node (fail-back);
- link-down: the active node's links taken down (as a dead box: its kernel is cut off too),
  then up again (it stays standby);
- split: VRRP cut both ways (both active), then healed (one active, rekeying);
- kms-down: the KMEs unreachable, then the active crashes: the new active keys without QKD
  (pqc-fallback).

Per scenario: its window (the flows' clock), the epochs before and after, and the standby's
kernel (SAs, blocking policies) where it matters. The traffic rate is low: the guest has one
CPU, shared by three daemons, keepalived and the simulator.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from gateway.demo.ha import NODES, XfrmHaSites
from gateway.demo.live import Flow, start_flows
from gateway.demo.topology import until
from gateway.demo.wire import Kind, Live, Tally

RATE = 100.0
POLICY = {"interval": 3.0, "jitter": 0.0, "grace": 1.0, "hard_lifetime": 60.0,
          "mode": "pqc-fallback", "retransmit": 0.3, "attempt_timeout": 5.0}
#: The guest is slow to start processes: long waits, polled.
WAIT = 120.0


class World(XfrmHaSites):
    tag = "qu"
    verbose = True


async def role_is(w: World, node: str, role: str) -> bool:
    return await w.role(node) == role


async def all_roles(w: World, roles: list[str]) -> bool:
    return sorted([await w.role(n) or "" for n in NODES]) == roles


async def kernel(w: World, node: str) -> dict[str, Any]:
    """NODE's SAs and policies, read over netlink in its namespace."""
    from ipsec.xfrm.kernel import XfrmKernel

    with w.net.inside(NODES[node]):
        k = XfrmKernel()
    try:
        sas, policies = await k.sas(), await k.policies()
    finally:
        k.close()
    return {"sas": len(sas), "policies": len(policies),
            "blocking": sum(1 for p in policies if p.block)}


async def scenarios(w: World, results: dict[str, Any]) -> None:
    first = await w.active()
    assert first is not None
    other = "a2" if first == "a1" else "a1"
    out: dict[str, Any] = results["scenarios"]

    async def epoch() -> int:
        return int((await w.link("b"))["epoch"])

    # standby-killed: the standby's processes die and come back; nothing happens to traffic
    s = out["standby-killed"] = {"start": time.monotonic() - 0.5}
    w.crash(other)
    await asyncio.sleep(2.0)
    w.restart(other)
    await until("the standby back", lambda: role_is(w, other, "standby"), WAIT)
    await asyncio.sleep(2.0)
    s.update(end=time.monotonic(), active=await w.active())

    # crash
    s = out["crash"] = {"start": time.monotonic() - 0.5, "before": await epoch()}
    w.crash(first)
    await until("the standby took over", lambda: w.converged(s["before"]), WAIT)
    s.update(end=time.monotonic(), after=await epoch(), active=await w.active())
    await asyncio.sleep(2.0)

    # back
    s = out["back"] = {"start": time.monotonic() - 0.5}
    w.restart(first)
    await until("the crashed node standby", lambda: role_is(w, first, "standby"), WAIT)
    await asyncio.sleep(3.0)
    s.update(end=time.monotonic(), active=await w.active(), kernel=await kernel(w, first))

    # handover (fail-back)
    s = out["handover"] = {"start": time.monotonic() - 0.5, "before": await epoch()}
    await w.handover(other)
    await until("the first node took over", lambda: w.converged(s["before"]), WAIT)
    s.update(end=time.monotonic(), active=await w.active())
    await until("the old active standby", lambda: role_is(w, other, "standby"), WAIT)
    await asyncio.sleep(2.0)
    s["old_kernel"] = await kernel(w, other)

    # link-down
    s = out["link-down"] = {"start": time.monotonic() - 0.5, "before": await epoch()}
    w.link_down(first)
    await until("the other node took over", lambda: w.converged(s["before"]), WAIT)
    s.update(end=time.monotonic(), after=await epoch(), active=await w.active())
    w.link_up(first)
    await until("the node whose links came back standby", lambda: role_is(w, first, "standby"),
                WAIT)
    await asyncio.sleep(2.0)

    # split: VRRP cut both ways, both active; healed, one active and rekeying
    s = out["split"] = {"start": time.monotonic() - 0.5}
    w.cut_vrrp()
    await until("both nodes active", lambda: all_roles(w, ["active", "active"]), WAIT)
    s["both"] = True
    await asyncio.sleep(3.0)
    before = await epoch()
    w.heal_vrrp()
    await until("one node active", lambda: all_roles(w, ["active", "standby"]), WAIT)
    await until("rekeying again", lambda: w.converged(before), WAIT)
    s.update(end=time.monotonic(), after=await epoch())
    await asyncio.sleep(2.0)

    # kms-down: the KMS unreachable as the standby takes over: a PQC-only epoch (pqc-fallback)
    active = await w.active()
    assert active is not None
    standby = "a2" if active == "a1" else "a1"
    s = out["kms-down"] = {"start": time.monotonic() - 0.5, "before": await epoch()}
    w.kms_fault(60.0)
    await asyncio.sleep(1.0)
    w.crash(active)
    await until("the standby took over without QKD", lambda: w.converged(s["before"]),
                WAIT)
    s.update(end=time.monotonic(), link=await w.link(standby))
    w.kms_fault(None)


async def main(root: Path) -> int:
    results: dict[str, Any] = {"scenarios": {}, "error": None}
    w = World(root, POLICY)
    flows: list[Flow] = []
    live: Live | None = None
    try:
        w.build()
        await w.start()
        tally = Tally.of(w.topology, {Kind.ESP, Kind.TCP, Kind.ICMP, Kind.VRRP})
        live = Live(w.net, "wan", "wan-a", tally)
        flows += start_flows(w, RATE)
        await asyncio.sleep(2.0)
        await scenarios(w, results)
    except Exception:
        results["error"] = traceback.format_exc()
    finally:
        for flow in flows:
            flow.stop.set()
        await asyncio.sleep(1.5)  # the last packets arrive
        results["flows"] = {f.name: {"sent_at": f.sent_at, "received": sorted(f.received)}
                            for f in flows}
        if live is not None:
            live.close()
            results["wire"] = {"plaintext": live.tally.plaintext, "leaked": live.tally.leaked,
                               "leaks": live.tally.leaks, "esp": sum(live.tally.esp.values()),
                               "vrrp": live.tally.vrrp}
        for flow in flows:
            flow.tx.close()
            flow.rx.close()
        w.teardown()
        (root / "results.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    args = parser.parse_args()
    args.root.mkdir(parents=True, exist_ok=True)
    os.chdir(args.root)
    sys.exit(asyncio.run(main(args.root.resolve())))
