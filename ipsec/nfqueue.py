"""NFQUEUE (`include/uapi/linux/netfilter/nfnetlink_queue.h`): hold packets in the kernel
until told to let them go.

Used to close the one window strongSwan's kernel-libipsec leaves open (see
`ipsec.strongswan.hold`). Only what that needs: bind a queue (fail-open), set how many packets
it may hold (0: all pass straight through, in the kernel), receive the (metadata-only) notices
of packets held, accept every held packet at once; closing the socket unbinds the queue.
Messages on pyroute2's netlink base, one class per kernel struct; the socket is
ipsec/netlink.py's transport.
"""

from __future__ import annotations

import errno
import socket
from typing import ClassVar

from pyroute2.netlink import nla, nlmsg
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_QUEUE, nfgen_msg

from ipsec.netlink import NetlinkError, NetlinkSocket

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


def _nfgen(msg: nfgen_msg, queue: int) -> None:
    msg["nfgen_family"] = socket.AF_UNSPEC
    msg["version"] = 0  # NFNETLINK_V0
    msg["res_id"] = queue


def bind_msg(queue: int, *, maxlen: int) -> nfqnl_config_msg:
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
    _nfgen(msg, queue)
    return msg


def maxlen_msg(queue: int, maxlen: int) -> nfqnl_config_msg:
    """How many packets the queue may hold; beyond that (fail-open) the kernel lets them
    through at once. 0: every packet passes straight through."""
    msg = nfqnl_config_msg()
    msg["attrs"] = [["NFQA_CFG_QUEUE_MAXLEN", maxlen]]
    _nfgen(msg, queue)
    return msg


def accept_msg(queue: int, up_to: int) -> nfqnl_packet_msg:
    """Accept every queued packet whose id is not after `up_to` (32-bit serial numbers)."""
    msg = nfqnl_packet_msg()
    msg["attrs"] = [["NFQA_VERDICT_HDR", {"verdict": NF_ACCEPT, "id": up_to & 0xFFFF_FFFF}]]
    _nfgen(msg, queue)
    return msg


class NfQueueError(NetlinkError):
    """The kernel refused an NFQUEUE request (binding needs CAP_NET_ADMIN)."""


class NfQueueSocket(NetlinkSocket):
    """One queue's socket. Besides the answers to its requests, the kernel sends it a notice
    for every packet it holds; they are read with the answers, or by `drain`."""

    protocol = NETLINK_NETFILTER
    protocol_name = "NETLINK_NETFILTER"
    message_classes: ClassVar[dict[int, type[nlmsg]]] = {
        msg_type(NFQNL_MSG_PACKET): nfqnl_packet_msg}
    message_names: ClassVar[dict[int, str]] = {msg_type(NFQNL_MSG_CONFIG): "NFQNL_MSG_CONFIG",
                     msg_type(NFQNL_MSG_VERDICT_BATCH): "NFQNL_MSG_VERDICT_BATCH"}
    error = NfQueueError
    unavailable = NfQueueError
    #: The kernel acknowledges config and verdict messages while handling them.
    answer_timeout = 1.0
    #: Notices of held packets wait here until read; when it overflows the notices are
    #: lost, not the packets.
    RCVBUF = 4 << 20

    def __init__(self, queue: int) -> None:
        super().__init__(rcvbuf=self.RCVBUF)
        self.queue = queue
        #: Notices of held packets read so far (some may be lost when the buffer overflows).
        self.seen = 0
        #: The id of the newest packet held: the kernel numbers every packet that reaches the
        #: queue, passed straight through or held.
        self.last_id: int | None = None

    async def bind(self, maxlen: int) -> None:
        await self._config(bind_msg(self.queue, maxlen=maxlen), "bind")

    async def set_maxlen(self, maxlen: int) -> None:
        await self._config(maxlen_msg(self.queue, maxlen), f"length {maxlen}")

    async def accept_all(self, slack: int) -> None:
        """Let every held packet go, in the order they were queued. `slack`: how many held
        packets may not have been announced yet (at most the queue's length)."""
        if self.last_id is None:
            return
        try:
            await self.request(accept_msg(self.queue, self.last_id + slack),
                               msg_type(NFQNL_MSG_VERDICT_BATCH), f"queue {self.queue}")
        except NfQueueError as e:
            if e.errno != errno.ENOENT:  # ENOENT: nothing held
                raise

    def drain(self) -> None:
        """Read the notices waiting now."""
        for msg in self.read_nowait():
            self.unsolicited(msg)

    def unsolicited(self, msg: nlmsg) -> None:
        hdr = msg.get_attr("NFQA_PACKET_HDR")
        if hdr is not None:
            self.seen += 1
            self.last_id = hdr["packet_id"]

    async def _config(self, msg: nfqnl_config_msg, what: str) -> None:
        await self.request(msg, msg_type(NFQNL_MSG_CONFIG), f"queue {self.queue} {what}")
