"""Rekey benchmark: latency and throughput of real daemons on loopback.

    python bench/rekey.py [--seconds 10] [--links 64]

Starts `qkdgw kms-sim` and two `qkdgw run` daemons (separate processes, mutual TLS, the
demo PKI), then:
1. latency: one link, an operator rekey (`POST /rekey` on the admin socket) every 50 ms;
   per epoch, from the start of the exchange at the initiator until the second of the two
   sides has switched its outbound key (both daemons report when, on this host's clock):
   trigger → both sides switched. p50 / p99 over the run.
2. throughput: LINKS links between the two daemons, each rekeying as fast as its policy
   allows; rekeys completed per second across all links (from /metrics).
Baseline in the same run: the same exchange between the two cores wired to each other in
memory (no sockets, KMS, sinks or logs), so the figures read as a multiple of the protocol's
pure CPU cost. Prints; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from common.sink import Role
from gateway.core.events import (
    Action,
    ActivateOutbound,
    Event,
    FetchQkdKeys,
    FetchQkdKeysById,
    InstallInbound,
    KmsStatusObserved,
    QkdKeysFetched,
    RekeyRequested,
    Send,
    SinkActivated,
    SinkInstalled,
    Tick,
    received,
)
from gateway.core.machine import LinkIdentity, LinkMachine
from gateway.core.policy import Policy
from gateway.initdemo import DemoLayout
from kms.models import QkdKey
from tests.helpers import many_links_demo, qkdgw_command, start_sim, wait_for_port


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def core_baseline(seconds: float) -> float:
    """CPU seconds per rekey of the two cores alone, wired to each other in memory: no
    sockets, no KMS, no sinks, no logs; messages handed over as objects. The floor the
    daemons' figures are compared with."""
    peers = {}
    pending: list[tuple[LinkMachine, Event]] = []
    reserved: dict[str, bytes] = {}
    for role in (Role.INITIATOR, Role.RESPONDER):
        me, other = ("gw-a", "gw-b") if role is Role.INITIATOR else ("gw-b", "gw-a")
        identity = LinkIdentity("ab", role, me, hashlib.sha256(me.encode()).digest(),
                                f"sae-{me[-1]}", other, f"sae-{other[-1]}")
        peers[role] = LinkMachine(identity, Policy(interval=1e6, hard_lifetime=4e6,
                                                   prefetch=False), now=0.0)
    i, r = peers[Role.INITIATOR], peers[Role.RESPONDER]
    for m, (me, peer) in ((i, ("kme-a", "kme-b")), (r, ("kme-b", "kme-a"))):
        m.handle(KmsStatusObserved(10**6, 256, me, peer), 0.0)

    def act(m: LinkMachine, actions: list[Action]) -> None:
        other = r if m is i else i
        for a in actions:
            if isinstance(a, Send):
                pending.append((other, received(a.message, m.identity.cert_sha256)))
            elif isinstance(a, FetchQkdKeys):
                key = QkdKey(str(uuid.uuid4()), os.urandom(a.size // 8))
                reserved[key.key_id] = key.material
                pending.append((m, QkdKeysFetched(a.request, (key,))))
            elif isinstance(a, FetchQkdKeysById):
                keys = tuple(QkdKey(k, reserved.pop(k)) for k in a.key_ids)
                pending.append((m, QkdKeysFetched(a.request, keys)))
            elif isinstance(a, InstallInbound):
                pending.append((m, SinkInstalled(a.material.epoch)))
            elif isinstance(a, ActivateOutbound):
                pending.append((m, SinkActivated(a.material.epoch)))

    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        now = 10.0 * n  # 10 s apart: old epochs retire (grace 2 s) at the ticks below
        act(i, i.handle(RekeyRequested("bench"), now))
        while pending:
            m, event = pending.pop(0)
            act(m, m.handle(event, now))
        for m in (i, r):
            act(m, m.handle(Tick(), now + 5.0))
        n += 1
    if not i.current_epoch == r.current_epoch == n:
        raise RuntimeError("the baseline exchange went wrong")
    return (time.perf_counter() - start) / n


def configure(root: Path, links: int, interval: float) -> DemoLayout:
    """Two sites with LINKS links and no sinks, rekeying every INTERVAL seconds."""
    return many_links_demo(root, links, policy={
        "interval": interval, "jitter": 0.0, "hard_lifetime": max(60.0, 4 * interval),
        "grace": 0.5}, kms_status_interval=1.0, file_sinks=False)


class Run:
    def __init__(self, layout: DemoLayout, flags: tuple[str, ...] = ()) -> None:
        self.layout = layout
        self.flags = flags
        d = layout
        self.sim = start_sim(d.kms_config, d.admin_port, [d.kme_port("a"), d.kme_port("b")],
                             d.root / "sim.log")
        self.procs = []
        for site in ("a", "b"):
            log = (d.root / f"{site}.log").open("wb")
            self.procs.append(subprocess.Popen(  # noqa: S603 (our qkdgw, an argv, no shell)
                [*qkdgw_command(), *self.flags, "run", "-c", str(d.site_config(site))], stdout=log,
                stderr=subprocess.STDOUT))
            wait_for_port(d.gateway_port(site), proc=self.procs[-1])

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
            p.wait()
        self.sim.stop()

    async def rekeys_total(self, site: str = "a") -> float:
        url = f"http://127.0.0.1:{self.layout.metrics_port(site)}/metrics"
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            text = await r.text()
        return sum(float(v) for v in re.findall(r"^qkdgw_rekeys_total\{[^}]*\} (\S+)$",
                                                 text, re.M))

    async def admin(self, path: str, body: dict[str, str] | None = None, site: str = "a"
                    ) -> dict[str, Any]:
        sock = self.layout.state_dir(site) / "admin.sock"
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(sock))) as s, \
                s.request("POST" if body is not None else "GET", f"http://x{path}",
                          json=body) as r:
            data: dict[str, Any] = await r.json()
            return data


async def latency(run: Run, seconds: float) -> list[float]:
    """Seconds from the start of each exchange (at the initiator) until the later of the two
    sides switched to its key; both daemons run on this host, so their clocks agree."""
    samples: list[float] = []
    seen = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await run.admin("/rekey", {})
        await asyncio.sleep(0.05)
        a = (await run.admin("/status"))["links"][0]["last_rekey"]
        b = (await run.admin("/status", site="b"))["links"][0]["last_rekey"]
        if a and b and a["epoch"] == b["epoch"] > seen:
            seen = a["epoch"]
            samples.append(max(a["activated_at"], b["activated_at"]) - a["started_at"])
    return samples


async def throughput(run: Run, seconds: float) -> float:
    await asyncio.sleep(2)  # all links past their first epoch
    before, t0 = await run.rekeys_total(), time.monotonic()
    await asyncio.sleep(seconds)
    after, t1 = await run.rekeys_total(), time.monotonic()
    return (after - before) / (t1 - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    parser.add_argument("--links", type=int, default=64, help="links for the throughput run")
    args = parser.parse_args()

    per = core_baseline(min(args.seconds, 3.0))
    print(f"baseline: the two cores alone, in memory (no I/O): {per * 1e3:.2f} ms of CPU"
          f" per rekey ({1 / per:,.0f} rekeys/s on one core)")

    with tempfile.TemporaryDirectory(prefix="qkdgw-bench-") as tmp:
        run = Run(configure(Path(tmp) / "one", 1, 3600.0))
        try:
            time.sleep(1.0)
            samples = asyncio.run(latency(run, args.seconds))
        finally:
            run.stop()
        p50, p99 = pct(samples, 50) * 1e3, pct(samples, 99) * 1e3
        print(f"\nlatency, 1 link, {len(samples)} operator rekeys (trigger -> both switched):")
        print(f"  p50 {p50:.2f} ms   p99 {p99:.2f} ms   mean"
              f" {statistics.mean(samples) * 1e3:.2f} ms   p50 = {p50 / (per * 1e3):.1f}x"
              " the cores' CPU cost")

        run = Run(configure(Path(tmp) / "many", args.links, 0.01))
        try:
            rps = asyncio.run(throughput(run, args.seconds))
        finally:
            run.stop()
        print(f"\nthroughput, {args.links} links between two daemons, back-to-back rekeys:")
        print(f"  {rps:,.0f} rekeys/s   = {rps * per:.2f}x what the cores alone do on one"
              " core")


if __name__ == "__main__":
    main()
