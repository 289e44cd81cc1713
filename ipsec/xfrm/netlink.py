"""The NETLINK_XFRM socket: the transport of ipsec/netlink.py with XFRM's message classes
and errors.
"""

from __future__ import annotations

from pyroute2.netlink import nlmsg

from ipsec.netlink import NetlinkError, NetlinkSocket
from ipsec.xfrm import structs as s

#: Answers to requests and dumps, and notifications, by message type.
MESSAGE_CLASSES: dict[int, type[nlmsg]] = {
    s.XFRM_MSG_NEWSA: s.xfrm_usersa_info,
    s.XFRM_MSG_UPDSA: s.xfrm_usersa_info,
    s.XFRM_MSG_NEWPOLICY: s.xfrm_userpolicy_info,
    s.XFRM_MSG_UPDPOLICY: s.xfrm_userpolicy_info,
    s.XFRM_MSG_EXPIRE: s.xfrm_user_expire,
    s.XFRM_MSG_ACQUIRE: s.xfrm_user_acquire,
}

MESSAGE_NAMES = {value: name for name, value in vars(s).items() if name.startswith("XFRM_MSG_")}


class XfrmError(NetlinkError):
    """The kernel refused an XFRM request."""


class XfrmUnavailable(XfrmError):
    """No XFRM netlink here (no kernel support, or not allowed: needs CAP_NET_ADMIN)."""


class XfrmSocket(NetlinkSocket):
    """One NETLINK_XFRM socket in the calling process's network namespace.

    The kernel answers XFRM requests at once, except that the first SA with a new algorithm
    may wait seconds on the kernel loading crypto modules (the answer timeout's 10 s); a
    malformed request the kernel cannot even parse gets no answer at all."""

    protocol = s.NETLINK_XFRM
    protocol_name = "NETLINK_XFRM"
    message_classes = MESSAGE_CLASSES
    message_names = MESSAGE_NAMES
    error = XfrmError
    unavailable = XfrmUnavailable
