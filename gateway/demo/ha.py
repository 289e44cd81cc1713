"""Site A as a gateway pair under keepalived, site B as one gateway: what `qkdgw demo --ha`
builds, and what the HA tests build on (docs/ha.md).

                 VIP 192.0.2.1 (WAN), 10.1.0.1 (LAN): keepalived moves them
    lan-a ── sw-a ┬─ gw-a  (node a1) 192.0.2.2 ─┐
     10.1.0.2     └─ gw-a2 (node a2) 192.0.2.3 ─┴ wan-a ═ wan ═ gw-b ── lan-b
                     keepalived + qkdgw run          kms-sim   qkdgw run

Each node runs `qkdgw run` with its own state directory, its own certificate (commonName
gw-a: the name site B pins, so B needs no change for HA) and keepalived as `qkdgw init-demo
--ha` configures it (gateway/initdemo.py: VRRP version 3 every 0.1 s, both nodes BACKUP
with `nopreempt`, the notify FIFO read by the daemon and `qkdgw ha notify`, the handover's
track file). Site B's gateway talks to the VIP.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any, Literal

import yaml

from gateway import pki
from gateway.demo.sites import (
    PEER_PORT,
    QKDGW,
    Sites,
    prepare_kms,
    site_config,
)
from gateway.demo.strongswan import StrongswanSites
from gateway.demo.topology import Site, Topology, until, wait_until
from gateway.initdemo import Pair, keepalived_conf

#: The pair's nodes: name → its namespace role.
NODES = {"a1": "gw-a", "a2": "gw-a2"}
TOPOLOGY = Topology(sites=(Site("a", gateways=2, vip=True), Site("b")), blackhole=True)
VIP, VIP_LAN = TOPOLOGY.address("a"), TOPOLOGY.address("a", lan=True)
#: site A's pair as init-demo --ha writes it, on the topology's addresses and devices.
PAIR = Pair(vip=f"{VIP}/24", vip_lan=f"{VIP_LAN}/{TOPOLOGY.lan('a').prefixlen}")
Failover = Literal["kill", "link-down", "handover"]


class HaSites(Sites):
    """Site A's pair (nodes a1, a2) and site B. Keys: "a1", "a2", "b"."""

    tag = "qh"
    topology = TOPOLOGY
    #: Which data plane the gateways key.
    plane: Literal["file", "strongswan", "xfrm"] = "file"

    def state(self, site: str) -> Path:
        return self.root / f"state-{site}"

    def prepare(self) -> None:
        self.prepare_sites()

    def prepare_sites(self) -> None:
        """The configurations of B and of both nodes, and the nodes' keepalived.conf."""
        layout = prepare_kms(self.root)
        ca = pki.load(layout.pki / "ca.pem", layout.pki / "ca.key")
        # Node a2's own key, with the name site B pins (docs/ha.md: the certificate choice).
        cert = pki.issue(ca, "gw-a", dns=["gw-a"], server=True, client=True)
        pki.save(cert, layout.pki / "gw-a2.pem", layout.pki / "gw-a2.key")
        for node in (*NODES, "b"):
            site = "b" if node == "b" else "a"
            config = site_config(layout, site, policy=self.policy, sink=self.sink(node),
                                 state_dir=str(self.state(node)))
            if site == "a":
                config["peer_channel"]["listen"] = f"{VIP}:{PEER_PORT}"
                config["ha"] = {"node": node,
                                "notify_fifo": str(self.state(node) / "ha" / "notify.fifo")}
                if node == "a2":
                    config["peer_channel"]["cert"] = str(layout.pki / "gw-a2.pem")
                    config["peer_channel"]["key"] = str(layout.pki / "gw-a2.key")
                (self.root / f"keepalived-{node}.conf").write_text(
                    keepalived_conf(PAIR, node, state_dir=self.state(node), qkdgw=QKDGW))
            else:
                config["links"][0]["peer"]["address"] = f"{VIP}:{PEER_PORT}"
            (self.root / self.config(node)).write_text(yaml.safe_dump(config))

    def sink(self, site: str) -> dict[str, Any]:
        return {"type": "file", "path": str(self.state(site) / "ab.psk")}

    # -- processes -------------------------------------------------------------------------------

    async def start(self) -> None:
        """The simulator, the data planes, site B and both nodes of A with keepalived,
        until one node is active and its first epoch is up with B."""
        self.start_sim()
        for node in (*NODES, "b"):
            self.start_data_plane(node)
        self.start_gateway("b")
        for node in NODES:
            self.start_node(node)
        await until("one node active, its first epoch up with site B", self.converged)

    def namespace(self, site: str) -> str:
        return NODES.get(site, f"gw-{site}")

    def start_node(self, node: str) -> None:
        """NODE's gateway, then its keepalived (which may make it active at once)."""
        self.start_gateway(node)
        wait_until(f"gw-{node} admin socket", (self.state(node) / "admin.sock").exists)
        self.start_keepalived(node)

    def start_keepalived(self, node: str) -> None:
        d = self.root
        for stale in (f"keepalived-{node}.pid", f"keepalived-vrrp-{node}.pid"):
            (d / stale).unlink(missing_ok=True)  # a crashed one's ("already running")
        self.spawn(f"keepalived-{node}", NODES[node], [
            "keepalived", "--dont-fork", "--log-console", "--log-detail", "--vrrp",
            "-f", str(d / f"keepalived-{node}.conf"), "-p", str(d / f"keepalived-{node}.pid"),
            "-r", str(d / f"keepalived-vrrp-{node}.pid")])

    def crash(self, node: str) -> None:
        """The node dies: its gateway, data plane and keepalived SIGKILLed, children first
        (keepalived's VRRP child would otherwise get its parent's death as a SIGTERM and
        send a priority-0 advertisement, which a dead box does not)."""
        procs = [self.procs.pop(n) for n in [n for n in self.procs if n.endswith(f"-{node}")]]
        for proc in procs:
            for pid in [*_descendants(proc.pid), proc.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for proc in procs:
            proc.wait()
        self.note(f"node {node} crashed")

    async def handover(self, node: str) -> None:
        """`qkdgw ha handover` on NODE (through its admin socket, as the command does)."""
        await self.admin(node, "POST", "/ha/handover")
        self.note(f"node {node}: handover")

    async def failover(self, kind: Failover) -> str:
        """Fail the active node over in the way KIND says; the node that was active."""
        node = await self.active()
        if node is None:
            raise RuntimeError("no node of site A is active")
        if kind == "kill":
            self.crash(node)
        elif kind == "link-down":
            self.link_down(node)
        else:
            await self.handover(node)
        return node

    def link_down(self, node: str) -> None:
        """The node's WAN and LAN links go down (its processes live on)."""
        self.net.run(NODES[node], "ip", "link", "set", "wan", "down")
        self.net.run(NODES[node], "ip", "link", "set", "lan", "down")
        self.note(f"node {node}: links down")

    def link_up(self, node: str) -> None:
        """The node's links back, with the default route their going down removed."""
        for dev in ("wan", "lan"):
            self.net.run(NODES[node], "ip", "link", "set", dev, "up")
        wait_until(f"node {node}: WAN up", lambda: "state UP" in self.net.run(
            NODES[node], "ip", "link", "show", "wan"))
        self.net.run(NODES[node], "ip", "route", "replace", "default", "via",
                     self.topology.router("a"))
        self.note(f"node {node}: links up")

    def cut_vrrp(self) -> None:
        """The pair can no longer hear each other (split brain): their ports on the WAN
        bridge isolated from each other (each still reaches the router, and the router each)."""
        for port in NODES.values():
            self.net.run("wan", "bridge", "link", "set", "dev", port, "isolated", "on")
        self.note("the pair's VRRP cut")

    def heal_vrrp(self) -> None:
        for port in NODES.values():
            self.net.run("wan", "bridge", "link", "set", "dev", port, "isolated", "off")
        self.note("the pair's VRRP back")

    def restart(self, node: str) -> None:
        """A crashed node back: its data plane, gateway and keepalived (it joins as BACKUP
        and, with nopreempt, stays standby)."""
        self.start_data_plane(node)
        self.start_node(node)

    # -- observing -------------------------------------------------------------------------------

    async def role(self, node: str) -> str | None:
        try:
            ha: dict[str, Any] = await self.admin(node, path="/ha")
        except OSError:
            return None
        return str(ha.get("role"))

    async def active(self) -> str | None:
        """The node that is active (the first, if split brain made both)."""
        for node in NODES:
            if await self.role(node) == "active":
                return node
        return None

    async def link(self, site: str) -> dict[str, Any]:
        """Site B's link, a node's (a1, a2), or site A's: its active node's (while none is,
        the first node that answers)."""
        if site != "a":
            return await super().link(site)
        active = await self.active()
        for node in ([active] if active else []) + list(NODES):
            try:
                return await super().link(node)
            except OSError:
                continue
        raise ConnectionError("no node of site A answers")

    async def converged(self, past: int = 0) -> bool:
        """As two sites, site A being its active node (none active: not converged)."""
        return await self.active() is not None and await super().converged(past)


class XfrmHaSites(HaSites):
    """The pair with the kernel's own ESP (the xfrm sink, User-Mode Linux here): every
    node's SAs and policies name the site's virtual address."""

    tag = "qx"
    plane = "xfrm"
    #: The xfrm sink's policies block without a key: the remote LAN routes to the WAN.
    topology = Topology(sites=TOPOLOGY.sites)

    def sink(self, site: str) -> dict[str, Any]:
        me, peer = ("b", "a") if site == "b" else ("a", "b")
        address = {"a": VIP, "b": TOPOLOGY.address("b")}
        lan = {s: str(TOPOLOGY.lan(s)) for s in ("a", "b")}
        return {"type": "xfrm", "local": address[me], "remote": address[peer],
                "local_subnets": [lan[me]], "remote_subnets": [lan[peer]]}


class StrongswanHaSites(HaSites, StrongswanSites):
    """The pair with the strongSwan sink: a charon on every node (and on B), the standby's
    idle: its gateway loads no connection and no PPK until it is active."""

    tag = "qj"
    plane = "strongswan"

    def identity(self, site: str) -> str:
        return "b" if site == "b" else "a"

    def sink(self, site: str) -> dict[str, Any]:
        return StrongswanSites.sink(self, site)

    def prepare(self) -> None:
        self.prepare_sites()
        for node in (*NODES, "b"):
            self.write_charon_config(node)


def _descendants(pid: int) -> list[int]:
    """PID's descendants, deepest first (from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found: list[int] = []

    def walk(p: int) -> None:
        for child in children.get(p, []):
            walk(child)
            found.append(child)

    walk(pid)
    return found
