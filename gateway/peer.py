"""The peer channel: protocol messages between gateways over mutual TLS.

Each link sends its messages over one WebSocket (`wss://PEER/v1/links/{link}/channel`),
opened on first use and reopened after a failure; one binary frame per message. Both ends
present certificates from the site CA; each pins the other's identity to the link's
configured peer name (the server checks the client certificate's commonName before the
upgrade, the client checks the server's certificate against that name). Delivery is best
effort: the rekey core retransmits, so a message that cannot be sent is logged and dropped.
A refused message is answered with a text frame `{"error": ...}`, which the sender logs.

Which links exist is asked of the daemon for every connection and every message (`pinned`),
never copied: a link a reload adds is accepted at once, one it removes is refused at once
(its open channel closed at its next message).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from common.text import quote_remote
from common.tlsctx import client_context, peer_common_name, server_context
from gateway.config import PeerChannelConfig, PeerConfig
from gateway.core.messages import MAX_MESSAGE_BYTES, Message, MessageError, decode, encode

log = logging.getLogger(__name__)

#: Opening the channel (TCP, TLS, upgrade) must not take longer; the core retransmits anyway.
CONNECT_TIMEOUT = 5.0
#: WebSocket pings: a silent dead connection is noticed within this and reopened.
HEARTBEAT = 20.0

Deliver = Callable[[str, Message, bytes], Awaitable[None]]
Reject = Callable[[str, str, str], None]
#: The pinned peer name of a link this site has now; None for a link it has not.
Pinned = Callable[[str], str | None]
#: A channel was opened for a link: (link, "in" when the peer opened it, "out" when we did).
Connected = Callable[[str, str], None]


def certificate_sha256(pem_path: Path) -> tuple[str, bytes]:
    """The commonName and SHA-256 (of the DER) of the certificate in PEM_PATH."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    cert = x509.load_pem_x509_certificate(pem_path.read_bytes())
    cns = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    if not cns:
        raise ValueError(f"{pem_path}: certificate has no commonName")
    return str(cns[0].value), hashlib.sha256(cert.public_bytes(Encoding.DER)).digest()


class PeerServer:
    """Receives messages for the site's links; PINNED names each link's pinned peer."""

    def __init__(self, config: PeerChannelConfig, pinned: Pinned, deliver: Deliver,
                 reject: Reject, connected: Connected | None = None) -> None:
        self.config = config
        self._pinned = pinned
        self._deliver = deliver
        self._reject = reject
        self._connected = connected
        ctx = server_context(config.ca, config.cert, config.key)
        ctx.verify_mode = ssl.CERT_REQUIRED  # gateways always authenticate each other
        self._ssl = ctx
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/links/{link}/channel", self._channel)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False,
                                     shutdown_timeout=1.0)
        await self._runner.setup()
        where = self.config.listen
        await web.TCPSite(self._runner, where.host, where.port, ssl_context=self._ssl).start()
        log.info("peer channel listening on %s", where)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _channel(self, request: web.Request) -> web.StreamResponse:
        link = request.match_info["link"]
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport \
            else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        who = peer_common_name(ssl_object.getpeercert() if ssl_object else None)
        pinned = self._pinned(link)
        if pinned is None:
            self._reject("", "unknown-link", f"channel for unknown link"
                         f" {quote_remote(link)!r} from {who}")
            return web.json_response({"error": "no such link"}, status=404)
        if who != pinned:
            self._reject(link, "wrong-peer", f"certificate {who!r} is not the pinned peer"
                         f" {pinned!r}")
            return web.json_response({"error": "not this link's peer"}, status=403)
        cert_sha256 = hashlib.sha256(der or b"").digest()
        ws = web.WebSocketResponse(max_msg_size=MAX_MESSAGE_BYTES, heartbeat=HEARTBEAT)
        try:
            await ws.prepare(request)
        except ConnectionResetError:
            # The peer went away during the handshake (it restarts, or gave up): it will
            # connect again; nothing to answer and nothing to log as an error.
            log.info("link %s: %s closed the channel during the handshake", link, who)
            # Not the half-prepared WebSocket: aiohttp would finish it ("Call .prepare()
            # first"); a plain answer to the gone peer ends quietly.
            return web.Response(status=400)
        if self._connected is not None:
            self._connected(link, "in")
        async for frame in ws:
            if frame.type not in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                continue
            if self._pinned(link) is None:  # a reload removed the link
                self._reject("", "unknown-link", f"message for removed link"
                             f" {quote_remote(link)!r} from {who}")
                await ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"no such link")
                break
            raw = frame.data if isinstance(frame.data, bytes) else frame.data.encode()
            try:
                message = decode(raw)
            except MessageError as e:
                self._reject(link, "malformed", str(e))
                await ws.send_str(json.dumps({"error": str(e)}))
                continue
            await self._deliver(link, message, cert_sha256)
        if ws.close_code not in (None, aiohttp.WSCloseCode.OK, aiohttp.WSCloseCode.GOING_AWAY):
            self._reject(link, "malformed", f"channel closed with code {ws.close_code}"
                         f" ({ws.exception() or 'no reason'})")
        return ws


class PeerClient:
    """Sends one link's messages to its peer over one WebSocket."""

    def __init__(self, link: str, channel: PeerChannelConfig, peer: PeerConfig,
                 connected: Connected | None = None) -> None:
        self.link = link
        self.peer = peer
        self._on_connect = connected
        self._ssl = client_context(channel.ca, channel.cert, channel.key)
        self._session: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self.url = f"https://{peer.address}/v1/links/{link}/channel"

    async def send(self, message: Message) -> bool:
        try:
            ws = await self._connected()
            await ws.send_bytes(encode(message))
            return True
        except (aiohttp.ClientError, TimeoutError, OSError, ConnectionError) as e:
            log.info("link %s: cannot send %s for epoch %d to %s at %s: %s", self.link,
                     message.type, message.epoch, self.peer.name, self.peer.address,
                     e or type(e).__name__)
            await self._drop()
            return False

    async def _connected(self) -> aiohttp.ClientWebSocketResponse:
        if self._ws is not None and not self._ws.closed:
            return self._ws
        async with self._lock:
            if self._ws is not None and not self._ws.closed:
                return self._ws
            if self._session is None:
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(ssl=self._ssl))
            async with asyncio.timeout(CONNECT_TIMEOUT):
                self._ws = await self._session.ws_connect(
                    self.url, server_hostname=self.peer.name, heartbeat=HEARTBEAT,
                    max_msg_size=MAX_MESSAGE_BYTES)
            self._reader = asyncio.create_task(self._read(self._ws))
            if self._on_connect is not None:
                self._on_connect(self.link, "out")
            return self._ws

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Drain the channel: pongs keep it alive; error frames say why a message was refused."""
        async for frame in ws:
            if frame.type is aiohttp.WSMsgType.TEXT:
                log.warning("link %s: peer %s refused a message: %s", self.link,
                            self.peer.name, quote_remote(frame.data))

    async def _drop(self) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    async def close(self) -> None:
        await self._drop()
        if self._reader is not None:
            self._reader.cancel()
        if self._session is not None:
            await self._session.close()
