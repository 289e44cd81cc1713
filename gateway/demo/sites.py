"""Two sites in network namespaces on this machine, with `qkdgw kms-sim` and two `qkdgw run`:
what `qkdgw demo` builds, and what the integration tests build on.

    lan-a ──── gw-a ═══════════ wan ═══════════ gw-b ──── lan-b
  10.1.0.2   10.1.0.1  192.0.2.1  192.0.2.254  198.51.100.254  198.51.100.1  10.2.0.1  10.2.0.2
             qkdgw run             qkdgw kms-sim               qkdgw run

Each box is a network namespace with a unique prefix. `wan` routes between the gateways and
has no route to either LAN: a clear-text packet from a LAN shows on the wire and goes no
further. Each gateway's main table has a blackhole route for the remote LAN (what keeps
traffic from leaving in clear when no data plane is up, docs/strongswan.md) and a default
route to `wan`.

A subclass says what sink the gateways run (`sink()`) and adds its data plane.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import yaml

LAN_A, LAN_B = "10.1.0.0/16", "10.2.0.0/16"
GW_A, GW_B = "192.0.2.1", "198.51.100.1"
WAN_A, WAN_B = "192.0.2.254", "198.51.100.254"
HOST_A, HOST_B = "10.1.0.2", "10.2.0.2"
PEER_PORT, KME_A_PORT, KME_B_PORT, SIM_ADMIN_PORT = 9443, 9001, 9002, 9000
ADDR = {"a": GW_A, "b": GW_B}
LAN = {"a": LAN_A, "b": LAN_B}
HOST = {"a": HOST_A, "b": HOST_B}


def run(*argv: str, check: bool = True) -> str:
    # Its own process group, as spawn's: Ctrl-C is for the demo, which finishes in order.
    proc = subprocess.run(argv, check=False, capture_output=True, text=True, process_group=0)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


class Sites:
    """The topology, the KMS simulator, the gateways and what measures them."""

    #: A short tag for namespace names (unique per run anyway).
    tag = "qn"
    #: Blackhole routes for the remote LAN in each gateway's main table (the strongSwan
    #: sink's guard against clear text). Not with the xfrm sink: its policies need a route.
    blackhole_routes = True
    #: Progress lines on stderr (the demo has its own view).
    verbose = True

    def __init__(self, root: Path, policy: dict[str, Any]) -> None:
        self.root = root
        tag = uuid.uuid4().hex[:4]
        self.ns = {n: f"{self.tag}{tag}-{n}" for n in ("lan-a", "gw-a", "wan", "gw-b", "lan-b")}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.policy = policy
        self.prepare()

    def sink(self, site: str) -> dict[str, Any]:
        """The sink configuration of SITE's gateway."""
        raise NotImplementedError

    def prepare(self) -> None:
        from gateway import pki
        from gateway.initdemo import init_demo

        root = self.root
        layout = init_demo(root)
        ca = pki.load(layout.pki / "ca.pem", layout.pki / "ca.key")
        for kme, ip in (("kme-a", WAN_A), ("kme-b", WAN_B)):
            cert = pki.issue(ca, kme, dns=[kme], ips=[ip], server=True, client=False)
            pki.save(cert, layout.pki / f"{kme}.pem", layout.pki / f"{kme}.key")
        kms = yaml.safe_load(layout.kms_config.read_text())
        kms["admin"]["listen"] = f"127.0.0.1:{SIM_ADMIN_PORT}"
        kms["kmes"][0]["listen"] = f"{WAN_A}:{KME_A_PORT}"
        kms["kmes"][1]["listen"] = f"{WAN_B}:{KME_B_PORT}"
        layout.kms_config.write_text(yaml.safe_dump(kms))
        for site in ("a", "b"):
            me, peer = (GW_A, GW_B) if site == "a" else (GW_B, GW_A)
            base = yaml.safe_load(layout.site_config(site).read_text())
            config = {**base, "state_dir": str(root / f"state-{site}"),
                      "kms_status_interval": 1.0, "policy": {**base["policy"], **self.policy}}
            config.pop("metrics", None)
            config["kms"] = {**base["kms"], "url": f"https://{WAN_A if site == 'a' else WAN_B}"
                             f":{KME_A_PORT if site == 'a' else KME_B_PORT}"}
            config["peer_channel"] = {**base["peer_channel"], "listen": f"{me}:{PEER_PORT}"}
            link = {**base["links"][0], "sinks": [self.sink(site)]}
            link["peer"] = {**link["peer"], "address": f"{peer}:{PEER_PORT}"}
            config["links"] = [link]
            (root / f"site-{site}.yaml").write_text(yaml.safe_dump(config))

    def note(self, what: str) -> None:
        if self.verbose:
            print(f"{time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)

    # -- topology ------------------------------------------------------------------------------

    def build(self) -> None:
        ns = self.ns
        script = [f"ip netns add {n}" for n in ns.values()]

        def veth(a: str, a_if: str, b: str, b_if: str) -> None:
            script.append(f"ip link add {a_if} netns {ns[a]} type veth peer name {b_if}"
                          f" netns {ns[b]}")

        veth("lan-a", "eth0", "gw-a", "lan")
        veth("gw-a", "wan", "wan", "wan-a")
        veth("wan", "wan-b", "gw-b", "wan")
        veth("gw-b", "lan", "lan-b", "eth0")
        addrs = [("lan-a", "eth0", f"{HOST_A}/16"), ("gw-a", "lan", "10.1.0.1/16"),
                 ("gw-a", "wan", f"{GW_A}/24"), ("wan", "wan-a", f"{WAN_A}/24"),
                 ("wan", "wan-b", f"{WAN_B}/24"), ("gw-b", "wan", f"{GW_B}/24"),
                 ("gw-b", "lan", "10.2.0.1/16"), ("lan-b", "eth0", f"{HOST_B}/16")]
        for n in ns.values():  # IPv4 only (IPv6 would make charon send MOBIKE updates)
            script.append(f"ip netns exec {n} sysctl -qw net.ipv6.conf.all.disable_ipv6=1")
        script += [f"ip -n {ns[n]} addr add {a} dev {d}" for n, d, a in addrs]
        for n, devs in (("lan-a", ["eth0"]), ("gw-a", ["lan", "wan"]),
                        ("wan", ["wan-a", "wan-b"]), ("gw-b", ["lan", "wan"]),
                        ("lan-b", ["eth0"])):
            script += [f"ip -n {ns[n]} link set {d} up" for d in ["lo", *devs]]
        script += [
            f"ip -n {ns['lan-a']} route add default via 10.1.0.1",
            f"ip -n {ns['lan-b']} route add default via 10.2.0.1",
            f"ip -n {ns['gw-a']} route add default via {WAN_A}",
            f"ip -n {ns['gw-b']} route add default via {WAN_B}",
        ]
        if self.blackhole_routes:
            script += [f"ip -n {ns['gw-a']} route add blackhole {LAN_B}",
                       f"ip -n {ns['gw-b']} route add blackhole {LAN_A}"]
        for n in ("gw-a", "wan", "gw-b"):
            script += [f"ip netns exec {ns[n]} sysctl -qw net.ipv4.ip_forward=1",
                       f"ip netns exec {ns[n]} sysctl -qw net.ipv4.conf.all.rp_filter=0",
                       f"ip netns exec {ns[n]} sysctl -qw net.ipv4.conf.default.rp_filter=0"]
        run("sh", "-ec", "\n".join(script))
        self.note("topology up")

    def teardown(self) -> None:
        for name in reversed(list(self.procs)):  # gateways before their data planes, KMS
            self.kill(name)
        for n in self.ns.values():
            run("ip", "netns", "del", n, check=False)

    # -- processes -------------------------------------------------------------------------------

    def spawn(self, name: str, ns: str, argv: list[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("ab")
        # Their own process group: Ctrl-C on a terminal reaches the whole foreground group,
        # and these must stay up for the summary, then stop in order (teardown) when the
        # demo, the only one that gets it, says so.
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns[ns], *argv], cwd=self.root,
                                stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, process_group=0)
        self.procs[name] = proc
        return proc

    def kill(self, name: str, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        proc = self.procs.pop(name)
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()

    def start_sim(self) -> None:
        qkdgw = str(Path(sys.executable).with_name("qkdgw"))
        self.spawn("kms-sim", "wan", [qkdgw, "kms-sim", "-c", "kms.yaml"])
        wait_until("kms-sim listening", lambda: _listening(self.ns["wan"], KME_B_PORT))

    def start_gateway(self, site: str) -> None:
        qkdgw = str(Path(sys.executable).with_name("qkdgw"))
        self.spawn(f"gw-{site}", f"gw-{site}", [qkdgw, "run", "-c", f"site-{site}.yaml"])
        self.note(f"gw-{site} started")

    async def admin(self, site: str, method: str = "GET", path: str = "/status"
                    ) -> dict[str, Any]:
        import aiohttp

        sock = self.root / f"state-{site}" / "admin.sock"
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(sock))) as c, \
                c.request(method, f"http://qkdgw{path}") as r:
            data: dict[str, Any] = await r.json()
            return data

    async def link(self, site: str) -> dict[str, Any]:
        links: list[dict[str, Any]] = (await self.admin(site))["links"]
        return links[0]

    async def converged(self) -> bool:
        try:
            a, b = await self.link("a"), await self.link("b")
        except OSError:
            return False
        return (a["epoch"] == b["epoch"] >= 1 and a["fingerprint"] == b["fingerprint"]
                and not a["blocked"] and not b["blocked"])

def _listening(ns: str, port: int) -> bool:
    return f":{port} " in run("ip", "netns", "exec", ns, "ss", "-Hltn", check=False)


def wait_until(what: str, check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise TimeoutError(f"{what}: not after {timeout} s")


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = 60.0
                ) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.1)
    raise TimeoutError(f"{what}: not after {timeout} s")
