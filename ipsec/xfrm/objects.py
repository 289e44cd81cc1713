"""SAs and policies as typed values, and their translation to and from kernel messages.

Pure: builds and reads `ipsec.xfrm.structs` messages, does no I/O. A message read with a
value no SA or policy can have is a NetlinkDecodeError.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from enum import IntEnum
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

from ipsec.netlink import NetlinkDecodeError
from ipsec.xfrm import structs as s

IPAddress = IPv4Address | IPv6Address
IPNetwork = IPv4Network | IPv6Network

#: AES-256-GCM for ESP (RFC 4106): a 32-byte key and a 4-byte salt, 16-byte ICV.
AEAD_ALGORITHM = b"rfc4106(gcm(aes))"
AEAD_KEY_BYTES = 36
AEAD_ICV_BITS = 128


class Mode(IntEnum):
    TRANSPORT = s.XFRM_MODE_TRANSPORT
    TUNNEL = s.XFRM_MODE_TUNNEL


class Direction(IntEnum):
    IN = s.XFRM_POLICY_IN
    OUT = s.XFRM_POLICY_OUT
    FWD = s.XFRM_POLICY_FWD


def family(a: IPAddress | IPNetwork) -> int:
    return socket.AF_INET if a.version == 4 else socket.AF_INET6


def packed(a: IPAddress) -> bytes:
    """xfrm_address_t: 16 bytes, an IPv4 address in the first four."""
    return a.packed.ljust(16, b"\0")


def unpacked(raw: bytes, fam: int) -> IPAddress:
    return ip_address(raw[:4] if fam == socket.AF_INET else raw[:16])


@dataclass(frozen=True)
class Lifetime:
    """Limits of one SA (None: none). Soft ones make the kernel send XFRM_MSG_EXPIRE
    (hard = 0) once; at a hard one it deletes the SA and says so (hard = 1)."""

    soft_bytes: int | None = None
    hard_bytes: int | None = None
    soft_packets: int | None = None
    hard_packets: int | None = None
    soft_seconds: int | None = None
    hard_seconds: int | None = None

    def fields(self) -> dict[str, int]:
        """struct xfrm_lifetime_cfg (the add-time limits; use-time limits unused)."""
        def lim(v: int | None) -> int:
            return s.XFRM_INF if v is None else v

        def sec(v: int | None) -> int:
            return 0 if v is None else v  # seconds: 0 means none

        return {"lft_soft_byte_limit": lim(self.soft_bytes),
                "lft_hard_byte_limit": lim(self.hard_bytes),
                "lft_soft_packet_limit": lim(self.soft_packets),
                "lft_hard_packet_limit": lim(self.hard_packets),
                "lft_soft_add_expires_seconds": sec(self.soft_seconds),
                "lft_hard_add_expires_seconds": sec(self.hard_seconds)}


NO_LIMITS = Lifetime()


@dataclass(frozen=True)
class Selector:
    """Which packets a policy covers: from SRC to DST; any protocol and port unless given
    (ports need PROTO, e.g. 6 for TCP)."""

    src: IPNetwork
    dst: IPNetwork
    proto: int = 0
    sport: int = 0
    dport: int = 0

    def __post_init__(self) -> None:
        if self.src.version != self.dst.version:
            raise ValueError(f"selector {self}: mixes IPv4 and IPv6")

    def __str__(self) -> str:
        ports = "".join(f" {n} {v}" for n, v in (("sport", self.sport), ("dport", self.dport))
                        if v)
        return f"{self.src} -> {self.dst}" + (f" proto {self.proto}{ports}" if self.proto
                                               else "")

    def reversed(self) -> Selector:
        return Selector(self.dst, self.src, self.proto, self.dport, self.sport)

    def with_ports(self, proto: int, sport: int = 0, dport: int = 0) -> Selector:
        return Selector(self.src, self.dst, proto, sport, dport)

    def covers(self, other: Selector) -> bool:
        """Whether every packet OTHER matches also matches this selector."""
        return (self.src.version == other.src.version
                and other.src.subnet_of(self.src)  # type: ignore[arg-type]
                and other.dst.subnet_of(self.dst)  # type: ignore[arg-type]
                and self.proto in (0, other.proto) and self.sport in (0, other.sport)
                and self.dport in (0, other.dport))

    def fields(self) -> dict[str, Any]:
        return {"sel_daddr": packed(self.dst.network_address),
                "sel_saddr": packed(self.src.network_address),
                "sel_prefixlen_d": self.dst.prefixlen, "sel_prefixlen_s": self.src.prefixlen,
                "sel_family": family(self.src), "sel_proto": self.proto,
                "sel_sport": self.sport, "sel_sport_mask": 0xFFFF if self.sport else 0,
                "sel_dport": self.dport, "sel_dport_mask": 0xFFFF if self.dport else 0}

    @classmethod
    def from_fields(cls, m: Any, prefix: str = "sel_") -> Selector:
        """The selector in M's fields. Host bits are dropped: the kernel keeps them as given
        (`ip xfrm policy add src 10.1.2.3/16`), and matches on the prefix alone."""
        fam = m[prefix + "family"]
        net, bits = (IPv4Network, 32) if fam == socket.AF_INET else (IPv6Network, 128)
        ends = []
        for end in ("s", "d"):
            length = m[f"{prefix}prefixlen_{end}"]
            if length > bits:
                raise NetlinkDecodeError("xfrm_selector", f"prefix length {length} for a"
                                         f" {bits}-bit address")
            addr = unpacked(m[f"{prefix}{end}addr"], fam)
            ends.append(net((addr, length), strict=False))
        return cls(ends[0], ends[1], m[prefix + "proto"], m[prefix + "sport"],
                   m[prefix + "dport"])


@dataclass(frozen=True)
class SaSpec:
    """An ESP SA with AES-256-GCM, as installed. The key is never shown."""

    src: IPAddress
    dst: IPAddress
    spi: int
    reqid: int
    mode: Mode
    key: bytes = field(repr=False)
    replay_window: int = 64
    lifetime: Lifetime = NO_LIMITS

    def __post_init__(self) -> None:
        if self.src.version != self.dst.version:
            raise ValueError("SA endpoints mix IPv4 and IPv6")
        if len(self.key) != AEAD_KEY_BYTES:
            raise ValueError(f"an AES-256-GCM SA needs a {AEAD_KEY_BYTES}-byte key and salt,"
                             f" not {len(self.key)} bytes")
        if not 0x100 <= self.spi <= 0xFFFF_FFFF:
            raise ValueError(f"SPI {self.spi:#x} is reserved or out of range")

    def describe(self) -> str:
        return f"SA {self.src} -> {self.dst} spi {self.spi:#010x} reqid {self.reqid}"

    def message(self) -> s.xfrm_usersa_info:
        """XFRM_MSG_NEWSA. The selector is left empty with XFRM_STATE_AF_UNSPEC: policies
        choose the traffic, and one tunnel SA carries IPv4 and IPv6 alike."""
        m = s.xfrm_usersa_info()
        m.update({"id_daddr": packed(self.dst), "id_spi": self.spi, "id_proto": s.IPPROTO_ESP,
                  "saddr": packed(self.src), "family": family(self.src), "mode": self.mode,
                  "reqid": self.reqid, "flags": s.XFRM_STATE_AF_UNSPEC,
                  **self.lifetime.fields()})
        m["attrs"] = [
            ("XFRMA_ALG_AEAD", {"alg_name": AEAD_ALGORITHM, "alg_key_len": 8 * len(self.key),
                                "alg_icv_len": AEAD_ICV_BITS, "alg_key": self.key}),
            # A bitmap window (any size, no ESN: both ends must agree on ESN, and 2^32
            # packets per SA is far beyond the soft packet limit anyway).
            ("XFRMA_REPLAY_ESN_VAL", {"bmp_len": (self.replay_window + 31) // 32,
                                      "replay_window": self.replay_window}),
        ]
        return m


@dataclass(frozen=True)
class SaId:
    """Names one SA: destination and SPI (ESP)."""

    dst: IPAddress
    spi: int

    def __str__(self) -> str:
        return f"SA to {self.dst} spi {self.spi:#010x}"

    def message(self) -> s.xfrm_usersa_id:
        m = s.xfrm_usersa_id()
        m.update({"daddr": packed(self.dst), "spi": self.spi, "family": family(self.dst),
                  "proto": s.IPPROTO_ESP})
        m["attrs"] = []
        return m


@dataclass(frozen=True)
class SaState:
    """An installed SA as the kernel reports it (keys are not read)."""

    src: IPAddress
    dst: IPAddress
    spi: int
    reqid: int
    mode: int
    bytes: int
    packets: int
    add_time: int
    replay_window: int
    algorithm: str

    @property
    def id(self) -> SaId:
        return SaId(self.dst, self.spi)

    @classmethod
    def from_message(cls, m: Any, prefix: str = "") -> SaState:
        fam = m[prefix + "family"]
        aead = m.get_attr("XFRMA_ALG_AEAD")
        esn = m.get_attr("XFRMA_REPLAY_ESN_VAL")
        return cls(src=unpacked(m[prefix + "saddr"], fam),
                   dst=unpacked(m[prefix + "id_daddr"], fam), spi=m[prefix + "id_spi"],
                   reqid=m[prefix + "reqid"], mode=m[prefix + "mode"],
                   bytes=m[prefix + "curlft_bytes"], packets=m[prefix + "curlft_packets"],
                   add_time=m[prefix + "curlft_add_time"],
                   replay_window=esn["replay_window"] if esn else m[prefix + "replay_window"],
                   algorithm=aead["alg_name"].rstrip(b"\0").decode(errors="replace")
                   if aead else "")


@dataclass(frozen=True)
class Template:
    """What a policy requires: ESP from SRC to DST with REQID (0: any)."""

    src: IPAddress
    dst: IPAddress
    reqid: int
    mode: Mode

    def fields(self) -> dict[str, Any]:
        """struct xfrm_user_tmpl; algorithm masks all-ones: the SA decides."""
        return {"id_daddr": packed(self.dst), "id_proto": s.IPPROTO_ESP,
                "family": family(self.src), "saddr": packed(self.src), "reqid": self.reqid,
                "mode": self.mode, "aalgos": 0xFFFF_FFFF, "ealgos": 0xFFFF_FFFF,
                "calgos": 0xFFFF_FFFF}


@dataclass(frozen=True)
class PolicySpec:
    """A policy: traffic matching SELECTOR in DIRECTION is protected by TEMPLATE, blocked
    (template None, block True), or let through (template None, block False: a bypass)."""

    selector: Selector
    direction: Direction
    priority: int
    template: Template | None = None
    block: bool = False

    def __post_init__(self) -> None:
        if self.block and self.template is not None:
            raise ValueError("a blocking policy has no template")

    def describe(self) -> str:
        what = ("block" if self.block else "bypass" if self.template is None
                else f"esp reqid {self.template.reqid}")
        return f"policy {self.direction.name.lower()} {self.selector} ({what})"

    def message(self) -> s.xfrm_userpolicy_info:
        m = s.xfrm_userpolicy_info()
        m.update({**self.selector.fields(), **NO_LIMITS.fields(), "priority": self.priority,
                  "dir": self.direction,
                  "action": s.XFRM_POLICY_BLOCK if self.block else s.XFRM_POLICY_ALLOW})
        m["attrs"] = [] if self.template is None else [("XFRMA_TMPL", self.template.fields())]
        return m


@dataclass(frozen=True)
class PolicyId:
    selector: Selector
    direction: Direction

    def __str__(self) -> str:
        return f"policy {self.direction.name.lower()} {self.selector}"

    def message(self) -> s.xfrm_userpolicy_id:
        m = s.xfrm_userpolicy_id()
        m.update({**self.selector.fields(), "dir": self.direction})
        m["attrs"] = []
        return m


@dataclass(frozen=True)
class PolicyState:
    """An installed policy as the kernel reports it."""

    selector: Selector
    direction: int
    priority: int
    block: bool
    reqid: int | None  # the template's; None without one

    @classmethod
    def from_message(cls, m: Any) -> PolicyState:
        tmpl = m.get_attr("XFRMA_TMPL")
        return cls(Selector.from_fields(m), m["dir"], m["priority"],
                   m["action"] == s.XFRM_POLICY_BLOCK, tmpl["reqid"] if tmpl else None)
