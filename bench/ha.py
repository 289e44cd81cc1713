"""HA benchmark: site A's gateway pair under keepalived failing over, again and again, with
traffic both ways; and, as the baseline in the same run, a single gateway killed and
started again.

    python bench/ha.py [--failovers 20] [--rate 1000] [--plane auto|strongswan|xfrm]

The pair of gateway/demo/ha.py (network namespaces, real keepalived, the KMS simulator, the
data plane the kernel allows; needs root), UDP at RATE packets/s each way throughout. Per
kind, FAILOVERS times:
- kill: the active node's gateway, data plane and keepalived SIGKILLed (then restarted: it
  comes back standby);
- link-down: the active node's links taken down (then up again: standby);
- handover: `qkdgw ha handover` on the active node (a planned switchover).
Each failover's outage is the span from the first to the last packet lost around it, either
way, and its loss the packets lost by direction. The baseline: the two-site world of
`qkdgw demo` with one gateway per site, gateway A SIGKILLed and `qkdgw run` again, FAILOVERS
times, measured the same way. Prints a table and, last, one JSON line; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.demo.ha import NODES, Failover, HaSites, StrongswanHaSites, XfrmHaSites
from gateway.demo.live import Flow, XfrmSites, kernel_has_esp, outage, start_flows
from gateway.demo.sites import Sites
from gateway.demo.strongswan import StrongswanSites
from gateway.demo.topology import until

POLICY = {"interval": 5.0, "jitter": 0.0, "grace": 1.0, "hard_lifetime": 60.0,
          "mode": "pqc-fallback", "retransmit": 0.2, "attempt_timeout": 3.0}
#: After a failover converged and the failed node is back standby, this long before the
#: next: the last lost packets of one failover are not put to the next one.
SETTLE = 1.0
#: Packets lost from this long before a failover are its own (in flight in the dead node).
BEFORE = 0.5


class Window:
    def __init__(self) -> None:
        self.start = time.monotonic() - BEFORE
        self.end = 0.0


def lost(flows: list[Flow], w: Window) -> dict[str, list[float]]:
    return {f.name: f.lost_in(w.start, w.end) for f in flows}


def stop_flows(flows: list[Flow]) -> None:
    for flow in flows:
        flow.stop.set()
    time.sleep(1.0)  # the last packets arrive
    for flow in flows:
        flow.tx.close()
        flow.rx.close()


async def backup(pair: HaSites, node: str) -> bool:
    """NODE is standby and keepalived has it BACKUP: ready to take over again."""
    try:
        ha = await pair.admin(node, path="/ha")
    except OSError:
        return False
    return bool(ha.get("role") == "standby" and ha.get("keepalived_state") == "BACKUP")


async def failovers(pair: HaSites, flows: list[Flow], kind: Failover, n: int
                    ) -> list[Window]:
    windows = []
    for _ in range(n):
        before = (await pair.link("b"))["epoch"]
        w = Window()
        node = await pair.failover(kind)
        await until(f"{kind}: converged", functools.partial(pair.converged, before))
        w.end = time.monotonic()
        if kind == "kill":
            pair.restart(node)
        elif kind == "link-down":
            pair.link_up(node)
        await until(f"{kind}: node {node} BACKUP again", functools.partial(backup, pair, node))
        await asyncio.sleep(SETTLE)
        windows.append(w)
    return windows


async def restarts(sites: Sites, n: int, *, plane_too: bool = False) -> list[Window]:
    """The baseline: gateway A SIGKILLed and started again, N times (PLANE_TOO: its data
    plane process with it, as when a box without a partner restarts)."""
    windows = []
    for _ in range(n):
        before = (await sites.link("b"))["epoch"]
        w = Window()
        sites.kill("gw-a", signal.SIGKILL)
        if plane_too:
            sites.kill("charon-a", signal.SIGKILL)
            sites.start_data_plane("a")
        sites.start_gateway("a")
        await until("restarted: converged", functools.partial(sites.converged, before))
        w.end = time.monotonic()
        await asyncio.sleep(SETTLE)
        windows.append(w)
    return windows


async def world(sites: Sites, rate: float,
                body: Callable[[list[Flow]], Awaitable[dict[str, list[Window]]]]
                ) -> tuple[list[Flow], dict[str, list[Window]]]:
    sites.build()
    flows: list[Flow] = []
    try:
        await sites.start()
        flows = start_flows(sites, rate)
        await asyncio.sleep(1.0)
        windows = await body(flows)
    finally:
        if flows:
            await asyncio.to_thread(stop_flows, flows)
        sites.teardown()
    return flows, windows


def summary(flows: list[Flow], windows: list[Window], rate: float) -> dict[str, Any]:
    outages = [outage(flows, w.start, w.end) * 1e3 for w in windows]
    losses = [lost(flows, w) for w in windows]
    per = [sum(len(v) for v in x.values()) for x in losses]
    return {"failovers": len(windows),
            "outage_p50_ms": round(statistics.median(outages), 1),
            "outage_max_ms": round(max(outages), 1),
            "lost_mean": round(statistics.mean(per), 1), "lost_max": max(per),
            "lost_a_to_b": sum(len(x["a->b"]) for x in losses),
            "lost_b_to_a": sum(len(x["b->a"]) for x in losses)}


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--failovers", type=int, default=20, help="of each kind (default: 20)")
    p.add_argument("--rate", type=float, default=1000.0, help="packets/s each way")
    p.add_argument("--plane", choices=("auto", "strongswan", "xfrm"), default="auto")
    args = p.parse_args()
    if not 1 <= args.failovers <= 1000 or not 1 <= args.rate <= 10_000:
        p.error("--failovers 1..1000, --rate 1..10000")
    plane = args.plane if args.plane != "auto" else \
        "xfrm" if kernel_has_esp() else "strongswan"
    n, rate = args.failovers, args.rate
    results: dict[str, Any] = {"plane": plane, "rate": rate}
    with tempfile.TemporaryDirectory(prefix="bench-ha-") as tmp:
        pair_class = XfrmHaSites if plane == "xfrm" else StrongswanHaSites
        pair = pair_class(Path(tmp) / "pair", POLICY)
        pair.verbose = False

        async def pair_body(flows: list[Flow]) -> dict[str, list[Window]]:
            return {kind: await failovers(pair, flows, kind, n)
                    for kind in ("kill", "link-down", "handover")}

        flows, windows = await world(pair, rate, pair_body)
        for kind, ws in windows.items():
            results[kind] = summary(flows, ws, rate)
        single: Sites = (XfrmSites if plane == "xfrm" else StrongswanSites)(
            Path(tmp) / "single", POLICY)
        single.verbose = False

        async def single_body(flows: list[Flow]) -> dict[str, list[Window]]:
            out = {"restart": await restarts(single, n)}
            if plane == "strongswan":
                out["plane"] = await restarts(single, n, plane_too=True)
            return out

        flows, windows = await world(single, rate, single_body)
        results["baseline_restart"] = summary(flows, windows["restart"], rate)
        if "plane" in windows:
            results["baseline_restart_with_charon"] = summary(flows, windows["plane"], rate)
    print(f"HA failovers, {plane} plane, {rate:g} packets/s each way, {n} of each kind"
          f" (nodes {', '.join(NODES)})")
    print(f"{'kind':<28}{'outage p50':>12}{'max':>10}{'lost/failover':>15}{'max':>6}"
          f"{'A→B':>7}{'B→A':>7}{'vs baseline':>13}")
    base = results.get("baseline_restart_with_charon", results["baseline_restart"])
    for kind, label in (("kill", "crash (kill)"), ("link-down", "links down"),
                        ("handover", "planned handover"),
                        ("baseline_restart", "baseline: gateway restarted"),
                        ("baseline_restart_with_charon", "baseline: gateway+charon")):
        if kind not in results:
            continue
        r = results[kind]
        ratio = f"{r['outage_p50_ms'] / base['outage_p50_ms']:.2f}x" \
            if base["outage_p50_ms"] else "-"
        print(f"{label:<28}{r['outage_p50_ms']:>9.0f} ms{r['outage_max_ms']:>7.0f} ms"
              f"{r['lost_mean']:>15.1f}{r['lost_max']:>6}{r['lost_a_to_b']:>7}"
              f"{r['lost_b_to_a']:>7}{ratio:>13}")
    print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
