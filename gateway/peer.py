"""The peer channel: protocol messages between gateways over mutual TLS.

Each message is one HTTPS POST to `/v1/links/{link}/messages` on the peer's listener. Both
ends present certificates from the site CA; each pins the other's identity to the link's
configured peer name (the server checks the client certificate's commonName, the client
checks the server's certificate against that name). Delivery is best effort: the rekey core
retransmits, so a failed POST is logged and dropped.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
from aiohttp import web

from gateway.config import PeerChannelConfig, PeerConfig
from gateway.core.messages import MAX_MESSAGE_BYTES, Message, MessageError, decode, encode
from kms.tlsctx import client_context, peer_common_name, server_context

log = logging.getLogger(__name__)

#: Per-message timeout: a peer that cannot take a message in this time is treated as lost;
#: the core's retransmission covers it.
SEND_TIMEOUT = 5.0

Deliver = Callable[[str, Message, bytes], Awaitable[None]]
Reject = Callable[[str, str, str], None]


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
    """Receives messages for the site's links; PEERS maps link name → pinned peer name."""

    def __init__(self, config: PeerChannelConfig, peers: dict[str, str], deliver: Deliver,
                 reject: Reject) -> None:
        self.config = config
        self.peers = peers
        self._deliver = deliver
        self._reject = reject
        ctx = server_context(config.ca, config.cert, config.key)
        ctx.verify_mode = ssl.CERT_REQUIRED  # gateways always authenticate each other
        self._ssl = ctx
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_MESSAGE_BYTES)
        app.router.add_post("/v1/links/{link}/messages", self._receive)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        where = self.config.listen
        await web.TCPSite(self._runner, where.host, where.port, ssl_context=self._ssl).start()
        log.info("peer channel listening on %s", where)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _receive(self, request: web.Request) -> web.Response:
        link = request.match_info["link"]
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport \
            else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
        who = peer_common_name(ssl_object.getpeercert() if ssl_object else None)
        if link not in self.peers:
            self._reject(link, "unknown-link", f"message for unknown link {link!r} from {who}")
            return web.json_response({"error": f"no link {link!r}"}, status=404)
        if who != self.peers[link]:
            self._reject(link, "wrong-peer", f"certificate {who!r} is not the pinned peer"
                         f" {self.peers[link]!r}")
            return web.json_response({"error": "not this link's peer"}, status=403)
        raw = await request.read()
        try:
            message = decode(raw)
        except MessageError as e:
            self._reject(link, "malformed", str(e))
            return web.json_response({"error": str(e)}, status=400)
        await self._deliver(link, message, hashlib.sha256(der or b"").digest())
        return web.Response(status=202)


class PeerClient:
    """Sends one link's messages to its peer."""

    def __init__(self, link: str, channel: PeerChannelConfig, peer: PeerConfig) -> None:
        self.link = link
        self.peer = peer
        self._ssl = client_context(channel.ca, channel.cert, channel.key)
        self._session: aiohttp.ClientSession | None = None
        self.url = f"https://{peer.address}/v1/links/{link}/messages"

    async def send(self, message: Message) -> bool:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=4),
                timeout=aiohttp.ClientTimeout(total=SEND_TIMEOUT))
        try:
            async with self._session.post(self.url, data=encode(message),
                                          server_hostname=self.peer.name,
                                          headers={"Content-Type": "application/json"}) as r:
                if r.status != 202:
                    body = (await r.text())[:200]
                    log.warning("link %s: peer %s refused %s for epoch %d: HTTP %d %s",
                                self.link, self.peer.name, message.type, message.epoch,
                                r.status, body)
                    return False
                return True
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            log.info("link %s: cannot reach peer %s at %s: %s", self.link, self.peer.name,
                     self.peer.address, type(e).__name__ if not str(e) else e)
            return False

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

