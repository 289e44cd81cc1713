"""gateway/demo/topology.py: the namespaces every world builds.

Building needs root (network namespaces); the addressing does not.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator

import pytest

from gateway.demo import topology
from gateway.demo.topology import Net, Site, Topology

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root")


def reaches(net: Net, role: str, target: str) -> bool:
    """One ping, 1 s."""
    return subprocess.run(net.argv(role, "ping", "-n", "-c", "1", "-W", "1", target),
                          capture_output=True, check=False).returncode == 0


def leftover(net: Net) -> list[str]:
    return [name for name in net.ns.values() if (topology.NETNS_DIR / name).exists()]


@pytest.fixture
def built(request: pytest.FixtureRequest) -> Iterator[Net]:
    with Net(request.param, "qy") as net:
        yield net
    assert leftover(net) == []


# -- addresses and names --------------------------------------------------------------------------


def test_the_two_sites_keep_the_addresses_the_worlds_use() -> None:
    t = Topology(ipv6=True)
    assert t.roles() == ["lan-a", "gw-a", "lan-b", "gw-b", "wan"]
    assert (t.host("a"), t.gateway("a", lan=True), t.gateway("a"), t.router("a")) == \
        ("10.1.0.2", "10.1.0.1", "192.0.2.1", "192.0.2.254")
    assert (t.host("b"), t.gateway("b", lan=True), t.gateway("b"), t.router("b")) == \
        ("10.2.0.2", "10.2.0.1", "198.51.100.1", "198.51.100.254")
    assert (str(t.lan("b", 6)), t.host("b", version=6)) == ("fd00:b::/64", "fd00:b::2")
    assert t.endpoints() == {"192.0.2.1": "a", "198.51.100.1": "b"}


def test_a_gateway_or_a_site_is_one_line() -> None:
    t = Topology(sites=(Site("a", gateways=2), Site("b"), Site("c", hosts=2)))
    assert t.roles() == ["lan-a", "sw-a", "gw-a", "gw-a2", "lan-b", "gw-b",
                         "lan-c", "lan-c2", "sw-c", "gw-c", "wan"]
    assert t.gateway("a", 1) == "192.0.2.2" and t.gateway("a", 1, lan=True) == "10.1.0.254"
    assert (t.gateway("c"), t.router("c"), t.host("c", 1)) == \
        ("203.0.113.1", "203.0.113.254", "10.3.0.3")
    assert t.endpoints() == {"192.0.2.1": "a", "192.0.2.2": "a", "198.51.100.1": "b",
                             "203.0.113.1": "c"}


def test_one_wire_joins_two_single_gateway_sites() -> None:
    t = Topology(sites=(Site("a"), Site("b", hosts=0)), wan="link")
    assert t.roles() == ["lan-a", "gw-a", "gw-b"]
    assert (t.gateway("a"), t.gateway("b"), t.host("b")) == ("192.0.2.1", "192.0.2.2", "10.2.0.2")
    with pytest.raises(ValueError, match="two sites of one gateway"):
        Topology(sites=(Site("a", gateways=2), Site("b")), wan="link")
    with pytest.raises(ValueError, match="without hosts"):
        Topology(sites=(Site("a", gateways=2, hosts=0), Site("b")))


# -- built -----------------------------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("built", [Topology(ipv6=True)], indirect=True)
def test_the_wan_routes_between_gateways_and_never_to_a_lan(built: Net) -> None:
    assert reaches(built, "gw-a", "198.51.100.1")
    assert reaches(built, "lan-a", "10.1.0.1") and reaches(built, "lan-a", "fd00:a::1")
    assert not reaches(built, "lan-a", "10.2.0.2")  # clear text stops at `wan`
    assert "fd00:b::/64 dev wan" in built.run("gw-a", "ip", "-6", "route")


@needs_root
@pytest.mark.parametrize("built", [Topology(
    sites=(Site("a", gateways=2), Site("b"), Site("c", hosts=2)), blackhole=True)],
    indirect=True)
def test_more_gateways_and_sites_are_all_connected(built: Net) -> None:
    t = built.topology
    gateways = [(g, t.gateway(s.name, k)) for s in t.sites
                for k, g in enumerate(t.gateways(s.name))]
    for role, _ in gateways:
        for _, address in gateways:
            assert reaches(built, role, address), (role, address)
    assert reaches(built, "lan-a", "10.1.0.254") and reaches(built, "lan-c2", "10.3.0.2")
    assert "blackhole 10.3.0.0/16" in built.run("gw-a2", "ip", "route")
    assert built.run("lan-a", "sysctl", "-n", "net.ipv6.conf.all.disable_ipv6").strip() == "1"


@needs_root
@pytest.mark.parametrize("built", [Topology(sites=(Site("a", wan_device="ipsec0"),
                                                   Site("b", hosts=0)), wan="link")],
                         indirect=True)
def test_one_wire_carries_clear_text_to_the_far_side(built: Net) -> None:
    assert reaches(built, "lan-a", "10.2.0.2")
    assert "10.2.0.0/16 via 192.0.2.2 dev ipsec0" in built.run("gw-a", "ip", "route")
    assert not built.listening("gw-b", 7)
    server = built.socket("gw-b", 2, 1)  # AF_INET, SOCK_STREAM
    with server:
        server.bind(("10.2.0.2", 7))
        server.listen()
        assert built.listening("gw-b", 7) and not topology.listening(7)


@needs_root
def test_a_failed_build_leaves_nothing_behind() -> None:
    net = Net(Topology(sites=(Site("a", wan_device="x" * 20), Site("b"))), "qy")
    with pytest.raises(Exception, match="Numerical result out of range"):  # a name too long
        net.up()
    assert leftover(net) == []
