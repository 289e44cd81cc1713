"""The peer channel: protocol messages between gateways over mutual TLS.

A gateway opens one WebSocket to each peer gateway, `wss://PEER/v1/channel`, and sends the
messages of every link it has with that peer over it: one binary frame per message, tagged
with its link (`LINK` `\\n` message JSON). So a restart costs one TLS handshake per peer, not
one per link, and a hub's memory does not grow with a connection per link. Each side sends
on its own connection; the receiving side answers only refusals, with a text frame
`{"link", "reason", "error"}` about one link, and the channel and the other links go on.

Both ends present certificates from the site CA. The server admits a client whose
certificate's commonName is the pinned peer of one of its links (403 otherwise) and then
checks every frame: the link must be one of its own and configured with that very peer; the
client checks the server's certificate against the peer's name. A link the receiver does not
have (the peer not yet reconfigured) gets `unknown-link`: the sender holds that link's
messages back for a while (doubling) and its core raises `peer-link-unknown`; the link
connects once the peer has it. Queues are bounded per link, so a flood for one link delays
none of the others. Delivery is best effort: the rekey core retransmits, so a message that
cannot be sent is dropped. The wire format: docs/protocol.md, "The channel".
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from common.config import HostPort
from common.text import quote_remote
from common.tlsctx import client_context, peer_common_name, server_context
from gateway.config import PeerChannelConfig
from gateway.core.messages import MAX_MESSAGE_BYTES, Message, MessageError, decode, encode

log = logging.getLogger(__name__)

#: Where a gateway listens for its peers' channels.
CHANNEL_PATH = "/v1/channel"
#: Opening the channel (TCP, TLS, upgrade) must not take longer; the core retransmits anyway.
CONNECT_TIMEOUT = 5.0
#: After a failed connection, sends fail at once until this has passed, doubling up to
#: CONNECT_RETRY_MAX: a hub's thousand links must not try a thousand handshakes with a peer
#: that is down, and a peer that comes back is found again within two seconds.
CONNECT_RETRY = 0.25
CONNECT_RETRY_MAX = 2.0
#: WebSocket pings: a silent dead connection is noticed within this and reopened.
HEARTBEAT = 20.0
#: A link tag longer than this is refused (link names are short identifiers).
MAX_TAG_BYTES = 255
#: Frames up to this are read and, when their message is over MAX_MESSAGE_BYTES, refused for
#: their link alone; a larger frame closes the channel (1009), since reading it is the cost.
MAX_FRAME_BYTES = 4 * MAX_MESSAGE_BYTES
#: A link's messages the peer said it does not have are held back this long, doubling up to
#: UNKNOWN_LINK_RETRY_MAX; any message of the peer for the link ends the wait at once.
UNKNOWN_LINK_RETRY = 1.0
UNKNOWN_LINK_RETRY_MAX = 30.0
#: Sends of one link waiting on the connection at once; more are dropped (the core
#: retransmits): a link cannot pile up work behind a slow peer.
MAX_SENDS_IN_FLIGHT = 4
#: Refusals that mean the peer has no such link with this gateway.
LINK_UNKNOWN = frozenset({"unknown-link", "wrong-peer"})
#: A peer that opens another channel to us (not its first since we started) has restarted
#: (or, in a pair under keepalived, its other node took over): the connection we send on
#: may end at a box that is gone, and the first message on it would be lost to a reset.
#: Ours is reopened, unless it is younger than this (it was opened in answer to the peer's:
#: two gateways must not reopen in turn).
STALE_AFTER_PEER_RECONNECT = 1.0
#: Linux's IP_FREEBIND (not in Python's socket module): bind an address not (yet) on this
#: host, e.g. the virtual address keepalived moves to this node as it becomes active.
IP_FREEBIND = 15
#: Stale connections being closed, channels opened ahead (a task must be referenced until
#: it ends).
_closing: set[asyncio.Task[bool]] = set()


class Listener(Protocol):
    """What the channels tell the daemon."""

    def deliver(self, link: str, message: Message, peer_cert: bytes) -> bool:
        """A message for LINK; False when the link's queue is full (refused for it)."""

    def rejected(self, link: str, reason: str, detail: str) -> None:
        """A frame refused (LINK "" when it names no link of ours)."""

    def link_unknown(self, link: str, detail: str) -> None:
        """The peer answered that it has no such link with this gateway."""

    def channel_opened(self, peer: str, inbound: bool) -> None:
        """A channel connection to (or, INBOUND, from) PEER is up."""


def frame(link: str, message: Message) -> bytes:
    """One message on the wire: its link's name, a newline, the message."""
    return link.encode() + b"\n" + encode(message)


def certificate_sha256(pem_path: Path) -> tuple[str, bytes]:
    """The commonName and SHA-256 (of the DER) of the certificate in PEM_PATH."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate(pem_path.read_bytes())
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not cns:
        raise ValueError(f"{pem_path}: certificate has no commonName")
    return str(cns[0].value), hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()


@dataclass(frozen=True)
class Refusal:
    """The receiver's answer to a frame it did not take."""

    link: str | None
    reason: str
    error: str

    def json(self) -> str:
        return json.dumps({"link": self.link, "reason": self.reason, "error": self.error})


class PeerServer:
    """Receives the peer gateways' channels. PEER_OF names the pinned peer of one of the
    site's links (None: no such link); it is asked for every frame, so links added or removed
    while running are seen at once."""

    def __init__(self, config: PeerChannelConfig, peer_of: Callable[[str], str | None],
                 is_peer: Callable[[str], bool], listener: Listener) -> None:
        self.config = config
        self._peer_of = peer_of
        self._is_peer = is_peer
        self._listener = listener
        ctx = server_context(config.ca, config.cert, config.key)
        ctx.verify_mode = ssl.CERT_REQUIRED  # gateways always authenticate each other
        self._ssl = ctx
        self._runner: web.AppRunner | None = None
        #: False on a standby node of a pair: channels are refused (503) while it holds no
        #: link, never taken as "no such link" (which would hold the peer's messages back).
        self.accepting = True
        self._open: set[web.WebSocketResponse] = set()

    async def start(self, *, freebind: bool = False) -> None:
        """Listen; FREEBIND: also on an address this host does not have (yet)."""
        app = web.Application()
        app.router.add_get(CHANNEL_PATH, self._channel)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        where = self.config.listen
        if freebind:
            sock = _freebind_socket(where)
            await web.SockSite(self._runner, sock, ssl_context=self._ssl).start()
        else:
            await web.TCPSite(self._runner, where.host, where.port,
                              ssl_context=self._ssl).start()
        log.info("peer channel listening on %s", where)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def close_channels(self) -> None:
        """Close every channel peers opened to us (this node goes standby), in the
        background (a peer that is gone makes a close wait): their next send opens a new
        one, to whichever node holds the address then."""
        for ws in list(self._open):
            task = asyncio.create_task(ws.close(code=aiohttp.WSCloseCode.GOING_AWAY,
                                                message=b"standby"), name="peer-close")
            _closing.add(task)
            task.add_done_callback(_closing.discard)

    async def _channel(self, request: web.Request) -> web.StreamResponse:
        if not self.accepting:
            return web.json_response({"error": "standby: this node holds no link"},
                                     status=503)
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport \
            else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        who = peer_common_name(ssl_object.getpeercert() if ssl_object else None)
        if who is None or not self._is_peer(who):
            self._listener.rejected("", "wrong-peer", f"channel from {who!r}, the peer of"
                                    " none of this gateway's links")
            return web.json_response({"error": "no link with this gateway"}, status=403)
        cert_sha256 = hashlib.sha256(der or b"").digest()
        ws = web.WebSocketResponse(max_msg_size=MAX_FRAME_BYTES, heartbeat=HEARTBEAT)
        try:
            await ws.prepare(request)
        except ConnectionResetError:
            # The peer went away during the handshake (it restarts, or gave up): it will
            # connect again; nothing to answer and nothing to log as an error.
            log.info("peer %s closed its channel during the handshake", who)
            # Not the half-prepared WebSocket: aiohttp would finish it ("Call .prepare()
            # first"); a plain answer to the gone peer ends quietly.
            return web.Response(status=400)
        self._listener.channel_opened(who, inbound=True)
        self._open.add(ws)
        try:
            async for msg in ws:
                if msg.type not in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                    continue
                raw = msg.data if isinstance(msg.data, bytes) else msg.data.encode()
                refusal = self.receive(who, cert_sha256, raw)
                if refusal is not None:
                    await ws.send_str(refusal.json())
        finally:
            self._open.discard(ws)
        if ws.close_code not in (None, aiohttp.WSCloseCode.OK, aiohttp.WSCloseCode.GOING_AWAY):
            self._listener.rejected("", "malformed", f"channel from {who} closed with code"
                                    f" {ws.close_code} ({ws.exception() or 'no reason'})")
        return ws

    def receive(self, who: str, cert_sha256: bytes, raw: bytes) -> Refusal | None:
        """One frame from WHO: delivered to its link, or refused for that link alone."""
        end = raw.find(b"\n", 0, MAX_TAG_BYTES + 1)
        try:
            link = raw[:end].decode() if end > 0 else None
        except UnicodeDecodeError:
            link = None
        if link is None:
            self._listener.rejected("", "malformed", f"frame from {who} without a link tag")
            return Refusal(None, "malformed", "frame without a link tag (LINK, newline,"
                           " message)")
        peer = self._peer_of(link)
        if peer is None:
            self._listener.rejected("", "unknown-link", f"message for unknown link"
                                    f" {quote_remote(link)!r} from {who}")
            return Refusal(link, "unknown-link", "no such link")
        if peer != who:
            self._listener.rejected(link, "wrong-peer", f"certificate {who!r} is not the"
                                    f" pinned peer {peer!r}")
            return Refusal(link, "wrong-peer", "not this link's peer")
        try:
            message = decode(raw[end + 1:])
        except MessageError as e:
            self._listener.rejected(link, "malformed", str(e))
            return Refusal(link, "malformed", str(e))
        if message.link != link:  # another link's message never reaches this link's core
            self._listener.rejected(link, "wrong-link", f"message for link"
                                    f" {quote_remote(message.link)!r} tagged {link!r}")
            return Refusal(link, "wrong-link", "the message names another link")
        if not self._listener.deliver(link, message, cert_sha256):
            self._listener.rejected(link, "overloaded", f"{message.type} for epoch"
                                    f" {message.epoch} dropped: too many messages queued")
            return Refusal(link, "overloaded", "too many messages queued for this link")
        return None


class ChannelDown(ConnectionError):
    """The channel cannot be opened now (a recent attempt failed); the reason says why."""


class PeerChannel:
    """This gateway's channel to one peer gateway: one WebSocket for all its links."""

    def __init__(self, name: str, address: HostPort, session: aiohttp.ClientSession,
                 listener: Listener) -> None:
        self.name = name
        self.address = address
        self.url = f"https://{address}{CHANNEL_PATH}"
        self.links: set[str] = set()  # the links it carries: only these may be answered for
        self.connects = 0
        self._session = session
        self._listener = listener
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._retry_at = 0.0  # monotonic: no new connection before
        self._retry = CONNECT_RETRY
        self._down = ""  # why the last connection failed
        self._refused = ""  # ... when the peer refused it: it has no link with us
        self._unknown: dict[str, tuple[float, float]] = {}  # link -> (send again at, backoff)
        self._in_flight: dict[str, int] = {}
        self._opened_at = 0.0  # monotonic: when the connection was opened

    @property
    def connected(self) -> bool:
        return self._ws is not None and not self._ws.closed

    async def send(self, link: str, message: Message) -> bool:
        """Send LINK's MESSAGE; False when it was not sent (the core retransmits)."""
        held = self._unknown.get(link)
        if held is not None and time.monotonic() < held[0]:
            return False  # the peer does not have the link: wait (UNKNOWN_LINK_RETRY)
        if self._in_flight.get(link, 0) >= MAX_SENDS_IN_FLIGHT:
            return False
        self._in_flight[link] = self._in_flight.get(link, 0) + 1
        try:
            ws = await self._connected()
            await ws.send_bytes(frame(link, message))
            return True
        except (aiohttp.ClientError, TimeoutError, OSError, ConnectionError) as e:
            if isinstance(e, ChannelDown):  # said once, by the send that tried to connect
                log.debug("link %s: %s for epoch %d not sent: %s", link, message.type,
                          message.epoch, e)
            else:
                log.info("link %s: cannot send %s for epoch %d to %s at %s: %s", link,
                         message.type, message.epoch, self.name, self.address,
                         e or type(e).__name__)
                await self._drop()
            if self._refused:
                self._link_unknown(link, self._refused)
            return False
        finally:
            self._in_flight[link] -= 1
            if not self._in_flight[link]:
                del self._in_flight[link]

    def warm(self) -> None:
        """Open the connection now, in the background (a takeover: the first epoch's Offer
        then finds it open instead of waiting for a TLS handshake); a failure here is left
        to the first send, which tries again."""
        task = asyncio.create_task(self._warm(), name=f"peer-{self.name}-warm")
        _closing.add(task)
        task.add_done_callback(_closing.discard)

    async def _warm(self) -> bool:
        try:
            await self._connected()
        except Exception as e:  # the first send tries again, and says why
            log.debug("peer %s: opening the channel ahead failed: %s", self.name, e)
            return False
        return True

    def forget(self, link: str) -> None:
        """LINK left this channel: nothing of it is held back any more."""
        self._unknown.pop(link, None)

    def heard(self, link: str) -> None:
        """The peer sent a message for LINK: it has the link, send to it at once."""
        if self._unknown:
            self._unknown.pop(link, None)

    async def _connected(self) -> aiohttp.ClientWebSocketResponse:
        if self._ws is not None and not self._ws.closed:
            return self._ws
        async with self._lock:
            if self._ws is not None and not self._ws.closed:
                return self._ws
            if time.monotonic() < self._retry_at:
                raise ChannelDown(self._down)
            try:
                async with asyncio.timeout(CONNECT_TIMEOUT):
                    ws = await self._session.ws_connect(
                        self.url, server_hostname=self.name, heartbeat=HEARTBEAT,
                        max_msg_size=MAX_FRAME_BYTES)
            except Exception as e:
                self._failed(e)
                raise
            self._retry, self._retry_at, self._down, self._refused = CONNECT_RETRY, 0.0, "", ""
            self.connects += 1
            self._listener.channel_opened(self.name, inbound=False)
            log.info("peer channel to %s at %s open", self.name, self.address)
            self._ws, self._opened_at = ws, time.monotonic()
            self._reader = asyncio.create_task(self._read(ws), name=f"peer-{self.name}-read")
            return ws

    def _failed(self, e: Exception) -> None:
        """A connection attempt failed: back off, and remember whether the peer refused us."""
        self._retry_at = time.monotonic() + self._retry
        self._retry = min(self._retry * 2, CONNECT_RETRY_MAX)
        self._down = f"connecting to {self.name} at {self.address} failed:" \
                     f" {e or type(e).__name__}"
        status = e.status if isinstance(e, aiohttp.WSServerHandshakeError) else None
        self._refused = f"peer {self.name} has no link with this gateway (it refused the" \
                        f" channel: {status})" if status in (403, 404) else ""

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Drain the channel: pongs keep it alive; text frames say why a message was
        refused. A reader that fails closes the connection: the next send reopens it."""
        try:
            async for msg in ws:
                if msg.type is aiohttp.WSMsgType.TEXT:
                    self._refusal(msg.data)
        except Exception:
            log.error("peer channel to %s: reading failed", self.name, exc_info=True)
            await ws.close()

    def _refusal(self, text: str) -> None:
        try:
            answer: Any = json.loads(text)
            link, reason, error = (answer.get(k) for k in ("link", "reason", "error"))
        except (ValueError, AttributeError):
            link = reason = error = None
        if not isinstance(link, str) or link not in self.links:
            # Not about a link this peer is pinned for: nothing it may speak for.
            log.warning("peer %s refused a message: %s", self.name, quote_remote(str(text)))
            return
        if reason in LINK_UNKNOWN:
            self._link_unknown(link, f"peer {self.name} has no link {link} with this gateway"
                               f" ({quote_remote(str(reason))})")
            return
        log.warning("link %s: peer %s refused a message (%s): %s", link, self.name,
                    quote_remote(str(reason)), quote_remote(str(error)))

    def _link_unknown(self, link: str, detail: str) -> None:
        """The peer does not have LINK: hold its messages back, and tell its core, once per
        wait (refusals the peer repeats within it change nothing)."""
        now = time.monotonic()
        until, last = self._unknown.get(link, (0.0, 0.0))
        if now < until:
            return
        backoff = min(last * 2, UNKNOWN_LINK_RETRY_MAX) if last else UNKNOWN_LINK_RETRY
        self._unknown[link] = (now + backoff, backoff)
        self._listener.link_unknown(link, detail)

    async def _drop(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    def reopen_if_stale(self) -> bool:
        """The peer opened a new channel to us: let go of ours unless it is younger than
        STALE_AFTER_PEER_RECONNECT, at once, so the next send opens a fresh one (the old one
        is closed in the background: closing a dead connection waits). True if let go."""
        ws = self._ws
        if ws is None or ws.closed or time.monotonic() - self._opened_at < \
                STALE_AFTER_PEER_RECONNECT:
            return False
        log.info("peer %s opened a new channel: reopening ours to %s", self.name, self.address)
        self._ws, self._retry, self._retry_at = None, CONNECT_RETRY, 0.0
        closing = asyncio.create_task(ws.close(), name=f"peer-{self.name}-close-stale")
        _closing.add(closing)
        closing.add_done_callback(_closing.discard)
        return True

    async def close(self) -> None:
        await self._drop()
        if self._reader is not None:
            self._reader.cancel()


class PeerChannels:
    """The site's channels, one per peer gateway (its name and address), shared by every
    link with it; one TLS context and one HTTP session for all."""

    def __init__(self, config: PeerChannelConfig, listener: Listener) -> None:
        self._ssl = client_context(config.ca, config.cert, config.key)
        self._listener = listener
        self._session: aiohttp.ClientSession | None = None
        self.channels: dict[tuple[str, str], PeerChannel] = {}

    def channel(self, link: str, name: str, address: HostPort) -> PeerChannel:
        """The channel to the peer NAME at ADDRESS, now also carrying LINK."""
        if self._session is None:
            # No connection limit: each channel holds one connection, whatever their number.
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=0))
        key = (name, str(address))
        channel = self.channels.get(key)
        if channel is None:
            channel = self.channels[key] = PeerChannel(name, address, self._session,
                                                       self._listener)
        channel.links.add(link)
        return channel

    async def release(self, link: str, channel: PeerChannel) -> None:
        """LINK no longer uses CHANNEL (a reload removed it, or moved its peer): the channel
        is closed once no link uses it; the other links' connection stays as it is."""
        channel.links.discard(link)
        channel.forget(link)
        if not channel.links:
            self.channels.pop((channel.name, str(channel.address)), None)
            await channel.close()

    def peer_reconnected(self, name: str) -> None:
        """The peer NAME opened a new channel to us: our channels to it may be stale."""
        for channel in [c for c in self.channels.values() if c.name == name]:
            channel.reopen_if_stale()

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
        if self._session is not None:
            await self._session.close()


def _freebind_socket(where: HostPort) -> socket.socket:
    """A listening TCP socket on WHERE, bound with IP_FREEBIND."""
    family = socket.AF_INET6 if ":" in where.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6 if family == socket.AF_INET6 else socket.SOL_IP,
                        IP_FREEBIND, 1)
        sock.bind((where.host, where.port))
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
