"""The netlink transport under the XFRM and NFQUEUE sockets: requests with their
acknowledgements, dumps, notifications.

A deliberately small socket layer under pyroute2's message classes: the kernel handles these
requests synchronously, so a request is one `send` and its answer is already queued; the
socket is non-blocking and read through the event loop all the same. Errors carry the
kernel's errno and, when it gives one, its extended-ack text ("Invalid key length", ...).
`NETLINK_CAP_ACK` keeps the kernel from echoing a failed request back: an XFRM SA request
holds key bytes.

A protocol subclasses `NetlinkSocket` with its number, the classes of the messages it reads
and its error classes.

Decoding is strict (`decode`): pyroute2 reads a struct or attribute cut short from whatever
bytes follow, or keeps an attribute it cannot decode as raw bytes. Here that is a
NetlinkDecodeError; a request whose answer does not decode fails with the protocol's error
(errno EBADMSG), and a notification that does not decode is logged and skipped, as the
kernel drops notifications when the socket's buffer overflows.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_
import itertools
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Iterator
from typing import Any, ClassVar

from pyroute2.netlink import (
    NLM_F_ACK,
    NLM_F_ACK_TLVS,
    NLM_F_DUMP,
    NLM_F_REQUEST,
    NLMSG_DONE,
    NLMSG_ERROR,
    nlmsg,
)

from common.sockets import grow_receive_buffer

SOL_NETLINK = 270
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NLMSGERR_ATTR_MSG = 1
_HEADER = struct.Struct("=IHHII")  # struct nlmsghdr
_NLA_HEADER = struct.Struct("=HH")  # struct nlattr
_ERROR_SIZE = 4 + _HEADER.size  # struct nlmsgerr without the request's payload

log = logging.getLogger(__name__)


class NetlinkError(Exception):
    """The kernel refused a request. `errno` is its error number; the text names the
    operation, what it was about, and the kernel's reason."""

    def __init__(self, operation: str, subject: str, errno: int, kernel_says: str = "") -> None:
        self.operation, self.subject, self.errno = operation, subject, errno
        reason = os.strerror(errno) + (f" ({kernel_says})" if kernel_says else "")
        super().__init__(f"{operation} {subject}: {reason}")


class NetlinkDecodeError(NetlinkError):
    """A message from the kernel that does not decode: cut short, or a value out of range.
    `detail` says what was wrong."""

    def __init__(self, what: str, detail: str) -> None:
        self.detail = detail
        super().__init__("decode", what, errno_.EBADMSG, detail)

    def in_answer(self, error: type[NetlinkError], operation: str,
                  subject: str) -> NetlinkError:
        """This, as the protocol's ERROR of the request OPERATION on SUBJECT."""
        return error(operation, subject, self.errno,
                     f"the answer does not decode: {self.subject}: {self.detail}")


class NetlinkSocket:
    """One netlink socket of PROTOCOL in the calling process's network namespace."""

    protocol: ClassVar[int]
    protocol_name: ClassVar[str]  # for messages, e.g. "NETLINK_XFRM"
    #: Messages read (answers, dump entries, notifications) by type; others are skipped.
    message_classes: ClassVar[dict[int, type[nlmsg]]]
    message_names: ClassVar[dict[int, str]]
    error: ClassVar[type[NetlinkError]] = NetlinkError
    unavailable: ClassVar[type[NetlinkError]] = NetlinkError
    #: An answer that does not come in this long is a failure.
    answer_timeout: ClassVar[float] = 10.0

    def __init__(self, groups: int = 0, rcvbuf: int = 1 << 20) -> None:
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK,
                                 self.protocol)
        except OSError as e:
            raise self.unavailable("open", f"{self.protocol_name} socket",
                                   e.errno or errno_.EPERM) from None
        sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
        sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)
        grow_receive_buffer(sock, rcvbuf)
        sock.bind((0, groups))
        self._sock = sock
        self._seq = itertools.count(1)
        self._lock = asyncio.Lock()  # one request in flight: answers are matched in order

    def close(self) -> None:
        self._sock.close()

    def fileno(self) -> int:
        return self._sock.fileno()

    async def request(self, msg: nlmsg, msg_type: int, subject: str, *,
                      flags: int = 0, dump: bool = False) -> list[nlmsg]:
        """Send MSG as MSG_TYPE and collect the answer: [] for an ack, the entries of a
        dump. Raises `error` with SUBJECT (what it was about, for the message)."""
        operation = self.message_names.get(msg_type, hex(msg_type))
        async with self._lock:
            seq = next(self._seq)
            msg["header"] = {"type": msg_type, "sequence_number": seq,
                             "flags": NLM_F_REQUEST | (NLM_F_DUMP if dump else NLM_F_ACK | flags)}
            msg.encode()
            try:
                self._sock.send(msg.data)
            except OSError as e:
                raise self.error(operation, subject, e.errno or errno_.EIO) from None
            finally:
                msg.data[:] = bytes(len(msg.data))  # an XFRM SA request holds a key
            try:
                async with asyncio.timeout(self.answer_timeout):
                    return await self._collect(seq, operation, subject)
            except TimeoutError:
                raise self.error(operation, subject, errno_.ETIMEDOUT,
                                 f"no answer in {self.answer_timeout:g} s") from None
            except NetlinkDecodeError as e:
                raise e.in_answer(self.error, operation, subject) from None

    def unsolicited(self, msg: nlmsg) -> None:
        """A message read while waiting for an answer that is not part of it: a stale answer
        to an abandoned request (skipped), or what the protocol sends on its own."""

    def read_nowait(self) -> list[nlmsg]:
        """Every message waiting now, decoded (those of `message_classes`)."""
        out: list[nlmsg] = []
        while True:
            try:
                data = self._sock.recv(1 << 16)
            except BlockingIOError:
                return out
            except OSError as e:
                if e.errno == errno_.ENOBUFS:  # we fell behind; the kernel dropped some
                    continue
                raise
            out += self._notices(data)

    def _notices(self, data: bytes) -> list[nlmsg]:
        """The messages of `message_classes` in DATA; what does not decode is logged and
        skipped."""
        out: list[nlmsg] = []
        try:
            for offset, length, msg_type, _, _ in headers(data):
                cls = self.message_classes.get(msg_type)
                if cls is not None:
                    with _skipped(self.protocol_name):
                        out.append(decode(cls, data, offset, length))
        except NetlinkDecodeError as e:
            log.error("%s: a datagram skipped: %s", self.protocol_name, e)
        return out

    async def _collect(self, seq: int, operation: str, subject: str) -> list[nlmsg]:
        loop = asyncio.get_running_loop()
        out: list[nlmsg] = []
        while True:
            try:
                data = await loop.sock_recv(self._sock, 1 << 16)
            except OSError as e:
                if e.errno == errno_.ENOBUFS:  # lost with the rest: the timeout says so
                    continue
                raise
            for offset, length, msg_type, flags, msg_seq in headers(data):
                cls = self.message_classes.get(msg_type)
                if msg_seq != seq:
                    if cls is not None:
                        with _skipped(self.protocol_name):
                            self.unsolicited(decode(cls, data, offset, length))
                    continue
                if msg_type == NLMSG_DONE:
                    return out
                if msg_type == NLMSG_ERROR:
                    code, text = error(data, offset, length, flags)
                    if code == 0:
                        return out
                    raise self.error(operation, subject, -code, text)
                if cls is not None:
                    out.append(decode(cls, data, offset, length))

    async def notifications(self) -> AsyncIterator[nlmsg]:
        """Decoded messages of the multicast groups this socket was opened with (those that
        do not decode are logged and skipped)."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                data = await loop.sock_recv(self._sock, 1 << 16)
            except OSError as e:
                if e.errno == errno_.ENOBUFS:  # we fell behind; the kernel dropped some
                    continue
                raise
            for msg in self._notices(data):
                yield msg


@contextlib.contextmanager
def _skipped(protocol: str) -> Iterator[None]:
    """A message not asked for that does not decode: logged, and the others still read."""
    try:
        yield
    except NetlinkDecodeError as e:
        log.error("%s: a message skipped: %s", protocol, e)


def headers(data: bytes) -> list[tuple[int, int, int, int, int]]:
    """(offset, length, type, flags, seq) of each netlink message in a datagram."""
    out, offset = [], 0
    while offset < len(data):
        if offset + _HEADER.size > len(data):
            raise NetlinkDecodeError("netlink datagram", f"{len(data) - offset} bytes left at"
                                     f" byte {offset}, less than a message header")
        length, msg_type, flags, seq, _ = _HEADER.unpack_from(data, offset)
        if length < _HEADER.size or offset + length > len(data):
            raise NetlinkDecodeError("netlink datagram", f"the message at byte {offset}"
                                     f" announces {length} bytes, {len(data) - offset} left")
        out.append((offset, length, msg_type, flags, seq))
        offset += (length + 3) & ~3
    return out


def error(data: bytes, offset: int, length: int, flags: int) -> tuple[int, str]:
    """struct nlmsgerr { int error; struct nlmsghdr msg; } + extended-ack attributes (the
    request itself is left out: NETLINK_CAP_ACK)."""
    if length < _HEADER.size + _ERROR_SIZE:
        raise NetlinkDecodeError("NLMSG_ERROR", f"{length} bytes, struct nlmsgerr needs"
                                 f" {_HEADER.size + _ERROR_SIZE}")
    (code,) = struct.unpack_from("=i", data, offset + _HEADER.size)
    text = ""
    if flags & NLM_F_ACK_TLVS:
        pos, end = offset + _HEADER.size + _ERROR_SIZE, offset + length
        while pos + 4 <= end:
            nla_len, nla_type = struct.unpack_from("=HH", data, pos)
            if nla_len < 4:
                break
            if nla_type == NLMSGERR_ATTR_MSG:
                text = bytes(data[pos + 4:min(pos + nla_len, end)]).split(b"\0")[0].decode(
                    errors="replace")
            pos += (nla_len + 3) & ~3
    return code, text


def _fixed_size(fields: Any) -> int:
    """Bytes of a pyroute2 field list, leaving out a trailing "s" (the rest, any length)."""
    return sum(struct.calcsize(fmt) for _, fmt in fields if fmt != "s")


def decode(cls: type[nlmsg], data: bytes, offset: int, length: int) -> Any:
    """The message of LENGTH bytes at OFFSET in DATA, as CLS, with every attribute decoded.

    Raises NetlinkDecodeError, naming the struct or attribute, when the message or one of
    its attributes is shorter than its struct or does not decode."""
    name = cls.__name__
    need = _HEADER.size + _fixed_size(cls.fields)
    if length < need:
        raise NetlinkDecodeError(name, f"{length} bytes, the struct needs {need}")
    buf = bytes(data[offset:offset + length])  # nothing past the message to read by mistake
    try:
        msg = cls(buf)
        msg.decode()
        end = (need + 3) & ~3  # where the attributes start, then where each ends
        for slot in msg.get("attrs", ()):
            attr, nla = slot.cell
            announced, _ = _NLA_HEADER.unpack_from(buf, nla.offset)
            fixed = _NLA_HEADER.size + _fixed_size(getattr(nla, "fields", ()))
            if announced != nla.length or announced < fixed:
                raise NetlinkDecodeError(name, f"attribute {attr} of {announced} bytes"
                                         f" ({nla.length} there, its struct needs {fixed})")
            nla.decode()
            end = nla.offset + ((nla.length + 3) & ~3)
        if end < length:
            raise NetlinkDecodeError(name, f"{length - end} bytes after the last attribute")
    except NetlinkDecodeError:
        raise
    except Exception as e:  # pyroute2 raises struct.error, its own errors, ValueError, ...
        raise NetlinkDecodeError(name, f"{type(e).__name__}: {e}") from None
    return msg
