"""A SKIP client over TLS-PSK (draft-cisco-skip-02): what a router asks its Key Provider.
Used by the demo's routers and the tests; one connection per request, as IOS XE does."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any
from urllib.parse import quote, urlencode

import h11

from common.psktls import ClientContext, PskError, PskStream

#: A whole request (connect, handshake, answer) ends within this.
REQUEST_TIMEOUT = 10.0
#: An answer larger than this is refused (SKIP's are under 1 kB).
MAX_ANSWER = 65536


class SkipClientError(Exception):
    """No answer: the connection, the TLS-PSK handshake or the HTTP exchange failed."""


class SkipClient:
    """HOST:PORT's Key Provider, as TLS's identity and key say. SOCKET: makes each
    connection's socket (e.g. in another network namespace); by default an ordinary one."""

    def __init__(self, host: str, port: int, tls: ClientContext, *,
                 socket_factory: Callable[[], socket.socket] | None = None) -> None:
        self.host, self.port, self.tls = host, port, tls
        self.socket_factory = socket_factory

    async def capabilities(self) -> tuple[int, dict[str, Any]]:
        return await self.get("/capabilities")

    async def new_key(self, remote: str, bits: int | None = None) -> tuple[int, dict[str, Any]]:
        query = {"remoteSystemID": remote} | ({} if bits is None else {"size": str(bits)})
        return await self.get("/key", query)

    async def key_by_id(self, remote: str, key_id: str) -> tuple[int, dict[str, Any]]:
        return await self.get(f"/key/{quote(key_id, safe='')}", {"remoteSystemID": remote})

    async def entropy(self, bits: int | None = None) -> tuple[int, dict[str, Any]]:
        return await self.get("/entropy", {} if bits is None else {"minentropy": str(bits)})

    async def get(self, path: str, query: dict[str, str] | None = None, *,
                  method: str = "GET") -> tuple[int, dict[str, Any]]:
        """The status and JSON body of METHOD PATH?QUERY; SkipClientError without one."""
        target = path + (f"?{urlencode(query)}" if query else "")
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await self._exchange(method, target)
        except (OSError, PskError, TimeoutError, h11.ProtocolError, ValueError) as e:
            raise SkipClientError(f"SKIP {method} {target} at {self.host}:{self.port}:"
                                  f" {str(e) or type(e).__name__}") from None

    async def _exchange(self, method: str, target: str) -> tuple[int, dict[str, Any]]:
        if self.socket_factory is None:
            reader, writer = await asyncio.open_connection(self.host, self.port)
        else:
            sock = self.socket_factory()
            try:
                sock.setblocking(False)
                await asyncio.get_running_loop().sock_connect(sock, (self.host, self.port))
            except BaseException:
                sock.close()
                raise
            reader, writer = await asyncio.open_connection(sock=sock)
        stream = PskStream(self.tls.context, reader, writer, server=False)
        try:
            await stream.handshake()
            http = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_ANSWER)
            await stream.write(http.send(h11.Request(
                method=method, target=target,
                headers=[("Host", f"{self.host}:{self.port}"), ("Connection", "close")]))
                + (http.send(h11.EndOfMessage()) or b""))
            status, body = 0, b""
            while True:
                event = http.next_event()
                if event is h11.NEED_DATA:
                    http.receive_data(await stream.read())
                elif isinstance(event, h11.Response):
                    status = event.status_code
                elif isinstance(event, h11.Data):
                    body += event.data
                    if len(body) > MAX_ANSWER:
                        raise ValueError(f"answer beyond {MAX_ANSWER} bytes")
                elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                    break
            answer = json.loads(body) if body else {}
            if not isinstance(answer, dict):
                raise ValueError("the answer is not a JSON object")
            return status, answer
        finally:
            await stream.close()
