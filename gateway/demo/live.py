"""`qkdgw demo`: two sites on this machine, a tunnel rekeying with hybrid keys, traffic, a live
view, and a summary counted from the wire.

The sites are network namespaces (gateway/demo/sites.py): `qkdgw kms-sim` for the QKD link,
two `qkdgw run` daemons, and the data plane the kernel allows: the xfrm sink where it has
ESP, strongSwan with kernel-libipsec where it has not. UDP flows run both ways between the
LANs with sequence numbers (so loss is counted, not assumed); a packet socket on the link
between the sites counts every packet that carries a LAN address in clear
(gateway/demo/wire.py). Faults go
through the simulator's admin API. Everything created is removed at the end, on Ctrl-C too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from common.sockets import grow_receive_buffer
from gateway.demo import QBER_SPIKE
from gateway.demo.ha import Failover
from gateway.demo.sites import ADDR, HOST, LAN, Sites
from gateway.demo.topology import Topology, namespace
from gateway.demo.wire import Kind, Live, Tally

if TYPE_CHECKING:
    from gateway.demo.skip import Routers
    from gateway.demo.web import DemoWeb

Plane = Literal["auto", "xfrm", "strongswan"]
FLOW_PORT = 5001
#: A packet sent less than this long ago may still be on its way: not lost (yet).
IN_FLIGHT = 0.5
#: After the traffic stops, the last packets get this long to arrive before the count.
DRAIN = 1.0


@dataclass(frozen=True)
class Fault:
    kind: Literal["kms-outage", "qber-spike"]
    at: float
    seconds: float


class DemoError(Exception):
    """Why the demo cannot run here, and how to fix it."""


# -- what this machine needs ---------------------------------------------------------------------


def preflight(plane: Plane) -> Literal["xfrm", "strongswan"]:
    """The data plane to use, or DemoError naming what is missing and how to get it."""
    if sys.platform != "linux":
        raise DemoError("the demo builds Linux network namespaces: run it on Linux")
    if os.geteuid() != 0:
        raise DemoError("the demo builds network namespaces and needs root: run"
                        " `sudo ./bootstrap demo` (or `sudo .venv/bin/qkdgw demo`)")
    if shutil.which("ip") is None:
        raise DemoError("`ip` is missing: apt-get install iproute2")
    if shutil.which("sysctl") is None:
        raise DemoError("`sysctl` is missing: apt-get install procps")
    if plane == "auto":
        plane = "xfrm" if kernel_has_esp() else "strongswan"
    if plane == "strongswan":
        from gateway.demo.strongswan import missing_tools

        if reason := missing_tools():
            raise DemoError(reason)
    elif not kernel_has_esp():
        raise DemoError("this kernel has no ESP (XFRM cannot add an AES-GCM SA): use"
                        " --plane strongswan (kernel-libipsec, ESP in userspace)")
    return plane


def ha_missing() -> str | None:
    """Why site A cannot be a keepalived pair here, or None."""
    if shutil.which("keepalived") is None:
        return "keepalived is not installed (apt-get install keepalived)"
    if shutil.which("iptables") is None:
        return "iptables is not installed (apt-get install iptables)"
    return None


def kernel_has_esp() -> bool:
    """Can this kernel hold an ESP SA with AES-GCM? Tried in a scratch namespace."""
    try:
        with namespace(f"qdprobe{os.getpid()}") as ns:
            # Its own process group: not stopped half-way by Ctrl-C (as topology.run). A fixed
            # argv, no shell; ip from PATH, as everywhere in the demo.
            probe = subprocess.run(  # noqa: S603
                ["ip", "-n", ns, "xfrm", "state", "add", "src", "192.0.2.1", "dst",  # noqa: S607
                 "192.0.2.2", "proto", "esp", "spi", "0x100", "mode", "tunnel", "aead",
                 "rfc4106(gcm(aes))", "0x" + "00" * 36, "128"], capture_output=True,
                check=False, process_group=0)
            return probe.returncode == 0
    except OSError:  # no namespaces here
        return False


class XfrmSites(Sites):
    """The two sites with the kernel's own ESP: no daemon besides the gateways. The xfrm
    sink's policies block without a key, so the remote LAN is routed to the wan as usual."""

    tag = "qd"
    topology = Topology()

    def sink(self, site: str) -> dict[str, Any]:
        peer = "b" if site == "a" else "a"
        return {"type": "xfrm", "local": ADDR[site], "remote": ADDR[peer],
                "local_subnets": [LAN[site]], "remote_subnets": [LAN[peer]]}


# -- traffic and the wire ------------------------------------------------------------------------


@dataclass
class Flow:
    """UDP from one LAN host to the other at RATE packets/s, numbered."""

    name: str
    tx: socket.socket
    rx: socket.socket
    target: tuple[str, int]
    rate: float
    sent_at: list[float] = field(default_factory=list)
    received: set[int] = field(default_factory=set)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        # Room for a burst (what a gateway held during a rotation arrives together): a loss
        # counted must be the tunnel's, never this socket's. The demo runs as root.
        grow_receive_buffer(self.rx, 4 << 20)
        self.rx.bind(("0.0.0.0", FLOW_PORT))  # noqa: S104 (in the LAN host's own namespace)
        self.rx.settimeout(0.2)
        for target in (self._send, self._receive):
            threading.Thread(target=target, name=f"{self.name}-{target.__name__}",
                             daemon=True).start()

    def _send(self) -> None:
        start = time.monotonic()
        seq = 0
        while not self.stop.is_set():
            delay = start + seq / self.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self.sent_at.append(time.monotonic())
            with contextlib.suppress(OSError):  # blocked: counted as lost, never in clear
                self.tx.sendto(struct.pack("!I", seq) + bytes(60), self.target)
            seq += 1

    def _receive(self) -> None:
        """Until stopped and then quiet for a moment (the last packets still count)."""
        while True:
            try:
                data = self.rx.recv(2048)
            except TimeoutError:
                if self.stop.is_set():
                    return
                continue
            except OSError:
                return
            if len(data) >= 4:
                self.received.add(struct.unpack_from("!I", data)[0])

    def lost_in(self, start: float, end: float) -> list[float]:
        """The send times (time.monotonic()) of the packets lost that were sent from START
        to END."""
        return [t for seq, t in enumerate(self.sent_at)
                if start <= t <= end and seq not in self.received]

    def counts(self, final: bool = False) -> tuple[int, int, int]:
        """(sent, received, lost); before the end, recent packets are not lost yet."""
        sent = len(self.sent_at)
        received = len(self.received)
        if final:
            return sent, received, sent - received
        settled = sum(1 for t in self.sent_at[-int(self.rate):]
                      if time.monotonic() - t < IN_FLIGHT)
        return sent, received, max(0, sent - settled - received)


def start_flows(sites: Sites, rate: float) -> list[Flow]:
    """UDP both ways between the LAN hosts of sites a and b, RATE packets/s each way."""
    flows = []
    for src, dst in (("a", "b"), ("b", "a")):
        flow = Flow(f"{src}->{dst}",
                    sites.net.socket(f"lan-{src}", socket.AF_INET, socket.SOCK_DGRAM),
                    sites.net.socket(f"lan-{dst}", socket.AF_INET, socket.SOCK_DGRAM),
                    (HOST[dst], FLOW_PORT), rate)
        flow.start()
        flows.append(flow)
    return flows


def outage(flows: list[Flow], start: float, end: float) -> float:
    """The longest span, either way, from the first to the last packet lost that was sent
    from START to END (0: none lost)."""
    spans = [lost[-1] - lost[0] + 1 / f.rate for f in flows if (lost := f.lost_in(start, end))]
    return max(spans, default=0.0)


# -- the demo ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FailoverPlan:
    """`--ha --failover-at AT --failover KIND`: fail site A's active node at AT seconds."""

    at: float
    kind: Failover
    max_outage: float  # seconds


#: Packets lost from this long before the failover count as the failover's (they were in
#: flight in the node that died) ...
FAILOVER_BEFORE = 1.0
#: ... and up to this long after it.
FAILOVER_AFTER = 10.0


class Demo:
    def __init__(self, plane: Literal["xfrm", "strongswan"], root: Path, interval: float,
                 rate: float, link_profile: str | None = None, ha: bool = False,
                 skip: bool = False) -> None:
        policy = {"interval": interval, "jitter": 0.0, "grace": min(1.0, interval / 2),
                  "hard_lifetime": max(10 * interval, 30.0), "mode": "pqc-fallback"}
        self.ha = ha
        self.failed_over: tuple[float, str, str] | None = None  # (monotonic, node, kind)
        if ha:
            from gateway.demo.ha import StrongswanHaSites, XfrmHaSites

            pair: type[Sites] = StrongswanHaSites if plane == "strongswan" else XfrmHaSites
            self.sites: Sites = pair(root, policy)
        elif plane == "strongswan":
            from gateway.demo.strongswan import StrongswanSites

            class DemoStrongswanSites(StrongswanSites):
                tag = "qd"  # the demo's namespaces: qdXXXX-lan-a, ...

            self.sites = DemoStrongswanSites(root, policy, skip=skip)
        else:
            self.sites = XfrmSites(root, policy, skip=skip)
        self.sites.verbose = False
        self.sites.link_profile = link_profile
        self.plane, self.rate = plane, rate
        self.flows: list[Flow] = []
        self.wire: Live | None = None
        self.first_epoch = self.last_epoch = 0
        self.plan: FailoverPlan | None = None
        self.events: list[str] = []
        #: Called once a second by the live view (the web view samples the traffic).
        self.ticks: list[Callable[[], None]] = []
        self.routers: Routers | None = None  # --skip
        self._routing: asyncio.Task[None] | None = None

    async def up(self) -> None:
        s = self.sites
        s.build()
        await s.start()
        self.first_epoch = self.last_epoch = (await s.link("a"))["epoch"]
        # wan-a: every packet between the sites passes it once.
        self.wire = Live(s.net, "wan", "wan-a",
                         Tally.of(s.topology, expect=set(Kind) - {Kind.PLAINTEXT}))
        self.flows = start_flows(s, self.rate)
        if s.skip:
            from gateway.demo.skip import Routers

            self.routers = Routers(s.net, s.root / "skip")
            self._routing = asyncio.create_task(self.routers.run(), name="skip-routers")

    async def failover(self, kind: Failover) -> None:
        from gateway.demo.ha import HaSites

        assert isinstance(self.sites, HaSites)  # noqa: S101 (only with --ha)
        at = time.monotonic()
        node = await self.sites.failover(kind)
        self.failed_over = (at, node, kind)
        self.events.append(f"{time.strftime('%H:%M:%S')} failover ({kind}) of node {node}")

    def failover_line(self) -> tuple[str, float]:
        """The summary's failover line and the outage (s): the packets lost around it, per
        direction, and the longest span from the first to the last of them."""
        if self.failed_over is None:
            return "failover: none happened", 0.0
        start, end = self.failed_over[0] - FAILOVER_BEFORE, self.failed_over[0] + FAILOVER_AFTER
        lost = {f.name: len(f.lost_in(start, end)) for f in self.flows}
        parts = ", ".join(f"{name.replace('->', '→').upper()} {n}" for name, n in lost.items())
        span = outage(self.flows, start, end)
        return (f"failover: outage {span * 1e3:.0f} ms, lost {sum(lost.values())} ({parts})",
                span)

    def fault(self, fault: Fault) -> None:
        if fault.kind == "kms-outage":
            path, body = "/admin/faults", {"kind": "unavailable", "seconds": fault.seconds}
        else:
            path, body = "/admin/links/qkd-ab/qber", {"qber": QBER_SPIKE}
        self._sim(path, body)
        self.events.append(f"{time.strftime('%H:%M:%S')} {fault.kind} for {fault.seconds:g} s")

    def end_qber_spike(self) -> None:
        self._sim("/admin/links/qkd-ab/qber", None)
        self.events.append(f"{time.strftime('%H:%M:%S')} QBER back to the link's own")

    def _sim(self, path: str, body: dict[str, Any] | None) -> None:
        self.sites.sim(path, body)

    async def view(self, elapsed: float, duration: float | None, compact: bool = False) -> str:
        a, b = await self.sites.link("a"), await self.sites.link("b")
        self.last_epoch = a["epoch"]
        kms = a.get("kms") or {}
        k = kms_figures(kms)
        alarms = sorted(set(a.get("alarms") or {}) | set(b.get("alarms") or {}))
        key = protection(a)
        if compact:
            flows = " ".join("{} {}/{}/{}".format(f.name, *f.counts()) for f in self.flows)
            return (f"{elapsed:4.0f}s epoch {a['epoch']} rekeys {a['epoch'] - self.first_epoch}"
                    f" key {key} QBER {k['qber']} pool {k['pool']}"
                    f" KMS {'up' if kms.get('ok') else 'down'}"
                    f" alarms {','.join(alarms) or 'none'} | sent/received/lost {flows}"
                    f" | plaintext {self.wire.tally.plaintext if self.wire else 0}"
                    + (f" | {self.routers.line()}" if self.routers else "")
                    + (f" | {self.events[-1]}" if self.events else ""))
        lines = [f"qkd-gateway demo · {self.plane} · {elapsed:5.0f} s"
                 + (f" of {duration:g}" if duration else " (Ctrl-C ends it)"),
                 f"  epoch {a['epoch']} (B: {b['epoch']})  key age {a.get('key_age') or 0:.1f} s"
                 f"  rekeys {a['epoch'] - self.first_epoch}  key {key}"
                 f"  fingerprint {a.get('fingerprint') or '-'}"
                 f" {'=' if a.get('fingerprint') == b.get('fingerprint') else '≠'} B",
                 f"  QKD link: key rate {k['key_rate']} bit/s  pool {k['pool']} keys"
                 f"  QBER {k['qber']}"
                 f"  KMS {'up' if kms.get('ok') else 'DOWN: ' + str(kms.get('reason'))}",
                 f"  alarms: {', '.join(alarms) or 'none'}"
                 + ("  (traffic BLOCKED)" if a.get("blocked") or b.get("blocked") else "")]
        for flow in self.flows:
            sent, received, lost = flow.counts()
            lines.append(f"  LAN {flow.name}: sent {sent}  received {received}  lost {lost}")
        if self.wire is not None:
            wire = self.wire.tally
            lines.append(f"  link between the sites: {wire.total} packets,"
                         f" {sum(wire.esp.values())} ESP, plaintext {wire.plaintext}")
        if self.routers is not None:
            lines.append(f"  {self.routers.line()}")
        lines += [f"  {e}" for e in self.events[-3:]]
        return "\n".join(lines)

    async def finish(self) -> tuple[str, bool]:
        for flow in self.flows:
            flow.stop.set()
        if self._routing is not None:
            self._routing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._routing
        await asyncio.sleep(DRAIN)
        # If the gateway is gone (its log says why), the last epoch seen.
        with contextlib.suppress(OSError):
            self.last_epoch = (await self.sites.link("a"))["epoch"]
        rekeys = self.last_epoch - self.first_epoch
        sent = lost = 0
        by_direction = []
        for flow in self.flows:
            s, _, x = flow.counts(final=True)
            sent, lost = sent + s, lost + x
            by_direction.append(f"{flow.name.replace('->', '→').upper()} {x}")
        plaintext = self.wire.tally.plaintext if self.wire else 0
        line = (f"rekeys: {rekeys}, packets sent: {sent}, lost: {lost}"
                f" ({', '.join(by_direction)}), plaintext on the link: {plaintext}")
        if self.plan is not None:
            failover, outage = self.failover_line()
            return failover + "\n" + line, plaintext == 0 and self.failed_over is not None \
                and outage <= self.plan.max_outage
        if self.routers is not None:
            return line + "\n" + self.routers.line(), lost == 0 and plaintext == 0 \
                and rekeys > 0 and self.routers.ok
        return line, lost == 0 and plaintext == 0 and rekeys > 0

    def down(self) -> None:
        for flow in self.flows:
            flow.stop.set()
            flow.tx.close()
            flow.rx.close()
        if self.wire is not None:
            self.wire.close()
        self.sites.teardown()


#: Signals that end the demo as Ctrl-C does: with the summary and the cleanup.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


async def run_demo(plane: Plane, *, duration: float | None, interval: float, rate: float,
                   faults: list[Fault], keep: Path | None, link_profile: str | None = None,
                   ha: bool = False, failover: FailoverPlan | None = None,
                   web_port: int | None = None, skip: bool = False) -> int:
    """Run the demo; the exit status. Ctrl-C (or SIGTERM, SIGHUP) ends it as --duration
    does: the counted summary, the cleanup, and the summary's status (0: nothing lost,
    nothing in clear). Before the traffic started there is nothing to count: 128 + signal.
    WEB_PORT: also show the live view in a browser, on 127.0.0.1 at that port. SKIP: each
    gateway also a SKIP Key Provider, and a router on each LAN fetching keys through them.

    The demo's processes run in their own process group, so Ctrl-C on a terminal reaches
    only the demo, which then stops them in order (gateways before their data planes)."""
    chosen = preflight(plane)
    if ha and (reason := ha_missing()):
        raise DemoError(reason)
    loop = asyncio.get_running_loop()
    stopped_by: list[signal.Signals] = []
    body: asyncio.Task[None] | None = None

    def stop(sig: signal.Signals) -> None:
        if not stopped_by:
            stopped_by.append(sig)
            if body is not None:
                body.cancel()
        else:
            print(f"\n{sig.name}: still counting and cleaning up, a few seconds", flush=True)

    for sig in STOP_SIGNALS:  # before anything is made that would need cleaning up
        loop.add_signal_handler(sig, stop, sig)
    root = keep or Path(tempfile.mkdtemp(prefix="qkdgw-demo-"))
    demo: Demo | None = None
    web: DemoWeb | None = None
    tty = sys.stdout.isatty()
    status = 1
    try:
        root.mkdir(parents=True, exist_ok=True)
        demo = Demo(chosen, root, interval, rate, link_profile, ha=ha, skip=skip)
        demo.plan = failover
        if web_port is not None:
            from gateway.demo.web import DemoWeb

            web = DemoWeb(demo, web_port)
            try:
                await web.start()
            except OSError as e:
                web = None
                raise DemoError(f"--web {web_port}: cannot listen on 127.0.0.1:{web_port}:"
                                f" {e.strerror}; give another port") from None
            demo.ticks.append(web.traffic.sample)
            print(f"live view in a browser: {web.url}", flush=True)
        pair = ", site A a keepalived pair" if ha else ""
        pair += ", SKIP routers" if skip else ""
        print(f"building two sites ({chosen} data plane{pair}), files in {root} ...",
              flush=True)
        if not stopped_by:
            body = asyncio.create_task(_live(demo, duration, faults, tty))
            try:
                await body
            except asyncio.CancelledError:
                if not stopped_by:  # cancelled from outside, not by a signal
                    raise
        if stopped_by:
            print(("\n" if tty else "") + f"{_signal_name(stopped_by[0])}: stopping", flush=True)
        if demo.flows:
            line, ok = await demo.finish()
            print(line, flush=True)
            status = 0 if ok else 1
        elif stopped_by:
            print("interrupted before the traffic started: nothing counted", flush=True)
            status = 128 + stopped_by[0]
    finally:
        if web is not None:
            await web.stop()
        if demo is not None:
            demo.down()
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)
    print("cleaned up: namespaces, processes" + ("" if keep else " and files") + " removed")
    return status


def _figure(value: object, spec: str) -> str:
    """A figure from the status, or 'unknown' while there is none (unknown is not zero)."""
    return format(value, spec) if isinstance(value, int | float) else "unknown"


#: What protects a link's traffic, by its status' `condition` (the policy's mode is not it).
PROTECTION = {"qkd": "QKD+ML-KEM-768+X25519", "pqc": "ML-KEM-768+X25519 (PQC-only)",
              "blocked": "none (BLOCKED)", "none": "none yet"}


def protection(link: dict[str, Any]) -> str:
    """The suite in use on LINK's current key, from its status."""
    return PROTECTION.get(str(link.get("condition")), str(link.get("condition")))


def kms_figures(kms: dict[str, Any]) -> dict[str, str]:
    """The KMS figures a view shows: 'unknown' for a KME that did not answer, and for the
    QBER of a quantum link that is down (the last reading, or a 0, is not today's)."""
    gone = kms.get("error") is not None
    down = kms.get("link_up") is False
    return {"qber": "unknown" if gone or down else _figure(kms.get("qber"), ".3f"),
            "key_rate": "unknown" if gone else _figure(kms.get("key_rate"), ",.0f"),
            "pool": "unknown" if gone else _figure(kms.get("stored_key_count"), "d")}


def _signal_name(sig: signal.Signals) -> str:
    return "Ctrl-C" if sig == signal.SIGINT else sig.name


async def _live(demo: Demo, duration: float | None, faults: list[Fault], tty: bool) -> None:
    """Bring the sites up, then the live view until DURATION (or cancelled)."""
    await demo.up()
    start = time.monotonic()
    pending = sorted(faults, key=lambda f: f.at)
    spikes: list[float] = []
    shown = 0
    while duration is None or time.monotonic() - start < duration:
        elapsed = time.monotonic() - start
        if demo.plan is not None and demo.failed_over is None and elapsed >= demo.plan.at:
            await demo.failover(demo.plan.kind)
        while pending and pending[0].at <= elapsed:
            fault = pending.pop(0)
            demo.fault(fault)
            if fault.kind == "qber-spike":
                spikes.append(elapsed + fault.seconds)
        if spikes and spikes[0] <= elapsed:
            spikes.pop(0)
            demo.end_qber_spike()
        try:
            text = await demo.view(elapsed, duration, compact=not tty)
        except OSError as e:  # a gateway restarting, or a node failing over
            text = f"{elapsed:4.0f}s (status unavailable: {e})"
        for tick in demo.ticks:
            tick()
        if tty:  # redraw in place
            sys.stdout.write((f"\x1b[{shown}A\x1b[J" if shown else "") + text + "\n")
            shown = text.count("\n") + 1
        else:  # a log: one line a second
            sys.stdout.write(text + "\n")
        sys.stdout.flush()
        wake = 1.0 - (time.monotonic() - start) % 1.0
        if demo.plan is not None and demo.failed_over is None:  # the failover on time
            wake = min(wake, max(0.0, demo.plan.at - (time.monotonic() - start)))
        await asyncio.sleep(wake)
