"""XFRM sink benchmark, on the real Linux IPsec stack of a User-Mode Linux guest.

    python bench/xfrm.py [--rollovers 20] [--rate 500] [--rekeys 30] [--wan-delay 10]

Boots a guest (tests/uml/boot.py) that builds the two-site topology of
tests/ipsec/xfrm_world.py and runs this script inside it with --guest:
1. netlink operations/s through the sink's own netlink layer (SA add + delete, policy
   replace), against the same operations through `ip xfrm` (a process per operation,
   what a shell-script key manager does) as the baseline.
2. packet loss during rollover: a ping at RATE/s each way between the LANs, over a WAN
   with a one-way delay of WAN_DELAY ms (netem), while both gateways roll over ROLLOVERS
   times: first make-before-break through XfrmSink (new inbound SAs on both sides, then
   the outbound switch, old SAs deleted after the grace), then the naive way (delete the
   old SAs, add the new ones, one side after the other). Same traffic, guest and run.
3. rekey latency: the two `qkdgw run` daemons with the xfrm sink, REKEYS operator rekeys
   one after the other: the initiator's trigger → both switched time (p50 / p99), and the
   sink's share of it (the rollover's netlink work, timed in 2.).
Prints; asserts nothing. The guest has one CPU; figures are for this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from ipaddress import ip_address, ip_network
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.sink import ProvidedKey, RekeyCause
from tests.ipsec import xfrm_world as w


def pct(values: list[float], q: float) -> float:
    return sorted(values)[min(len(values) - 1, int(q * len(values)))]


# -- in the guest -----------------------------------------------------------------------------


async def netlink_ops(world: w.World) -> dict[str, float]:
    from ipsec.xfrm.kernel import XfrmKernel
    from ipsec.xfrm.objects import Direction, Mode, PolicySpec, SaId, SaSpec, Template
    from ipsec.xfrm.objects import Selector as Sel

    with world.net.inside("gw-a"):
        kernel = XfrmKernel()
    src, dst = ip_address(w.GW_A), ip_address("203.0.113.9")  # an unused peer: no traffic
    n = 500
    t0 = time.perf_counter()
    for i in range(n):
        await kernel.add_sa(SaSpec(src, dst, 0x5000 + i, 77, Mode.TUNNEL, bytes(36)))
        await kernel.delete_sa(SaId(dst, 0x5000 + i))
    sa_ops = 2 * n / (time.perf_counter() - t0)
    sel = Sel(ip_network("10.7.0.0/16"), ip_network("10.8.0.0/16"))
    t0 = time.perf_counter()
    for i in range(n):
        tmpl = None if i % 2 else Template(src, dst, 78 + i % 4, Mode.TUNNEL)
        await kernel.set_policy(PolicySpec(sel, Direction.OUT, 5000, tmpl, block=tmpl is None))
    policy_ops = n / (time.perf_counter() - t0)
    kernel.close()
    ns, k = world.ns["gw-a"], "0x" + "00" * 36
    m = 10
    t0 = time.perf_counter()
    for i in range(m):
        w.run("ip", "-n", ns, "xfrm", "state", "add", "src", w.GW_A, "dst", "203.0.113.9",
              "proto", "esp", "spi", str(0x6000 + i), "reqid", "79", "mode", "tunnel",
              "aead", "rfc4106(gcm(aes))", k, "128")
        w.run("ip", "-n", ns, "xfrm", "state", "del", "src", w.GW_A, "dst", "203.0.113.9",
              "proto", "esp", "spi", str(0x6000 + i))
    ip_ops = 2 * m / (time.perf_counter() - t0)
    w.run("ip", "-n", ns, "xfrm", "policy", "del", "src", "10.7.0.0/16", "dst", "10.8.0.0/16",
          "dir", "out")
    return {"sa_ops": sa_ops, "policy_ops": policy_ops, "ip_ops": ip_ops}


class _Quiet:
    def rekey_needed(self, link: str, cause: RekeyCause, detail: str) -> None:
        """Not part of this benchmark."""

    def key_provided(self, link: str, key: ProvidedKey) -> None:
        raise AssertionError("this sink hands out no key")


async def rollovers(world: w.World, count: int, rate: int, delay_ms: int) -> dict[str, Any]:
    import yaml

    from common.config import HostPort
    from common.sink import EpochMaterial, EpochRef, Role, SinkContext
    from gateway.core.policy import Policy
    from ipsec.xfrm.objects import SaId, SaSpec
    from ipsec.xfrm.sink import XfrmSinkConfig
    from kdf.schedule import EpochKeys
    from tests.helpers import lifetimes

    grace = w.POLICIES["bench"]["grace"]
    sinks = {}
    for site in ("a", "b"):
        raw = yaml.safe_load((world.root / f"site-{site}-bench.yaml").read_text())
        config = XfrmSinkConfig.model_validate(raw["links"][0]["sinks"][0])
        # No peer channel (the bench drives the sinks itself): placeholders, not a bind.
        ctx = SinkContext("ab", lifetimes(Policy(interval=3600, hard_lifetime=7200)), _Quiet(),
                          HostPort("0.0.0.0", 1), HostPort("0.0.0.0", 1))  # noqa: S104
        sink = config.build(ctx)
        with world.net.inside(f"gw-{site}"):
            await sink.start()
        sinks[site] = sink

    def material(epoch: int, site: str) -> EpochMaterial:
        spi_a, spi_b = 0x1000 + 2 * epoch, 0x1001 + 2 * epoch  # A's and B's inbound SPIs
        keys = EpochKeys(epoch, bytes([epoch % 256]) * 48)
        if site == "a":
            return EpochMaterial("ab", epoch, Role.INITIATOR, "bench", (), spi_a, spi_b, keys)
        return EpochMaterial("ab", epoch, Role.RESPONDER, "bench", (), spi_b, spi_a, keys)

    def ref(m: EpochMaterial) -> EpochRef:
        return EpochRef(m.link, m.epoch, m.spi_in, m.spi_out)

    async def mbb(epoch: int) -> float:
        a, b = material(epoch, "a"), material(epoch, "b")
        t0 = time.perf_counter()
        await sinks["a"].install_inbound(a)
        await sinks["b"].install_inbound(b)
        await sinks["a"].activate_outbound(a)
        await sinks["b"].activate_outbound(b)
        switched = time.perf_counter() - t0
        if epoch > 1:
            await asyncio.sleep(grace)
            for site in ("a", "b"):
                old = ref(material(epoch - 1, site))
                await sinks[site].retire_outbound(old)
                await sinks[site].retire_inbound(old)
        return switched

    async def naive(epoch: int) -> None:
        for site in ("a", "b"):
            sink, new, old = sinks[site], material(epoch, site), material(epoch - 1, site)
            kernel = sink.kernel
            if kernel is None or sink.current is None:
                raise RuntimeError(f"the sink at {site} has not started")
            reqid = sink.outbound[sink.current]
            await kernel.delete_sa(SaId(sink.remote, old.spi_out))
            await kernel.delete_sa(SaId(sink.local, old.spi_in))
            await kernel.add_sa(SaSpec(sink.remote, sink.local, new.spi_in, sink.in_reqid,
                                       sink.mode, new.inbound_esp))
            await kernel.add_sa(SaSpec(sink.local, sink.remote, new.spi_out, reqid,
                                       sink.mode, new.outbound_esp))
            sink.outbound = {new.spi_out: reqid}
            sink.current = new.spi_out

    async def measured(method: str, step: Any, first: int) -> dict[str, Any]:
        name = f"ping-{method}"
        world.ping(name, "lan-a", w.HOST_B, count=rate * (count + 2), interval=1 / rate)
        await asyncio.sleep(1)
        times = []
        for epoch in range(first, first + count):
            t = await step(epoch)
            if t is not None:
                times.append(t)
            await asyncio.sleep(max(0.0, 1 - (grace if method == "mbb" else 0)))
        while world.procs[name].poll() is None:
            await asyncio.sleep(0.1)
        result = world.ping_result(name)
        return {"sent": result["transmitted"], "lost": result["transmitted"] - result["received"],
                "switch_ms": [1000 * t for t in times]}

    await mbb(1)
    wan = world.ns["wan"]
    for dev in ("wan-a", "wan-b"):  # a WAN, not a wire: packets are in flight at the switch
        w.run("tc", "-n", wan, "qdisc", "add", "dev", dev, "root", "netem", "delay",
              f"{delay_ms}ms")
    out = {"mbb": await measured("mbb", mbb, 2)}
    out["naive"] = await measured("naive", naive, count + 2)
    for dev in ("wan-a", "wan-b"):
        w.run("tc", "-n", wan, "qdisc", "del", "dev", dev, "root")
    for sink in sinks.values():
        await sink.close()
    return out


async def rekey_latency(world: w.World, rekeys: int) -> list[float]:
    world.start_gateway("a")
    world.start_gateway("b")
    await w.until("first epoch", world.converged)
    latencies = []
    for _ in range(rekeys):
        epoch = (await world.link("a"))["epoch"]
        await world.admin("a", "POST", "/rekey")

        async def done(epoch: int = epoch) -> bool:
            a, b = await world.link("a"), await world.link("b")
            return bool(a["epoch"] == b["epoch"] > epoch)

        await w.until("rekeyed", done, timeout=30)
        latencies.append(1000 * (await world.link("a"))["last_rekey_latency"])
    world.kill("gw-a")
    world.kill("gw-b")
    return latencies


async def guest(root: Path, args: argparse.Namespace) -> None:
    out = root / "out"
    out.mkdir(exist_ok=True)
    world = w.World(root, out)
    world.phase = "bench"
    results: dict[str, Any] = {}
    try:
        world.build()
        world.start_sim()
        results["netlink"] = await netlink_ops(world)
        results["rollover"] = await rollovers(world, args.rollovers, args.rate,
                                              args.wan_delay)
        results["latency_ms"] = await rekey_latency(world, args.rekeys)
    finally:
        world.teardown()
        (root / "bench.json").write_text(json.dumps(results))


# -- on the host ---------------------------------------------------------------------------------


def report(r: dict[str, Any], args: argparse.Namespace) -> None:
    n = r["netlink"]
    print("netlink, through the sink's netlink layer (in-process):")
    print(f"  SA add/delete      {n['sa_ops']:8.0f} ops/s")
    print(f"  policy replace     {n['policy_ops']:8.0f} ops/s")
    print(f"  baseline `ip xfrm` {n['ip_ops']:8.1f} ops/s   ({n['sa_ops'] / n['ip_ops']:.0f}x)")
    print(f"rollover loss, ping {args.rate}/s each way, {args.wan_delay} ms each way on the"
          f" WAN, {args.rollovers} rollovers per method:")
    for method, label in (("mbb", "make-before-break"), ("naive", "delete-then-add")):
        x = r["rollover"][method]
        print(f"  {label:18} lost {x['lost']:5d} of {x['sent']} "
              f"({x['lost'] / max(1, args.rollovers):.1f} per rollover)")
    switch = r["rollover"]["mbb"]["switch_ms"]
    lat = r["latency_ms"]
    print(f"rekey latency, {len(lat)} operator rekeys, trigger -> both switched (initiator):")
    print(f"  p50 {statistics.median(lat):6.1f} ms   p99 {pct(lat, 0.99):6.1f} ms")
    share = statistics.median(switch) / statistics.median(lat)
    print(f"  sink share: both sides' inbound install + outbound switch p50"
          f" {statistics.median(switch):.1f} ms ({share:.0%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rollovers", type=int, default=20)
    parser.add_argument("--rate", type=int, default=500, help="pings per second each way")
    parser.add_argument("--rekeys", type=int, default=30)
    parser.add_argument("--wan-delay", type=int, default=10, metavar="MS",
                        help="one-way delay between the gateways during the rollovers")
    parser.add_argument("--guest", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.guest:
        os.chdir(args.guest)
        asyncio.run(guest(args.guest, args))
        return
    from tests.uml import boot

    reason = boot.missing()
    if reason:
        sys.exit(f"cannot run: {reason}")
    root = Path(tempfile.mkdtemp(prefix="qkdgw-bench-xfrm-"))
    w.prepare(root / "world")
    argv = [sys.executable, str(Path(__file__).resolve()), "--guest", str(root / "world"),
            "--rollovers", str(args.rollovers), "--rate", str(args.rate),
            "--rekeys", str(args.rekeys), "--wan-delay", str(args.wan_delay)]
    print(f"booting User-Mode Linux (files in {root}) ...", flush=True)
    run = boot.boot(argv, root / "guest", timeout=1200)
    result = root / "world" / "bench.json"
    if run.returncode != 0 or not result.exists():
        sys.exit(f"the guest failed:\n{run.explain()}")
    report(json.loads(result.read_text()), args)
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
