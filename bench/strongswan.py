"""strongSwan benchmark: PPK rotation (a new IKE SA per epoch) against strongSwan's own CHILD SA
rekey, with traffic both ways, in the same run.

    python bench/strongswan.py [--rotations 20] [--rate 1000] [--charon {5.9,6}]

The two-site world of tests/ipsec/strongswan_world.py (network namespaces, two charons with
kernel-libipsec, `qkdgw kms-sim`, two `qkdgw run`, needs root). UDP flows at RATE packets/s
each way run throughout; then
1. ROTATIONS operator rekeys (`POST /rekey`), 1.5 s apart: per rotation, the gateway's latency
   (trigger → both sides switched, which includes the new IKE SA) and the packets lost, by
   direction;
2. ROTATIONS CHILD SA rekeys by charon alone (VICI `rekey` of the CHILD SA, same IKE SA, no
   new PPK), 1.5 s apart: latency (request → new CHILD SA installed, polled) and loss.
A packet lost is put to the rekey nearest its send time. Then 3. both directions saturated
(40,000 packets/s offered each way for 4 s): packets/s that arrive. Runs twice: as configured by
default (the IKE responder holds its tunnel traffic during a rotation, ipsec/strongswan/hold.py)
and, as the baseline, with `hold: null`. With `--charon 6` both sites run Debian 13's
strongSwan 6.0.1 (from the root of tests/interop/roots.py, with the `ml` plugin), and the two
runs are with ML-KEM-768 as an additional key exchange in the IKE and ESP proposals
(`ke1_mlkem768`) and, as the baseline, without. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ipsec.strongswan.vici import Vici
from tests.ipsec import strongswan_world as sw

GAP = 1.5  # seconds between rekeys: each one's losses stay apart from the next one's
#: Offered load each way for the throughput check: well above what kernel-libipsec carries.
SATURATE_RATE, SATURATE_SECONDS = 40_000, 4.0


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def rekey_gateway(w: sw.World) -> None:
    sock = w.root / "state-a" / "admin.sock"
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(sock))) as c, \
            c.post("http://qkdgw/rekey", json={}) as r:
        r.raise_for_status()


async def child_spis(v: Vici) -> set[str]:
    events = await v.streamed("list-sas", "list-sa", {"ike": "qkdgw-ab", "noblock": "yes"})
    return {c["spi-in"] for e in events for sa in e.values() if isinstance(sa, dict)
            for c in (sa.get("child-sas") or {}).values() if c.get("state") == "INSTALLED"}


async def measure(w: sw.World, rotations: int, rate: int) -> dict[str, Any]:
    seconds = 3 + 2 * rotations * GAP + 3
    w.start_flows(rate, seconds)
    v = await Vici.connect(w.vici_path("a"))
    await asyncio.sleep(3)
    ppk: list[tuple[float, float]] = []  # (start, gateway latency)
    for _ in range(rotations):
        before = (await w.link("a"))["epoch"]
        started = time.time()
        await rekey_gateway(w)
        while (link := await w.link("a"))["epoch"] == before or link["state"] != "idle":
            await asyncio.sleep(0.005)
        ppk.append((started, link["last_rekey_latency"]))
        await asyncio.sleep(max(0.0, started + GAP - time.time()))
    child: list[tuple[float, float]] = []
    for _ in range(rotations):
        old = await child_spis(v)
        started = time.time()
        await v.request("rekey", {"child": "lan"})
        while not (await child_spis(v)) - old:
            await asyncio.sleep(0.001)
        child.append((started, time.time() - started))
        await asyncio.sleep(max(0.0, started + GAP - time.time()))
    await v.close()
    flows = await w.flows_done()
    starts = [("ppk", t) for t, _ in ppk] + [("child", t) for t, _ in child]
    lost: dict[tuple[str, str], int] = {}
    for direction, flow in flows.items():
        for t in flow["lost_at"]:
            kind, _ = min(starts, key=lambda s: abs(s[1] - t))
            lost[kind, direction] = lost.get((kind, direction), 0) + 1
    holds = [(packets, ms) for packets, ms, _ in w.holds("b")]
    return {"ppk": [x for _, x in ppk], "child": [x for _, x in child], "lost": lost,
            "flows": flows, "holds": holds}


def report(r: dict[str, Any], rotations: int, rate: int, what: str) -> None:
    print(f"\nstrongSwan {r['version']} kernel-libipsec, {rate} UDP packets/s each way,"
          f" {rotations} of each kind; {what}")
    for kind, name in (("ppk", "PPK rotation (new IKE SA, qkdgw)"),
                       ("child", "CHILD SA rekey (charon alone)")):
        lat = [x * 1000 for x in r[kind]]
        i2r = r["lost"].get((kind, "a->b"), 0)
        r2i = r["lost"].get((kind, "b->a"), 0)
        print(f"  {name:34s} latency p50 {statistics.median(lat):6.1f} ms"
              f"  p95 {pct(lat, 95):6.1f} ms   lost per rekey: initiator->responder"
              f" {i2r / rotations:.2f}, responder->initiator {r2i / rotations:.2f}"
              f" (~{1000 * r2i / rotations / rate:.2f} ms of traffic)")
    ppk, child = statistics.median(r["ppk"]), statistics.median(r["child"])
    print(f"  ratio PPK rotation / CHILD SA rekey latency (p50): {ppk / child:.1f}x")
    for direction, f in r["flows"].items():
        print(f"  flow {direction}: sent {f['sent']}, received {f['received']},"
              f" lost {len(f['lost'])}")
    sat = r["saturated"]
    print(f"  saturated ({SATURATE_RATE} packets/s offered each way, no rotation): arrived"
          f" a->b {sat['a->b']:,.0f}/s, b->a {sat['b->a']:,.0f}/s")
    if r["holds"]:
        packets, ms = [p for p, _ in r["holds"]], [m for _, m in r["holds"]]
        print(f"  responder holds: {len(ms)}, duration p50 {statistics.median(ms):.0f} ms"
              f" max {max(ms):.0f} ms, packets held p50 {statistics.median(packets):.0f}"
              f" max {max(packets)}")


async def saturate(w: sw.World, rate: int, seconds: float) -> dict[str, float]:
    """Offer more than kernel-libipsec carries, both ways: packets/s that arrive. Between
    rotations every responder packet passes the hold's queue (fail-open, in the kernel)."""
    w.start_flows(rate, seconds)
    flows = await w.flows_done()
    return {d: f["received"] / seconds for d, f in flows.items()}


class Unheld(sw.World):
    hold = False


async def run(rotations: int, rate: int, *, hold: bool, charon: sw.Charon = sw.DEBIAN12,
              mlkem: bool = False) -> dict[str, Any]:
    world = (sw.World if hold else Unheld)(
        Path(tempfile.mkdtemp(prefix="qkdgw-bench-strongswan-")),
        {"interval": 3600.0, "jitter": 0.0, "hard_lifetime": 7200.0, "grace": 0.5},
        charons=(charon, charon), mlkem=mlkem)
    with world:
        await world.start()
        result = await measure(world, rotations, rate)
        result["saturated"] = await saturate(world, SATURATE_RATE, SATURATE_SECONDS)
        result["version"] = charon.version
        return result


def ratios(runs: dict[str, dict[str, Any]]) -> None:
    """The first run's figures over the second's (the baseline)."""
    (name, r), (base_name, base) = runs.items()
    for kind, what in (("ppk", "PPK rotation"), ("child", "CHILD SA rekey")):
        print(f"ratio {what} latency (p50) {name} / {base_name}:"
              f" {statistics.median(r[kind]) / statistics.median(base[kind]):.2f}x")
    for d in ("a->b", "b->a"):
        print(f"ratio saturated throughput {d} {name} / {base_name}:"
              f" {r['saturated'][d] / base['saturated'][d]:.2f}x")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rotations", type=int, default=20)
    parser.add_argument("--rate", type=int, default=1000, help="UDP packets/s each way")
    parser.add_argument("--charon", choices=["5.9", "6"], default="5.9",
                        help="5.9: Debian 12's, with and without the responder's hold;"
                             " 6: Debian 13's 6.0, with and without ML-KEM in IKE and ESP")
    args = parser.parse_args()
    charon = sw.DEBIAN12 if args.charon == "5.9" else sw.DEBIAN13
    if reason := sw.missing_tools(charon):
        sys.exit(f"bench/strongswan.py: {reason}")
    n, rate = args.rotations, args.rate
    if args.charon == "5.9":
        held = await run(n, rate, hold=True)
        baseline = await run(n, rate, hold=False)
        report(held, n, rate, "the responder holds its traffic (default)")
        report(baseline, n, rate, "baseline: no hold (hold: null)")
        print()
        ratios({"with hold": held, "without": baseline})
        return
    mlkem = await run(n, rate, hold=True, charon=charon, mlkem=True)
    baseline = await run(n, rate, hold=True, charon=charon, mlkem=False)
    report(mlkem, n, rate, f"ke1_mlkem768 in the IKE and ESP proposals ({sw.MLKEM_IKE})")
    report(baseline, n, rate, "baseline: without ML-KEM in IKE and ESP")
    print()
    ratios({"with ML-KEM": mlkem, "without": baseline})


if __name__ == "__main__":
    asyncio.run(main())
