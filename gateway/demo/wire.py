"""What crosses the WAN between the sites, judged frame by frame: the one classifier for the
demo's live count and every test's capture.

Each Ethernet frame is IPv4 or IPv6 (anything else, ARP, is not counted) of one kind:
plaintext (a LAN address in clear: a leak wherever it shows), ESP, ESP-in-UDP (port 4500
both ways, not the zero marker of IKE), IKE (UDP 500/4500 otherwise, NAT-T keepalives
too), TCP (the peer channel, the KMEs' mutual TLS), ICMP, VRRP (a gateway pair's
advertisements, and its IGMP reports joining their group), or other. A `Tally` counts a
world's frames by the rule every world judges with: ESP, IKE and ICMP count only between
two gateways, VRRP only from a gateway, TCP anywhere, and anything else, or a kind the
world does not expect, is a leak.

Captures are taken on `wan`'s device for a site (every packet between that site and the
others passes it once, and no gateway's decryption shows there): live from a packet socket
(`Live`) or written by tcpdump (`capture`) and read back (`Tally.read`).
"""

from __future__ import annotations

import contextlib
import enum
import re
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from pathlib import Path
from typing import Any

from gateway.demo.topology import Net, Topology, wait_until

ETH_P_ALL = 0x0003
#: Bytes kept of each frame: the headers and what tells ESP-in-UDP from IKE.
SNAPLEN = 160
#: pcap files' magic numbers → their byte order and the unit of their time stamps' fraction.
MAGIC = {b"\xd4\xc3\xb2\xa1": ("<", 1e-6), b"\xa1\xb2\xc3\xd4": (">", 1e-6),
         b"\x4d\x3c\xb2\xa1": ("<", 1e-9), b"\xa1\xb2\x3c\x4d": (">", 1e-9)}
#: Summaries kept of the leaks (all are counted).
LEAKS_SHOWN = 20
#: VRRP's multicast group (RFC 5798), where a pair's advertisements go.
VRRP_GROUP = IPv4Address("224.0.0.18")
#: Where IGMPv3 membership reports go (RFC 3376): a pair's nodes joining VRRP's group.
IGMPV3_REPORTS = IPv4Address("224.0.0.22")


class Kind(enum.Enum):
    PLAINTEXT = "plaintext"
    ESP = "ESP"
    ESP_IN_UDP = "ESP-in-UDP"
    IKE = "IKE"
    TCP = "TCP"
    ICMP = "ICMP"
    VRRP = "VRRP"  # a gateway pair's advertisements (keepalived), and its IGMP joining their group
    OTHER = "other"


@dataclass(frozen=True)
class Packet:
    kind: Kind
    src: IPv4Address | IPv6Address
    dst: IPv4Address | IPv6Address
    proto: int
    spi: int | None = None  # ESP, ESP-in-UDP

    def __str__(self) -> str:
        return f"{self.kind.value} {self.src} > {self.dst} proto {self.proto}"


def classify(frame: bytes, lans: Iterable[IPv4Network | IPv6Network]) -> Packet | None:
    """The kind of one Ethernet frame (None: not IP)."""
    ethertype, ip = frame[12:14], frame[14:]
    if ethertype == b"\x08\x00" and len(ip) >= 20:
        proto, src, dst = ip[9], ip_address(ip[12:16]), ip_address(ip[16:20])
        # The transport header: in the first fragment only.
        l4 = ip[(ip[0] & 0x0F) * 4:] if struct.unpack_from("!H", ip, 6)[0] & 0x1FFF == 0 \
            else None
    elif ethertype == b"\x86\xdd" and len(ip) >= 40:
        proto, src, dst, l4 = ip[6], ip_address(ip[8:24]), ip_address(ip[24:40]), ip[40:]
    else:
        return None
    if any(a in lan for a in (src, dst) for lan in lans if lan.version == a.version):
        return Packet(Kind.PLAINTEXT, src, dst, proto)
    if proto == 50 and l4 is not None and len(l4) >= 4:
        return Packet(Kind.ESP, src, dst, proto, struct.unpack_from("!I", l4)[0])
    if proto == 17 and l4 is not None and len(l4) >= 8:
        ports, payload = struct.unpack_from("!HH", l4), l4[8:]
        if ports == (4500, 4500) and len(payload) > 8 and payload[:4] != bytes(4):
            return Packet(Kind.ESP_IN_UDP, src, dst, proto, struct.unpack_from("!I", payload)[0])
        if {500, 4500} & set(ports):
            return Packet(Kind.IKE, src, dst, proto)
    if proto == 6 and l4 is not None:
        return Packet(Kind.TCP, src, dst, proto)
    if proto in (1, 58):
        return Packet(Kind.ICMP, src, dst, proto)
    if (proto, dst) in ((112, VRRP_GROUP), (2, IGMPV3_REPORTS)):
        return Packet(Kind.VRRP, src, dst, proto)
    return Packet(Kind.OTHER, src, dst, proto)


class Tally:
    """A world's counts of the frames on the WAN. EXPECT: the kinds that may cross (between
    the GATEWAYS: address → site; TCP anywhere). Without IPV6 the world has none: IPv6
    frames (a host's own link-local chatter) are not counted. With TIMELINE, each ESP
    packet's time and SPI by direction too."""

    def __init__(self, lans: Iterable[IPv4Network | IPv6Network], gateways: Mapping[str, str],
                 expect: Iterable[Kind], *, ipv6: bool, timeline: bool = False) -> None:
        self.lans = list(lans)
        self.gateways = {ip_address(a): site for a, site in gateways.items()}
        self.expect = frozenset(expect)
        self.ipv6 = ipv6
        self.total = self.plaintext = self.leaked = 0
        self.esp: Counter[str] = Counter()  # "a>b": ESP and ESP-in-UDP packets
        self.ike = self.control = self.icmp = self.vrrp = 0  # control: TCP
        self.leaks: list[str] = []  # the first LEAKS_SHOWN of the leaks
        self.record = timeline
        self.timeline: dict[str, list[tuple[float, int]]] = {}  # "a>b": (time, SPI)

    @classmethod
    def of(cls, topology: Topology, expect: Iterable[Kind], *, timeline: bool = False
           ) -> Tally:
        """The Tally of a topology's WAN: its LANs, its gateways, its IP versions."""
        versions = (4, 6) if topology.ipv6 else (4,)
        return cls([topology.lan(s.name, v) for s in topology.sites for v in versions],
                   topology.endpoints(), expect, ipv6=topology.ipv6, timeline=timeline)

    def add(self, frame: bytes, t: float) -> None:
        p = classify(frame, self.lans)
        if p is None or (p.src.version == 6 and not self.ipv6):
            return
        self.total += 1
        src, dst = self.gateways.get(p.src), self.gateways.get(p.dst)
        direction = f"{src}>{dst}" if src and dst else None
        if p.kind is Kind.PLAINTEXT:
            self.plaintext += 1
        elif p.kind in self.expect and p.kind is Kind.TCP:
            self.control += 1
            return
        elif p.kind in self.expect and p.kind is Kind.VRRP and src is not None:
            self.vrrp += 1  # from a gateway of a pair to the group
            return
        elif p.kind in self.expect and direction is not None:
            if p.kind in (Kind.ESP, Kind.ESP_IN_UDP):
                self.esp[direction] += 1
                if self.record and p.spi is not None:
                    self.timeline.setdefault(direction, []).append((t, p.spi))
            elif p.kind is Kind.IKE:
                self.ike += 1
            elif p.kind is Kind.ICMP:
                self.icmp += 1
            return
        self.leaked += 1
        if len(self.leaks) < LEAKS_SHOWN:
            self.leaks.append(str(p))

    def read(self, pcap: Path) -> Tally:
        """Add every frame of a pcap file (tcpdump -w, Ethernet)."""
        data = pcap.read_bytes()
        if data[:4] not in MAGIC:
            raise ValueError(f"{pcap}: not a pcap file")
        order, fraction = MAGIC[data[:4]]
        if struct.unpack_from(order + "I", data, 20)[0] != 1:
            raise ValueError(f"{pcap}: not an Ethernet capture")
        offset = 24
        while offset + 16 <= len(data):
            sec, frac, captured, _ = struct.unpack_from(order + "IIII", data, offset)
            offset += 16
            self.add(data[offset:offset + captured], sec + frac * fraction)
            offset += captured
        return self


class Live:
    """TALLY fed from a packet socket on DEVICE in ROLE's namespace, until close()."""

    def __init__(self, net: Net, role: str, device: str, tally: Tally) -> None:
        self.tally = tally
        self.sock = net.socket(role, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((device, 0))
        self.sock.settimeout(0.2)
        self.stop = threading.Event()
        threading.Thread(target=self._run, name="wire", daemon=True).start()

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                frame = self.sock.recv(SNAPLEN)
            except TimeoutError:
                continue
            except OSError:
                return
            self.tally.add(frame, time.time())

    def close(self) -> None:
        self.stop.set()
        self.sock.close()


@contextlib.contextmanager
def capture(pcap: Path, device: str, net: Net | None = None, role: str = "wan"
            ) -> Iterator[dict[str, Any]]:
    """tcpdump on DEVICE (in ROLE's namespace of NET, or this one) into PCAP; then how many
    frames it captured and how many the kernel dropped (None where tcpdump did not say)."""
    stats: dict[str, Any] = {"pcap": str(pcap)}
    err = pcap.with_suffix(".tcpdump")
    argv = ["tcpdump", "-i", device, "-n", "-s", str(SNAPLEN), "-U", "-w", str(pcap)]
    with err.open("wb") as f:  # tcpdump: the argv above, no shell
        proc = subprocess.Popen(net.argv(role, *argv) if net else argv,  # noqa: S603
                                stdout=f, stderr=subprocess.STDOUT)
    wait_until("tcpdump listening", lambda: b"listening on" in err.read_bytes())
    try:
        yield stats
    finally:
        time.sleep(0.5)  # the last packets reach the file
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        text = err.read_text()
        for key, pattern in (("captured", r"(\d+) packets? captured"),
                             ("dropped", r"(\d+) packets? dropped by kernel")):
            m = re.search(pattern, text)
            stats[key] = int(m.group(1)) if m else None
