"""Netlink messages that do not decode (cut short, a field out of range, garbage) are typed
errors: NetlinkDecodeError from the codec, the protocol's error (XfrmError, NfQueueError) with
EBADMSG from a request, a skipped message (logged) from a notification stream. Never
struct.error, ValueError, TypeError; never a dead listener.

The kernel is trusted; these stand for a bug or a kernel the structs do not match, which
must end in an alarm rather than a dead task."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
from collections.abc import Iterator
from ipaddress import ip_address, ip_network
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink import NLMSG_DONE, NLMSG_ERROR, nlmsg

from common.config import HostPort
from common.sink import ProvidedKey, RekeyCause, SinkContext, SinkError
from ipsec import netlink, nfqueue
from ipsec.netlink import NetlinkDecodeError, NetlinkSocket
from ipsec.xfrm import structs as s
from ipsec.xfrm.kernel import XfrmKernel
from ipsec.xfrm.netlink import XfrmError, XfrmSocket
from ipsec.xfrm.objects import (
    Direction,
    Mode,
    PolicySpec,
    PolicyState,
    SaSpec,
    SaState,
    Selector,
    Template,
)
from ipsec.xfrm.sink import XfrmSink, XfrmSinkConfig
from tests.helpers import lifetimes

HEADER = struct.Struct("=IHHII")
KEY = bytes(range(36))
A, B = ip_address("192.0.2.1"), ip_address("198.51.100.1")


def encoded(msg: Any, msg_type: int, seq: int = 1) -> bytes:
    msg["header"] = {"type": msg_type, "sequence_number": seq}
    msg.encode()
    return bytes(msg.data)


def sa_message(spi: int = 0x1234, seq: int = 1, msg_type: int = s.XFRM_MSG_NEWSA) -> bytes:
    return encoded(SaSpec(A, B, spi, 7, Mode.TUNNEL, KEY).message(), msg_type, seq)


def policy_message(seq: int = 1) -> bytes:
    spec = PolicySpec(Selector(ip_network("10.1.0.0/16"), ip_network("10.2.0.0/16")),
                      Direction.OUT, 1000, Template(A, B, 7, Mode.TUNNEL))
    return encoded(spec.message(), s.XFRM_MSG_NEWPOLICY, seq)


def expire_message(spi: int) -> bytes:
    m = s.xfrm_user_expire()
    sa = SaSpec(A, B, spi, 7, Mode.TUNNEL, KEY).message()
    m.update({k: v for k, v in sa.items() if k not in ("header", "attrs")})
    m.update({"hard": 0, "curlft_packets": 10, "lft_soft_packet_limit": 10})
    m["attrs"] = []
    return encoded(m, s.XFRM_MSG_EXPIRE, 0)


def packet_notice(packet_id: int) -> bytes:
    pkt = nfqueue.nfqnl_packet_msg()
    pkt["attrs"] = [["NFQA_PACKET_HDR", {"packet_id": packet_id, "hw_protocol": 0x800,
                                         "hook": 4}]]
    return encoded(pkt, nfqueue.msg_type(nfqueue.NFQNL_MSG_PACKET), 0)


def with_length(data: bytes, length: int) -> bytes:
    """DATA's first message claiming LENGTH bytes, cut there."""
    return struct.pack("=I", length) + data[4:length]


def done(seq: int = 1) -> bytes:
    return HEADER.pack(HEADER.size, NLMSG_DONE, 0, seq, 0)


def attribute_ends(data: bytes, struct_size: int) -> set[int]:
    """Where the message's attributes end, one after another."""
    ends, pos = {HEADER.size + struct_size}, HEADER.size + struct_size
    while pos < len(data):
        pos += (struct.unpack_from("=H", data, pos)[0] + 3) & ~3
        ends.add(pos)
    return ends


# -- the codec --------------------------------------------------------------------------------


def test_valid_messages_decode() -> None:
    data = sa_message()
    state = SaState.from_message(netlink.decode(s.xfrm_usersa_info, data, 0, len(data)))
    assert (state.spi, state.algorithm) == (0x1234, "rfc4106(gcm(aes))")


@pytest.mark.parametrize("data", [b"\x10\x00", HEADER.pack(8, 0, 0, 0, 0),
                                  HEADER.pack(100, 0, 0, 0, 0) + bytes(20)])
def test_a_cut_datagram_is_a_decode_error(data: bytes) -> None:
    with pytest.raises(NetlinkDecodeError):
        netlink.headers(data)


SA = sa_message()
SA_SIZE = 224


@pytest.mark.parametrize("length", sorted(set(range(HEADER.size, len(SA)))
                                          - attribute_ends(SA, SA_SIZE)))
def test_every_cut_of_an_sa_is_a_decode_error(length: int) -> None:
    data = with_length(SA, length)
    with pytest.raises(NetlinkDecodeError, match="xfrm_usersa_info"):
        SaState.from_message(netlink.decode(s.xfrm_usersa_info, data, 0, length))


def test_a_short_nfqueue_packet_header_is_a_decode_error() -> None:
    data = packet_notice(5)
    cut = data[:HEADER.size + 4] + struct.pack("=HH", 6, 1) + data[HEADER.size + 8:]
    with pytest.raises(NetlinkDecodeError, match="NFQA_PACKET_HDR"):
        netlink.decode(nfqueue.nfqnl_packet_msg, cut, 0, len(cut))


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("sel_prefixlen_s", 200, "prefix length 200"),
    ("sel_family", 99, None),  # no such family: read as IPv6, as the sink compares it
])
def test_selector_fields_out_of_range_are_decode_errors(field: str, value: int,
                                                       problem: str | None) -> None:
    spec = PolicySpec(Selector(ip_network("fd00:1::/64"), ip_network("fd00:2::/64")),
                      Direction.OUT, 1000)
    m = spec.message()
    m[field] = value
    data = encoded(m, s.XFRM_MSG_NEWPOLICY)
    decoded = netlink.decode(s.xfrm_userpolicy_info, data, 0, len(data))
    if problem is None:
        PolicyState.from_message(decoded)
    else:
        with pytest.raises(NetlinkDecodeError, match=problem):
            PolicyState.from_message(decoded)


def test_a_foreign_policy_with_host_bits_reads_as_its_network() -> None:
    """`ip xfrm policy add src 10.1.2.3/16 ...`: the kernel keeps the host bits."""
    m = PolicySpec(Selector(ip_network("10.1.0.0/16"), ip_network("10.2.0.0/16")),
                   Direction.OUT, 1000).message()
    m["sel_saddr"] = ip_address("10.1.2.3").packed.ljust(16, b"\0")
    data = encoded(m, s.XFRM_MSG_NEWPOLICY)
    state = PolicyState.from_message(netlink.decode(s.xfrm_userpolicy_info, data, 0, len(data)))
    assert state.selector.src == ip_network("10.1.0.0/16")


CONSUMERS: dict[type[nlmsg], Any] = {
    s.xfrm_usersa_info: SaState.from_message,
    s.xfrm_userpolicy_info: PolicyState.from_message,
    s.xfrm_user_expire: lambda m: (SaState.from_message(m), m["hard"]),
    s.xfrm_user_acquire: Selector.from_fields,
    nfqueue.nfqnl_packet_msg: lambda m: (h := m.get_attr("NFQA_PACKET_HDR")) and h["packet_id"],
}


@given(cls=st.sampled_from(list(CONSUMERS)), body=st.binary(max_size=400),
       attrs=st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(0, 40), st.binary(
           max_size=100)), max_size=4), template=st.booleans())
def test_anything_decodes_or_is_a_decode_error(cls: type[nlmsg], body: bytes,
                                               attrs: list[tuple[int, int, bytes]],
                                               template: bool) -> None:
    """Random bytes, or the right struct size with random attributes: a value the sink reads,
    or NetlinkDecodeError."""
    if template:
        size = {s.xfrm_usersa_info: 224, s.xfrm_userpolicy_info: 168,
                s.xfrm_user_expire: 232, s.xfrm_user_acquire: 280}.get(cls, 4)
        body = body[:size].ljust(size, b"\0") + b"".join(
            struct.pack("=HH", len(v) + 4 if n % 5 else n, t) + v + bytes(-len(v) % 4)
            for n, (t, _, v) in enumerate(attrs))
    data = HEADER.pack(HEADER.size + len(body), 0x10, 0, 0, 0) + body
    with contextlib.suppress(NetlinkDecodeError):
        for offset, length, _, _, _ in netlink.headers(data):
            CONSUMERS[cls](netlink.decode(cls, data, offset, length))


# -- through the sockets ----------------------------------------------------------------------


@contextlib.contextmanager
def fake_kernel(sock: NetlinkSocket) -> Iterator[socket.socket]:
    """SOCK, talking to the test instead of the kernel: the test's end of the pair."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    sock._sock.close()
    sock._sock = ours
    try:
        yield theirs
    finally:
        theirs.close()
        sock.close()


@pytest.mark.parametrize("answer", [
    with_length(sa_message(), 100),  # cut inside the struct
    with_length(sa_message(), len(sa_message()) - 4),  # cut inside an attribute
    HEADER.pack(HEADER.size + 2, NLMSG_ERROR, 0, 1, 0) + b"\0\0",  # a short error
], ids=["cut in the struct", "cut in an attribute", "a short error"])
async def test_a_dump_answer_that_does_not_decode_is_an_xfrm_error(answer: bytes) -> None:
    kernel = XfrmKernel()
    with fake_kernel(kernel.socket) as theirs:
        theirs.send(answer + done())
        with pytest.raises(XfrmError, match="does not decode") as e:
            await kernel.sas()
        assert e.value.errno == errno.EBADMSG


async def test_a_policy_dump_with_an_impossible_selector_is_an_xfrm_error() -> None:
    m = PolicySpec(Selector(ip_network("10.1.0.0/16"), ip_network("10.2.0.0/16")),
                   Direction.OUT, 1000).message()
    m["sel_prefixlen_d"] = 99
    kernel = XfrmKernel()
    with fake_kernel(kernel.socket) as theirs:
        theirs.send(encoded(m, s.XFRM_MSG_NEWPOLICY) + done())
        with pytest.raises(XfrmError, match="prefix length 99") as e:
            await kernel.policies()
        assert e.value.errno == errno.EBADMSG


async def test_a_dump_that_does_not_decode_stops_the_xfrm_sink_with_a_sink_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    kernel = XfrmKernel()
    monkeypatch.setattr("ipsec.xfrm.sink.XfrmKernel", lambda: kernel)
    sink = xfrm_sink(Events())
    with fake_kernel(kernel.socket) as theirs:
        theirs.send(with_length(sa_message(), 100) + done())
        with pytest.raises(SinkError, match=r"cannot set up XFRM: .*does not decode"):
            await sink.start()


class Events:
    def __init__(self) -> None:
        self.soft: list[str] = []

    def rekey_needed(self, link: str, cause: RekeyCause, detail: str) -> None:
        self.soft.append(detail)

    def key_provided(self, link: str, key: ProvidedKey) -> None:
        raise AssertionError("this sink hands out no key")


def xfrm_sink(events: Events) -> XfrmSink:
    config = XfrmSinkConfig.model_validate({
        "type": "xfrm", "local": str(A), "remote": str(B), "local_subnets": ["10.1.0.0/16"],
        "remote_subnets": ["10.2.0.0/16"]})
    return config.build(SinkContext("ab", lifetimes(), events, HostPort("192.0.2.1", 9443),
                                    HostPort("198.51.100.1", 9443)))


async def test_the_xfrm_listener_survives_a_notification_that_does_not_decode() -> None:
    events = Events()
    sink = xfrm_sink(events)
    sink.outbound[0x4242] = sink.out_reqids[0]
    bad_selector = s.xfrm_user_acquire()
    bad_selector.update({"sel_family": socket.AF_INET, "sel_prefixlen_s": 77})
    bad_selector["attrs"] = []
    notifications = XfrmSocket()
    with fake_kernel(notifications) as theirs:
        listener = asyncio.create_task(sink._listen(notifications))
        for garbage in (with_length(expire_message(0x4242), 100), b"\x01\x02",
                        encoded(bad_selector, s.XFRM_MSG_ACQUIRE, 0),
                        expire_message(0x4242)):
            theirs.send(garbage)
        for _ in range(100):
            if events.soft:
                break
            await asyncio.sleep(0.01)
        assert not listener.done()
        listener.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await listener
    assert events.soft == ["outbound SA 0x00004242 reached its soft packet limit"]


async def test_an_nfqueue_notice_that_does_not_decode_is_skipped() -> None:
    sock = nfqueue.NfQueueSocket(7)
    with fake_kernel(sock) as theirs:
        cut = packet_notice(5)
        cut = cut[:HEADER.size + 4] + struct.pack("=HH", 6, 1) + cut[HEADER.size + 8:]
        theirs.send(cut + packet_notice(6))
        await asyncio.sleep(0.01)
        sock.drain()
        assert (sock.seen, sock.last_id) == (1, 6)
