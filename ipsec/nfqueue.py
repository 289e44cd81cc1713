"""NFQUEUE (`include/uapi/linux/netfilter/nfnetlink_queue.h`): hold packets in the kernel
until told to let them go.

Used to close the one window strongSwan's kernel-libipsec leaves open (see
`ipsec.strongswan.hold`). Only what that needs: bind a queue (fail-open), set how many packets
it may hold (0: all pass straight through, in the kernel), receive the (metadata-only) notices
of packets held, accept every held packet at once; closing the socket unbinds the queue.
Messages on pyroute2's netlink base, one class per kernel struct; a small socket below.
"""

from __future__ import annotations

import errno as errno_
import itertools
import os
import select
import socket
import struct

from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST, NLMSG_ERROR, nla
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_QUEUE, nfgen_msg

NETLINK_NETFILTER = 12
# enum nfqnl_msg_types
NFQNL_MSG_PACKET = 0
NFQNL_MSG_CONFIG = 2
NFQNL_MSG_VERDICT_BATCH = 3
# enum nfqnl_msg_config_cmds
NFQNL_CFG_CMD_BIND = 1
# enum nfqnl_config_mode
NFQNL_COPY_META = 1
# NFQA_CFG_FLAGS: when the queue is full, accept instead of dropping
NFQA_CFG_F_FAIL_OPEN = 0x1
# netfilter verdicts
NF_ACCEPT = 1

_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr


def msg_type(nfqnl_type: int) -> int:
    return int(NFNL_SUBSYS_QUEUE << 8) | nfqnl_type


class nfqnl_config_msg(nfgen_msg):
    """struct nfgenmsg { __u8 nfgen_family; __u8 version; __be16 res_id; } + NFQA_CFG_*.

    NFQNL_MSG_CONFIG: res_id is the queue number."""

    nla_map = (
        (0, "NFQA_CFG_UNSPEC", "none"),
        (1, "NFQA_CFG_CMD", "nfqnl_msg_config_cmd"),
        (2, "NFQA_CFG_PARAMS", "nfqnl_msg_config_params"),
        (3, "NFQA_CFG_QUEUE_MAXLEN", "be32"),
        (4, "NFQA_CFG_MASK", "be32"),
        (5, "NFQA_CFG_FLAGS", "be32"),
    )

    class nfqnl_msg_config_cmd(nla):
        """struct nfqnl_msg_config_cmd { __u8 command; __u8 _pad; __be16 pf; };"""

        fields = (("command", "B"), ("_pad", "x"), ("pf", ">H"))

    class nfqnl_msg_config_params(nla):
        """struct nfqnl_msg_config_params { __be32 copy_range; __u8 copy_mode; }
        __attribute__ ((packed));"""

        fields = (("copy_range", ">I"), ("copy_mode", "B"))


class nfqnl_packet_msg(nfgen_msg):
    """struct nfgenmsg + NFQA_*: a queued packet (NFQNL_MSG_PACKET) or a verdict on queued
    packets (NFQNL_MSG_VERDICT_BATCH)."""

    nla_map = (
        (0, "NFQA_UNSPEC", "none"),
        (1, "NFQA_PACKET_HDR", "nfqnl_msg_packet_hdr"),
        (2, "NFQA_VERDICT_HDR", "nfqnl_msg_verdict_hdr"),
    )

    class nfqnl_msg_packet_hdr(nla):
        """struct nfqnl_msg_packet_hdr { __be32 packet_id; __be16 hw_protocol; __u8 hook; }
        __attribute__ ((packed));"""

        fields = (("packet_id", ">I"), ("hw_protocol", ">H"), ("hook", "B"))

    class nfqnl_msg_verdict_hdr(nla):
        """struct nfqnl_msg_verdict_hdr { __be32 verdict; __be32 id; };"""

        fields = (("verdict", ">I"), ("id", ">I"))


def _encode(msg: nfgen_msg, queue: int, nfqnl_type: int, seq: int) -> bytes:
    msg["nfgen_family"] = socket.AF_UNSPEC
    msg["version"] = 0  # NFNETLINK_V0
    msg["res_id"] = queue
    msg["header"]["type"] = msg_type(nfqnl_type)
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK
    msg["header"]["sequence_number"] = seq
    msg.encode()
    return bytes(msg.data)


def bind_request(queue: int, seq: int, *, maxlen: int) -> bytes:
    """Bind `queue`: metadata only (no payload copied out), up to `maxlen` packets held,
    accept rather than drop once full (NFQA_CFG_F_FAIL_OPEN)."""
    msg = nfqnl_config_msg()
    msg["attrs"] = [
        ["NFQA_CFG_CMD", {"command": NFQNL_CFG_CMD_BIND, "pf": 0}],
        ["NFQA_CFG_PARAMS", {"copy_range": 0, "copy_mode": NFQNL_COPY_META}],
        ["NFQA_CFG_QUEUE_MAXLEN", maxlen],
        ["NFQA_CFG_MASK", NFQA_CFG_F_FAIL_OPEN],
        ["NFQA_CFG_FLAGS", NFQA_CFG_F_FAIL_OPEN],
    ]
    return _encode(msg, queue, NFQNL_MSG_CONFIG, seq)


def maxlen_request(queue: int, seq: int, maxlen: int) -> bytes:
    """How many packets the queue may hold; beyond that (fail-open) the kernel lets them
    through at once, in order. 0: every packet passes straight through."""
    msg = nfqnl_config_msg()
    msg["attrs"] = [["NFQA_CFG_QUEUE_MAXLEN", maxlen]]
    return _encode(msg, queue, NFQNL_MSG_CONFIG, seq)


def accept_request(queue: int, seq: int, up_to: int) -> bytes:
    """Accept every queued packet whose id is not after `up_to` (32-bit serial numbers)."""
    msg = nfqnl_packet_msg()
    msg["attrs"] = [["NFQA_VERDICT_HDR", {"verdict": NF_ACCEPT, "id": up_to & 0xFFFF_FFFF}]]
    return _encode(msg, queue, NFQNL_MSG_VERDICT_BATCH, seq)


def parse(data: bytes) -> tuple[list[int], dict[int, int]]:
    """The packet ids queued and the acknowledgements (sequence number -> errno, 0 for
    success) in one read."""
    packets: list[int] = []
    acks: dict[int, int] = {}
    offset = 0
    while offset + _HEADER.size <= len(data):
        length, mtype, _flags, seq, _pid = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size:
            break
        if mtype == NLMSG_ERROR:
            (error,) = struct.unpack_from("=i", data, offset + _HEADER.size)
            acks[seq] = -error
        elif mtype == msg_type(NFQNL_MSG_PACKET):
            msg = nfqnl_packet_msg(data[offset:offset + length])
            msg.decode()
            hdr = msg.get_attr("NFQA_PACKET_HDR")
            if hdr is not None:
                packets.append(hdr["packet_id"])
        offset += (length + 3) & ~3
    return packets, acks


class NfQueueError(Exception):
    def __init__(self, what: str, errno: int) -> None:
        super().__init__(f"NFQUEUE {what}: {os.strerror(errno)}")
        self.errno = errno


class NfQueueSocket:
    """One queue's socket. Requests are answered by the kernel at once, so each is one send
    and a read of its acknowledgement (non-blocking, after a poll of at most ACK_TIMEOUT)."""

    #: The kernel acknowledges config and verdict messages while handling them.
    ACK_TIMEOUT = 1.0
    #: Notices of held packets (~80 bytes each) wait here until read; when it overflows the
    #: notices are lost, not the packets.
    RCVBUF = 4 << 20

    def __init__(self, queue: int) -> None:
        self.queue = queue
        self._seq = itertools.count(1)
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, 33, self.RCVBUF)  # SO_RCVBUFFORCE
        except OSError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.RCVBUF)
        self.sock.bind((0, 0))
        self.sock.setblocking(False)
        #: Packets the kernel said it held (notices may be lost when the buffer overflows).
        self.seen = 0
        #: The id of the newest packet held: the kernel numbers every packet that reaches the
        #: queue, passed straight through or held.
        self.last_id: int | None = None

    def close(self) -> None:
        """Unbinds the queue: the kernel drops what it still holds."""
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def bind(self, maxlen: int) -> None:
        self._request("bind", bind_request(self.queue, self._next(), maxlen=maxlen))

    def set_maxlen(self, maxlen: int) -> None:
        self._request("queue length", maxlen_request(self.queue, self._next(), maxlen))

    def accept_all(self, slack: int) -> None:
        """Let every held packet go, in the order they were queued. `slack`: how many held
        packets may not have been announced yet (at most the queue's length)."""
        if self.last_id is not None:
            self._request("verdict", accept_request(self.queue, self._next(),
                                                     self.last_id + slack), missing_ok=True)

    def drain(self) -> None:
        """Read what is waiting: notices of held packets."""
        while True:
            try:
                data = self.sock.recv(1 << 16)
            except BlockingIOError:
                return
            except OSError as e:
                if e.errno == errno_.ENOBUFS:  # notices lost; the packets are still held
                    continue
                raise
            packets, _ = parse(data)
            self._note(packets)

    def _note(self, packets: list[int]) -> None:
        if packets:
            self.seen += len(packets)
            self.last_id = packets[-1]

    def _next(self) -> int:
        return next(self._seq)

    def _request(self, what: str, data: bytes, *, missing_ok: bool = False) -> None:
        seq = int.from_bytes(data[8:12], "little")
        self.sock.send(data)
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        while True:
            if not poller.poll(self.ACK_TIMEOUT * 1000):
                raise NfQueueError(what, errno_.ETIMEDOUT)
            try:
                chunk = self.sock.recv(1 << 16)
            except BlockingIOError:
                continue
            except OSError as e:
                if e.errno == errno_.ENOBUFS:
                    continue
                raise
            packets, acks = parse(chunk)
            self._note(packets)
            if seq in acks:
                error = acks[seq]
                if error and not (missing_ok and error == errno_.ENOENT):
                    raise NfQueueError(what, error)
                return
