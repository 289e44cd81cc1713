"""Two sites in network namespaces on this machine (gateway/demo/topology.py), with `qkdgw
kms-sim` and two `qkdgw run`: what `qkdgw demo` builds, and what the integration tests build on.

    lan-a ──── gw-a ═══════════ wan ═══════════ gw-b ──── lan-b
             qkdgw run    qkdgw kms-sim: KME-A   qkdgw run
                          192.0.2.254:9001, KME-B
                          198.51.100.254:9002

A subclass says what sink the gateways run (`sink()`) and adds its data plane.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Self

import yaml

from gateway.demo.topology import Net, Topology, until, wait_until
from gateway.initdemo import DemoLayout

#: The namespaces. Each gateway's main table has a blackhole route for the remote LAN: the
#: strongSwan sink's guard against clear text when no data plane is up (docs/strongswan.md).
TOPOLOGY = Topology(blackhole=True)
LAN_A, LAN_B = str(TOPOLOGY.lan("a")), str(TOPOLOGY.lan("b"))
GW_A, GW_B = TOPOLOGY.gateway("a"), TOPOLOGY.gateway("b")
WAN_A, WAN_B = TOPOLOGY.router("a"), TOPOLOGY.router("b")
HOST_A, HOST_B = TOPOLOGY.host("a"), TOPOLOGY.host("b")
PEER_PORT, KME_A_PORT, KME_B_PORT, SIM_ADMIN_PORT = 9443, 9001, 9002, 9000
#: Each gateway's SKIP Key Provider (`skip`), on its LAN address: the site's routers ask there.
SKIP_PORT = 9444
ADDR = {"a": GW_A, "b": GW_B}
SKIP_ADDR = {s: TOPOLOGY.gateway(s, lan=True) for s in ("a", "b")}
LAN = {"a": LAN_A, "b": LAN_B}
HOST = {"a": HOST_A, "b": HOST_B}
KME = {"a": f"{WAN_A}:{KME_A_PORT}", "b": f"{WAN_B}:{KME_B_PORT}"}
QKDGW = str(Path(sys.executable).with_name("qkdgw"))


def prepare_kms(root: Path, *, skip: bool = False) -> DemoLayout:
    """init-demo's files in ROOT (SKIP: with its skip/), the simulator's KMEs listening on
    `wan` (with certificates for their addresses there)."""
    from gateway import pki
    from gateway.initdemo import init_demo

    layout = init_demo(root, skip=skip)
    ca = pki.load(layout.pki / "ca.pem", layout.pki / "ca.key")
    for site, ip in (("a", WAN_A), ("b", WAN_B)):
        cert = pki.issue(ca, f"kme-{site}", dns=[f"kme-{site}"], ips=[ip], server=True,
                         client=False)
        pki.save(cert, layout.pki / f"kme-{site}.pem", layout.pki / f"kme-{site}.key")
    kms = yaml.safe_load(layout.kms_config.read_text())
    kms["admin"]["listen"] = f"127.0.0.1:{SIM_ADMIN_PORT}"
    kms["kmes"][0]["listen"] = KME["a"]
    kms["kmes"][1]["listen"] = KME["b"]
    layout.kms_config.write_text(yaml.safe_dump(kms))
    return layout


def site_config(layout: DemoLayout, site: str, *, policy: dict[str, Any], sink: dict[str, Any],
                state_dir: str, skip: bool = False) -> dict[str, Any]:
    """SITE's configuration in the namespaces: its KME on `wan`, its peer at the other gateway;
    SKIP: also a SKIP Key Provider on its LAN address."""
    peer = "b" if site == "a" else "a"
    base = yaml.safe_load(layout.site_config(site).read_text())
    config = {**base, "state_dir": state_dir, "kms_status_interval": 1.0,
              "policy": {**base["policy"], **policy}}
    config.pop("metrics", None)
    config["kms"] = {**base["kms"], "url": f"https://{KME[site]}"}
    config["peer_channel"] = {**base["peer_channel"], "listen": f"{ADDR[site]}:{PEER_PORT}"}
    sinks = [sink]
    if skip:
        sinks.append({"type": "skip", "listen": f"{SKIP_ADDR[site]}:{SKIP_PORT}",
                      "local_system_id": f"kp-{site}", "remote_system_id": f"kp-{peer}",
                      "psk_file": str((layout.skip_dir / f"kp-{site}.psk").resolve())})
    link = {**base["links"][0], "sinks": sinks}
    link["peer"] = {**link["peer"], "address": f"{ADDR[peer]}:{PEER_PORT}"}
    config["links"] = [link]
    return config


class Sites:
    """The namespaces, the KMS simulator, the gateways and what measures them."""

    #: A short tag for namespace names (unique per run anyway).
    tag = "qn"
    topology = TOPOLOGY
    #: Progress lines on stderr (the demo has its own view).
    verbose = True
    #: The QKD link follows this published field result (`kms-sim --link-profile`).
    link_profile: str | None = None

    def __init__(self, root: Path, policy: dict[str, Any], *, out: Path | None = None,
                 skip: bool = False) -> None:
        self.root = root
        self.skip = skip
        self.out = out or root  # logs and captures
        self.net = Net(self.topology, self.tag)
        self.ns = self.net.ns
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.events: list[tuple[float, str]] = []
        self.policy = policy
        self.prepare()

    def sink(self, site: str) -> dict[str, Any]:
        """The sink configuration of SITE's gateway."""
        raise NotImplementedError

    def config(self, site: str) -> str:
        """SITE's configuration file, relative to the root."""
        return f"site-{site}.yaml"

    def state(self, site: str) -> Path:
        return self.root / f"state-{site}"

    def prepare(self) -> None:
        layout = prepare_kms(self.root, skip=self.skip)
        for site in ("a", "b"):
            config = site_config(layout, site, policy=self.policy, sink=self.sink(site),
                                 state_dir=str(self.state(site)), skip=self.skip)
            (self.root / self.config(site)).write_text(yaml.safe_dump(config))

    def note(self, what: str) -> None:
        self.events.append((time.time(), what))
        if self.verbose:
            print(f"{time.strftime('%H:%M:%S')} {what}", file=sys.stderr, flush=True)

    def build(self) -> None:
        self.net.up()
        self.note("topology up")

    def teardown(self) -> None:
        for name in reversed(list(self.procs)):  # gateways before their data planes, KMS
            self.kill(name)
        self.net.down()

    def __enter__(self) -> Self:
        self.build()
        return self

    def __exit__(self, *_: object) -> None:
        self.teardown()

    async def start(self) -> None:
        """The KMS simulator, both data planes and both gateways, until their first epoch."""
        self.start_sim()
        for site in ("a", "b"):
            self.start_data_plane(site)
        for site in ("a", "b"):
            self.start_gateway(site)
        await until("the first epoch on both sites", self.converged)

    # -- processes -------------------------------------------------------------------------------

    def spawn(self, name: str, role: str, argv: list[str], env: dict[str, str] | None = None
              ) -> subprocess.Popen[bytes]:
        log = (self.out / f"{name}.log").open("ab")
        # Their own process group: Ctrl-C on a terminal reaches the whole foreground group,
        # and these must stay up for the summary, then stop in order (teardown) when the
        # demo, the only one that gets it, says so. The demo's own processes, an argv, no shell.
        proc = subprocess.Popen(self.net.argv(role, *argv), cwd=self.root, stdout=log,  # noqa: S603
                                stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
                                process_group=0)
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
        profile = ["--link-profile", self.link_profile] if self.link_profile else []
        self.spawn("kms-sim", "wan", [QKDGW, "kms-sim", "-c", "kms.yaml", *profile])
        wait_until("kms-sim listening", lambda: self.net.listening("wan", KME_B_PORT))

    def start_data_plane(self, site: str) -> None:
        """What SITE's gateway keys, if it is a process of its own (the kernel's is not)."""

    def namespace(self, site: str) -> str:
        """The namespace role SITE's gateway runs in."""
        return f"gw-{site}"

    def start_gateway(self, site: str) -> None:
        self.spawn(f"gw-{site}", self.namespace(site), [QKDGW, "run", "-c", self.config(site)])
        self.note(f"gw-{site} started")

    def sim(self, path: str, body: dict[str, Any] | None) -> None:
        """The simulator's admin API (on loopback inside `wan`): POST BODY to PATH; DELETE
        PATH without one."""
        import json
        import socket

        with self.net.inside("wan"):
            conn = socket.create_connection(("127.0.0.1", SIM_ADMIN_PORT), timeout=5)
        data = b"" if body is None else json.dumps(body).encode()
        method = "DELETE" if body is None else "POST"
        request = (f"{method} {path} HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json"
                   f"\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
        with conn:
            conn.sendall(request + data)
            while conn.recv(4096):
                pass

    def kms_fault(self, seconds: float | None) -> None:
        """The KMEs unreachable for SECONDS; None: every fault cleared."""
        if seconds is None:
            self.sim("/admin/faults", None)
        else:
            self.sim("/admin/faults", {"kind": "unavailable", "seconds": seconds})

    async def admin(self, site: str, method: str = "GET", path: str = "/status"
                    ) -> dict[str, Any]:
        """The daemon's admin socket, in-process (a curl would cost a User-Mode Linux guest a
        program launch)."""
        import aiohttp

        sock = self.state(site) / "admin.sock"
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(sock))) as c, \
                c.request(method, f"http://qkdgw{path}") as r:
            data: dict[str, Any] = await r.json()
            return data

    async def link(self, site: str) -> dict[str, Any]:
        links: list[dict[str, Any]] = (await self.admin(site))["links"]
        return links[0]

    async def converged(self, past: int = 0) -> bool:
        """Both sites send on the same epoch, later than PAST, with the same key, unblocked."""
        try:
            a, b = await self.link("a"), await self.link("b")
        except OSError:
            return False
        return (a["epoch"] == b["epoch"] > past and a["fingerprint"] == b["fingerprint"]
                and not a["blocked"] and not b["blocked"])
