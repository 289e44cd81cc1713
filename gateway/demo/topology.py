"""Network namespaces for the demo and every test world: sites (LAN hosts behind gateways)
joined by a WAN, built in-process over netlink, removed by one cleanup.

    lan-a ──── gw-a ═══════════ wan ═══════════ gw-b ──── lan-b
  10.1.0.2   10.1.0.1  192.0.2.1  192.0.2.254  198.51.100.254  198.51.100.1  10.2.0.1  10.2.0.2
  fd00:a::2  fd00:a::1                                                      fd00:b::1  fd00:b::2
      eth0 ─ lan       wan ─ wan-a              wan-b ─ wan       lan ─ eth0   (device names)

    Topology()                                                the picture: two sites
    Topology(sites=(Site("a", gateways=2), Site("b"), Site("c")))   a second gateway, a third site
    Topology(sites=(Site("a"), Site("b", hosts=0)), wan="link")     lan-a ── gw-a ── gw-b
    Topology(sites=(Site("a", gateways=2, vip=True), Site("b")))     a pair under keepalived

Each box is a network namespace named TAG + a random part + its role (`qd1f2e3d-gw-a`).
`wan` routes between the sites' gateways and has no route to any LAN: a clear-text packet
from a LAN shows on the WAN and goes no further. With `wan="link"` two sites' gateways
share one wire instead and route each other's LAN in clear (only what the test installs
stops it); a site without hosts has its gateway stand for the LAN too (the LAN's first host
address on its loopback). Gateways reach the remote LANs through `wan` (default route; IPv6:
a device route, so only an XFRM policy can carry it), or with `blackhole=True` not at all
from their main table (strongSwan's kernel-libipsec routes win over it while it runs).

Addressing, by the site's position i (from 0):
- LAN 10.{i+1}.0.0/16 and with `ipv6` fd00:{a+i}::/64: gateways .1, .254, .253, …; hosts
  .2, .3, …; the hosts route through the first gateway.
- WAN 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, then 198.18.{i}.0/24: gateways .1, .2, …
  and `wan` .254 (`wan="link"`: both sites on 192.0.2.0/24, site i's gateway .{i+1}).
More than one gateway or host on a LAN: a bridge in a namespace `sw-SITE` joins them; more
than one gateway on a WAN: `wan`'s device for the site is a bridge.

IPv6 is off in every namespace unless `ipv6=True` (it would make charon send MOBIKE updates).
Everything is made over netlink from this process: a program launch costs a User-Mode Linux
guest 60–170 ms.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network, ip_interface, ip_network
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

T = TypeVar("T")

#: Upper bound for anything a world waits for (a daemon listening, a first epoch, a capture
#: started): every wait polls and returns as soon as its condition holds, so this bounds only
#: a failure. Generous for User-Mode Linux guests.
WAIT = 60.0
#: How often a wait looks again.
POLL = 0.05

WAN_NETS = ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
#: Where named namespaces live (iproute2's and pyroute2's place).
NETNS_DIR = Path("/var/run/netns")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True)
class Site:
    """One site: its name (a short word: it goes into namespace names), how many gateways
    and LAN hosts it has, and the name of its gateways' WAN-side device. VIP: its gateways
    are a pair sharing virtual addresses (the site's WAN and LAN .1, which keepalived moves
    between them; the topology does not assign them), each with addresses of its own."""

    name: str
    gateways: int = 1
    hosts: int = 1
    wan_device: str = "wan"
    vip: bool = False


@dataclass
class _Plan:
    """What Net.up() makes, list by list."""

    bridges: list[tuple[str, str]] = field(default_factory=list)  # (role, device)
    veths: list[tuple[str, str, str, str]] = field(default_factory=list)  # role, dev, role, dev
    ports: list[tuple[str, str, str]] = field(default_factory=list)  # role, device, bridge
    addrs: list[tuple[str, str, str]] = field(default_factory=list)  # role, device, address/len
    routes: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # role, netlink
    forwarding: list[str] = field(default_factory=list)  # roles that route


@dataclass(frozen=True)
class Topology:
    """Sites and how their WAN joins them; addresses and namespaces follow from it."""

    sites: tuple[Site, ...] = (Site("a"), Site("b"))
    wan: Literal["router", "link"] = "router"
    ipv6: bool = False
    blackhole: bool = False

    def __post_init__(self) -> None:
        if self.wan == "link" and (len(self.sites) != 2
                                   or any(s.gateways != 1 for s in self.sites)):
            raise ValueError('wan="link" joins two sites of one gateway each')
        if any(s.hosts == 0 and s.gateways != 1 for s in self.sites):
            raise ValueError("a site without hosts has exactly one gateway (it stands for the LAN)")
        if any(s.vip and (s.gateways != 2 or self.wan != "router") for s in self.sites):
            raise ValueError("a site with a virtual address has a pair of gateways on a routed"
                             " WAN")

    # -- addresses ------------------------------------------------------------------------------

    def _index(self, site: str) -> int:
        return [s.name for s in self.sites].index(site)

    def site(self, name: str) -> Site:
        return self.sites[self._index(name)]

    def lan(self, site: str, version: int = 4) -> IPv4Network | IPv6Network:
        i = self._index(site)
        return ip_network(f"10.{i + 1}.0.0/16" if version == 4 else f"fd00:{0xa + i:x}::/64")

    def _wan(self, site: str) -> IPv4Network:
        i = 0 if self.wan == "link" else self._index(site)
        return IPv4Network(WAN_NETS[i] if i < len(WAN_NETS) else f"198.18.{i}.0/24")

    def gateway(self, site: str, k: int = 0, *, lan: bool = False, version: int = 4) -> str:
        """Gateway K's address on the WAN (what peers and KMEs see), or with LAN on its LAN.
        A pair's nodes (`vip`) have .2, .3 on the WAN and .254, .253 on the LAN."""
        if self.site(site).vip:
            return str(self.lan(site, version)[254 - k] if lan else self._wan(site)[2 + k])
        if lan:
            return str(self.lan(site, version)[1 if k == 0 else 255 - k])
        return str(self._wan(site)[1 + (self._index(site) if self.wan == "link" else k)])

    def address(self, site: str, *, lan: bool = False, version: int = 4) -> str:
        """Where the site's gateway is reached: a pair's virtual address, else gateway 0's."""
        if self.site(site).vip:
            return str(self.lan(site, version)[1] if lan else self._wan(site)[1])
        return self.gateway(site, lan=lan, version=version)

    def host(self, site: str, j: int = 0, version: int = 4) -> str:
        return str(self.lan(site, version)[2 + j])

    def router(self, site: str) -> str:
        """`wan`'s address on SITE's WAN."""
        return str(self._wan(site)[254])

    def endpoints(self) -> dict[str, str]:
        """Every gateway's WAN address (a pair's virtual one too) → its site's name."""
        return {**{self.address(s.name): s.name for s in self.sites},
                **{self.gateway(s.name, k): s.name for s in self.sites
                   for k in range(s.gateways)}}

    # -- namespaces -------------------------------------------------------------------------------

    @staticmethod
    def _nth(kind: str, site: str, n: int) -> str:
        return f"{kind}-{site}" if n == 0 else f"{kind}-{site}{n + 1}"

    def gateways(self, site: str) -> list[str]:
        return [self._nth("gw", site, k) for k in range(self.site(site).gateways)]

    def hosts(self, site: str) -> list[str]:
        return [self._nth("lan", site, j) for j in range(self.site(site).hosts)]

    def _switched(self, site: Site) -> bool:
        return site.gateways + site.hosts > 2

    def roles(self) -> list[str]:
        """Every namespace's role: site by site, then the WAN router."""
        roles: list[str] = []
        for s in self.sites:
            roles += self.hosts(s.name) + (["sw-" + s.name] if self._switched(s) else [])
            roles += self.gateways(s.name)
        return roles + (["wan"] if self.wan == "router" else [])

    def plan(self) -> _Plan:
        p = _Plan()
        versions = (4, 6) if self.ipv6 else (4,)
        for s in self.sites:
            gws, hosts = self.gateways(s.name), self.hosts(s.name)
            # The LAN: one wire between a gateway and a host, else a bridge.
            members = [(g, "lan") for g in gws] + [(h, "eth0") for h in hosts]
            if self._switched(s):
                switch = "sw-" + s.name
                p.bridges.append((switch, "br"))
                for role, dev in members:
                    p.veths.append((role, dev, switch, role))
                    p.ports.append((switch, role, "br"))
            elif hosts:
                p.veths.append((gws[0], "lan", hosts[0], "eth0"))
            for v in versions:
                prefix = self.lan(s.name, v).prefixlen
                if hosts:
                    p.addrs += [(g, "lan", f"{self.gateway(s.name, k, lan=True, version=v)}"
                                 f"/{prefix}") for k, g in enumerate(gws)]
                    p.addrs += [(h, "eth0", f"{self.host(s.name, j, v)}/{prefix}")
                                for j, h in enumerate(hosts)]
                else:  # the gateway stands for its LAN
                    p.addrs.append((gws[0], "lo", f"{self.host(s.name, 0, v)}/{prefix}"))
                dst = "0.0.0.0/0" if v == 4 else "::/0"
                p.routes += [(h, {"dst": dst, "gateway": self.address(s.name, lan=True,
                                                                       version=v)})
                             for h in hosts]
            # The WAN side.
            prefix = self._wan(s.name).prefixlen
            for k, g in enumerate(gws):
                p.addrs.append((g, s.wan_device, f"{self.gateway(s.name, k)}/{prefix}"))
                if self.wan == "router":
                    p.routes.append((g, {"dst": "0.0.0.0/0", "gateway": self.router(s.name)}))
                for remote in self.sites:
                    if remote is not s:
                        p.routes += self._remote(g, s, remote, versions)
            if self.wan == "router":
                wan_dev = f"wan-{s.name}"
                if len(gws) == 1:
                    p.veths.append((gws[0], s.wan_device, "wan", wan_dev))
                else:
                    p.bridges.append(("wan", wan_dev))
                    for g in gws:
                        p.veths.append((g, s.wan_device, "wan", g))
                        p.ports.append(("wan", g, wan_dev))
                p.addrs.append(("wan", wan_dev, f"{self.router(s.name)}/{prefix}"))
            p.forwarding.extend(gws)
        if self.wan == "link":
            a, b = self.sites
            p.veths.append((self.gateways(a.name)[0], a.wan_device,
                            self.gateways(b.name)[0], b.wan_device))
        else:
            p.forwarding.append("wan")
        return p

    def _remote(self, gw: str, site: Site, remote: Site, versions: tuple[int, ...]
                ) -> list[tuple[str, dict[str, Any]]]:
        """GW's routes to REMOTE's LAN (IPv4 in router mode: the default route)."""
        routes: list[tuple[str, dict[str, Any]]] = []
        for v in versions:
            dst = str(self.lan(remote.name, v))
            if self.blackhole:
                routes.append((gw, {"dst": dst, "type": "blackhole"}))
            elif v == 6:
                routes.append((gw, {"dst": dst, "oif": site.wan_device}))
            elif self.wan == "link":
                routes.append((gw, {"dst": dst, "gateway": self.gateway(remote.name)}))
        return routes


class Net:
    """A Topology built in network namespaces of unique names; `down()` (or leaving the
    `with` block) removes every one of them, also after a failure half-way."""

    def __init__(self, topology: Topology, tag: str) -> None:
        self.topology = topology
        unique = uuid.uuid4().hex[:6]
        #: role → namespace name
        self.ns = {role: f"{tag}{unique}-{role}" for role in topology.roles()}

    def __enter__(self) -> Self:
        self.up()
        return self

    def __exit__(self, *_: object) -> None:
        self.down()

    def up(self) -> None:
        """Build it, in a thread of its own (pyroute2's calls cannot run in a thread whose
        event loop is running, as the demo's is); on any failure, Ctrl-C too, remove what
        was made."""
        try:
            _threaded(self._build, "topology")
        except BaseException:
            self.down()
            raise

    def _build(self) -> None:
        from pyroute2 import IPRoute

        plan = self.topology.plan()
        links: dict[str, Any] = {}
        try:
            for role, name in self.ns.items():
                _create(name)
                with self.inside(role):
                    links[role] = IPRoute()
                    if not self.topology.ipv6:
                        _sysctl("net/ipv6/conf/all/disable_ipv6", 1)
            for role, dev in plan.bridges:
                links[role].link("add", ifname=dev, kind="bridge")
            for a, a_dev, b, b_dev in plan.veths:
                links[a].link("add", ifname=a_dev, kind="veth",
                              peer={"ifname": b_dev, "net_ns_fd": self.ns[b]})
            for role, dev, bridge in plan.ports:
                ipr = links[role]
                ipr.link("set", index=_index(ipr, dev), master=_index(ipr, bridge))
            for role, dev, address in plan.addrs:
                iface = ip_interface(address)
                links[role].addr("add", index=_index(links[role], dev), address=str(iface.ip),
                                 prefixlen=iface.network.prefixlen,
                                 flags=0x02 if iface.version == 6 else 0)  # IFA_F_NODAD
            for ipr in links.values():
                for link in ipr.get_links():
                    ipr.link("set", index=link["index"], state="up")
            for role, spec in plan.routes:
                ipr = links[role]
                device = {"oif": _index(ipr, spec["oif"])} if "oif" in spec else {}
                ipr.route("add", **{**spec, **device})
            for role in plan.forwarding:
                with self.inside(role):
                    _sysctl("net/ipv4/ip_forward", 1)
                    _sysctl("net/ipv4/conf/all/rp_filter", 0)
                    _sysctl("net/ipv4/conf/default/rp_filter", 0)
                    if self.topology.ipv6:
                        _sysctl("net/ipv6/conf/all/forwarding", 1)
            # A veth has its carrier, a bridge a forwarding port, a moment after "up".
            wait_until("every link up", lambda: all(
                link.get_attr("IFLA_OPERSTATE") == "UP" for ipr in links.values()
                for link in ipr.get_links() if link.get_attr("IFLA_IFNAME") != "lo"))
        finally:
            for ipr in links.values():
                ipr.close()

    def down(self) -> None:
        """Remove every namespace of this Net that exists (processes still inside keep
        theirs alive until they exit: stop them first)."""
        from pyroute2 import netns

        for name in self.ns.values():
            if (NETNS_DIR / name).exists():
                netns.remove(name)

    # -- running in a namespace -------------------------------------------------------------------

    def argv(self, role: str, *argv: str) -> list[str]:
        """ARGV as a command run in ROLE's namespace."""
        return ["ip", "netns", "exec", self.ns[role], *argv]

    def run(self, role: str, *argv: str, check: bool = True) -> str:
        return run(*self.argv(role, *argv), check=check)

    @contextlib.contextmanager
    def inside(self, role: str) -> Iterator[None]:
        """This thread in ROLE's namespace: sockets made meanwhile stay there."""
        with _entered(NETNS_DIR / self.ns[role]):
            yield

    def socket(self, role: str, family: int, kind: int, proto: int = 0) -> socket.socket:
        """A socket in ROLE's namespace (any thread may use it)."""
        with self.inside(role):
            return socket.socket(family, kind, proto)

    def in_thread(self, role: str, factory: Callable[[], Awaitable[T]]) -> T:
        """Run a coroutine on its own event loop in a thread inside ROLE's namespace (every
        socket it opens is made there)."""
        def inside() -> T:
            with self.inside(role):
                return asyncio.run(factory())  # type: ignore[arg-type]

        return _threaded(inside, f"in-{role}")

    def listening(self, role: str, port: int) -> bool:
        """Something listens on TCP PORT in ROLE's namespace."""
        with self.inside(role):
            return listening(port)


# -- helpers ---------------------------------------------------------------------------------------


def run(*argv: str, check: bool = True) -> str:
    """A command's output. Its own process group: Ctrl-C is for the demo or the test, which
    then finish and clean up in order."""
    # The demo's own commands (ip, tc, ...), an argv and no shell.
    proc = subprocess.run(argv, check=False, capture_output=True, text=True,  # noqa: S603
                          process_group=0)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def listening(port: int) -> bool:
    """Something listens on TCP PORT in this thread's network namespace."""
    for table in ("tcp", "tcp6"):
        with contextlib.suppress(FileNotFoundError):  # tcp6: IPv6 disabled at boot
            for line in Path(f"/proc/thread-self/net/{table}").read_text().splitlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # LISTEN
                    return True
    return False


@contextlib.contextmanager
def namespace(name: str) -> Iterator[str]:
    """One scratch namespace NAME, removed afterwards."""
    from pyroute2 import netns

    _create(name)
    try:
        yield name
    finally:
        netns.remove(name)


def wait_until(what: str, check: Callable[[], bool], timeout: float = WAIT, *,
               ignore: tuple[type[Exception], ...] = (),
               detail: Callable[[], str] | None = None) -> None:
    """Poll CHECK until it holds; TimeoutError naming WHAT (and DETAIL) after TIMEOUT.
    Exceptions of the types in IGNORE count as "not yet" (a daemon still starting)."""
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(*ignore):
            if check():
                return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout} s"
                               + (f"\n{detail()}" if detail else ""))
        time.sleep(POLL)


async def until(what: str, check: Callable[[], Awaitable[bool]], timeout: float = WAIT
                ) -> None:
    """wait_until for a coroutine check, without blocking the event loop."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not within {timeout} s")
        await asyncio.sleep(POLL)


def _create(name: str) -> None:
    """A new named namespace (as `ip netns add`), without a new process: a short-lived thread
    unshares its own network namespace and bind-mounts it under /run/netns."""
    from pyroute2 import netns

    def unshared() -> None:
        if _libc.unshare(CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"unshare: {os.strerror(ctypes.get_errno())}")
        netns.attach(name, "thread-self")

    _threaded(unshared, f"netns-{name}")


def _threaded(fn: Callable[[], T], name: str) -> T:
    """FN's result, or its exception, from a thread of its own. Interrupted meanwhile (Ctrl-C),
    it still waits for FN to end: a cleanup must not race what FN makes."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as e:  # handed to the caller
            box["error"] = e

    thread = threading.Thread(target=target, name=name)
    thread.start()
    try:
        thread.join()
    finally:
        while thread.is_alive():
            thread.join()
    if "error" in box:
        raise box["error"]
    value: T = box["value"]
    return value


@contextlib.contextmanager
def _entered(path: Path) -> Iterator[None]:
    """This thread in the network namespace at PATH, then back where it was."""
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        try:
            yield
        finally:
            _setns(home)
    finally:
        os.close(home)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise OSError(ctypes.get_errno(), f"setns: {os.strerror(ctypes.get_errno())}")


def _sysctl(key: str, value: int) -> None:
    """Set a net sysctl of this thread's namespace (/proc/sys/net follows the writer's)."""
    Path("/proc/sys", key).write_text(str(value))


def _index(ipr: Any, dev: str) -> int:
    found: list[int] = ipr.link_lookup(ifname=dev)
    if not found:
        raise RuntimeError(f"no device {dev}")
    return found[0]
