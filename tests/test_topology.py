"""gateway/demo/topology.py and gateway/demo/wire.py: the namespaces every world builds, and
the classifier every world judges its wire with.

Building needs root (network namespaces); the addressing and the classifier do not.
"""

from __future__ import annotations

import os
import struct
import subprocess
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path

import pytest

from gateway.demo import topology
from gateway.demo.topology import Net, Site, Topology
from gateway.demo.wire import Kind, Tally, classify

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
    assert t.gateway("a", 1) == "192.0.2.2"
    assert t.gateway("a", 1, lan=True) == "10.1.0.254"
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
    assert reaches(built, "lan-a", "10.1.0.1")
    assert reaches(built, "lan-a", "fd00:a::1")
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
    assert reaches(built, "lan-a", "10.1.0.254")
    assert reaches(built, "lan-c2", "10.3.0.2")
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
        assert built.listening("gw-b", 7)
        assert not topology.listening(7)


@needs_root
def test_a_failed_build_leaves_nothing_behind() -> None:
    net = Net(Topology(sites=(Site("a", wan_device="x" * 20), Site("b"))), "qy")
    with pytest.raises(Exception, match="Numerical result out of range"):  # a name too long
        net.up()
    assert leftover(net) == []


# -- the wire --------------------------------------------------------------------------------------

LANS = [ip_network("10.1.0.0/16"), ip_network("10.2.0.0/16")]
A, B, KME = "192.0.2.1", "198.51.100.1", "192.0.2.254"


def ipv4(src: str, dst: str, proto: int, payload: bytes, frag: int = 0) -> bytes:
    """An Ethernet frame with an IPv4 packet."""
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, frag, 64, proto, 0,
                         bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))))
    return bytes(12) + b"\x08\x00" + header + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload


def test_each_frame_is_of_one_kind() -> None:
    def kind(frame: bytes) -> Kind | None:
        p = classify(frame, LANS)
        return p.kind if p else None

    assert kind(ipv4(A, B, 50, struct.pack("!II", 0x1234, 1))) is Kind.ESP
    assert classify(ipv4(A, B, 50, struct.pack("!II", 0x1234, 1)), LANS).spi == 0x1234  # type: ignore[union-attr]
    assert kind(ipv4(A, B, 17, udp(4500, 4500, struct.pack("!I", 7) + bytes(20)))) \
        is Kind.ESP_IN_UDP
    assert kind(ipv4(A, B, 17, udp(4500, 4500, bytes(4) + bytes(20)))) is Kind.IKE  # marker
    assert kind(ipv4(A, B, 17, udp(4500, 4500, b"\xff"))) is Kind.IKE  # NAT-T keepalive
    assert kind(ipv4(A, B, 17, udp(500, 500, bytes(28)))) is Kind.IKE
    assert kind(ipv4(A, B, 17, udp(53, 53, bytes(28)))) is Kind.OTHER
    assert kind(ipv4(A, KME, 6, bytes(20))) is Kind.TCP
    assert kind(ipv4(A, B, 6, bytes(20), frag=100)) is Kind.OTHER  # no TCP header here
    assert kind(ipv4(A, B, 1, bytes(8))) is Kind.ICMP
    assert kind(ipv4("10.1.0.2", "10.2.0.2", 50, bytes(8))) is Kind.PLAINTEXT
    assert kind(bytes(12) + b"\x08\x06" + bytes(28)) is None  # ARP
    v6 = bytes(12) + b"\x86\xdd" + bytes(6) + b"\x3a\x40" + bytes(32) + bytes(8)
    assert kind(v6) is Kind.ICMP


def test_the_tally_counts_what_a_world_expects_between_its_gateways() -> None:
    t = Tally(LANS, {A: "a", B: "b"}, {Kind.ESP_IN_UDP, Kind.IKE, Kind.TCP}, ipv6=False)
    esp = ipv4(A, B, 17, udp(4500, 4500, struct.pack("!I", 7) + bytes(20)))
    for frame in (esp, esp, ipv4(B, A, 17, udp(4500, 4500, struct.pack("!I", 8) + bytes(20))),
                  ipv4(A, B, 17, udp(500, 500, bytes(28))), ipv4(A, KME, 6, bytes(20))):
        t.add(frame, 0.0)
    assert (t.esp, t.ike, t.control, t.leaked, t.total) == ({"a>b": 2, "b>a": 1}, 1, 1, 0, 5)
    t.add(ipv4(A, B, 50, bytes(8)), 0.0)  # ESP not in UDP: not what this world sends
    t.add(ipv4(A, KME, 17, udp(500, 500, bytes(28))), 0.0)  # IKE, not between gateways
    t.add(ipv4("10.1.0.2", "10.2.0.2", 17, udp(5001, 5001, bytes(8))), 0.0)
    t.add(bytes(12) + b"\x86\xdd" + bytes(6) + b"\x3a\x40" + bytes(40), 0.0)  # no IPv6 here
    assert (t.leaked, t.plaintext, t.total) == (3, 1, 8)
    assert t.leaks[2] == "plaintext 10.1.0.2 > 10.2.0.2 proto 17"


def test_a_pcap_file_is_read_with_each_frames_time(tmp_path: Path) -> None:
    frames = [ipv4(A, B, 50, struct.pack("!II", 0x100 + i, i)) for i in range(3)]
    data = struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 160, 1)
    for i, frame in enumerate(frames):
        data += struct.pack("<IIII", 1000 + i, 500_000, len(frame), len(frame)) + frame
    (tmp_path / "x.pcap").write_bytes(data)
    t = Tally(LANS, {A: "a", B: "b"}, {Kind.ESP}, ipv6=False, timeline=True)
    t.read(tmp_path / "x.pcap")
    assert t.timeline == {"a>b": [(1000.5, 0x100), (1001.5, 0x101), (1002.5, 0x102)]}
    (tmp_path / "y.pcap").write_bytes(b"\x0a\x0d\x0d\x0a" + bytes(20))  # pcapng
    with pytest.raises(ValueError, match="not a pcap"):
        t.read(tmp_path / "y.pcap")
