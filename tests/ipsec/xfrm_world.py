"""Two sites with the kernel XFRM sink on a real Linux IPsec stack, inside User-Mode Linux.

    lan-a ──── gw-a ═══════════ wan ═══════════ gw-b ──── lan-b
  10.1.0.2   10.1.0.1  192.0.2.1   192.0.2.254 198.51.100.254  198.51.100.1  10.2.0.1   10.2.0.2
  fd00:a::2  fd00:a::1 (qkdgw run) (qkdgw kms-sim: KME-A, KME-B)   (qkdgw run) fd00:b::1  fd00:b::2
                                   (tcpdump on wan-a: the wire between the sites)

The namespaces of gateway/demo/topology.py with IPv6 LANs, the processes and captures of
tests/netns_sites.py. `wan` routes between the gateways and has no route to either LAN:
anything from a LAN that leaves a gateway in clear shows in the capture and goes no
further. The gateways route the remote LAN towards `wan`, so only their XFRM policies keep
it from leaving in clear.

Two halves: `prepare(DIR)` runs on the host and writes the PKI and configurations;
`python -m tests.ipsec.xfrm_world DIR PHASE...` runs in the guest (see tests/uml/boot.py),
runs the phases and writes DIR/results.json, the captures and the daemons' logs for the
host-side test to judge. Phases:

- main: 500 pings/s each way (IPv4) and 50/s (IPv6) across 60 rekeys at 1 s intervals;
  SAs sampled every 0.2 s in both gateways; then `qkdgw stop` and a ping that must fail.
- faults: the peer gateway SIGKILLed and restarted under a continuous ping; then 5 % loss
  and 50 ms delay on the control path (TCP through `wan`, netem).
- soft: no timed rekeys, a soft packet limit on the SAs: the kernel's soft expiry rekeys.
- crash: the initiator SIGKILLed under a continuous ping both ways and restarted at once.
- transport: transport mode between the gateways themselves (their peer channel bypasses
  the policies), 100 pings/s from gw-a to gw-b across 20 rekeys.
- bench: see bench/xfrm.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

# GW_A, ..., run and until re-exported (X as X) for test_xfrm_uml.py and bench/xfrm.py
from gateway.demo.sites import GW_A as GW_A
from gateway.demo.sites import GW_B as GW_B
from gateway.demo.sites import HOST_A, QKDGW, prepare_kms, site_config
from gateway.demo.sites import HOST_B as HOST_B
from gateway.demo.sites import LAN_A as LAN_A
from gateway.demo.sites import LAN_B as LAN_B
from gateway.demo.topology import Topology
from gateway.demo.topology import run as run
from gateway.demo.topology import until as until
from tests.netns_sites import Sites

#: The namespaces: IPv6 LANs too; the gateways route the remote LANs towards `wan`.
TOPOLOGY = Topology(ipv6=True)
LAN6_A, LAN6_B = str(TOPOLOGY.lan("a", 6)), str(TOPOLOGY.lan("b", 6))
HOST6_A, HOST6_B = TOPOLOGY.host("a", version=6), TOPOLOGY.host("b", version=6)

#: Rekey policies per phase (interval 1 s as the issue asks; hard lifetimes short enough
#: that the fault phase sees the kernel backstop within seconds).
POLICIES = {
    "main": {"interval": 1.0, "jitter": 0.0, "hard_lifetime": 10.0, "grace": 1.0},
    "faults": {"interval": 1.0, "jitter": 0.0, "hard_lifetime": 6.0, "grace": 1.0,
               "retry_backoff_max": 2.0},
    "soft": {"interval": 3600.0, "jitter": 0.0, "hard_lifetime": 7200.0, "grace": 1.0},
    "bench": {"interval": 3600.0, "jitter": 0.0, "hard_lifetime": 7200.0, "grace": 0.5},
    "transport": {"interval": 1.0, "jitter": 0.0, "hard_lifetime": 10.0, "grace": 1.0},
    # A restart takes the guest ~5 s: the hard lifetime must outlast it.
    "crash": {"interval": 2.0, "jitter": 0.0, "hard_lifetime": 120.0, "grace": 1.0},
}
SOFT_PACKETS = 500


# -- host side: configuration ----------------------------------------------------------------


def prepare(root: Path) -> None:
    """Write PKI, kms.yaml and one site configuration per site and phase into ROOT."""
    layout = prepare_kms(root)
    for site in ("a", "b"):
        for phase, policy in POLICIES.items():
            config = site_config(layout, site, policy=policy, sink=_sink(site, phase),
                                 state_dir=f"state-{site}-{phase}")
            (root / f"site-{site}-{phase}.yaml").write_text(yaml.safe_dump(config))


def _sink(site: str, phase: str) -> dict[str, Any]:
    me, peer = (GW_A, GW_B) if site == "a" else (GW_B, GW_A)
    lans = ([LAN_A, LAN6_A], [LAN_B, LAN6_B])
    local, remote = lans if site == "a" else lans[::-1]
    sink: dict[str, Any] = {"type": "xfrm", "local": me, "remote": peer}
    if phase == "transport":  # the gateways' own traffic; the peer channel must bypass
        sink["mode"] = "transport"
    else:
        sink.update(local_subnets=local, remote_subnets=remote)
    if phase == "soft":
        sink["soft_limits"] = {"packets": SOFT_PACKETS}
    return sink


# -- guest side: the world -------------------------------------------------------------------


class World(Sites):
    """The sites of one phase after another; the configurations come from prepare() on the
    host, the logs and captures go to OUT."""

    tag = "qx"
    topology = TOPOLOGY

    def __init__(self, root: Path, out: Path) -> None:
        super().__init__(root, {}, out=out)
        self.phase = ""

    def prepare(self) -> None:
        """Done on the host: prepare()."""

    def config(self, site: str) -> str:
        return f"site-{site}-{self.phase}.yaml"

    def state(self, site: str) -> Path:
        return self.root / f"state-{site}-{self.phase}"

    def netem(self, on: bool) -> None:
        """5 % loss and 50 ms delay for TCP (the peer channel, the KMS) through `wan`."""
        w = self.ns["wan"]
        for dev in ("wan-a", "wan-b"):
            if on:
                run("sh", "-ec", f"""
                    tc -n {w} qdisc add dev {dev} root handle 1: prio
                    tc -n {w} qdisc add dev {dev} parent 1:3 handle 30: netem delay 50ms loss 5%
                    tc -n {w} filter add dev {dev} parent 1:0 protocol ip prio 1 u32 \
                        match ip protocol 6 0xff flowid 1:3""")
            else:
                run("tc", "-n", w, "qdisc", "del", "dev", dev, "root")
        self.note(f"netem {'on' if on else 'off'}")

    # -- measuring ------------------------------------------------------------------------------

    def ping(self, name: str, role: str, target: str, *, count: int, interval: float,
             timestamps: bool = False) -> subprocess.Popen[bytes]:
        """ping at 1/INTERVAL per second. `-l 20` lets it catch up after a late wakeup
        (the guest's timers are coarse and its one CPU busy), so the rate holds."""
        argv = ["ping", "-n", "-c", str(count), "-i", str(interval), "-W", "2", "-l", "20"]
        argv += ["-D"] if timestamps else ["-q"]
        return self.spawn(name, role, [*argv, target])

    def ping_result(self, name: str) -> dict[str, Any]:
        self.procs.pop(name).wait()
        return parse_ping((self.out / f"{name}.log").read_text())

    async def sample(self, stop: asyncio.Event, period: float = 0.2) -> list[dict[str, Any]]:
        """Every PERIOD, the SAs of both gateways (spi, reqid, direction, counters)."""
        from ipsec.xfrm.kernel import XfrmKernel

        kernels: dict[str, XfrmKernel] = {}
        for site in ("a", "b"):
            with self.net.inside(f"gw-{site}"):
                kernels[site] = XfrmKernel()
        samples: list[dict[str, Any]] = []
        try:
            while not stop.is_set():
                for site, kernel in kernels.items():
                    me = GW_A if site == "a" else GW_B
                    sas = await kernel.sas()
                    samples.append({"t": time.time(), "site": site, "sas": [
                        {"spi": sa.spi, "reqid": sa.reqid, "packets": sa.packets,
                         "bytes": sa.bytes, "out": str(sa.src) == me, "alg": sa.algorithm,
                         "replay_window": sa.replay_window, "mode": sa.mode}
                        for sa in sas]})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), period)
        finally:
            for kernel in kernels.values():
                kernel.close()
        return samples

    def xfrm_dump(self, site: str) -> dict[str, str]:
        """`ip xfrm` of a gateway: an independent decoder of what the sink installed."""
        ns = self.ns[f"gw-{site}"]
        state = re.sub(r"0x[0-9a-f]{72}", "<key>", run("ip", "-n", ns, "xfrm", "state"))
        return {"state": state,
                "policy": run("ip", "-n", ns, "xfrm", "policy")}


def parse_ping(text: str) -> dict[str, Any]:
    """ping's summary and, with -D, every reply as (time, icmp_seq)."""
    m = re.search(r"(\d+) packets transmitted, (\d+) received", text)
    replies = [(float(t), int(seq)) for t, seq in re.findall(
        r"^\[(\d+\.\d+)\] \d+ bytes from \S+ icmp_seq=(\d+)", text, re.M)]
    return {"transmitted": int(m.group(1)) if m else None,
            "received": int(m.group(2)) if m else None, "replies": replies}


# -- phases ----------------------------------------------------------------------------------


async def phase_main(w: World) -> dict[str, Any]:
    rate, seconds = 550, 62
    w.start_gateway("a")
    w.start_gateway("b")
    await until("first epoch", w.converged)
    rekeys_before = (await w.link("a"))["rekeys"]
    stop = asyncio.Event()
    sampler = asyncio.create_task(w.sample(stop, period=0.5))
    with w.capture("main") as capture:
        w.note("traffic on")
        started = time.time()
        w.ping("ping4", "lan-a", HOST_B, count=rate * seconds, interval=1 / rate)
        w.ping("ping6", "lan-a", HOST6_B, count=50 * seconds, interval=1 / 50)
        while any(w.procs[p].poll() is None for p in ("ping4", "ping6")):
            await asyncio.sleep(0.2)
        w.note("traffic done")
        elapsed = time.time() - started
        ping4, ping6 = w.ping_result("ping4"), w.ping_result("ping6")
        status = {s: await w.link(s) for s in ("a", "b")}
        await asyncio.sleep(POLICIES["main"]["grace"] + 1.5)  # the last old SAs retire
        stop.set()
        samples = await sampler
        dumps = {s: w.xfrm_dump(s) for s in ("a", "b")}
        # Stopping: `qkdgw stop` on A, SIGTERM on B; both leave blocking policies.
        w.note("qkdgw stop")
        stop_a = run(QKDGW, "stop", "-c", str(w.root / "site-a-main.yaml"))
        w.procs.pop("gw-a").wait(timeout=30)
        w.kill("gw-b")
        after_stop = {s: w.xfrm_dump(s) for s in ("a", "b")}
        w.ping("ping-stopped", "lan-a", HOST_B, count=5, interval=0.2)
        stopped_ping = w.ping_result("ping-stopped")
    return {"rate": rate, "seconds": seconds, "elapsed": elapsed, "ping4": ping4, "ping6": ping6,
            "status": status, "rekeys_before": rekeys_before, "samples": samples,
            "dumps": dumps, "capture": capture, "stop_output": stop_a,
            "after_stop": after_stop, "stopped_ping": stopped_ping}


async def phase_faults(w: World) -> dict[str, Any]:
    p = POLICIES["faults"]
    w.start_gateway("a")
    w.start_gateway("b")
    await until("first epoch", w.converged)
    stop = asyncio.Event()
    sampler = asyncio.create_task(w.sample(stop, period=0.5))
    with w.capture("faults") as capture:
        w.ping("ping-faults", "lan-a", HOST_B, count=100_000, interval=0.05, timestamps=True)
        w.ping("ping-faults-b", "lan-b", HOST_A, count=100_000, interval=0.05,
               timestamps=True)
        await asyncio.sleep(3)
        w.note("kill gw-b")
        w.kill("gw-b", signal.SIGKILL)
        killed_at = time.time()
        # A blocks at its hard lifetime; B's kernel deletes B's SAs a little after its own.
        await asyncio.sleep(p["hard_lifetime"] + 10)
        blocked_a = await w.link("a")
        w.note("restart gw-b")
        restarted_at = time.time()
        w.start_gateway("b")
        await until("resynchronised", w.converged, timeout=60)
        w.note("resynchronised")
        await asyncio.sleep(3)
        rekeys = (await w.link("a"))["rekeys"]
        w.netem(True)
        await asyncio.sleep(30)
        rekeys_netem = (await w.link("a"))["rekeys"] - rekeys
        status_netem = await w.link("a")
        w.netem(False)
        for name in ("ping-faults", "ping-faults-b"):
            w.procs[name].send_signal(signal.SIGINT)
        ping, ping_b = w.ping_result("ping-faults"), w.ping_result("ping-faults-b")
        stop.set()
        samples = await sampler
        w.kill("gw-a")
        w.kill("gw-b")
    return {"policy": p, "killed_at": killed_at, "restarted_at": restarted_at,

            "blocked_a": blocked_a, "rekeys_netem": rekeys_netem, "status_netem": status_netem,
            "ping": ping, "ping_b": ping_b, "samples": samples, "capture": capture}


async def phase_soft(w: World) -> dict[str, Any]:
    w.start_gateway("a")
    w.start_gateway("b")
    await until("first epoch", w.converged)
    before = (await w.link("a"))["rekeys"]
    w.ping("ping-soft", "lan-a", HOST_B, count=2000, interval=0.01)
    while w.procs["ping-soft"].poll() is None:
        await asyncio.sleep(0.2)
    ping = w.ping_result("ping-soft")
    await asyncio.sleep(2)
    after = (await w.link("a"))["rekeys"]
    w.kill("gw-a")
    w.kill("gw-b")
    logs = {s: (w.out / f"gw-{s}.log").read_text() for s in ("a", "b")}
    return {"rekeys": after - before, "ping": ping, "soft_packets": SOFT_PACKETS,
            "soft_limit_lines": {s: sum("rekey needed (soft-limit)" in line
                                        for line in logs[s].splitlines()) for s in logs}}


async def phase_transport(w: World) -> dict[str, Any]:
    w.start_gateway("a")
    w.start_gateway("b")
    await until("first epoch", w.converged)
    before = (await w.link("a"))["rekeys"]
    with w.capture("transport") as capture:
        w.ping("ping-transport", "gw-a", GW_B, count=2000, interval=0.01)
        while w.procs["ping-transport"].poll() is None:
            await asyncio.sleep(0.2)
        ping = w.ping_result("ping-transport")
        rekeys = (await w.link("a"))["rekeys"] - before
        dump = w.xfrm_dump("a")
        w.kill("gw-a")
        w.kill("gw-b")
    return {"ping": ping, "rekeys": rekeys, "capture": capture, "dump": dump}


async def phase_crash(w: World) -> dict[str, Any]:
    """The initiator SIGKILLed under traffic and restarted at once: its kernel keeps
    forwarding; the restarted daemon adopts the SAs and rekeys without a gap."""
    w.start_gateway("a")
    w.start_gateway("b")
    await until("first epoch", w.converged)
    for site, target in (("a", HOST_B), ("b", HOST_A)):
        w.ping(f"ping-crash-{site}", f"lan-{site}", target, count=100_000, interval=0.02,
               timestamps=True)
    await asyncio.sleep(3)
    # Crash mid-interval: past the last switch's grace (1 s) and before the next rekey (2 s
    # interval), when the kernel holds exactly one SA each way.
    before = (await w.link("a"))["epoch"]
    await until("a rekey", lambda: _rekeyed_past(w, before))
    await asyncio.sleep(1.4)
    epoch = (await w.link("a"))["epoch"]
    w.note("crash gw-a")
    w.kill("gw-a", signal.SIGKILL)
    crashed_at = time.time()
    w.start_gateway("a")
    await until("rekeyed after the crash",
                lambda: _rekeyed_past(w, epoch + 1), timeout=60)
    w.note("rekeyed after the crash")
    # 5 s more of traffic, and at least the 10 s after the crash the test counts replies over
    # (at 50/s, with a margin for the guest's coarse timers) however fast the restart was.
    await asyncio.sleep(max(5.0, crashed_at + 12.0 - time.time()))
    for site in ("a", "b"):
        w.procs[f"ping-crash-{site}"].send_signal(signal.SIGINT)
    pings = {site: w.ping_result(f"ping-crash-{site}") for site in ("a", "b")}
    w.kill("gw-a")
    w.kill("gw-b")
    adopted = [line for line in (w.out / "gw-a.log").read_text().splitlines()
               if "adopted" in line]
    return {"crashed_at": crashed_at, "epoch_before": epoch, "ping": pings,
            "adopted": adopted}


async def _rekeyed_past(w: World, epoch: int) -> bool:
    try:
        a, b = await w.link("a"), await w.link("b")
    except OSError:
        return False
    return a["epoch"] == b["epoch"] > epoch and not a["blocked"]


PHASES = {"main": phase_main, "faults": phase_faults, "soft": phase_soft,
          "transport": phase_transport, "crash": phase_crash}


async def main(root: Path, phases: list[str]) -> int:
    out = root / "out"
    out.mkdir(exist_ok=True)
    world = World(root, out)
    results: dict[str, Any] = {"phases": {}, "errors": {}}
    try:
        world.build()
        world.start_sim()
        for phase in phases:
            world.phase = phase
            world.note(f"phase {phase}")
            try:
                results["phases"][phase] = await PHASES[phase](world)
            except Exception as e:  # keep going: the host test reports each phase
                import traceback

                results["errors"][phase] = traceback.format_exc()
                world.note(f"phase {phase} failed: {e}")
                for name in [n for n in world.procs if n != "kms-sim"]:
                    world.kill(name, signal.SIGKILL)
    finally:
        results["events"] = world.events
        world.teardown()
        results["leftover_netns"] = run("ip", "netns", "list")
        (root / "results.json").write_text(json.dumps(results))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("root", type=Path)
    parser.add_argument("phases", nargs="+", choices=sorted(PHASES))
    args = parser.parse_args()
    os.chdir(args.root)
    sys.exit(asyncio.run(main(args.root.resolve(), args.phases)))
